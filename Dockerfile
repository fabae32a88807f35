# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t kondense-operator:0.1.0 .   # light: kopf, kubernetes, boto3
#   docker build --target jobs     -t kondense-jobs:0.1.0 .       # the stages: torch, trl, llama.cpp
# GPU build of llama.cpp (GGUF evaluation on the GPU; torch uses the GPU either way):
#   docker build --target jobs --build-arg LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" -t kondense-jobs:0.1.0-cuda .
# Build stages hold compilers and headers; the final stages copy only the virtual environment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch 2.14 from PyPI is built for CUDA 13.0 (it brings its own CUDA libraries as wheels);
# the CUDA images match it for llama.cpp's optional CUDA build (nvcc, libcudart, libcublas).
ARG CUDA_VERSION=13.0.1
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# jobs: python -m kondense_jobs <stage> --spec ... (what every stage Job runs)
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS jobs-build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# llama-cpp-python has no wheels on PyPI and is compiled here. GGML_NATIVE=OFF with AVX2 and no
# AVX512/AMX/llamafile: native builds on AVX512/AMX hosts crashed in llama_decode (see README).
ARG LLAMA_CMAKE_ARGS=""
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_LLAMAFILE=OFF ${LLAMA_CMAKE_ARGS}" \
    CMAKE_BUILD_PARALLEL_LEVEL=8
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY jobs ./jobs
RUN pip install ".[jobs]"
# llama.cpp's converter (convert_hf_to_gguf.py and its gguf-py) from the sdist of the installed
# llama-cpp-python, at a path the Job's emptyDir cache mount does not hide.
RUN python -m kondense_jobs.gguf install-converter --dest /opt/venv/share/kondense/llama.cpp \
    && python -m compileall -q /opt/venv/share/kondense/llama.cpp
# llama-imatrix and llama-quantize (importance-matrix K-quants) from the same sdist, with the same
# CMAKE_ARGS as the library (CUDA tools in the GPU build), statically linked.
RUN python -m kondense_jobs.gguf install-tools --dest /opt/venv/share/kondense/llama.cpp/bin

FROM ${CUDA_RUNTIME_IMAGE} AS jobs
ENV DEBIAN_FRONTEND=noninteractive
# python3 matches the build stage's (both Ubuntu 24.04), so the copied venv runs as is;
# libgomp1: llama.cpp's OpenMP threads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 kondense \
    && useradd --uid 65532 --gid 65532 --home-dir /home/kondense --no-create-home --shell /usr/sbin/nologin kondense \
    && mkdir -p /home/kondense/.cache /scratch \
    && chown -R 65532:65532 /home/kondense /scratch
COPY --from=jobs-build /opt/venv /opt/venv
# The Job mounts emptyDirs at /scratch and /home/kondense/.cache and keeps the root read-only.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/kondense \
    TMPDIR=/scratch \
    HF_HOME=/home/kondense/.cache/huggingface \
    KONDENSE_CACHE=/home/kondense/.cache/kondense \
    KONDENSE_LLAMA_CPP_DIR=/opt/venv/share/kondense/llama.cpp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /scratch
USER 65532:65532
ENTRYPOINT ["python", "-m", "kondense_jobs"]

# ---------------------------------------------------------------------------------------------
# operator: python -m kondense.operator (the chart's Deployment); the default target
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY jobs ./jobs
# Only the light package: no extras, no torch.
RUN pip install .

FROM ${PYTHON_IMAGE} AS operator
# A passwd entry for 65532: kopf names itself after the user when POD_ID is unset.
RUN groupadd --gid 65532 kondense \
    && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kondense
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
ENTRYPOINT ["python", "-m", "kondense.operator"]
