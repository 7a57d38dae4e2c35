# syntax=docker/dockerfile:1
# MLflow tracking server with the PostgreSQL driver and boto3 for S3 artifacts. Build from the
# repository root:
#   docker build -f docker/mlflow.Dockerfile -t REGISTRY/aeplat/mlflow-server:3.17.2 .
# MLFLOW_VERSION must match the mlflow that aeplat pins in pyproject.toml; tests/k8s checks it.
FROM python:3.11.13-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.8
ARG USER_ID=1001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install \
        "mlflow==${MLFLOW_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
    && mlflow --version

RUN groupadd --gid "${USER_ID}" mlflow \
    && useradd --uid "${USER_ID}" --gid "${USER_ID}" --create-home mlflow

USER ${USER_ID}:${USER_ID}
WORKDIR /tmp
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
