#!/usr/bin/env bash
# The raw Open MPI equivalent of horovodrun.sh, with the settings Horovod documents for
# multi-node jobs: no core binding, ranks by slot, NCCL/paths exported, TCP over ob1.
#   launch/mpirun.sh [--hostfile F] [--np N] [--iface IFACE] [--dry-run]
#                    [--timeline FILE] [--autotune [--autotune_log FILE]]
#                    [--stall_check_warning_seconds S] [--stall_check_shutdown_seconds S | --no_stall_check]
#                    [--finetune] [train.py flags, or finetune's with --finetune...]
# Horovod's tools go to the ranks as the HOROVOD_* variables Horovod reads (mpirun -x). See docs/CLUSTER.md.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
no_controller
require_command mpirun "install Open MPI (make setup does), or use launch/horovodrun.sh --gloo"
read_hostfile
cmd=(mpirun -np "$NP" -hostfile "$HOSTFILE" -bind-to none -map-by slot --tag-output
     -x NCCL_DEBUG=INFO -x LD_LIBRARY_PATH -x PATH -x TF_CPP_MIN_LOG_LEVEL
     -mca pml ob1 -mca btl ^openib)
[ "$(id -u)" = 0 ] && cmd+=(--allow-run-as-root)
[ -n "$IFACE" ] && cmd+=(-mca btl_tcp_if_include "$IFACE" -x NCCL_SOCKET_IFNAME="$IFACE")
for var in "${TOOL_ENV[@]}"; do cmd+=(-x "$var"); done
# mpirun answers SIGTERM/SIGINT by killing the ranks within a second, but passes SIGUSR1 on: send that.
FORWARD_AS=USR1
run_job "${cmd[@]}" "$PYTHON" "${PROGRAM[@]}" "${ARGS[@]}"
