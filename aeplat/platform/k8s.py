"""Build the KubeRay RayJob that runs `aeplat search` on a Kubernetes cluster with GPU nodes.

The manifests under k8s/ create what the job refers to by name: the ConfigMap
`aeplat-settings`, the Secret `aeplat-s3-credentials` and the MLflow service. The Ray pods run
one image, so head, workers, submitter and autoscaler see the same code and dependencies.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "registry.example.com/aeplat/aeplat:0.1.0"
SETTINGS_CONFIG_MAP = "aeplat-settings"
S3_SECRET = "aeplat-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
RAY_POD_LABELS = {"app.kubernetes.io/name": "aeplat-ray", "app.kubernetes.io/part-of": "aeplat"}

# User id that docker/aeplat.Dockerfile creates and runs as.
IMAGE_USER_ID = 1000

GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

# Ray's object store lives in /dev/shm. It gets this share of a pod's memory limit, and /dev/shm
# gets the object store plus room for PyTorch DataLoader workers, which also pass batches there.
OBJECT_STORE_FRACTION = 0.25
DATALOADER_SHM_GIB = 2

_NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GIB = 1024**3


class RenderError(ValueError):
    """Invalid render option, with a message that names the option and the fix."""


@dataclass(frozen=True)
class PodSize:
    """CPU cores and memory in GiB of one Ray pod, used as both requests and limits."""

    cpus: int
    memory_gib: int


@dataclass(frozen=True)
class ClusterOptions:
    """Shape of the Ray cluster: image, head size and the GPU worker group."""

    image: str = DEFAULT_IMAGE
    head: PodSize = field(default_factory=lambda: PodSize(cpus=4, memory_gib=16))
    worker: PodSize = field(default_factory=lambda: PodSize(cpus=8, memory_gib=32))
    gpus_per_worker: int = 1
    max_workers: int = 8
    worker_idle_timeout_s: int = 300
    data_claim: str | None = None


@dataclass(frozen=True)
class JobOptions:
    """Lifecycle settings of one RayJob, with times in seconds."""

    name: str
    namespace: str
    entrypoint: str
    backoff_limit: int = 2
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 7 * 24 * 3600
    pre_running_deadline_seconds: int = 1800


def search_entrypoint(search_args: list[str]) -> str:
    """Return the `aeplat search` command line, quoted so that no option value reaches a shell unquoted."""
    return shlex.join(["aeplat", "search", *search_args])


def job_name(dataset: str, modality: str | None) -> str:
    """Return the default RayJob name, for example `aeplat-search-brats-flair`."""
    parts = ["aeplat-search", dataset] + ([modality] if modality else [])
    return "-".join(parts).lower().replace("_", "-")


def validate_name(option: str, name: str) -> None:
    """Raise RenderError unless `name` is a valid Kubernetes object name (an RFC 1123 label)."""
    if len(name) > 63 or not _NAME_PATTERN.match(name):
        raise RenderError(
            f"{option} {name!r} is not a valid Kubernetes name. Use at most 63 lowercase letters, "
            "digits and '-', starting and ending with a letter or digit."
        )


def ray_job(job: JobOptions, cluster: ClusterOptions) -> dict[str, Any]:
    """Build a RayJob that creates a Ray cluster, runs the entrypoint on it and deletes it afterwards."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": dict(RAY_POD_LABELS)},
        "spec": {
            "entrypoint": job.entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": job.ttl_seconds_after_finished,
            "activeDeadlineSeconds": job.active_deadline_seconds,
            "preRunningDeadlineSeconds": job.pre_running_deadline_seconds,
            "backoffLimit": job.backoff_limit,
            "submitterPodTemplate": _submitter_template(cluster),
            "rayClusterSpec": ray_cluster_spec(cluster),
        },
    }


