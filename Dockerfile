# lmconvert serve on an NVIDIA GPU.
#   docker build -t lmconvert .
#   docker run --gpus all -p 23333:23333 -v $PWD/engines:/models:ro lmconvert /models/qwen3-8b-w4 --reasoning-parser qwen3
# The torch wheel brings its own CUDA libraries; the base image gives the driver hookup (NVIDIA container
# toolkit) and gcc + Python headers, which Triton needs to compile its kernel launchers at first use (g++ is for
# the CPU: inductor compiles the CPU decode step with it).
# Any Debian / Ubuntu base with a python3 that the torch wheel supports works: deploy/container_check.sh builds
# this same file on a Debian bookworm root made with debootstrap and CPU torch from a local wheel directory:
#   podman build -v /opt/wheels:/wheels:ro --build-arg BASE_IMAGE=localhost/lmconvert-base:bookworm \
#     --build-arg TORCH_VERSION=2.13.0+cpu --build-arg TORCH_INDEX=https://pypi.org/simple \
#     --build-arg EXTRA_PIP_ARGS="--find-links /wheels" -t lmconvert:cpu .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ libc6-dev curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/lmconvert
# torch first, in its own layer, so code changes do not re-download it
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# more pip options for both installs, e.g. "--find-links /wheels" or "--index-url https://mirror/simple"
ARG EXTRA_PIP_ARGS=""
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" ${EXTRA_PIP_ARGS}
COPY pyproject.toml README.md ./
COPY lmconvert lmconvert
COPY quant quant
COPY kernels kernels
COPY runtime runtime
COPY calibration_data calibration_data
RUN pip install . ${EXTRA_PIP_ARGS} && lmconvert --help > /dev/null

RUN useradd --create-home --uid 1000 lmconvert
USER lmconvert
EXPOSE 23333
# 503 while the model loads, 200 once it serves; the long start period covers loading a large model
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD curl -fsS http://127.0.0.1:23333/health || exit 1
ENTRYPOINT ["lmconvert", "serve", "--server-name", "0.0.0.0", "--server-port", "23333"]
CMD ["/models/engine"]
