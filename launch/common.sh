# shellcheck shell=bash disable=SC2034  # sourced; the variables are read by the launchers
# Shared by the launchers: option parsing, hostfile reading, Horovod's tools, running the job.
# Relative paths (--flagfile, --data_dir, --model_dir, --timeline, ...) are relative to the directory the
# launcher is called from: nothing here changes directory, and train.py is passed by absolute path (finetune
# runs as `python -m horovod_mlstm.finetune`, from the package installed into .venv).
# Sourced, not run. Sets: ROOT CALLER_DIR PYTHON HOROVODRUN PROGRAM HOSTFILE NP DRY_RUN IFACE CONTROLLER
# ARGS HOSTS SLOTS HOSTLIST TOOL_FLAGS TOOL_ENV
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_DIR="$PWD"
PYTHON="$ROOT/.venv/bin/python"; [ -x "$PYTHON" ] || PYTHON=python
HOROVODRUN="$ROOT/.venv/bin/horovodrun"; [ -x "$HOROVODRUN" ] || HOROVODRUN=horovodrun
EX_TEMPFAIL=75  # train.py (or finetune) stopped early on a signal or --max_runtime_minutes, after checkpointing
# A job in which one rank stops answering ends after this long without a finished step, naming the rank
# (Horovod's stall shutdown, and train.py's heartbeat watch for a frozen rank, which Horovod's check cannot see).
# 10 minutes: over twice the slowest single-rank pause the paper's shape has (rank 0 writing its checkpoint,
# about 1.2 GB of weights and Adam moments plus 1 GiB of RNN state, takes 4 minutes at 10 MB/s), and at most
# 10 minutes of a 128-GPU allocation lost to a hung node rather than the rest of its time limit.
STALL_SHUTDOWN_DEFAULT=600
# shellcheck source=hosts.sh
source "$ROOT/launch/hosts.sh"

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# abs_path P: P made absolute against the caller's directory.
abs_path() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER_DIR/$1" ;; esac; }

# option_value "$@": the value of the option in $1, given as `--opt VALUE` or `--opt=VALUE`; sets VALUE and
# SHIFT (how many arguments it used). A missing or empty value is one line, also when the option is last.
option_value() {
  if [[ "$1" == *=* ]]; then VALUE="${1#*=}" SHIFT=1
  else [ $# -ge 2 ] || die "${1%%=*} needs a value"; VALUE="$2" SHIFT=2; fi
  [ -n "$VALUE" ] || die "${1%%=*} needs a value"
}

# parse_args "$@": launcher options; everything else goes to the ranks' program as absl flags. The program is
# train.py, or with --finetune `python -m horovod_mlstm.finetune` (the package is installed into .venv).
parse_args() {
  HOSTFILE="" NP="" DRY_RUN=0 IFACE="" CONTROLLER="" ARGS=() PROGRAM=("$ROOT/train.py")
  TIMELINE="" AUTOTUNE=0 AUTOTUNE_LOG="" STALL_WARN="" STALL_SHUTDOWN="" NO_STALL_CHECK=0
  while [ $# -gt 0 ]; do
    case "${1%%=*}" in
      --hostfile) option_value "$@"; HOSTFILE="$VALUE" ;;
      --np) option_value "$@"; NP="$VALUE" ;;
      --iface) option_value "$@"; IFACE="$VALUE" ;;
      --timeline) option_value "$@"; TIMELINE="$VALUE" ;;
      --autotune_log) option_value "$@"; AUTOTUNE_LOG="$VALUE" ;;
      --stall_check_warning_seconds) option_value "$@"; STALL_WARN="$VALUE" ;;
      --stall_check_shutdown_seconds) option_value "$@"; STALL_SHUTDOWN="$VALUE" ;;
      --dry-run) DRY_RUN=1 SHIFT=1 ;;
      --finetune) PROGRAM=(-m horovod_mlstm.finetune) SHIFT=1 ;;
      --autotune) AUTOTUNE=1 SHIFT=1 ;;
      --no_stall_check) NO_STALL_CHECK=1 SHIFT=1 ;;
      --gloo|--mpi) CONTROLLER="$1" SHIFT=1 ;;
      *) ARGS+=("$1") SHIFT=1 ;;
    esac
    shift "$SHIFT"
  done
  [ -z "$NP" ] || check_positive --np "$NP"
  check_tools
  check_flagfiles
}

check_positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, got '$2'"; }