def ray_cluster(name: str, cluster: ClusterOptions) -> dict[str, Any]:
    """Build a long-lived RayCluster with the same image and groups as a RayJob's cluster."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "labels": dict(RAY_POD_LABELS)},
        "spec": ray_cluster_spec(cluster),
    }


def ray_cluster_spec(cluster: ClusterOptions) -> dict[str, Any]:
    """Build the cluster part shared by RayJob and RayCluster: a CPU head and a GPU worker group scaled from 0."""
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": cluster.worker_idle_timeout_s,
            "imagePullPolicy": "IfNotPresent",
            "resources": _resources(PodSize(cpus=1, memory_gib=1)),
            "securityContext": container_security_context(),
        },
        "headGroupSpec": {
            # num-cpus 0 keeps trials off the head, which runs the driver, GCS and dashboard.
            "rayStartParams": {
                "num-cpus": "0",
                "object-store-memory": str(_object_store_bytes(cluster.head)),
            },
            "template": _ray_pod_template(cluster, "ray-head", cluster.head, gpus=0),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "minReplicas": 0,
                "replicas": 0,
                "maxReplicas": cluster.max_workers,
                "idleTimeoutSeconds": cluster.worker_idle_timeout_s,
                "rayStartParams": {
                    "num-cpus": str(cluster.worker.cpus),
                    "num-gpus": str(cluster.gpus_per_worker),
                    "object-store-memory": str(_object_store_bytes(cluster.worker)),
                },
                "template": _ray_pod_template(cluster, "ray-worker", cluster.worker, gpus=cluster.gpus_per_worker),
            }
        ],
    }


def container_security_context() -> dict[str, Any]:
    """Return the container security context of every Ray container: non-root, no privilege escalation, no capabilities."""
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_USER_ID,
        "runAsGroup": IMAGE_USER_ID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def dump_manifest(manifest: dict[str, Any]) -> str:
    """Serialise a manifest as YAML in the key order it was built."""
    # A wide line keeps the entrypoint on one line, where it reads as the command it runs.
    return yaml.safe_dump(manifest, sort_keys=False, width=2**16)


def _ray_pod_template(cluster: ClusterOptions, container_name: str, size: PodSize, gpus: int) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": container_name,
        "image": cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "envFrom": [{"configMapRef": {"name": SETTINGS_CONFIG_MAP}}],
        "env": _credential_env(),
        "resources": _resources(size, gpus),
        "securityContext": container_security_context(),
        "volumeMounts": _ray_volume_mounts(cluster),
    }
    spec: dict[str, Any] = {
        "automountServiceAccountToken": container_name == "ray-head",
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": _ray_volumes(cluster, size),
    }
    if gpus:
        spec["nodeSelector"] = dict(GPU_NODE_SELECTOR)
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    return {"metadata": {"labels": dict(RAY_POD_LABELS)}, "spec": spec}


def _submitter_template(cluster: ClusterOptions) -> dict[str, Any]:
    # KubeRay fills in the submitter's command (`ray job submit ...`). The submitter needs no
    # credentials because the driver runs on the head pod.
    container = {
        "name": "ray-job-submitter",
        "image": cluster.image,
        "resources": _resources(PodSize(cpus=1, memory_gib=1)),
        "securityContext": container_security_context(),
    }
    return {
        "metadata": {"labels": dict(RAY_POD_LABELS)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": _pod_security_context(),
            "containers": [container],
        },
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_USER_ID,
        "runAsGroup": IMAGE_USER_ID,
        "fsGroup": IMAGE_USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _credential_env() -> list[dict[str, Any]]:
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}}}
        for key in S3_SECRET_KEYS
    ]


def _resources(size: PodSize, gpus: int = 0) -> dict[str, Any]:
    amounts: dict[str, str] = {"cpu": str(size.cpus), "memory": f"{size.memory_gib}Gi"}
    if gpus:
        amounts[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _object_store_bytes(size: PodSize) -> int:
    return int(size.memory_gib * _GIB * OBJECT_STORE_FRACTION)


def _shm_size_limit(size: PodSize) -> str:
    object_store_gib = math.ceil(size.memory_gib * OBJECT_STORE_FRACTION)
    return f"{object_store_gib + DATALOADER_SHM_GIB}Gi"


def _ray_volumes(cluster: ClusterOptions, size: PodSize) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size_limit(size)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    if cluster.data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": cluster.data_claim, "readOnly": True}})
    return volumes


def _ray_volume_mounts(cluster: ClusterOptions) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    if cluster.data_claim:
        mounts.append({"name": "data", "mountPath": "/data", "readOnly": True})
    return mounts
