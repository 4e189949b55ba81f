# horovod_mlstm image: the pinned stack of `make setup`, for GPUs (default) or CPUs.
#   make docker-build                 GPU: NVIDIA's CUDA 12.2 + cuDNN 8.9 image, tensorflow==2.15.1, NCCL
#   make docker-build DEVICE=cpu      CPU: Debian 12 (Python 3.11 is Debian's), tensorflow-cpu==2.15.1
# Offline: `make wheelhouse DEVICE=cpu|gpu` first; pip then installs only from wheelhouse/ (--no-index).
# Without a registry: `make docker-base` imports a debootstrapped Debian 12 as the CPU base.
# Stages: system (runtime packages), build (compilers; the venv and Horovod), then the final
# image = system + the built venv + the code, so neither compilers nor wheels ship, and editing
# the code rebuilds nothing below it. docs/CLUSTER.md (section 6) has the measured build times and sizes.
ARG BASE_IMAGE=nvidia/cuda:12.2.2-cudnn8-devel-ubuntu22.04

FROM ${BASE_IMAGE} AS system
ARG DEVICE=gpu
ENV DEVICE=${DEVICE} \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
COPY scripts/image.sh /usr/local/bin/image.sh
RUN bash /usr/local/bin/image.sh system runtime

FROM system AS build
RUN bash /usr/local/bin/image.sh system build
COPY requirements.txt /tmp/requirements.txt
COPY wheelhouse/ /wheelhouse/
RUN bash /usr/local/bin/image.sh python && bash /usr/local/bin/image.sh horovod

FROM system
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/horovod_mlstm
COPY pyproject.toml README.md requirements.txt train.py Makefile ./
COPY horovod_mlstm/ horovod_mlstm/
COPY launch/ launch/
COPY configs/ configs/
COPY hostfiles/ hostfiles/
COPY scripts/ scripts/
RUN pip install -q --no-cache-dir --no-index --no-deps --no-build-isolation -e . \
    && horovodrun --check-build

# `docker run IMAGE` trains the CPU demo with 2 processes, as `make train` does; on a cluster,
# `docker run --network host ... IMAGE bash launch/mpirun.sh --hostfile H --flagfile=...`.
CMD ["bash", "launch/horovodrun.sh", "--gloo", "--np", "2", "--flagfile=configs/cpu_demo.cfg"]
