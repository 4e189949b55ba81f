#!/usr/bin/env bash
# horovodrun over a hostfile:
#   launch/horovodrun.sh [--hostfile F] [--np N] [--iface IFACE] [--dry-run] [train.py flags...]
# N defaults to the hostfile's slots (hostfiles/localhost.txt by default).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
read_hostfile
cmd=("$HOROVODRUN" -np "$NP" -H "$HOSTLIST")
[ -n "$IFACE" ] && cmd+=(--network-interface "$IFACE")
[ -n "${HOROVOD_CONTROLLER:-}" ] && cmd+=("--${HOROVOD_CONTROLLER,,}")  # gloo|mpi; else horovodrun picks MPI
run_or_print "${cmd[@]}" "$PYTHON" "$ROOT/train.py" "${ARGS[@]}"