# check_tools: validates Horovod's tool options and builds them both ways Horovod documents:
# TOOL_FLAGS for horovodrun, TOOL_ENV (VAR=value) for mpirun -x and srun's environment. The stall shutdown is
# always there ($STALL_SHUTDOWN_DEFAULT s unless given), except with --no_stall_check.
check_tools() {
  TOOL_FLAGS=() TOOL_ENV=()
  local file
  for file in TIMELINE AUTOTUNE_LOG; do
    [ -n "${!file}" ] || continue
    printf -v "$file" '%s' "$(abs_path "${!file}")"
    [ -d "$(dirname "${!file}")" ] || die "--${file,,} ${!file}: directory $(dirname "${!file}") does not exist"
  done
  [ -z "$STALL_WARN" ] || check_positive --stall_check_warning_seconds "$STALL_WARN"
  [ -z "$STALL_SHUTDOWN" ] || check_positive --stall_check_shutdown_seconds "$STALL_SHUTDOWN"
  [ -z "$AUTOTUNE_LOG" ] || [ "$AUTOTUNE" = 1 ] || die "--autotune_log needs --autotune"
  if [ "$NO_STALL_CHECK" = 1 ] && [ -n "$STALL_WARN$STALL_SHUTDOWN" ]; then
    die "--no_stall_check contradicts --stall_check_warning_seconds/--stall_check_shutdown_seconds"
  fi
  local shutdown="${STALL_SHUTDOWN:-$STALL_SHUTDOWN_DEFAULT}" default="" warn="$STALL_WARN"
  [ -n "$STALL_SHUTDOWN" ] || default=", the default"
  [ "$NO_STALL_CHECK" = 0 ] || shutdown=""
  # Horovod warns after 60 s unless told otherwise, and its shutdown time must exceed its warning time
  [ -n "$warn" ] || [ -z "$shutdown" ] || [ "$shutdown" -gt 60 ] || warn=$(((shutdown + 1) / 2))
  if [ -n "$warn" ] && [ -n "$shutdown" ] && [ "$shutdown" -le "$warn" ]; then
    die "--stall_check_shutdown_seconds ($shutdown$default) must exceed --stall_check_warning_seconds ($warn)"
  fi
  if [ -n "$TIMELINE" ]; then
    TOOL_FLAGS+=(--timeline-filename "$TIMELINE"); TOOL_ENV+=("HOROVOD_TIMELINE=$TIMELINE"); fi
  if [ "$AUTOTUNE" = 1 ]; then TOOL_FLAGS+=(--autotune); TOOL_ENV+=(HOROVOD_AUTOTUNE=1); fi
  if [ -n "$AUTOTUNE_LOG" ]; then
    TOOL_FLAGS+=(--autotune-log-file "$AUTOTUNE_LOG"); TOOL_ENV+=("HOROVOD_AUTOTUNE_LOG=$AUTOTUNE_LOG"); fi
  if [ "$NO_STALL_CHECK" = 1 ]; then TOOL_FLAGS+=(--no-stall-check); TOOL_ENV+=(HOROVOD_STALL_CHECK_DISABLE=1); fi
  if [ -n "$warn" ]; then TOOL_FLAGS+=(--stall-check-warning-time-seconds "$warn")
    TOOL_ENV+=("HOROVOD_STALL_CHECK_TIME_SECONDS=$warn"); fi
  if [ -n "$shutdown" ]; then TOOL_FLAGS+=(--stall-check-shutdown-time-seconds "$shutdown")
    TOOL_ENV+=("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=$shutdown"); fi
  return 0
}

# check_flagfiles: a --flagfile that is not there is one line here, not one absl error per rank.
check_flagfiles() {
  local arg file
  for arg in "${ARGS[@]}"; do
    [[ "$arg" == --flagfile=* ]] || continue
    file="${arg#--flagfile=}"
    [ -f "$(abs_path "$file")" ] || die "flagfile $file not found in $CALLER_DIR (relative paths are taken from the directory you run the launcher in)"
  done
}

# require_command NAME HINT: a launcher's runner missing from PATH is one line (unless only printing).
require_command() {
  [ "$DRY_RUN" = 1 ] || command -v "$1" > /dev/null || die "$1 is not on PATH on $(hostname): $2"
}

# no_controller: the launchers other than horovodrun.sh have no Gloo/MPI choice to make.
no_controller() { [ -z "$CONTROLLER" ] || die "$CONTROLLER applies to launch/horovodrun.sh only"; }

