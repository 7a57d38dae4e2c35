"""Each offline check rejects a manifest that breaks its rule, so a passing check means something."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import k8s_checks
from aeplat.platform import k8s


def _ray_job() -> dict:
    job = k8s.JobOptions(name="check", namespace="aeplat", entrypoint=k8s.search_entrypoint(["--dataset", "brats"]))
    return k8s.ray_job(job, k8s.ClusterOptions())


def _head_container(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _deployment() -> dict:
    container = {
        "name": "app",
        "image": "registry.example.com/app:1.0.0",
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "selector": {"matchLabels": {"app": "app"}},
            "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [container]}},
        },
    }


def test_valid_samples_pass(ray_schema_dir: Path) -> None:
    assert k8s_checks.validate_manifest(_ray_job(), ray_schema_dir) == []
    assert k8s_checks.validate_manifest(_deployment(), ray_schema_dir) == []


def test_unknown_rayjob_field_fails(ray_schema_dir: Path) -> None:
    manifest = _ray_job()
    manifest["spec"]["shutdownAfterJobFinish"] = True
    _head_container(manifest)["imagePullPolicyy"] = "Always"

    problems = k8s_checks.validate_ray_resource(manifest, ray_schema_dir)

    assert any("unknown field 'shutdownAfterJobFinish'" in problem for problem in problems)
    assert any("unknown field 'imagePullPolicyy'" in problem for problem in problems)


def test_rayjob_wrong_type_fails(ray_schema_dir: Path) -> None:
    manifest = _ray_job()
    manifest["spec"]["backoffLimit"] = "two"

    problems = k8s_checks.validate_ray_resource(manifest, ray_schema_dir)

    assert any("spec/backoffLimit" in problem for problem in problems)


def test_schema_defaults_fill_required_fields() -> None:
    schema = {"properties": {"group": {"properties": {"maxReplicas": {"type": "integer", "default": 5}}, "required": ["maxReplicas"]}}}
    value: dict = {"group": {}}

    k8s_checks.apply_schema_defaults(schema, value)

    assert value == {"group": {"maxReplicas": 5}}


def test_repeated_container_name_fails(ray_schema_dir: Path) -> None:
    manifest = _ray_job()
    pod = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["containers"].append(copy.deepcopy(pod["containers"][0]))

    problems = k8s_checks.validate_ray_resource(manifest, ray_schema_dir)

    assert any("repeated key {'name': 'ray-worker'}" in problem for problem in problems)


def test_repeated_env_name_fails(ray_schema_dir: Path) -> None:
    manifest = _ray_job()
    env = _head_container(manifest)["env"]
    env.append(copy.deepcopy(env[0]))

    problems = k8s_checks.validate_ray_resource(manifest, ray_schema_dir)

    assert any("repeated key {'name': 'AWS_ACCESS_KEY_ID'}" in problem for problem in problems)


def test_unknown_submission_mode_fails(ray_schema_dir: Path) -> None:
    manifest = _ray_job()
    manifest["spec"]["submissionMode"] = "K8sMode"

    problems = k8s_checks.validate_ray_resource(manifest, ray_schema_dir)

    assert any("submissionMode 'K8sMode'" in problem for problem in problems)


def test_invalid_ray_pod_template_fails(ray_schema_dir: Path) -> None:
    manifest = _ray_job()
    manifest["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] = 3

    problems = k8s_checks.validate_ray_resource(manifest, ray_schema_dir)

    assert any("submitterPodTemplate" in problem and "Kubernetes 1.29" in problem for problem in problems)


def test_missing_resources_fail(ray_schema_dir: Path) -> None:
    manifest = _deployment()
    del manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    problems = k8s_checks.validate_manifest(manifest, ray_schema_dir)

    assert "Deployment/app: spec/template/spec/containers/app: resources.limits.cpu is missing" in problems
    assert "Deployment/app: spec/template/spec/containers/app: resources.limits.memory is missing" in problems


def test_unequal_gpu_requests_fail() -> None:
    manifest = _ray_job()
    resources = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    resources["requests"]["nvidia.com/gpu"] = "0"

    problems = k8s_checks.policy_problems(manifest)

    assert any("nvidia.com/gpu requests 0 differ from limits 1" in problem for problem in problems)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"runAsUser": 0}, "runAsUser is 0"),
        ({"runAsNonRoot": False}, "runAsNonRoot is not true"),
        ({"allowPrivilegeEscalation": True}, "allowPrivilegeEscalation is not false"),
        ({"capabilities": {"drop": ["NET_RAW"]}}, "capabilities.drop does not contain ALL"),
        ({"seccompProfile": {"type": "Unconfined"}}, "seccompProfile.type is not RuntimeDefault"),
        ({"privileged": True}, "privileged is true"),
    ],
)
def test_root_or_privileged_container_fails(change: dict, expected: str) -> None:
    manifest = _deployment()
    manifest["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(change)

    problems = k8s_checks.policy_problems(manifest)

    assert any(expected in problem for problem in problems), problems


def test_insecure_autoscaler_fails() -> None:
    manifest = _ray_job()
    del manifest["spec"]["rayClusterSpec"]["autoscalerOptions"]["securityContext"]

    problems = k8s_checks.policy_problems(manifest)

    # The head pod's context still makes the autoscaler non-root; the container-only fields fail.
    assert "RayJob/check: autoscalerOptions: allowPrivilegeEscalation is not false" in problems
    assert "RayJob/check: autoscalerOptions: capabilities.drop does not contain ALL" in problems


def test_secret_literal_fails() -> None:
    manifest = _deployment()
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "POSTGRES_PASSWORD", "value": "hunter2"}]
    container["args"] = ["--backend-store-uri=postgresql://mlflow:hunter2@postgres/mlflow"]

    problems = k8s_checks.policy_problems(manifest)

    assert any("env POSTGRES_PASSWORD has a literal value" in problem for problem in problems)
    assert any("args contains what looks like a credential" in problem for problem in problems)


def test_runtime_env_secret_and_pip_fail() -> None:
    manifest = _ray_job()
    manifest["spec"]["runtimeEnvYAML"] = "pip: [torch]\nenv_vars:\n  AWS_SECRET_ACCESS_KEY: abc\n"
    manifest["spec"]["entrypoint"] = "AWS_SECRET_ACCESS_KEY=abc aeplat search"

    problems = k8s_checks.policy_problems(manifest)

    assert "RayJob/check: runtimeEnvYAML installs packages with pip; bake them into the image" in problems
    assert any("env_vars AWS_SECRET_ACCESS_KEY has a literal value" in problem for problem in problems)
    assert "RayJob/check: entrypoint contains what looks like a credential" in problems


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("registry.example.com/aeplat/aeplat:latest", "uses the tag 'latest'"),
        ("registry.example.com:5000/aeplat/aeplat", "has no tag"),
        ("postgres", "has no tag"),
    ],
)
def test_unpinned_image_fails(image: str, expected: str) -> None:
    manifest = _ray_job()
    _head_container(manifest)["image"] = image

    problems = k8s_checks.policy_problems(manifest)

    assert any(expected in problem for problem in problems), problems


def test_digest_and_registry_port_pass() -> None:
    assert k8s_checks.image_problems("registry.example.com:5000/aeplat/aeplat@sha256:" + "0" * 64) == []
    assert k8s_checks.image_problems("registry.example.com:5000/aeplat/aeplat:0.1.0") == []


@pytest.mark.parametrize("version", k8s_checks.KUBERNETES_VERSIONS)
def test_invalid_builtin_field_fails(version: str) -> None:
    unknown = _deployment()
    unknown["spec"]["replica"] = 2
    wrong_type = _deployment()
    wrong_type["spec"]["replicas"] = "two"

    assert any("'replica' was unexpected" in problem for problem in k8s_checks.validate_builtin(unknown, version))
    assert any("spec/replicas" in problem for problem in k8s_checks.validate_builtin(wrong_type, version))


def test_field_newer_than_oldest_version_fails() -> None:
    # Pod-level resources exist in the PodSpec of Kubernetes 1.32 and later only.
    manifest = _deployment()
    manifest["spec"]["template"]["spec"]["resources"] = {"limits": {"cpu": "1"}}

    assert k8s_checks.validate_builtin(manifest, "1.29") != []
    assert k8s_checks.validate_builtin(manifest, "1.37") == []


def test_unknown_builtin_kind_fails() -> None:
    manifest = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}

    problems = k8s_checks.validate_builtin(manifest, "1.37")

    assert len(problems) == 1
    assert problems[0].startswith("Widget/w: no Kubernetes 1.37 schema")
