# syntax=docker/dockerfile:1
# aeplat with a CUDA build of torch: one image for the Ray head, the GPU workers, the job
# submitter and the autoscaler. Build from the repository root:
#   docker build -f docker/aeplat.Dockerfile -t REGISTRY/aeplat/aeplat:0.1.0 .
# PyPI's Linux x86_64 torch wheel brings the CUDA runtime as pip packages, so the base image
# needs no CUDA toolkit; the GPU nodes provide the NVIDIA driver.
# Keep these versions inside the ranges of pyproject.toml; tests/k8s checks that they are.
FROM python:3.11.13-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2
ARG OPTUNA_VERSION=5.1.0
ARG USER_ID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay's default health probes for Ray pods call wget from bash.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid "${USER_ID}" aeplat \
    && useradd --uid "${USER_ID}" --gid "${USER_ID}" --create-home --shell /bin/bash aeplat

WORKDIR /opt/aeplat
COPY pyproject.toml README.md ./
COPY aeplat ./aeplat

# Everything is installed at build time; Ray jobs install nothing when they start.
RUN pip install \
        "torch==${TORCH_VERSION}" \
        "ray[default,tune]==${RAY_VERSION}" \
        "mlflow==${MLFLOW_VERSION}" \
        "optuna==${OPTUNA_VERSION}" \
        . \
    && aeplat --help > /dev/null

USER ${USER_ID}:${USER_ID}
WORKDIR /home/aeplat
