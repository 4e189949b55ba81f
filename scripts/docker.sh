#!/usr/bin/env bash
# The Docker image, built and proven on machines without a registry or a package index
# (the make targets docker-*, wheelhouse call this; docs/CLUSTER.md, section 6).
#   docker.sh daemon        dockerd reachable: installs Debian's docker.io and starts it if need be
#   docker.sh base          Debian 12 base image from debootstrap + `docker import` (no registry)
#   docker.sh wheelhouse    every pinned wheel and Horovod's source in wheelhouse/, by the host's pip
#   docker.sh build         the image ($IMAGE, $DEVICE, $BASE_IMAGE), offline when wheelhouse/ is full
#   docker.sh run [CMD...]  the container with runs/ and data/ mounted; default: the 2-process demo
#   docker.sh test          all of the above for the CPU image, then checks the demo's summary.json
# Settings (environment): DEVICE=gpu|cpu, IMAGE, BASE_IMAGE, NP, RUNS, DATA, DEBIAN_MIRROR, PYTHON,
# DOCKER_BUILD_ARGS (more `docker build` options, e.g. --build-arg http_proxy=...), DOCKERD_LOG.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-gpu}
IMAGE=${IMAGE:-horovod_mlstm:$DEVICE}
LOCAL_BASE=horovod_mlstm-base:bookworm
if [ "$DEVICE" = cpu ]; then DEFAULT_BASE=debian:bookworm-slim; else DEFAULT_BASE=nvidia/cuda:12.2.2-cudnn8-devel-ubuntu22.04; fi
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
NP=${NP:-2}
RUNS=$(realpath -m "${RUNS:-runs}")  # absolute: a relative -v source would be a named volume
DATA=$(realpath -m "${DATA:-data}")
DOCKERD_LOG=${DOCKERD_LOG:-build/dockerd.log}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DOCKER_BUILDKIT=0  # the classic builder: Debian's docker.io has no buildx

log() { echo "[docker] $*"; }
die() { echo "[docker] error: $*" >&2; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] || die "$1 is not installed and installing it needs root: sudo apt-get install $2"
  log "installing Debian's $2"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null; } \
    || die "apt-get install $2 failed"
}

daemon() {
  command -v docker >/dev/null || apt_install docker docker.io
  local why
  why=$(docker info 2>&1) && return 0  # docker 20.10 prints its errors on stdout
  case "$why" in
    *"permission denied"*) die "no permission to use the Docker daemon (/var/run/docker.sock): run as root or join the docker group" ;;
  esac
  command -v dockerd >/dev/null || apt_install dockerd docker.io
  [ "$(id -u)" = 0 ] || die "dockerd is not running and starting it needs root"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  log "starting dockerd (log: $DOCKERD_LOG)"
  setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
  STARTED_DOCKERD=$!  # test stops it again (cleanup)
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 $! 2>/dev/null || break
    sleep 1
  done
  die "dockerd did not start: $(grep -m1 -iE 'level=(error|fatal)|failed' "$DOCKERD_LOG" || tail -n1 "$DOCKERD_LOG")"
}

base() {
  daemon
  command -v debootstrap >/dev/null || apt_install debootstrap debootstrap
  local root=build/rootfs start=$SECONDS
  rm -rf --one-file-system "$root" && mkdir -p build  # never into a bind mount a killed debootstrap left
  log "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR"
  debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >build/debootstrap.log 2>&1 \
    || die "debootstrap failed: $(tail -n1 build/debootstrap.log) (whole log: build/debootstrap.log)"
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
    "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" >"$root/etc/apt/sources.list"
  # Nothing of the build host: its DNS settings and name, apt's downloads and lists.
  rm -f "$root"/etc/resolv.conf "$root"/etc/hostname
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null
  rm -rf --one-file-system "$root"
  log "$LOCAL_BASE: $(docker image inspect -f '{{.Size}}' "$LOCAL_BASE" | awk '{printf "%.0f MB", $1/1e6}') in $((SECONDS - start)) s"
}

