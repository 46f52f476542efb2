#!/usr/bin/env bash
# Every GPU check of issue 5 in one run on one GPU (meant for an H200), a summary table last.
#
#   bash bench/gpu_check.sh           # GPU mode: needs CUDA; about 6-7 minutes, never past the budget
#   bash bench/gpu_check.sh --tiny    # the same steps on the CPU at tiny sizes (1-3 minutes), to prove the script
#
# Steps: training throughput (ResNet-18, 32x32x3 synthetic, bf16, device-resident data with
# augmentation, global batch 1024; then 2048 and torch.compile while the time budget allows), the
# DataLoader path, the notebook loop baseline, the Fashion-MNIST fast recipe (configs/
# fashion_mnist_fast.yaml) on 3 seeds timed from command start to exit, and an exact-resume check
# in fp16 (fp32 in tiny mode: fp16 is refused on the CPU). Each step has its own timeout; a failed
# step is reported as FAILED with the tail of its log and the others still run; the exit code is 1
# if any check failed, 2 for a bad argument or a missing GPU.
#
# Environment: PYTHON (default python3), FASHION_ROOT (default data/fashion-mnist in the checkout
# when present, else /usr/share/datasets/fashion-mnist), GPU_CHECK_BUDGET_S (GPU mode: no step
# starts or runs past this many seconds from the start; default 450), GPU_CHECK_LOGS=DIR (copy
# every step's log and JSON, and each run's metrics.json and config.yaml, into DIR at the end;
# checkpoints are not copied), GPU_CHECK_KEEP=1 (keep the whole temporary folder). The checkout is
# put on PYTHONPATH: the project need not be installed.
set -uo pipefail

mode=gpu
case "${1:-}" in
    "") ;;
    --tiny) mode=tiny ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bash bench/gpu_check.sh [--tiny]" >&2; exit 2 ;;
