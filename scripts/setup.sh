#!/usr/bin/env bash
# Installs everything horovod_mlstm needs on a fresh Debian machine:
# Open MPI (+ ssh for multi-host launches), a .venv with the pinned Python
# stack, and Horovod 0.28.1 compiled against that TensorFlow with MPI and Gloo.
# Idempotent: each step checks before it acts, and pip's wheel cache keeps the
# built Horovod wheel so a second setup on the same machine takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
# g++: Horovod's build and the fused CPU kernels (horovod_mlstm/kernels.cc)
DEBS="g++ libopenmpi-dev openmpi-bin openssh-client openssh-server iproute2 procps strace libcap2-bin"

log() { echo "[setup] $*"; }

missing_debs() {
  local m=""
  for p in $DEBS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || m="$m $p"
  done
  echo "$m"
}

need=$(missing_debs)
if [ -n "$need" ]; then
  if [ "$(id -u)" = "0" ]; then
    log "installing Debian packages:$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086  # $need is a list of package names
    apt-get install -y -qq --no-install-recommends $need >/dev/null
  else
    echo "[setup] error: missing Debian packages:$need (run as root, or: sudo apt-get install$need)" >&2
    exit 1
  fi
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "[setup] error: $PYTHON not found; the pinned stack needs Python 3.11" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

log "installing pinned Python packages (requirements.txt)"
"$PY" -m pip install -q --upgrade "pip<25"
"$PY" -m pip install -q -r requirements.txt

if ! "$PY" -c "import horovod.tensorflow" >/dev/null 2>&1 || \
   ! "$PY" -c "import horovod; assert horovod.__version__ == '0.28.1'" >/dev/null 2>&1; then
  log "building horovod==0.28.1 against TensorFlow (about 5 minutes the first time; cached after)"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    "$PY" -m pip install -q --no-build-isolation horovod==0.28.1
fi

"$PY" -m pip install -q --no-deps -e . >/dev/null
log "check: $("$VENV/bin/horovodrun" --check-build | tr '\n' ' ' | sed 's/  */ /g')"
log "done"
