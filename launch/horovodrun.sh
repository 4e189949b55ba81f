#!/usr/bin/env bash
# horovodrun over a hostfile:
#   launch/horovodrun.sh [--hostfile F] [--np N] [--iface IFACE] [--gloo|--mpi] [--dry-run]
#                        [--timeline FILE] [--autotune [--autotune_log FILE]]
#                        [--stall_check_warning_seconds S] [--stall_check_shutdown_seconds S | --no_stall_check]
#                        [--finetune] [train.py flags, or finetune's with --finetune...]
# N defaults to the hostfile's slots (hostfiles/localhost.txt by default); the controller defaults to
# horovodrun's own choice (MPI when Horovod was built with it). See docs/CLUSTER.md.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
require_command "$HOROVODRUN" "run make setup (it installs Horovod into .venv)"
read_hostfile
cmd=("$HOROVODRUN" -np "$NP" -H "$HOSTLIST")
[ -n "$CONTROLLER" ] && cmd+=("$CONTROLLER")
[ -n "$IFACE" ] && cmd+=(--network-interface "$IFACE")
# A signal goes to the ranks on this host as SIGTERM, not to horovodrun, which would kill them 5 s later
# (common.sh: forward_signal). In MPI mode horovodrun runs mpirun, which gets SIGUSR1 instead.
FORWARD_AS=TERM
RANKS_RUN="$PYTHON ${PROGRAM[*]}"
run_job "${cmd[@]}" "${TOOL_FLAGS[@]}" "$PYTHON" "${PROGRAM[@]}" "${ARGS[@]}"
