# shellcheck shell=bash disable=SC2034  # sourced; the variables are read by its callers
# One check for every host list: static hostfiles (launch/common.sh), the elastic hosts file and whatever a
# discovery script prints (hostfiles/discover_hosts.sh). horovodrun puts host names into ssh command lines that
# a shell runs, so a name that is not plain (`x;touch${IFS}/tmp/pwned;true`) would run as the launching user:
# a host name is letters, digits, '.', '_' and '-', starting with a letter or digit (no option to ssh either).
# Sourced, not run. Sets HOST and HOST_SLOTS.
HOST_NAME_RULE="a host name is letters, digits, '.', '_' and '-', starting with a letter or digit"

# host_line LINE FORMS: parses one line of a host list. FORMS says what the list may hold:
#   hostfile   Open MPI's "host slots=N"; # comments and blank lines skipped
#   elastic    "host slots=N" or Horovod's "host:N"; # comments and blank lines skipped
#   discovery  "host:N" only, as horovodrun reads a discovery script's output (it knows no comments)
# Sets HOST and HOST_SLOTS (N >= 1), or HOST="" for a line with nothing on it; returns 1 for anything else.
host_line() {
  local line="$1" name='([A-Za-z0-9][A-Za-z0-9._-]*)' slots='([1-9][0-9]*)' space='[[:space:]]*'
  local LC_ALL=C  # ASCII ranges: in other locales [A-Za-z] may match accented letters
  HOST="" HOST_SLOTS=""
  if [ "$2" = discovery ]; then
    [ -n "$line" ] || return 0
    [[ "$line" =~ ^${name}:${slots}$ ]] || return 1
  else
    line="${line%%#*}"
    [[ "$line" =~ ^${space}$ ]] && return 0
    [[ "$line" =~ ^${space}${name}[[:space:]]+slots=${slots}${space}$ ]] \
      || { [ "$2" = elastic ] && [[ "$line" =~ ^${space}${name}:${slots}${space}$ ]]; } || return 1
  fi
  HOST="${BASH_REMATCH[1]}" HOST_SLOTS="${BASH_REMATCH[2]}"
}

# host_forms FORMS: the line formats FORMS accepts, for error messages.
host_forms() {
  case "$1" in
    hostfile) echo "'host slots=N'" ;;
    elastic) echo "'host slots=N' or 'host:N'" ;;
    discovery) echo "'host:N'" ;;
  esac
}
