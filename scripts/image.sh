#!/usr/bin/env bash
# The steps of the Dockerfile, one script for both bases: Debian 12 (CPU; its Python is 3.11)
# and NVIDIA's CUDA image on Ubuntu 22.04 (GPU; Python 3.11 from the deadsnakes PPA).
#   image.sh system runtime|build   Debian packages of the final image, or of the build stage
#   image.sh python                 /opt/venv with requirements.txt
#   image.sh horovod                horovod==0.28.1 compiled against that TensorFlow
# DEVICE=gpu|cpu. With wheels in /wheelhouse (`make wheelhouse`), pip never uses the network.
set -euo pipefail
DEVICE=${DEVICE:-gpu}
export DEBIAN_FRONTEND=noninteractive

log() { echo "[image] $*"; }

pip_source() {
  if compgen -G "/wheelhouse/*.whl" >/dev/null; then
    log "installing from the wheelhouse, offline (pip --no-index)"
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse
  else
    log "no wheelhouse: installing from the package index"
  fi
}

system() {
  local pkgs
  # shellcheck disable=SC1091  # the image's own os-release
  . /etc/os-release
  apt-get update -qq
  case "$1" in
    runtime)
      if [ "$ID" = ubuntu ]; then  # 22.04 ships Python 3.10
        apt-get install -y -qq --no-install-recommends software-properties-common gpg-agent >/dev/null
        add-apt-repository -y ppa:deadsnakes/ppa
        apt-get update -qq
      fi
      pkgs="python3.11 python3.11-venv openmpi-bin openssh-client openssh-server iproute2 procps ca-certificates"
      [ "$DEVICE" = gpu ] && pkgs="$pkgs libnccl2" ;;
    build)
      pkgs="build-essential cmake libopenmpi-dev python3.11-dev"
      [ "$DEVICE" = gpu ] && pkgs="$pkgs libnccl-dev" ;;
    *) echo "error: image.sh system: expected runtime or build, got '$1'" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086  # a list of package names
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  # No secrets in any layer: sshd's host keys are made by each container (ssh-keygen -A).
  rm -f /etc/ssh/ssh_host_*
  apt-get clean
  rm -rf /var/lib/apt/lists/*
}

python() {
  pip_source
  python3.11 -m venv /opt/venv
  /opt/venv/bin/pip install -q --no-cache-dir --upgrade "pip<25"
  # The GPU image takes tensorflow==2.15.1 (CUDA 12.2, cuDNN 8.9) in place of tensorflow-cpu.
  [ "$DEVICE" = gpu ] && sed -i 's/^tensorflow-cpu==/tensorflow==/' /tmp/requirements.txt
  /opt/venv/bin/pip install -q --no-cache-dir -r /tmp/requirements.txt
}

horovod() {
  pip_source
  [ "$DEVICE" = gpu ] && export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME=/usr/local/cuda
  log "building horovod==0.28.1 (about 5 minutes on 2 cores)"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    /opt/venv/bin/pip install -q --no-cache-dir --no-build-isolation horovod==0.28.1
  /opt/venv/bin/horovodrun --check-build
}

case "${1:-}" in
  system) system "${2:-}" ;;
  python) python ;;
  horovod) horovod ;;
  *) echo "error: usage: image.sh system runtime|build | python | horovod" >&2; exit 2 ;;
esac
