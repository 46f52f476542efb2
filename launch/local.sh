#!/bin/bash
# ddp_train on one machine: torchrun --standalone with one worker per GPU, or 2 CPU workers.
#
#   launch/local.sh [--config PATH] [key=value ...]
#   NPROC_PER_NODE=4 launch/local.sh --config configs/cifar10_resnet18.yaml train.epochs=5
#
# The arguments go to `python -m ddp_train` unchanged. Settings are the environment variables
# below (each has a default).
set -euo pipefail

# PYTHON, NPROC_PER_NODE, CPU_PROCS, TORCHRUN_ARGS: see common.sh.
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# shellcheck disable=SC2206  # a user-supplied word list
EXTRA=($TORCHRUN_ARGS)
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC_PER_NODE" "${EXTRA[@]}" \
    -m ddp_train "$@"
