#!/usr/bin/env bash
# Times the README's main command (the default config, 2 ranks) from start to final test metrics,
# and prints the figures that go into bench/RESULTS.md. Usage: bash bench/default_run.sh [NPROC]
set -euo pipefail
cd "$(dirname "$0")/.."
nproc_per_node=${1:-2}
out=$(mktemp -d)
start=$(date +%s.%N)
.venv/bin/torchrun --nproc_per_node="$nproc_per_node" -m ddp_train out_dir="$out" run_name=bench 2>/dev/null
end=$(date +%s.%N)
.venv/bin/python - "$out/bench/metrics.json" "$start" "$end" <<'PY'
import json, platform, sys, os
m = json.load(open(sys.argv[1]))
wall = float(sys.argv[3]) - float(sys.argv[2])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"machine: {cpu}, {os.cpu_count()} cores")
print(f"wall clock: {wall:.1f} s")
for h in m["history"]:
    print(f"epoch {h['epoch']}: valid_acc {h['valid_acc']:.4f}, {h['img_per_s']:.0f} img/s, {h['epoch_s']:.1f} s")
print(f"test acc {m['test']['acc']:.4f} over {m['test']['count']} images")
PY
rm -rf "$out"
