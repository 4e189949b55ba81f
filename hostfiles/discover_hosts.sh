#!/usr/bin/env bash
# Host discovery for Horovod elastic: prints the hosts that may run workers now, one "host:slots" per line;
# horovodrun runs it every second. The hosts come from one of:
# - a hosts file: $HOROVOD_MLSTM_ELASTIC_HOSTS (launch/elastic.sh --hostfile sets it), else
#   hostfiles/elastic_hosts.txt beside this script. Lines are "host:slots" or, as in the Open MPI hostfiles
#   the other launchers read, "host slots=N"; # comments and blank lines are skipped. The operator edits it
#   while the job runs (remove a line to drain a host, add one to grow the job).
# - a discovery script of your own: $HOROVOD_MLSTM_DISCOVERY (launch/elastic.sh --discovery sets it), which
#   prints "host:slots" lines.
# horovodrun puts host names into shell commands, so every line is checked (launch/hosts.sh) before any is
# printed: a bad one prints nothing and exits 1 with one line naming where it was. horovodrun stops a job
# whose first discovery fails; later it warns and keeps the hosts it has.
set -euo pipefail
# shellcheck source=../launch/hosts.sh
source "$(dirname "$0")/../launch/hosts.sh"
fail() { echo "discover_hosts.sh: $*" >&2; exit 1; }

if [ -n "${HOROVOD_MLSTM_DISCOVERY:-}" ]; then
  script="$HOROVOD_MLSTM_DISCOVERY" forms=discovery
  errors="$(mktemp "${TMPDIR:-/tmp}/discovery-stderr.XXXXXX")"
  trap 'rm -f "$errors"' EXIT
  status=0
  lines="$("$script" 2> "$errors")" || status=$?
  said="$(tail -n 1 "$errors")"
  [ "$status" = 0 ] || fail "discovery script $script failed (status $status)${said:+: $said}"
else
  file=${HOROVOD_MLSTM_ELASTIC_HOSTS:-"$(dirname "$0")/elastic_hosts.txt"} forms=elastic
  [ -f "$file" ] && [ -r "$file" ] || fail "cannot read hosts file $file"
  lines="$(cat "$file")"
fi
found="" n=0
while IFS= read -r line; do
  n=$((n + 1))
  if ! host_line "$line" "$forms"; then
    where="${file:+$file:$n}" where="${where:-discovery script $script, line $n of its output}"
    fail "$where: expected $(host_forms "$forms"), got '$line' ($HOST_NAME_RULE; slots a positive number)"
  fi
  [ -z "$HOST" ] || found+="$HOST:$HOST_SLOTS"$'\n'
done <<< "$lines"
printf '%s' "$found"
