#!/bin/bash
# ddp_train on one machine: torchrun --standalone with one worker per GPU, or 2 CPU workers.
#
#   launch/local.sh [--config PATH] [key=value ...]
#   NPROC_PER_NODE=4 launch/local.sh --config configs/cifar10_resnet18.yaml train.epochs=5
#
# The arguments go to `python -m ddp_train` unchanged. Settings are the environment variables
# below (each has a default).
set -euo pipefail

# Python with ddp_train installed. Default: the project's .venv next to this script, else python3.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -x "$HERE/../.venv/bin/python" ]; then
    PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
else
    PYTHON="${PYTHON:-python3}"
fi
# Worker processes. Empty: one per visible GPU (torch.cuda.device_count(), which honours
# CUDA_VISIBLE_DEVICES); without GPUs, CPU_PROCS.
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

# shellcheck disable=SC2206  # a user-supplied word list
EXTRA=($TORCHRUN_ARGS)
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC_PER_NODE" "${EXTRA[@]}" \
    -m ddp_train "$@"
