# Shared by local.sh and multinode.sh (sourced, not run): the Python to use and how many workers.
# shellcheck shell=bash

# Python with ddp_train installed. Default: the project's .venv next to these scripts, else python3.
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -x "$LAUNCH_DIR/../.venv/bin/python" ]; then
    PYTHON="${PYTHON:-$LAUNCH_DIR/../.venv/bin/python}"
else
    PYTHON="${PYTHON:-python3}"
fi
# Worker processes on this machine. Empty: one per visible GPU (torch.cuda.device_count(), which
# honours CUDA_VISIBLE_DEVICES); without GPUs, CPU_PROCS.
NPROC_PER_NODE="${NPROC_PER_NODE:-}"
# CPU-only machines: worker processes (at most the number of cores); the cores are shared out
# between them as OMP_NUM_THREADS unless that is set already.
CPU_PROCS="${CPU_PROCS:-2}"
# Extra torchrun arguments, e.g. "--log-dir=logs --redirects=3".
TORCHRUN_ARGS="${TORCHRUN_ARGS:-}"

if [ -z "$NPROC_PER_NODE" ]; then
    gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    if [ "$gpus" -gt 0 ]; then
        NPROC_PER_NODE="$gpus"
    else
        cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc alone obeys OMP_NUM_THREADS
        NPROC_PER_NODE=$(( CPU_PROCS < cores ? CPU_PROCS : cores ))
        [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
        threads=$(( cores / NPROC_PER_NODE ))
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
    fi
fi