esac
if (($# > 1)); then
    echo "usage: bash bench/gpu_check.sh [--tiny]" >&2
    exit 2
fi

PYTHON=${PYTHON:-python3}
if [[ $PYTHON == */* ]]; then  # a relative path keeps meaning what it meant where the script was started
    PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
fi
if [[ -n ${GPU_CHECK_LOGS:-} && $GPU_CHECK_LOGS != /* ]]; then
    GPU_CHECK_LOGS=$PWD/$GPU_CHECK_LOGS
fi
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root" || exit 2
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ -z ${FASHION_ROOT:-} ]]; then
    if [[ -d data/fashion-mnist ]]; then
        FASHION_ROOT=$repo_root/data/fashion-mnist
    else
        FASHION_ROOT=/usr/share/datasets/fashion-mnist
    fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
child=""
cleanup() {
    local run
    if [[ -n ${GPU_CHECK_LOGS:-} ]] && mkdir -p "$GPU_CHECK_LOGS"; then
        cp "$work"/*.log "$work"/*.json "$work"/*.jsonl "$GPU_CHECK_LOGS"/ 2>/dev/null
        for run in "$work"/runs/*/; do
            [[ -d $run ]] || continue
            mkdir -p "$GPU_CHECK_LOGS/runs/$(basename "$run")"
            cp "$run"metrics.json "$run"config.yaml "$GPU_CHECK_LOGS/runs/$(basename "$run")/" 2>/dev/null
        done
    fi
    if [[ ${GPU_CHECK_KEEP:-0} == 1 ]]; then
        echo "(kept $work)" >&2
    else
        rm -rf "$work"
    fi
}
on_signal() {
    echo "gpu_check: interrupted; stopping the running step" >&2
    if [[ -n $child ]]; then
        kill -TERM "$child" 2>/dev/null  # timeout passes it on to the step's whole process group
        wait "$child" 2>/dev/null
    fi
    exit 130
}
trap cleanup EXIT
trap on_signal INT TERM

# ---------------------------------------------------------------------------------------------
# Sizes per mode.
if [[ $mode == gpu ]]; then
    budget=${GPU_CHECK_BUDGET_S:-450}
    prec=bf16
    batch=1024; batch2=2048
    tp_size=(data.synthetic_size=50000)
    tp_steps=(--steps 30 --warmup 10); tp2_steps=(--steps 15 --warmup 5); dl_steps=(--steps 20 --warmup 5)
    tp_limit=150; compile_limit=240
    dl_workers=8
    nb_args=(--steps 30 --batch-size 64 --workers 2); nb_limit=150
    seeds=(0 1 2)
    fashion_extra=(); fashion_limit=120; fashion_test_count=10000
    resume_prec=fp16
    resume_cfg=(data.synthetic_size=2000 train.batch_size=256 train.precision=fp16 train.deterministic=true)
    resume_limit=120
else
    budget=${GPU_CHECK_BUDGET_S:-900}
    prec=auto
    batch=32; batch2=64
    tp_size=(data.synthetic_size=400)
    tp_steps=(--steps 3 --warmup 1); tp2_steps=(--steps 3 --warmup 1); dl_steps=(--steps 3 --warmup 1)
    tp_limit=120; compile_limit=0
    dl_workers=0
    nb_args=(--steps 3 --batch-size 16 --workers 0); nb_limit=120
    seeds=(0 1)
    fashion_extra=(data.subset=600 train.epochs=1 train.batch_size=64 model.name=resnet18)
    fashion_limit=180; fashion_test_count=600
    resume_prec=fp32
    resume_cfg=(data.synthetic_size=200 train.batch_size=32 train.precision=fp32)
    resume_limit=120
fi
nb_batch=${nb_args[3]}; nb_workers=${nb_args[5]}

# The table, in this order; every row starts as "not run".
r_tp="throughput $prec resident b$batch"
r_tp2="throughput $prec resident b$batch2"
r_compile="throughput $prec resident b$batch compile"
r_dl="throughput $prec dataloader b$batch w$dl_workers"
r_nb="notebook loop b$nb_batch w$nb_workers"
r_speedup="resident b$batch / notebook loop"
r_fashion_mean="fashion fast mean (${#seeds[@]} seeds)"
r_resume="$resume_prec resume exact"
[[ $mode == tiny ]] && r_resume="$resume_prec resume exact (tiny: no CPU fp16)"
rows=("$r_tp" "$r_tp2" "$r_compile" "$r_dl" "$r_nb" "$r_speedup")
for s in "${seeds[@]}"; do rows+=("fashion fast seed $s"); done
rows+=("$r_fashion_mean" "$r_resume")
declare -A result=()
for r in "${rows[@]}"; do result[$r]="not run"; done
failed=()

set_row() { result[$1]=$2; }
fail_row() {  # NAME REASON
    result[$1]="FAILED ($2)"
    failed+=("$1")
}

# ---------------------------------------------------------------------------------------------
# Python helpers (parsing and checks), one inline program: summarize KIND ARGS...
summarize() {
    "$PYTHON" - "$@" <<'PY'
import json
import re
import statistics
import sys
from pathlib import Path

kind, *args = sys.argv[1:]


def fail(message):
    print(message)
    sys.exit(1)


if kind == "throughput":  # JSON [key=value expected ...] [target]
    path, *checks = args
    f = json.loads(Path(path).read_text())
    target = "target" in checks
    for check in (c for c in checks if "=" in c):
        key, want = check.split("=", 1)
        got = str(f[key]) if key != "device" else str(f[key]).split(":")[0]
        if got != want:
            fail(f"{key} is {got}, expected {want}")
    row = (f"{f['img_per_s']:.0f} img/s, MFU {100 * f['mfu']:.1f}%, {f['precision']}, "
           f"data {f['data_ms']:.1f} / compute {f['compute_ms']:.1f} ms per step")
    if target:
        met = f["img_per_s"] >= 70000 and f["mfu"] >= 0.30
        row += f" [target 70000 img/s, 30% MFU: {'met' if met else 'MISSED'}]"
    print(row)

elif kind == "notebook":  # LOG
    found = re.findall(r"notebook loop: ([0-9.]+) img/s", Path(args[0]).read_text())
    if not found:
        fail("no 'notebook loop: ... img/s' line in its output")
    print(f"{float(found[-1]):.1f} img/s")

elif kind == "speedup":  # THROUGHPUT_JSON NOTEBOOK_LOG
    fast = json.loads(Path(args[0]).read_text())["img_per_s"]
    slow = float(re.findall(r"notebook loop: ([0-9.]+) img/s", Path(args[1]).read_text())[-1])
    print(f"{fast / slow:.1f}x")

elif kind == "fashion":  # RUN_DIR WALL_MS EXPECTED_TEST_COUNT RECORDS_JSONL
    run, wall_ms, count, records = Path(args[0]), int(args[1]), int(args[2]), Path(args[3])
    m = json.loads((run / "metrics.json").read_text())
    import yaml
    epochs = yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"]
    test, history = m["test"], m["history"]
    if len(history) != epochs:
        fail(f"{len(history)} epochs in metrics.json, the config has {epochs}")
    if test["count"] != count or test["weights"] != "final":
        fail(f"test count {test['count']} (expected {count}), weights {test['weights']} (expected final)")
    wall, in_epochs = wall_ms / 1000, sum(h["epoch_s"] for h in history)
    with records.open("a") as out:
        out.write(json.dumps({"acc": test["acc"], "wall": wall}) + "\n")
    print(f"acc {test['acc']:.4f}, {wall:.1f} s ({epochs} epochs: {in_epochs:.1f} s, "
          f"last {history[-1]['img_per_s']:.0f} img/s)")

elif kind == "fashion_mean":  # RECORDS_JSONL SEEDS [target]
    path, seeds = Path(args[0]), int(args[1])
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not recs:
        fail("no seed finished")

    def spread(values, fmt):
        sd = fmt.format(statistics.stdev(values)) if len(values) > 1 else "n/a"
        return (f"{fmt.format(statistics.mean(values))} +- {sd} "
                f"(min {fmt.format(min(values))}, max {fmt.format(max(values))})")

    accs, walls = [r["acc"] for r in recs], [r["wall"] for r in recs]
    row = f"acc {spread(accs, '{:.4f}')}, wall s {spread(walls, '{:.1f}')}"
    if len(recs) < seeds:
        row += f" [only {len(recs)} of {seeds} seeds]"
    if "target" in args[2:]:
        acc_ok, wall_ok = statistics.mean(accs) >= 0.95, max(walls) < 45
        row += (f" [targets: mean acc >= 0.95 {'met' if acc_ok else 'MISSED'}, "
                f"every wall < 45 s {'met' if wall_ok else 'MISSED'}]")
    print(row)

elif kind == "resume":  # FULL_RUN RESUMED_RUN RESUMED_LOG EXPECT_SCALER(0/1)
    import torch

    a_dir, b_dir, b_log, want_scaler = Path(args[0]), Path(args[1]), Path(args[2]), args[3] == "1"
    log = b_log.read_text()
    if "resumed from" not in log:
        fail("the second run did not say 'resumed from'")
    a = torch.load(a_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    b = torch.load(b_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    notes = [f"{a['global_step']} steps, resumed at step 3"]
    if a["global_step"] != b["global_step"]:
        fail(f"no (global step {a['global_step']} vs {b['global_step']})")
    if want_scaler:
        scaler = a.get("scaler")
        if not isinstance(scaler, dict) or "scale" not in scaler:
            fail(f"no (last.pt's scaler is {type(scaler).__name__}, not a dict with 'scale')")
        notes.append(f"scaler scale {float(scaler['scale']):g}")
    ma, mb = a["model"], b["model"]
    if ma.keys() != mb.keys():
        fail("no (different model keys)")
    differ = [k for k in ma if not torch.equal(ma[k], mb[k])]
    notes.append(f"{len(ma) - len(differ)}/{len(ma)} tensors equal")
    warned = "does not have a deterministic implementation" in log
    if warned:
        notes.append("a nondeterministic op warned")
    if differ:
        worst = max(float((ma[k].double() - mb[k].double()).abs().max()) for k in differ)
        fail(f"no ({', '.join(notes)}; max abs diff {worst:.3g}, first {differ[0]})")
    print(f"yes ({', '.join(notes)})")

else:
    fail(f"unknown summary {kind}")
PY
}

# ---------------------------------------------------------------------------------------------
# Running steps.
now_ms() { date +%s%3N; }
step_no=0
step_ms=0
step_error=""

# run_step NAME LIMIT_S LOG CMD...: runs CMD under timeout, output into LOG; on failure prints the
# log's tail and sets step_error. step_ms: wall clock of CMD in ms. LIMIT_S 0: not run (budget spent).
run_step() {
    local name=$1 limit=$2 log=$3 start rc
    shift 3
    step_no=$((step_no + 1))
    if ((limit <= 0)); then  # (timeout 0 would mean no limit at all)
        step_error="skipped: time budget of $budget s spent"
        printf '\n[%4d s] step %d: %s: %s\n' "$SECONDS" "$step_no" "$name" "$step_error"
        return 1
    fi
    printf '\n[%4d s] step %d: %s (timeout %d s)\n' "$SECONDS" "$step_no" "$name" "$limit"
    start=$(now_ms)
    timeout -k 15 "$limit" "$@" >"$log" 2>&1 &
    child=$!
    wait "$child"
    rc=$?
    child=""
    step_ms=$(($(now_ms) - start))
    if ((rc == 0)); then
        printf '  ok, %d.%d s\n' $((step_ms / 1000)) $((step_ms % 1000 / 100))
        return 0
    fi
    case $rc in
        124 | 137) step_error="timed out after $limit s" ;;
        *) step_error="exit code $rc" ;;
    esac
    printf '  FAILED: %s; the end of its log:\n' "$step_error"
    tail -n 40 "$log" | sed 's/^/  | /'
    return 1
}

# show LOG [N]: a successful step's figures, indented.
show() { tail -n "${2:-12}" "$1" | sed 's/^/  | /'; }

# limit_for WANTED MINIMUM: WANTED seconds capped by what the budget has left; 0 when under MINIMUM.
limit_for() {
    local left=$((budget - SECONDS))
    ((left > $1)) && left=$1
    ((left < $2)) && left=0
    echo "$left"
}

# throughput ROW LIMIT TAG CHECKS... -- STEPS... -- OVERRIDES...: bench/throughput.py, JSON into
# $work/TAG.json. CHECKS: key=value the JSON must hold, "target" (issue 5's), "optional" (a step
# the time budget may skip without failing the run).
throughput() {
    local row=$1 limit=$2 tag=$3 checks=() steps=() overrides=() out optional=0
    shift 3
    while [[ $1 != -- ]]; do
        if [[ $1 == optional ]]; then optional=1; else checks+=("$1"); fi
        shift
    done
    shift
    while [[ $1 != -- ]]; do steps+=("$1"); shift; done
    shift
    overrides=("$@")
    if ((limit == 0 && optional)); then
        set_row "$row" "skipped (time budget of $budget s spent)"
        return
    fi
    if run_step "$row" "$limit" "$work/$tag.log" \
        "$PYTHON" bench/throughput.py "${steps[@]}" --json "$work/$tag.json" "${overrides[@]}"; then
        show "$work/$tag.log" 9
        if out=$(summarize throughput "$work/$tag.json" "${checks[@]}" 2>&1); then
            set_row "$row" "$out"
        else
            echo "  check failed: $out"
            fail_row "$row" "${out##*$'\n'}"
        fi
    else
        fail_row "$row" "$step_error"
    fi
}

# ---------------------------------------------------------------------------------------------
# Header.
echo "== gpu_check ($mode mode) =="
echo "date: $(date '+%Y-%m-%d %H:%M:%S %Z')"
echo "host: $(uname -n), $(nproc --all) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo)"
echo "cpu: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | paste -sd ';' -)"
fi
echo "checkout: $repo_root, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
     "($(git status --porcelain 2>/dev/null | wc -l) changed files)"
echo "fashion-mnist: $FASHION_ROOT; work folder: $work; budget: $budget s"
if ! "$PYTHON" - "$mode" <<'PY'; then
import platform
import sys

import torch
import torchvision

print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch sees: {torch.cuda.device_count()} GPU(s), {p.name}, {p.total_memory / 2**30:.1f} GiB, "
          f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
elif sys.argv[1] == "gpu":
    print("gpu_check: torch sees no CUDA device; GPU mode needs one (bash bench/gpu_check.sh --tiny runs on the CPU)",
          file=sys.stderr)
    sys.exit(2)
else:
    print(f"torch sees no GPU: tiny mode on the CPU, {torch.get_num_threads()} threads")
PY
    exit 2
fi

# ---------------------------------------------------------------------------------------------
# 1. Throughput, the issue's target: bf16, device-resident data with augmentation, batch 1024.
tp_common=(data.augment=true "${tp_size[@]}" "train.precision=$prec")
if [[ $mode == gpu ]]; then
    checks=(device=cuda precision=bf16 device_resident=True)
    target=(target)
else
    checks=(device_resident=True)
    target=()
fi
throughput "$r_tp" "$(limit_for "$tp_limit" 30)" tp "${checks[@]}" "${target[@]}" -- "${tp_steps[@]}" -- \
    "${tp_common[@]}" data.device_resident=true "train.batch_size=$batch"

# 2. The DataLoader path for comparison.
dl_checks=("${checks[@]/device_resident=True/device_resident=False}")
throughput "$r_dl" "$(limit_for "$tp_limit" 30)" dl "${dl_checks[@]}" -- "${dl_steps[@]}" -- \
    "${tp_common[@]}" data.device_resident=false "data.num_workers=$dl_workers" "train.batch_size=$batch"

# 3. The notebook loop baseline.
if run_step "$r_nb" "$(limit_for "$nb_limit" 30)" "$work/notebook.log" "$PYTHON" bench/notebook_loop.py "${nb_args[@]}"; then
    show "$work/notebook.log" 3
    if out=$(summarize notebook "$work/notebook.log" 2>&1); then set_row "$r_nb" "$out"; else fail_row "$r_nb" "$out"; fi
else
    fail_row "$r_nb" "$step_error"
fi
if [[ -f $work/tp.json && ${result[$r_nb]} != FAILED* && ${result[$r_nb]} != "not run" ]]; then
    out=$(summarize speedup "$work/tp.json" "$work/notebook.log" 2>&1) && set_row "$r_speedup" "$out"
else
    set_row "$r_speedup" "n/a (a figure is missing)"
fi

# 4. The Fashion-MNIST fast recipe on several seeds, each timed from command start to exit.
fashion_target=()
[[ $mode == gpu ]] && fashion_target=(target)
for s in "${seeds[@]}"; do
    row="fashion fast seed $s"
    if run_step "$row" "$(limit_for "$fashion_limit" 30)" "$work/fashion-$s.log" "$PYTHON" -m ddp_train --config configs/fashion_mnist_fast.yaml \
        "data.root=$FASHION_ROOT" "${fashion_extra[@]}" "out_dir=$work/runs" "run_name=fashion-seed$s" "train.seed=$s"; then
        grep -E '^(epoch|test \|)' "$work/fashion-$s.log" | tail -n 2 | sed 's/^/  | /'
        if out=$(summarize fashion "$work/runs/fashion-seed$s" "$step_ms" "$fashion_test_count" "$work/fashion.jsonl" 2>&1); then
            set_row "$row" "$out"
        else
            echo "  check failed: $out"
            fail_row "$row" "${out##*$'\n'}"
        fi
    else
        fail_row "$row" "$step_error"
    fi
done
if out=$(summarize fashion_mean "$work/fashion.jsonl" "${#seeds[@]}" "${fashion_target[@]}" 2>&1); then
    set_row "$r_fashion_mean" "$out"
else
    fail_row "$r_fashion_mean" "${out##*$'\n'}"
fi

# 5. Exact resume (fp16 and its grad scaler on the GPU; fp32 in tiny mode): a full run that
# checkpoints every 3 steps, and a second one resumed from step 3, must end with equal weights.
# On the GPU train.deterministic=true, else cudnn's autotuner may pick other kernels in the second
# process and the comparison would say nothing about resuming.
resume_common=("${resume_cfg[@]}" data.num_workers=0 train.epochs=2 checkpoint.every_steps=3 checkpoint.keep=100
               train.seed=1 "out_dir=$work/runs")
[[ $mode == tiny ]] && echo && echo "tiny mode: the resume check runs in fp32 (fp16 on the CPU is refused by design)"
if run_step "$r_resume: full run" "$(limit_for "$resume_limit" 30)" "$work/resume-a.log" \
        "$PYTHON" -m ddp_train "${resume_common[@]}" run_name=resume-a &&
    run_step "$r_resume: resumed from step 3" "$(limit_for "$resume_limit" 30)" "$work/resume-b.log" \
        "$PYTHON" -m ddp_train "${resume_common[@]}" run_name=resume-b \
        "resume=$work/runs/resume-a/checkpoints/step-00000003.pt"; then
    show "$work/resume-b.log" 2
    want_scaler=0
    [[ $resume_prec == fp16 ]] && want_scaler=1
    if out=$(summarize resume "$work/runs/resume-a" "$work/runs/resume-b" "$work/resume-b.log" "$want_scaler" 2>&1); then
        set_row "$r_resume" "$out"
    else
        echo "  check: $out"
        result[$r_resume]=${out##*$'\n'}
        failed+=("$r_resume")
    fi
else
    fail_row "$r_resume" "$step_error"
fi

# 6. While the budget allows: the doubled batch, then torch.compile (slow to compile).
throughput "$r_tp2" "$(limit_for "$tp_limit" 40)" tp2 "${checks[@]}" "${target[@]}" optional -- "${tp2_steps[@]}" -- \
    "${tp_common[@]}" data.device_resident=true "train.batch_size=$batch2"
if [[ $mode == tiny ]]; then
    set_row "$r_compile" "skipped in tiny mode"
else
    throughput "$r_compile" "$(limit_for "$compile_limit" 90)" compile "${checks[@]}" "${target[@]}" compile=True optional -- \
        "${tp_steps[@]}" -- "${tp_common[@]}" data.device_resident=true "train.batch_size=$batch" train.compile=true
fi

# ---------------------------------------------------------------------------------------------
# The summary table, last.
if ((${#failed[@]})); then
    overall="${#failed[@]} FAILED (the rows above; each step's log tail is printed above the table)"
else
    overall="ok"
fi
echo
echo "== summary ($mode mode, $SECONDS s) =="
printf '%-44s %s\n' check result
for r in "${rows[@]}"; do
    printf '%-44s %s\n' "$r" "${result[$r]}"
done
printf '%-44s %s\n' overall "$overall"
((${#failed[@]} == 0))