# read_hostfile: Open MPI format, "host slots=N" per line (# comments, blank lines allowed), every host name
# checked as launch/hosts.sh says.
read_hostfile() {
  HOSTFILE="$(abs_path "${HOSTFILE:-$ROOT/hostfiles/localhost.txt}")"
  [ -f "$HOSTFILE" ] || die "hostfile $HOSTFILE does not exist"
  HOSTS=() SLOTS=0 HOSTLIST=""
  local n=0 line
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    host_line "$line" hostfile \
      || die "$HOSTFILE:$n: expected $(host_forms hostfile), got '$line' ($HOST_NAME_RULE; slots a positive number)"
    [ -n "$HOST" ] || continue
    HOSTS+=("$HOST")
    SLOTS=$((SLOTS + HOST_SLOTS))
    HOSTLIST="${HOSTLIST:+$HOSTLIST,}$HOST:$HOST_SLOTS"
  done < "$HOSTFILE"
  [ "$SLOTS" -gt 0 ] || die "$HOSTFILE lists no hosts"
  NP=${NP:-$SLOTS}
  [ "$NP" -le "$SLOTS" ] || die "--np $NP is more than the $SLOTS slots in $HOSTFILE"
}

# run_job CMD...: with --dry-run print the exact command (shell-quoted) and exit. Otherwise run it from the
# caller's directory and exit with its status, where:
# - TERM, USR1 and INT to the launcher go to the job as $FORWARD_AS (default: the same signal), so a
#   scheduler's or a user's signal reaches train.py, which stops at a step boundary and checkpoints
#   (each launcher sets the signal its job runner passes on to the ranks without killing them; with
#   RANKS_RUN set, the ranks on this host get it directly: see forward_signal);
# - a job that stopped that way exits 75 (horovodrun's own "exited with non-zero status" is unwrapped),
#   after one line saying so and how it resumes ($RESUME_HINT);
# - a failed job's last stderr line is rank 0's first `error:` line, rank prefix stripped;
# - a 0 from horovodrun after it was sent SIGTERM is not success: it then kills the ranks itself, and its
#   safe_shell_exec reaps each rank's shell from two threads at once (a psutil wait in the termination
#   thread, Popen.wait in the main one); the loser reads "reaped elsewhere" as status 0 (measured: 5 of 120
#   elastic stops said 0). The launcher exits 143 (SIGTERM) instead.
run_job() {
  if [ "$DRY_RUN" = 1 ]; then
    local a out=()
    for a in "$@"; do
      if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./^-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
    done
    echo "${out[*]}"
    exit 0
  fi
  local stderr_log status tee_pid
  stderr_log="$(mktemp "${TMPDIR:-/tmp}/launch-stderr.XXXXXX")"
  mkfifo "$stderr_log.fifo"
  # tee ignores the signals, or a Ctrl-C would end it and the job's last words (and its stderr) with it
  (trap '' TERM USR1 INT; exec tee "$stderr_log" < "$stderr_log.fifo" >&2) &
  tee_pid=$!
  JOB_PID="" RUNNER_TERMINATED=0
  trap 'forward_signal TERM' TERM
  trap 'forward_signal USR1' USR1
  trap 'forward_signal INT' INT
  "$@" 2> "$stderr_log.fifo" &
  JOB_PID=$!
  while kill -0 "$JOB_PID" 2>/dev/null; do
    wait "$JOB_PID" || true  # returns early when a trapped signal interrupts it: the job may still run
  done
  # The job has ended. The last wait may have been cut short by a signal (status 128+n) after the job ended,
  # so ask again: bash keeps an ended job's status for a later wait.
  status=0; wait "$JOB_PID" || status=$?
  wait "$tee_pid" || true
  trap - TERM USR1 INT
  status=$(job_status "$status" "$stderr_log")
  if [ "$status" = 0 ] && [ "$RUNNER_TERMINATED" = 1 ]; then
    echo "$(basename "$0"): horovodrun said 0 after it terminated the ranks, which is not a finished job;" \
      "exiting 143 (the same command resumes from the last checkpoint)" >&2
    status=143
  elif [ "$status" = "$EX_TEMPFAIL" ]; then
    echo "$(basename "$0"): training stopped at a checkpoint (status 75); ${RESUME_HINT:-the same command resumes it}" >&2
  elif [ "$status" != 0 ]; then
    job_error "$stderr_log" >&2
  fi
  rm -f "$stderr_log" "$stderr_log.fifo"
  return "$status"
}

