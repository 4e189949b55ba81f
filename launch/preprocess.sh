#!/usr/bin/env bash
# Preprocess across the hosts training uses: mpirun over the same hostfiles, one preprocess rank per slot
# (or --np), every rank reading its share of the input and writing into --output_dir, which must be on a
# filesystem every host sees at the same path.
#   launch/preprocess.sh [--hostfile F] [--np N] [--iface IFACE] [--dry-run] [preprocess flags...]
# e.g. launch/preprocess.sh --hostfile hostfiles/dgx1-16nodes.txt --np 16 --workers 8 \
#        --input /shared/amazon/aggressive_dedup.json.gz --output_dir /shared/amazon_tfrecords --num_shards 128
# One rank per host (--np = the number of hosts) with --workers = its cores is best for gzip input, which
# each rank of a shared file decompresses whole (see docs/DATA.md).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
no_controller
[ -z "$TIMELINE$AUTOTUNE_LOG$STALL_WARN$STALL_SHUTDOWN" ] && [ "$AUTOTUNE$NO_STALL_CHECK" = 00 ] \
  || die "Horovod's tool options (--timeline, --autotune, stall checks) do not apply to preprocess"
require_command mpirun "install Open MPI (make setup does)"
read_hostfile
# -map-by node: ranks go round the hosts, so `--np <hosts>` is one rank per host (give it --workers <cores>)
cmd=(mpirun -np "$NP" -hostfile "$HOSTFILE" -bind-to none -map-by node --tag-output
     -x "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}" -x PATH -mca pml ob1 -mca btl ^openib)
for var in LD_LIBRARY_PATH TF_CPP_MIN_LOG_LEVEL; do [ -z "${!var:-}" ] || cmd+=(-x "$var"); done
[ "$(id -u)" = 0 ] && cmd+=(--allow-run-as-root)
[ -n "$IFACE" ] && cmd+=(-mca btl_tcp_if_include "$IFACE")
# mpirun answers SIGTERM/SIGINT by killing the ranks within a second, but passes SIGUSR1 on: preprocess
# stops on it as on SIGTERM (nothing published, staging removed) and exits 143.
FORWARD_AS=USR1
run_job "${cmd[@]}" "$PYTHON" -m horovod_mlstm.preprocess "${ARGS[@]}"
