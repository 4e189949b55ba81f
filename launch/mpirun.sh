#!/usr/bin/env bash
# The raw Open MPI equivalent of horovodrun.sh, with the settings Horovod documents for
# multi-node jobs: no core binding, ranks by slot, NCCL/paths exported, TCP over ob1.
#   launch/mpirun.sh [--hostfile F] [--np N] [--iface IFACE] [--dry-run] [train.py flags...]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
read_hostfile
cmd=(mpirun -np "$NP" -hostfile "$HOSTFILE" -bind-to none -map-by slot
     -x NCCL_DEBUG=INFO -x LD_LIBRARY_PATH -x PATH -x TF_CPP_MIN_LOG_LEVEL
     -mca pml ob1 -mca btl ^openib)
[ "$(id -u)" = 0 ] && cmd+=(--allow-run-as-root)
[ -n "$IFACE" ] && cmd+=(-mca btl_tcp_if_include "$IFACE" -x NCCL_SOCKET_IFNAME="$IFACE")
run_or_print "${cmd[@]}" "$PYTHON" "$ROOT/train.py" "${ARGS[@]}"
