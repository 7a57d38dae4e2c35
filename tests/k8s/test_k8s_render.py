"""`aeplat k8s render`: the RayJob it writes is valid, safe, and sized from --gpus."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

import k8s_checks
from aeplat.platform import k8s
from aeplat.platform.cli import build_parser, main
from aeplat.platform.cli_k8s import render_job

REQUIRED = ["--dataset", "brats", "--data-dir", "s3://bucket/brats", "--storage", "s3://bucket/aeplat-runs"]


def _render(*options: str) -> dict:
    return render_job(build_parser().parse_args(["k8s", "render", *REQUIRED, *options]))


def _cluster(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]


def _worker_group(job: dict) -> dict:
    return _cluster(job)["workerGroupSpecs"][0]


def _pod_specs(job: dict) -> list[dict]:
    return [template["spec"] for _, template in k8s_checks.ray_pod_templates(job)]


def _entrypoint_args(job: dict) -> list[str]:
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["aeplat", "search"]
    return words[2:]


@pytest.mark.parametrize(
    "options",
    [
        ["--modality", "flair", "--trials", "200", "--gpus", "8"],
        ["--gpus", "16", "--gpus-per-worker", "4", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2", "--worker-cpus", "16"],
        ["--gpus", "1", "--namespace", "aeplat-dev", "--data-claim", "brats-scans", "--data-dir", "/data/brats"],
    ],
)
def test_rendered_job_valid(options: list[str], ray_schema_dir: Path) -> None:
    assert k8s_checks.validate_manifest(_render(*options), ray_schema_dir) == []


def test_job_lifecycle() -> None:
    spec = _render()["spec"]

    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["preRunningDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1
    assert "runtimeEnvYAML" not in spec


def test_gpus_size_worker_group_and_trials() -> None:
    job = _render("--gpus", "8")
    group = _worker_group(job)
    args = _entrypoint_args(job)

    assert group["minReplicas"] == 0
    assert group["maxReplicas"] == 8
    assert args[args.index("--gpus-per-trial") + 1] == "1.0"
    assert args[args.index("--max-concurrent") + 1] == "8"


def test_fractional_gpus_per_trial() -> None:
    job = _render("--gpus", "8", "--gpus-per-worker", "2", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2")
    args = _entrypoint_args(job)
    limits = _worker_group(job)["template"]["spec"]["containers"][0]["resources"]["limits"]

    assert _worker_group(job)["maxReplicas"] == 4
    assert limits["nvidia.com/gpu"] == "2"
    assert args[args.index("--max-concurrent") + 1] == "16"


def test_explicit_max_concurrent_kept() -> None:
    args = _entrypoint_args(_render("--gpus", "8", "--max-concurrent", "3"))

    assert args[args.index("--max-concurrent") + 1] == "3"


def test_head_and_gpu_workers() -> None:
    job = _render()
    cluster = _cluster(job)
    worker = _worker_group(job)["template"]["spec"]
    resources = worker["containers"][0]["resources"]

    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    assert resources["requests"] == resources["limits"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert worker["nodeSelector"] == k8s.GPU_NODE_SELECTOR
    assert worker["tolerations"] == [k8s.GPU_TOLERATION]


def test_shm_holds_object_store() -> None:
    job = _render("--worker-memory-gib", "64")
    group = _worker_group(job)
    spec = group["template"]["spec"]
    shm = next(volume for volume in spec["volumes"] if volume["name"] == "dshm")
    object_store_gib = int(group["rayStartParams"]["object-store-memory"]) / 1024**3

    assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) >= object_store_gib + k8s.DATALOADER_SHM_GIB
    assert int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) < 64


def test_one_image_everywhere() -> None:
    job = _render("--image", "registry.example.com/aeplat/aeplat:0.2.0")
    images = {container["image"] for spec in _pod_specs(job) for container in spec["containers"]}

    assert images == {"registry.example.com/aeplat/aeplat:0.2.0"}
    assert "image" not in _cluster(job)["autoscalerOptions"]


def test_settings_and_credentials_by_reference() -> None:
    job = _render()
    for spec in _pod_specs(job)[1:]:
        container = spec["containers"][0]
        env = {variable["name"]: variable for variable in container["env"]}

        assert container["envFrom"] == [{"configMapRef": {"name": k8s.SETTINGS_CONFIG_MAP}}]
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == k8s.S3_SECRET
        assert all("value" not in variable for variable in container["env"])


def test_shell_metacharacters_stay_quoted() -> None:
    hostile = "s3://bucket/brats; rm -rf /"

    job = _render("--data-dir", hostile, "--experiment", "$(whoami) `id` && echo")
    args = _entrypoint_args(job)

    assert args[args.index("--data-dir") + 1] == hostile
    assert args[args.index("--experiment") + 1] == "$(whoami) `id` && echo"
    assert "'s3://bucket/brats; rm -rf /'" in job["spec"]["entrypoint"]


def test_entrypoint_round_trips_to_search_options() -> None:
    job = _render("--trials", "200", "--epochs", "12", "--seed", "7", "--modality", "t2")
    search_args = build_parser().parse_args(["search", *_entrypoint_args(job)])

    assert (search_args.trials, search_args.epochs, search_args.seed, search_args.modality) == (200, 12, 7, "t2")
    assert search_args.data_dir == "s3://bucket/brats"
    assert str(search_args.storage).startswith("s3:")
    assert search_args.gpus_per_trial == 1.0


def test_default_name_and_namespace() -> None:
    job = _render("--modality", "t1ce", "--namespace", "aeplat-dev")

    assert job["metadata"] == {"name": "aeplat-search-brats-t1ce", "namespace": "aeplat-dev", "labels": k8s.RAY_POD_LABELS}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--storage", "runs"], "--storage 'runs' is not an s3:// URI"),
        (["--data-dir", "/scans/brats"], "--data-dir '/scans/brats' is not readable in the pods"),
        (["--gpus", "6", "--gpus-per-worker", "4"], "--gpus 6 is not a multiple of --gpus-per-worker 4"),
        (["--gpus-per-trial", "2"], "--gpus-per-trial must lie in (0, --gpus-per-worker=1]"),
        (["--cpus-per-trial", "16"], "need more than --worker-cpus 8"),
        (["--image", "registry.example.com/aeplat/aeplat:latest"], "uses the tag 'latest'"),
        (["--image", "registry.example.com/aeplat/aeplat"], "has no tag"),
        (["--namespace", "Aeplat_Dev"], "--namespace 'Aeplat_Dev' is not a valid Kubernetes name"),
        (["--gpus", "0"], "--gpus must be at least 1, got 0"),
    ],
)
def test_invalid_options_rejected(options: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["k8s", "render", *REQUIRED, *options])

    assert status == 2
    assert expected in " ".join(capsys.readouterr().err.split())


def test_output_file_written(tmp_path: Path) -> None:
    output = tmp_path / "rayjob.yaml"

    status = main(["k8s", "render", *REQUIRED, "--gpus", "4", "-o", str(output)])

    assert status == 0
    assert yaml.safe_load(output.read_text(encoding="utf-8"))["kind"] == "RayJob"


def test_stdout_written(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["k8s", "render", *REQUIRED])

    assert status == 0
    assert yaml.safe_load(capsys.readouterr().out)["spec"]["entrypoint"].startswith("aeplat search --dataset brats")
