#!/usr/bin/env bash
# Elastic training: horovodrun keeps the job going while workers are lost or added.
#   launch/elastic.sh [--np N] [--min-np N] [--max-np N] [--hostfile F | --discovery SCRIPT] [--iface IFACE]
#                     [--dry-run] [--timeline FILE] [--autotune [--autotune_log FILE]]
#                     [--stall_check_warning_seconds S] [--stall_check_shutdown_seconds S | --no_stall_check]
#                     [train.py flags...]
# Defaults: discovery hostfiles/discover_hosts.sh over $HOROVOD_MLSTM_ELASTIC_HOSTS or
# hostfiles/elastic_hosts.txt (--hostfile F reads F instead: edit it while the job runs), --np = slots it
# lists now, --min-np 1, --max-np = --np, --iface lo when every listed host is this machine.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
discovery="" min_np=1 max_np="" rest=()
while [ $# -gt 0 ]; do
  case "${1%%=*}" in
    --min-np) option_value "$@"; min_np="$VALUE" ;;
    --max-np) option_value "$@"; max_np="$VALUE" ;;
    --discovery) option_value "$@"; discovery="$(abs_path "$VALUE")" ;;
    *) rest+=("$1") SHIFT=1 ;;
  esac
  shift "$SHIFT"
done
parse_args "${rest[@]}"
no_controller
require_command "$HOROVODRUN" "run make setup (it installs Horovod into .venv)"
check_positive --min-np "$min_np"
[ -z "$max_np" ] || check_positive --max-np "$max_np"
env_cmd=()
if [ -n "$HOSTFILE" ]; then
  [ -z "$discovery" ] || die "--hostfile and --discovery exclude each other (the default discovery script reads the hostfile)"
  HOSTFILE="$(abs_path "$HOSTFILE")"
  [ -f "$HOSTFILE" ] || die "hostfile $HOSTFILE does not exist"
  export HOROVOD_MLSTM_ELASTIC_HOSTS="$HOSTFILE"
  env_cmd=(env "HOROVOD_MLSTM_ELASTIC_HOSTS=$HOSTFILE")  # shown by --dry-run; horovodrun runs discovery with it
fi
discovery="${discovery:-$ROOT/hostfiles/discover_hosts.sh}"
[ -x "$discovery" ] || die "discovery script $discovery is missing or not executable"
hosts="$("$discovery")" || die "discovery script $discovery failed"
[ -n "$hosts" ] || die "discovery script $discovery lists no hosts"
slots=0 all_local=1
while IFS= read -r line; do
  [[ "$line" =~ ^([^:[:space:]]+):([0-9]+)$ ]] || die "discovery line '$line' is not host:slots"
  slots=$((slots + BASH_REMATCH[2]))
  case "${BASH_REMATCH[1]}" in localhost|127.0.0.1|"$(hostname)") ;; *) all_local=0 ;; esac
done <<< "$hosts"
NP=${NP:-$slots}
max_np=${max_np:-$NP}
[ "$NP" -ge "$min_np" ] && [ "$NP" -le "$max_np" ] || die "need --min-np ($min_np) <= --np ($NP) <= --max-np ($max_np)"
[ "$NP" -le "$slots" ] || die "--np $NP is more than the $slots slots the discovery script lists"
[ -z "$IFACE" ] && [ "$all_local" = 1 ] && IFACE=lo  # NIC probing between local "hosts" would hang
# A host whose worker failed is blacklisted; without a cooldown it never comes back, even when the
# discovery script lists it again (a drained host re-added, a spot node replaced). 10-300 s backoff.
cmd=("$HOROVODRUN" -np "$NP" --min-np "$min_np" --max-np "$max_np" --host-discovery-script "$discovery"
     --blacklist-cooldown-range 10 300)
[ -n "$IFACE" ] && cmd+=(--network-interface "$IFACE")
# As horovodrun.sh: a signal goes to the ranks on this host as SIGTERM, not to horovodrun, which would
# kill them 5 s later. Each rank then exits 75 on its own; the driver counts that as a failure of every
# host, stops, and reports the 75, which run_job passes on.
FORWARD_AS=TERM
RANKS_RUN="$PYTHON $TRAIN_PY"
run_job "${env_cmd[@]}" "${cmd[@]}" "${TOOL_FLAGS[@]}" "$PYTHON" "$TRAIN_PY" --elastic "${ARGS[@]}"
