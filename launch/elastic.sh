#!/usr/bin/env bash
# Elastic training: horovodrun keeps the job going while workers are lost or added.
#   launch/elastic.sh [--np N] [--min-np N] [--max-np N] [--hostfile F | --discovery SCRIPT] [--iface IFACE]
#                     [--dry-run] [--timeline FILE] [--autotune [--autotune_log FILE]]
#                     [--stall_check_warning_seconds S] [--stall_check_shutdown_seconds S | --no_stall_check]
#                     [train.py flags...]
# Hosts: hostfiles/discover_hosts.sh over $HOROVOD_MLSTM_ELASTIC_HOSTS or hostfiles/elastic_hosts.txt
# (--hostfile F reads F instead: edit it while the job runs), or over the output of your own --discovery
# SCRIPT; either way every line is checked before horovodrun gets it. Defaults: --np = slots listed now,
# --min-np 1, --max-np = --np, --iface lo when every listed host is this machine.
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
[ "${PROGRAM[0]}" = "$ROOT/train.py" ] || die "--finetune does not run elastic: use launch/horovodrun.sh --finetune"
require_command "$HOROVODRUN" "run make setup (it installs Horovod into .venv)"
check_positive --min-np "$min_np"
[ -z "$max_np" ] || check_positive --max-np "$max_np"
# horovodrun always runs hostfiles/discover_hosts.sh, which reads the hosts file or runs --discovery SCRIPT and
# checks every line before horovodrun sees it (host names go into shell commands: launch/hosts.sh).
env_cmd=()  # shown by --dry-run; horovodrun runs the discovery with it
if [ -n "$HOSTFILE" ]; then
  [ -z "$discovery" ] || die "--hostfile and --discovery exclude each other (the default discovery script reads the hostfile)"
  HOSTFILE="$(abs_path "$HOSTFILE")"
  [ -f "$HOSTFILE" ] || die "hostfile $HOSTFILE does not exist"
  export HOROVOD_MLSTM_ELASTIC_HOSTS="$HOSTFILE"
  unset HOROVOD_MLSTM_DISCOVERY
  env_cmd=(env "HOROVOD_MLSTM_ELASTIC_HOSTS=$HOSTFILE")
elif [ -n "$discovery" ]; then
  [ -f "$discovery" ] && [ -x "$discovery" ] || die "discovery script $discovery is missing or not executable"
  export HOROVOD_MLSTM_DISCOVERY="$discovery"
  env_cmd=(env "HOROVOD_MLSTM_DISCOVERY=$discovery")
fi
discover_hosts="$ROOT/hostfiles/discover_hosts.sh"
# What horovodrun will be given, checked now: a bad line is discover_hosts.sh's one line, before anything starts.
hosts="$("$discover_hosts")" || exit 2
[ -n "$hosts" ] || die "the discovery lists no hosts"
slots=0 all_local=1
while IFS=: read -r host host_slots; do
  slots=$((slots + host_slots))
  case "$host" in localhost|127.0.0.1|"$(hostname)") ;; *) all_local=0 ;; esac
done <<< "$hosts"
NP=${NP:-$slots}
max_np=${max_np:-$NP}
[ "$NP" -ge "$min_np" ] && [ "$NP" -le "$max_np" ] || die "need --min-np ($min_np) <= --np ($NP) <= --max-np ($max_np)"
[ "$NP" -le "$slots" ] || die "--np $NP is more than the $slots slots the discovery script lists"
[ -z "$IFACE" ] && [ "$all_local" = 1 ] && IFACE=lo  # NIC probing between local "hosts" would hang
# A host whose worker failed is blacklisted; without a cooldown it never comes back, even when the
# discovery script lists it again (a drained host re-added, a spot node replaced). 10-300 s backoff.
# Gloo's timeout is both how long the ranks wait on a dead peer and how long they wait, when a host is added,
# for its new worker to start (ssh, Python, TensorFlow) and join; Gloo's 30 s default was too short for the
# second on a busy machine (the grown job died with "Wait timeout after 30 seconds for key(s)"). 120 s unless
# HOROVOD_GLOO_TIMEOUT_SECONDS says otherwise; a lost host then costs 2 minutes before the job goes on.
cmd=("$HOROVODRUN" -np "$NP" --min-np "$min_np" --max-np "$max_np" --host-discovery-script "$discover_hosts"
     --blacklist-cooldown-range 10 300 --gloo-timeout-seconds "${HOROVOD_GLOO_TIMEOUT_SECONDS:-120}")
[ -n "$IFACE" ] && cmd+=(--network-interface "$IFACE")
# As horovodrun.sh: a signal goes to the ranks on this host as SIGTERM, not to horovodrun, which would
# kill them 5 s later. Each rank then exits 75 on its own; the driver counts that as a failure of every
# host, stops, and reports the 75, which run_job passes on.
FORWARD_AS=TERM
RANKS_RUN="$PYTHON ${PROGRAM[*]}"
run_job "${env_cmd[@]}" "${cmd[@]}" "${TOOL_FLAGS[@]}" "$PYTHON" "${PROGRAM[@]}" --elastic "${ARGS[@]}"
