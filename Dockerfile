# horovod_mlstm image: the pinned stack of `make setup`, for GPUs (default) or CPUs.
#   docker build -t horovod_mlstm:gpu .
#   docker build -t horovod_mlstm:cpu --build-arg DEVICE=cpu --build-arg BASE_IMAGE=ubuntu:22.04 .
# Layers go from slowest-changing to fastest: system, Python stack, Horovod, then the code,
# so editing the code does not rebuild Horovod.
ARG BASE_IMAGE=nvidia/cuda:12.2.2-cudnn8-devel-ubuntu22.04
FROM ${BASE_IMAGE}

ARG DEVICE=gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10), Open MPI, ssh for multi-node
# launches, and (GPU) NCCL from the CUDA repository that the base image already configures.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv \
       build-essential cmake git openmpi-bin libopenmpi-dev openssh-client openssh-server iproute2 \
    && if [ "$DEVICE" = gpu ]; then apt-get install -y --no-install-recommends libnccl2 libnccl-dev; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /opt/horovod_mlstm
COPY requirements.txt .
# The GPU image takes tensorflow==2.15.1 (CUDA 12.2, cuDNN 8.9) in place of tensorflow-cpu.
RUN pip install --no-cache-dir --upgrade "pip<25" \
    && if [ "$DEVICE" = gpu ]; then sed -i 's/^tensorflow-cpu==/tensorflow==/' requirements.txt; fi \
    && pip install --no-cache-dir -r requirements.txt

RUN if [ "$DEVICE" = gpu ]; then export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME=/usr/local/cuda; fi \
    && HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
       HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
       pip install --no-cache-dir --no-build-isolation horovod==0.28.1 \
    && horovodrun --check-build

COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# `docker run IMAGE -np 8 -H localhost:8 python train.py --flagfile=configs/paper_32k.cfg ...`
ENTRYPOINT ["horovodrun"]
CMD ["-np", "1", "-H", "localhost:1", "python", "train.py", "--flagfile=configs/cpu_demo.cfg"]
