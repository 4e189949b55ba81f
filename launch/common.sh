# shellcheck shell=bash disable=SC2034  # sourced; the variables are read by the launchers
# Shared by the launchers: option parsing, hostfile reading, the venv's python.
# Paths given to train.py (--flagfile, --data_dir, ...) are relative to the repository root.
# Sourced, not run. Sets: ROOT PYTHON HOROVODRUN HOSTFILE NP DRY_RUN IFACE ARGS HOSTS SLOTS HOSTLIST
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"; [ -x "$PYTHON" ] || PYTHON=python
HOROVODRUN="$ROOT/.venv/bin/horovodrun"; [ -x "$HOROVODRUN" ] || HOROVODRUN=horovodrun

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# parse_args "$@": launcher options; everything else goes to train.py as absl flags.
parse_args() {
  HOSTFILE="$ROOT/hostfiles/localhost.txt" NP="" DRY_RUN=0 IFACE="" ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --hostfile) [ $# -ge 2 ] || die "--hostfile needs a file"; HOSTFILE="$2"; shift 2 ;;
      --np) [ $# -ge 2 ] || die "--np needs a number"; NP="$2"; shift 2 ;;
      --iface) [ $# -ge 2 ] || die "--iface needs an interface name"; IFACE="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
}

# read_hostfile: Open MPI format, "host slots=N" per line (# comments, blank lines allowed).
read_hostfile() {
  [ -f "$HOSTFILE" ] || die "hostfile $HOSTFILE does not exist"
  HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"  # commands run from ROOT
  HOSTS=() SLOTS=0 HOSTLIST=""
  local n=0 line
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line="${line%%#*}"
    [[ "$line" =~ ^[[:space:]]*$ ]] && continue
    [[ "$line" =~ ^[[:space:]]*([A-Za-z0-9._-]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]] \
      || die "$HOSTFILE:$n: expected 'host slots=N', got '$line'"
    HOSTS+=("${BASH_REMATCH[1]}")
    SLOTS=$((SLOTS + BASH_REMATCH[2]))
    HOSTLIST="${HOSTLIST:+$HOSTLIST,}${BASH_REMATCH[1]}:${BASH_REMATCH[2]}"
  done < "$HOSTFILE"
  [ "$SLOTS" -gt 0 ] || die "$HOSTFILE lists no hosts"
  NP=${NP:-$SLOTS}
  [[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "--np must be a positive number, got '$NP'"
  [ "$NP" -le "$SLOTS" ] || die "--np $NP is more than the $SLOTS slots in $HOSTFILE"
}

# run_or_print CMD...: with --dry-run print the exact command (shell-quoted), else run it from ROOT.
run_or_print() {
  if [ "$DRY_RUN" = 1 ]; then
    local a out=()
    for a in "$@"; do
      if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./^-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
    done
    echo "${out[*]}"
    exit 0
  fi
  cd "$ROOT" && exec "$@"
}
