#!/usr/bin/env bash
# Host discovery for Horovod elastic: prints the hosts that may run workers now, one
# "host:slots" per line. The operator edits the hosts file while the job runs (remove a
# line to drain a host, add one to grow the job); horovodrun polls this script.
# Hosts file: $HOROVOD_MLSTM_ELASTIC_HOSTS (launch/elastic.sh --hostfile sets it), else
# hostfiles/elastic_hosts.txt beside this script. Lines are "host:slots" or, as in the Open MPI
# hostfiles the other launchers read, "host slots=N"; # comments and blank lines are skipped.
set -euo pipefail
hosts=${HOROVOD_MLSTM_ELASTIC_HOSTS:-"$(dirname "$0")/elastic_hosts.txt"}
[ -r "$hosts" ] || { echo "discover_hosts.sh: cannot read hosts file $hosts" >&2; exit 1; }
sed -E -e 's/#.*//' -e 's/^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$/\1:\2/' \
  -e 's/[[:space:]]//g' -e '/^$/d' "$hosts"