# forward_signal SIG: passes the launcher's signal on, once; a second one goes to the job runner itself.
# - horovodrun in MPI mode becomes `sh -c "mpirun ..."`; mpirun kills the ranks on SIGTERM but passes
#   SIGUSR1 on, so mpirun gets SIGUSR1.
# - With RANKS_RUN (the command line the ranks run), the ranks of this host get the signal directly and
#   horovodrun none: horovodrun kills its ranks 5 s after a SIGTERM of its own, too soon for a large
#   checkpoint. Ranks on other hosts stop too, because every rank's stop vote is in every step's allreduce.
# - Otherwise, and for a second signal (the user insists), the job runner gets it.
forward_signal() {
  local target="$JOB_PID" signal="${FORWARD_AS:-$1}" mpirun_pid ranks
  [ -n "$JOB_PID" ] || return 0  # not started yet
  FORWARDED=$((${FORWARDED:-0} + 1))
  if [ "$(ps -o comm= -p "$JOB_PID")" = sh ] && mpirun_pid="$(pgrep -x -P "$JOB_PID" mpirun)"; then
    target="$mpirun_pid" signal=USR1
  elif [ -n "${RANKS_RUN:-}" ] && [ "$FORWARDED" = 1 ] && ranks="$(local_ranks)" && [ -n "$ranks" ]; then
    echo "$(basename "$0"): got SIG$1, passing SIG$signal to the ranks on this host so they checkpoint and" \
      "stop (a second signal goes to horovodrun, which kills them 5 s later)" >&2
    # shellcheck disable=SC2086  # one pid per word
    kill -s "$signal" $ranks 2>/dev/null || true
    return 0
  fi
  echo "$(basename "$0"): got SIG$1, passing SIG$signal to the job so it checkpoints and stops" >&2
  if [ "$target" = "$JOB_PID" ] && [[ "$(ps -ww -o args= -p "$JOB_PID")" == *"$HOROVODRUN "* ]]; then
    RUNNER_TERMINATED=1  # see run_job
  fi
  kill -s "$signal" "$target" 2>/dev/null || true
}

# local_ranks: the job's processes on this host whose command line starts with $RANKS_RUN, one per line.
local_ranks() {
  local parents="$JOB_PID" children pid args
  while children="$(pgrep -d, -P "$parents")"; do
    while read -r pid args; do
      [[ "$args" == "$RANKS_RUN"* ]] && echo "$pid"
    done < <(ps -ww -o pid=,args= -p "$children")  # -ww: whole command lines, whatever $COLUMNS says
    parents="$children"
  done
}

# job_status STATUS STDERR_LOG: the ranks' status; horovodrun reports any failing rank as its own status 1.
job_status() {
  local rank_status
  rank_status="$(sed -nE 's/^(Exit code: |.*mpirun failed with exit code )([0-9]+)$/\2/p' "$2" | head -n 1)"
  if [ "$1" = 1 ] && [ -n "$rank_status" ]; then echo "$rank_status"; else echo "$1"; fi
}

# job_error STDERR_LOG: the one line that says why the job failed:
# - the ranks Horovod's stall check shut the job down for: it marks them "R!: [tensors...]" under "Missing ranks:";
# - else rank 0's first `error:` line (train.py's, or its heartbeat watch's naming a frozen rank);
# - else the first `error:` line of any rank (rank 0 itself may be the one that froze).
# Ranks' lines come prefixed by whichever launcher ran them: horovodrun+Gloo "[0]<stderr>:", mpirun --tag-output
# "[1,0]<stderr>:" (which also tags the newline that sys.exit writes separately, at the end of the line), srun
# --label "0: ".
job_error() {
  local prefix='(\[[0-9]+\]<stderr>:|\[[0-9]+,[0-9]+\]<stderr>:|[[:space:]]*[0-9]+: )' stalled
  stalled="$(sed -nE "s/^$prefix?([0-9]+)!: \[.*/\2/p" "$1" | sort -nu | paste -sd, | sed 's/,/, /g')"
  if [[ "$stalled" == *,* ]]; then
    echo "error: ranks $stalled stalled: Horovod's stall check found them missing from a collective past the stall" \
      "shutdown time and shut the job down"
  elif [ -n "$stalled" ]; then
    echo "error: rank $stalled stalled: Horovod's stall check found it missing from a collective past the stall" \
      "shutdown time and shut the job down"
  else
    sed -nE -e 's/\[[0-9]+,[0-9]+\]<std(err|out)>:$//' \
      -e 's/^(\[0\]<stderr>:|\[[0-9]+,0\]<stderr>:|[[:space:]]*0: )?(error: .*)$/\2/p' "$1" | head -n 1 | grep . \
      || sed -nE -e 's/\[[0-9]+,[0-9]+\]<std(err|out)>:$//' -e "s/^$prefix(error: .*)\$/\\2/p" "$1" | head -n 1
  fi
}
