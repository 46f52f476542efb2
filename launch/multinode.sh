#!/bin/bash
# ddp_train on several machines without a scheduler: run this once on every machine.
#
#   launch/multinode.sh NODE_RANK NNODES HEAD_ADDR [PORT] [--config PATH] [key=value ...]
#
#   # on the head node (its address as others reach it: 10.0.0.1), and on a second machine:
#   launch/multinode.sh 0 2 10.0.0.1 29500 --config configs/cifar10_resnet18.yaml
#   launch/multinode.sh 1 2 10.0.0.1 29500 --config configs/cifar10_resnet18.yaml
#
# NODE_RANK is 0 on the head node (which hosts the rendezvous and global rank 0, the rank that
# writes the run folder: give every node the same out_dir on a shared file system, or read
# results on the head node) and 1..NNODES-1 elsewhere. PORT (default 29500) must be free on the
# head node and reachable from the others. The remaining arguments go to `python -m ddp_train`;
# every node must get the same ones.
set -euo pipefail

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[ $# -ge 3 ] || usage
NODE_RANK="$1"
NNODES="$2"
HEAD_ADDR="$3"
shift 3
PORT=29500
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
    PORT="$1"
    shift
fi
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NNODES" =~ ^[0-9]+$ ]] || usage
[ "$NODE_RANK" -lt "$NNODES" ] || { echo "multinode.sh: NODE_RANK $NODE_RANK must be below NNODES $NNODES" >&2; exit 2; }

# PYTHON, NPROC_PER_NODE, CPU_PROCS, TORCHRUN_ARGS: see common.sh.
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# static: global ranks follow NODE_RANK (node 0 holds rank 0); c10d: elastic rendezvous hosted on
# the head node, ranks in order of arrival (NODE_RANK is then only a label).
RDZV_BACKEND="${RDZV_BACKEND:-static}"
# c10d only: a name shared by the nodes of one run (a second run on the same port needs another).
RDZV_ID="${RDZV_ID:-ddp_train}"

case "$RDZV_BACKEND" in
    static)
        RDZV=(--node-rank="$NODE_RANK" --master-addr="$HEAD_ADDR" --master-port="$PORT") ;;
    c10d)
        RDZV=(--rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$RDZV_ID") ;;
    *)
        echo "multinode.sh: RDZV_BACKEND must be static or c10d, got '$RDZV_BACKEND'" >&2
        exit 2 ;;
esac

echo "[multinode.sh] node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es), rendezvous $RDZV_BACKEND on $HEAD_ADDR:$PORT"
# shellcheck disable=SC2206  # a user-supplied word list
EXTRA=($TORCHRUN_ARGS)
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${RDZV[@]}" \
    "${EXTRA[@]}" -m ddp_train "$@"
