#!/usr/bin/env bash
# Times the main command of README.md: "Quick start" (the default config, 2 ranks) from start to final test metrics,
# RUNS times, and prints the figures that go into bench/RESULTS.md, labelled with the CPU kind.
#
#   bash bench/default_run.sh [RUNS] [key=value ...]
#   AS_AVX2=1 bash bench/default_run.sh 3     # restrict torch's kernels to AVX2 (and oneDNN's ISA),
#                                             # as on a CPU without AVX-512 or native bf16
#
# AS_AVX2 approximates such a CPU on a newer one (the same kernels, but this CPU's clock and
# caches): `precision: auto` then picks fp32, as it does there. It is a proxy, not the real thing.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
shift || true
python=${PYTHON:-.venv/bin/python}
kind=$(grep -o -m1 -E 'amx_bf16|avx512_bf16|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
extra=()
if [[ ${AS_AVX2:-0} == 1 ]]; then
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    extra=(train.precision=fp32)  # auto reads /proc/cpuinfo, which still lists bf16
    kind="$kind(restricted to AVX2 kernels: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"
fi
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; CPU flags: $kind"
for ((i = 1; i <= runs; i++)); do
    out=$(mktemp -d)
    start=$(date +%s.%N)
    "$python" -m torch.distributed.run --nproc_per_node=2 -m ddp_train out_dir="$out" run_name=bench \
        "${extra[@]}" "$@" >"$out/log" 2>&1 || { tail -20 "$out/log"; exit 1; }
    end=$(date +%s.%N)
    "$python" - "$out/bench/metrics.json" "$start" "$end" "$i" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
wall = float(sys.argv[3]) - float(sys.argv[2])
epochs = ", ".join(f"{h['valid_acc']:.4f}" for h in m["history"])
speed = ", ".join(f"{h['img_per_s']:.0f}" for h in m["history"])
print(f"run {sys.argv[4]}: wall {wall:.1f} s | valid acc by epoch {epochs} | test acc {m['test']['acc']:.4f} "
      f"over {m['test']['count']} | img/s {speed}")
PY
    rm -rf "$out"
done
