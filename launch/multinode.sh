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
# NNODES may be MIN:MAX (e.g. 1:2, with RDZV_BACKEND=c10d or etcd-v2): an elastic job that goes on
# when nodes are lost (down to MIN) and takes in nodes that join later (up to MAX), resuming each
# time from the newest checkpoint with the same global batch (docs/launching.md: "Elastic training").
set -euo pipefail

# True when HEAD_ADDR ($1) is a loopback address or localhost. A name that resolves here to loopback
# addresses only is refused on the other nodes; the head node ($2 = 0) accepts it, since many
# systems map their own host name to 127.0.1.1 in /etc/hosts while the other machines resolve it
# to a real address.
head_is_loopback() {
    case "$(tr '[:upper:]' '[:lower:]' <<<"$1")" in  # host names ignore case
        127.*|::1|\[::1\]|0:0:0:0:0:0:0:1|localhost|localhost.|*.localhost) return 0 ;;
    esac
    [ "$2" != 0 ] || return 1
    local addrs
    addrs="$(getent ahosts "$1" 2>/dev/null | awk '{print $1}' | sort -u)" || return 1
    [ -n "$addrs" ] && ! grep -qvE '^(127\.|::1$)' <<<"$addrs"
}

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
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
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]] || usage
MIN_NODES="${NNODES%%:*}"  # N, or MIN and MAX of MIN:MAX
MAX_NODES="${NNODES##*:}"
if [ "$MIN_NODES" -lt 1 ] || [ "$MIN_NODES" -gt "$MAX_NODES" ]; then
    echo "multinode.sh: NNODES $NNODES: expected N >= 1 or MIN:MAX with 1 <= MIN <= MAX" >&2
    exit 2
fi
[ "$NODE_RANK" -lt "$MAX_NODES" ] || { echo "multinode.sh: NODE_RANK $NODE_RANK must be below NNODES $NNODES" >&2; exit 2; }
# A loopback HEAD_ADDR works only when every node is this machine: the others would reach themselves.
# ALLOW_LOOPBACK=1 is for that case (tests that run several nodes on one machine).
if [ "$MAX_NODES" -gt 1 ] && [ "${ALLOW_LOOPBACK:-0}" != 1 ] && head_is_loopback "$HEAD_ADDR" "$NODE_RANK"; then
    echo "multinode.sh: HEAD_ADDR $HEAD_ADDR is a loopback address, which the other machines cannot reach; give the" \
         "head node's address as they reach it (its name, or an address from 'hostname -I' on it);" \
         "ALLOW_LOOPBACK=1 if every node runs on this machine" >&2
    exit 2
fi

# PYTHON, NPROC_PER_NODE, CPU_PROCS, TORCHRUN_ARGS: see common.sh.
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# static: global ranks follow NODE_RANK (node 0 holds rank 0); c10d: elastic rendezvous hosted on
# the head node, ranks in order of arrival (NODE_RANK is then only a label).
RDZV_BACKEND="${RDZV_BACKEND:-static}"
# c10d only: a name shared by the nodes of one run (a second run on the same port needs another).
RDZV_ID="${RDZV_ID:-ddp_train}"
# Seconds a node waits for the others to join before it gives up with one line saying how many
# joined (torchrun's rendezvous timeout: --rdzv-conf timeout=N for static, join_timeout=N for c10d).
RDZV_TIMEOUT="${RDZV_TIMEOUT:-600}"
[[ "$RDZV_TIMEOUT" =~ ^[0-9]+$ && "$RDZV_TIMEOUT" -ge 1 ]] ||
    { echo "multinode.sh: RDZV_TIMEOUT must be a number of seconds >= 1, got '$RDZV_TIMEOUT'" >&2; exit 2; }

case "$RDZV_BACKEND" in
    static)
        RDZV=(--node-rank="$NODE_RANK" --master-addr="$HEAD_ADDR" --master-port="$PORT"
              --rdzv-conf="timeout=$RDZV_TIMEOUT") ;;
    c10d)
        RDZV=(--rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$RDZV_ID"
              --rdzv-conf="join_timeout=$RDZV_TIMEOUT") ;;
    etcd-v2)
        # The rendezvous in an etcd server outside the nodes (RDZV_ENDPOINT=HOST:PORT, etcd 3.4 started
        # with --enable-v2): unlike c10d's store in the head node's agent, it survives any node.
        [ -n "${RDZV_ENDPOINT:-}" ] || { echo "multinode.sh: RDZV_BACKEND=etcd-v2 needs RDZV_ENDPOINT=HOST:PORT," \
            "the client address of an etcd server started with --enable-v2" >&2; exit 2; }
        "$PYTHON" -c 'import etcd' 2>/dev/null || { echo "multinode.sh: RDZV_BACKEND=etcd-v2 needs the python-etcd" \
            "package: $PYTHON -m pip install python-etcd (or pip install -e '.[etcd]')" >&2; exit 2; }
        RDZV=(--rdzv-backend=etcd-v2 --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID"
              --rdzv-conf="join_timeout=$RDZV_TIMEOUT") ;;
    *)
        echo "multinode.sh: RDZV_BACKEND must be static, c10d or etcd-v2, got '$RDZV_BACKEND'" >&2
        exit 2 ;;
esac

# Elastic (NNODES=MIN:MAX): torchrun restarts the workers when a node is lost (a restart counted
# against MAX_RESTARTS, default 3) or joins (not counted); ddp_train resumes from the newest checkpoint.
if [[ "$NNODES" == *:* ]]; then
    [ "$RDZV_BACKEND" != static ] || { echo "multinode.sh: NNODES $NNODES (elastic) needs RDZV_BACKEND=c10d or" \
        "etcd-v2: the static rendezvous waits for a fixed number of nodes" >&2; exit 2; }
    MAX_RESTARTS="${MAX_RESTARTS:-3}"
    # torch shares the rendezvous store with the workers by default, and then a node that joins a
    # running job waits for a store address that is never published (its agent fails after 60 s).
    # Unshared, rank 0 hosts a fresh store for each group.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
fi
# Worker group restarts after a failure (torchrun --max-restarts; 0, its default, for a fixed NNODES).
MAX_RESTARTS="${MAX_RESTARTS:-0}"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] ||
    { echo "multinode.sh: MAX_RESTARTS must be a whole number >= 0, got '$MAX_RESTARTS'" >&2; exit 2; }

echo "[multinode.sh] node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es), rendezvous $RDZV_BACKEND on $HEAD_ADDR:$PORT"
# shellcheck disable=SC2206  # a user-supplied word list
EXTRA=($TORCHRUN_ARGS)
# ddp_train.resilience.launch_agent is torchrun (same arguments) ending a failed rendezvous with one line, and a
# failed job with its first failed worker's exit code.
exec "$PYTHON" -m ddp_train.resilience.launch_agent --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${RDZV[@]}" \
    --max-restarts="$MAX_RESTARTS" "${EXTRA[@]}" -m ddp_train "$@"
