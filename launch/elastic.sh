#!/usr/bin/env bash
# Elastic training: horovodrun keeps the job going while workers are lost or added.
#   launch/elastic.sh [--np N] [--min-np N] [--max-np N] [--discovery SCRIPT] [--iface IFACE]
#                     [--dry-run] [train.py flags...]
# Defaults: discovery hostfiles/discover_hosts.sh, --np = slots it lists now, --min-np 1,
# --max-np = --np, --iface lo when every listed host is this machine.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
discovery="$ROOT/hostfiles/discover_hosts.sh"
min_np=1 max_np="" rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --min-np) min_np="$2"; shift 2 ;;
    --max-np) max_np="$2"; shift 2 ;;
    --discovery) discovery="$2"; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
parse_args "${rest[@]}"
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
cmd=("$HOROVODRUN" -np "$NP" --min-np "$min_np" --max-np "$max_np" --host-discovery-script "$discovery")
[ -n "$IFACE" ] && cmd+=(--network-interface "$IFACE")
run_or_print "${cmd[@]}" "$PYTHON" "$ROOT/train.py" --elastic "${ARGS[@]}"
