#!/usr/bin/env bash
# Elastic training: horovodrun keeps the job going while workers are lost or added.
#   launch/elastic.sh [--np N] [--min-np N] [--max-np N] [--discovery SCRIPT] [--iface IFACE]
#                     [--dry-run] [train.py flags...]
# Defaults: discovery hostfiles/discover_hosts.sh, --np = slots it lists now, --min-np 1,
# --max-np = --np, --iface lo when every listed host is this machine.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
discovery="$root/hostfiles/discover_hosts.sh"
np="" min_np=1 max_np="" iface="" dry_run=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --np) np="$2"; shift 2 ;;
    --min-np) min_np="$2"; shift 2 ;;
    --max-np) max_np="$2"; shift 2 ;;
    --discovery) discovery="$2"; shift 2 ;;
    --iface) iface="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
fail() { echo "elastic.sh: $*" >&2; exit 2; }
[ -x "$discovery" ] || fail "discovery script $discovery is missing or not executable"
hosts="$("$discovery")" || fail "discovery script $discovery failed"
[ -n "$hosts" ] || fail "discovery script $discovery lists no hosts"
slots=0 all_local=1
while IFS= read -r line; do
  [[ "$line" =~ ^([^:[:space:]]+):([0-9]+)$ ]] || fail "discovery line '$line' is not host:slots"
  slots=$((slots + BASH_REMATCH[2]))
  case "${BASH_REMATCH[1]}" in localhost|127.0.0.1|"$(hostname)") ;; *) all_local=0 ;; esac
done <<< "$hosts"
np=${np:-$slots}
max_np=${max_np:-$np}
[ "$np" -ge "$min_np" ] && [ "$np" -le "$max_np" ] || fail "need --min-np ($min_np) <= --np ($np) <= --max-np ($max_np)"
[ "$np" -le "$slots" ] || fail "--np $np is more than the $slots slots the discovery script lists"
[ -z "$iface" ] && [ "$all_local" = 1 ] && iface=lo  # NIC probing between local "hosts" would hang
python="$root/.venv/bin/python"; [ -x "$python" ] || python=python
horovodrun="$root/.venv/bin/horovodrun"; [ -x "$horovodrun" ] || horovodrun=horovodrun
cmd=("$horovodrun" -np "$np" --min-np "$min_np" --max-np "$max_np" --host-discovery-script "$discovery")
[ -n "$iface" ] && cmd+=(--network-interface "$iface")
cmd+=("$python" "$root/train.py" --elastic "${args[@]}")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
cd "$root" && exec "${cmd[@]}"