wheelhouse() {
  local py=${PYTHON:-python3.11} reqs=build/requirements-$DEVICE.txt start=$SECONDS glibc max
  [ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || py=.venv/bin/python
  "$py" -m pip --version >/dev/null 2>&1 \
    || die "$py with pip not found: the wheelhouse is downloaded by a Python 3.11 pip on the host (PYTHON=...)"
  # The host's pip picks wheels for the host's glibc: not newer than the image's, or they will not install.
  if [ "$DEVICE" = gpu ]; then max=2.35; else max=2.36; fi  # Ubuntu 22.04, Debian 12
  glibc=$("$py" -c 'import platform; print(platform.libc_ver()[1])')
  [ "$(printf '%s\n%s\n' "$glibc" "$max" | sort -V | tail -n1)" = "$max" ] \
    || die "this host's glibc $glibc is newer than the $DEVICE image's $max: download the wheelhouse on an older host"
  mkdir -p build wheelhouse
  sed "$([ "$DEVICE" = gpu ] && echo 's/^tensorflow-cpu==/tensorflow==/')" requirements.txt >"$reqs"
  log "downloading the pinned wheels ($DEVICE) and Horovod's source into wheelhouse/"
  "$py" -m pip download -q -d wheelhouse --only-binary=:all: "pip<25" -r "$reqs"
  "$py" -m pip download -q -d wheelhouse --no-deps --no-binary=:all: horovod==0.28.1
  log "wheelhouse/: $(du -sh wheelhouse | cut -f1) in $((SECONDS - start)) s"
}

build() {
  daemon
  local start=$SECONDS why
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "pulling $BASE_IMAGE"
    why=$(docker pull -q "$BASE_IMAGE" 2>&1 >/dev/null) || die "cannot pull $BASE_IMAGE ($(tail -n1 <<<"$why")); \
without a registry the CPU image builds on a local Debian base: make docker-base, then \
make docker-build DEVICE=cpu BASE_IMAGE=$LOCAL_BASE"
  fi
  log "building $IMAGE (DEVICE=$DEVICE, BASE_IMAGE=$BASE_IMAGE)"
  # shellcheck disable=SC2086  # DOCKER_BUILD_ARGS is a list of options
  docker build -t "$IMAGE" --build-arg DEVICE="$DEVICE" --build-arg BASE_IMAGE="$BASE_IMAGE" ${DOCKER_BUILD_ARGS:-} .
  log "$IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}') in $((SECONDS - start)) s"
}

run() {
  daemon
  local gpus=()
  command -v nvidia-smi >/dev/null 2>&1 && gpus=(--gpus all --ipc host)  # NCCL needs more than 64 MB of /dev/shm
  mkdir -p "$RUNS" "$DATA"
  [ $# -gt 0 ] || set -- bash launch/horovodrun.sh --gloo --np "$NP" --flagfile=configs/cpu_demo.cfg
  docker run --rm --network host "${gpus[@]}" -v "$RUNS:/opt/horovod_mlstm/runs" \
    -v "$DATA:/opt/horovod_mlstm/data" -v "$PWD/hostfiles:/opt/horovod_mlstm/hostfiles:ro" "$IMAGE" "$@"
}

check_summary() {  # PATH STEP WORLD: the job finished there with a finite BPC and equal replicas
  python3 - "$@" <<'EOF'
import json, math, sys
path, step, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    s = json.load(open(path))
except (OSError, ValueError) as e:
    sys.exit(f"[docker] error: the job in the container left no readable {path}: {e}")
bpc = s.get("val_bpc")
if not (isinstance(bpc, (int, float)) and math.isfinite(bpc) and 0 < bpc < 8.5) or s.get("final_step") != step \
        or s.get("world_size") != world or s.get("replicas_in_sync") is not True:
    sys.exit(f"[docker] error: {path}: expected step {step} on {world} ranks in sync with a finite validation BPC, "
             f"got step {s.get('final_step')} on {s.get('world_size')} ranks, in sync {s.get('replicas_in_sync')}, "
             f"val_bpc {bpc}")
print(f"[docker] ok: {path}: step {step} on {world} ranks, replicas in sync, validation BPC {bpc:.3f}")
EOF
}

cleanup() {
  docker rm -f hm-node1 hm-node2 >/dev/null 2>&1 || true
  docker network rm horovod_mlstm-test >/dev/null 2>&1 || true
  # A daemon this test started is stopped again, so the machine is left as it was.
  [ -z "${STARTED_DOCKERD:-}" ] || kill "$STARTED_DOCKERD" 2>/dev/null || true
}

two_hosts() {  # docs/CLUSTER.md's recipe on two containers with their own names and addresses
  local dir=$1 node launcher name
  mkdir -p "$dir/ssh" "$dir/shared"
  docker run --rm -v "$dir/ssh:/keys" "$IMAGE" ssh-keygen -q -t ed25519 -N "" -f /keys/id_ed25519
  cp "$dir/ssh/id_ed25519.pub" "$dir/ssh/authorized_keys"
  printf 'Host *\n  Port 12345\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' \
    >"$dir/ssh/config"
  chmod 600 "$dir"/ssh/*
  printf 'node1 slots=1\nnode2 slots=1\n' >"$dir/shared/hosts.txt"
  docker network create horovod_mlstm-test >/dev/null
  for node in node1 node2; do
    docker run -d --name "hm-$node" --hostname "$node" --network horovod_mlstm-test \
      -v "$dir/ssh:/root/.ssh:ro" -v "$dir/shared:/shared" "$IMAGE" \
      bash -c "ssh-keygen -A >/dev/null && mkdir -p /run/sshd && exec /usr/sbin/sshd -D -p 12345" >/dev/null
  done
  for _ in $(seq 30); do  # sshd makes its host keys first
    docker exec hm-node1 ssh node2 true 2>/dev/null && docker exec hm-node2 ssh node1 true 2>/dev/null && break
    sleep 1
  done
  for launcher in mpirun.sh "horovodrun.sh --gloo"; do
    name=${launcher%%.*}
    log "two hosts: launch/$launcher on node1 starts a rank on node2 over ssh"
    # shellcheck disable=SC2086  # the launcher and its option
    docker exec hm-node1 bash launch/$launcher --hostfile /shared/hosts.txt --model_dir="/shared/runs/$name" \
      --hidden_size=32 --embed_size=8 --seq_length=32 --batch_size_per_worker=4 --train_steps=20 \
      --warmup_steps=2 --eval_every=20 --log_every=10 --checkpoint_every=20 --eval_windows=2 >"$dir/$name.log" 2>&1 \
      || die "launch/$launcher across two containers failed: $(grep -m1 error "$dir/$name.log") (log: $dir/$name.log)"
    check_summary "$dir/shared/runs/$name/summary.json" 20 2
  done
}

test_image() {
  DEVICE=cpu IMAGE=horovod_mlstm:cpu-test
  local out=$PWD/build/docker-test start=$SECONDS
  trap cleanup EXIT
  daemon
  docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 || base
  wheelhouse  # pip download keeps what is there and adds what requirements.txt now asks for
  BASE_IMAGE=$LOCAL_BASE build
  local refused
  refused=$(BASE_IMAGE=registry.invalid/none:1 bash "$PWD/scripts/docker.sh" build 2>&1) && die "a build on an unreachable base succeeded"
  grep -q "error: cannot pull registry.invalid/none:1 .*make docker-base" <<<"$refused" \
    || die "an unreachable base gave no clear error: $refused"
  log "ok: an unreachable base is one line naming make docker-base"
  rm -rf "$out" && mkdir -p "$out"
  log "the 2-process demo, as make docker-run runs it"
  RUNS=$out/runs DATA=$out/data run
  check_summary "$out/runs/cpu_demo/summary.json" 300 2
  two_hosts "$out/cluster"
  log "docker-test passed in $((SECONDS - start)) s"
}

case "${1:-}" in
  daemon) daemon ;;
  base) base ;;
  wheelhouse) wheelhouse ;;
  build) build ;;
  run) shift; run "$@" ;;
  test) test_image ;;
  *) die "usage: docker.sh daemon|base|wheelhouse|build|run [CMD...]|test" ;;
esac
