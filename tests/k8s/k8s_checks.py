"""Offline checks of Kubernetes manifests: KubeRay CRD schemas, built-in schemas and policies.

Each check returns a list of problems, one readable line each, so a test can assert the list is
empty and show every problem at once.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"

# Oldest and newest Kubernetes minor versions the manifests must be valid for.
KUBERNETES_VERSIONS = ("1.29", "1.37")

RAY_SCHEMA_FILES = {"RayJob": "rayjob_v1.json", "RayCluster": "raycluster_v1.json", "RayService": "rayservice_v1.json"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
# `password=...` style assignments and `scheme://user:password@host` URIs in command lines.
SECRET_IN_TEXT = re.compile(r"(password|secret|token|key)\s*=\s*\S|://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
GPU_RESOURCE = "nvidia.com/gpu"

Manifest = dict[str, Any]


# Loading and building


def load_documents(path: Path) -> list[Manifest]:
    """Parse every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as stream:
        return [document for document in yaml.safe_load_all(stream) if document]


def load_kustomization_resources(folder: Path) -> list[Manifest]:
    """Load the files listed under `resources` of a kustomization without building it."""
    kustomization = load_documents(folder / "kustomization.yaml")[0]
    documents: list[Manifest] = []
    for resource in kustomization["resources"]:
        documents += load_documents(folder / resource)
    return documents


def build_kustomization(folder: Path) -> list[Manifest]:
    """Build a kustomization with `kubectl kustomize`, offline, and parse the output."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl is not on PATH; install kubectl 1.27 or newer, which includes kustomize")
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder} failed: {result.stderr.strip()}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def describe(manifest: Manifest) -> str:
    """Name a manifest as kind/name for messages."""
    return f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"


# KubeRay custom resources


@lru_cache(maxsize=None)
def _load_ray_schema(schema_dir: str, kind: str) -> dict[str, Any]:
    with (Path(schema_dir) / RAY_SCHEMA_FILES[kind]).open(encoding="utf-8") as stream:
        return json.load(stream)


def validate_ray_resource(manifest: Manifest, schema_dir: Path) -> list[str]:
    """Validate a RayJob, RayCluster or RayService as the API server would, plus its pod templates.

    Plain JSON Schema passes unknown fields in these CRD schemas, so unknown keys are looked up
    in each node's `properties`. Schema defaults are applied first, as the API server does.
    """
    kind = manifest.get("kind")
    if kind not in RAY_SCHEMA_FILES:
        return [f"{describe(manifest)}: not a KubeRay kind; expected one of {', '.join(RAY_SCHEMA_FILES)}"]

    schema = _load_ray_schema(str(schema_dir), kind)
    value = copy.deepcopy(manifest)
    apply_schema_defaults(schema, value)

    problems = [
        f"{describe(manifest)}: {'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in jsonschema.Draft4Validator(schema).iter_errors(value)
    ]
    problems += [f"{describe(manifest)}: {problem}" for problem in unknown_fields(schema, value)]
    problems += [f"{describe(manifest)}: {problem}" for problem in repeated_map_keys(schema, value)]
    problems += _submission_mode_problems(manifest)
    for path, template in ray_pod_templates(manifest):
        for version in KUBERNETES_VERSIONS:
            problems += [f"{describe(manifest)}: {path}: {problem}" for problem in validate_pod_template(template, version)]
    return problems


def apply_schema_defaults(schema: dict[str, Any], value: Any) -> None:
    """Fill in missing fields that have a schema `default`, in place, in every object that exists."""
    if isinstance(value, dict):
        for name, child_schema in schema.get("properties", {}).items():
            if name not in value and "default" in child_schema:
                value[name] = copy.deepcopy(child_schema["default"])
            if name in value:
                apply_schema_defaults(child_schema, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, child in value.items():
                if name not in schema.get("properties", {}):
                    apply_schema_defaults(extra, child)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_schema_defaults(schema["items"], item)


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """List keys that the schema does not declare, except under x-kubernetes-preserve-unknown-fields."""
    problems: list[str] = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return problems
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for name, child in value.items():
            if properties is not None and name in properties:
                problems += unknown_fields(properties[name], child, f"{path}/{name}")
            elif isinstance(extra, dict):
                problems += unknown_fields(extra, child, f"{path}/{name}")
            elif properties is not None:
                problems.append(f"{path or '/'}: unknown field {name!r}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += unknown_fields(schema["items"], item, f"{path}/{index}")
    return problems


def repeated_map_keys(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """List entries of `x-kubernetes-list-type: map` lists whose keys repeat an earlier entry."""
    problems: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, child in value.items():
            child_schema = properties.get(name, extra if isinstance(extra, dict) else None)
            if child_schema is not None:
                problems += repeated_map_keys(child_schema, child, f"{path}/{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        if schema.get("x-kubernetes-list-type") == "map":
            problems += _repeated_keys(value, schema.get("x-kubernetes-list-map-keys", []), path)
        for index, item in enumerate(value):
            problems += repeated_map_keys(schema["items"], item, f"{path}/{index}")
    return problems


def _repeated_keys(items: list[Any], keys: list[str], path: str) -> list[str]:
    seen: set[tuple[Any, ...]] = set()
    problems = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(name) for name in keys)
        if key in seen:
            problems.append(f"{path}/{index}: repeated key {dict(zip(keys, key))} in a list keyed by {keys}")
        seen.add(key)
    return problems


def _submission_mode_problems(manifest: Manifest) -> list[str]:
    if manifest.get("kind") != "RayJob":
        return []
    mode = manifest.get("spec", {}).get("submissionMode", "K8sJobMode")
    if mode in SUBMISSION_MODES:
        return []
    return [f"{describe(manifest)}: submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}"]


def ray_pod_templates(manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """Return (path, PodTemplateSpec) of the head, every worker group and the RayJob submitter."""
    spec = manifest.get("spec", {})
    templates: list[tuple[str, dict[str, Any]]] = []
    if manifest.get("kind") == "RayJob":
        if "submitterPodTemplate" in spec:
            templates.append(("spec/submitterPodTemplate", spec["submitterPodTemplate"]))
        spec, prefix = spec.get("rayClusterSpec", {}), "spec/rayClusterSpec"
    else:
        prefix = "spec"
    if "headGroupSpec" in spec:
        templates.append((f"{prefix}/headGroupSpec/template", spec["headGroupSpec"]["template"]))
    for index, group in enumerate(spec.get("workerGroupSpecs", [])):
        templates.append((f"{prefix}/workerGroupSpecs/{index}/template", group["template"]))
    return templates


# Built-in kinds


def validate_builtin(manifest: Manifest, version: str) -> list[str]:
    """Validate a built-in kind with kubernetes-validate's strict schemas; an unknown kind is a problem.

    kubernetes-validate's command line passes kinds it has no schema for, so this function
    reports them instead of passing them.
    """
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{describe(manifest)}: no Kubernetes {version} schema: {error.message}"]
    except kubernetes_validate.ValidationError as error:
        location = "/".join(map(str, error.absolute_path))
        return [f"{describe(manifest)}: Kubernetes {version}: {location}: {error.message}"]
    return []


def validate_pod_template(template: dict[str, Any], version: str) -> list[str]:
    """Validate a PodTemplateSpec against a Kubernetes version by wrapping it in a PodTemplate."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    return validate_builtin(wrapper, version)


def validate_manifest(manifest: Manifest, schema_dir: Path) -> list[str]:
    """Validate any manifest: Ray kinds with the CRD schemas, the others with the built-in schemas."""
    if manifest.get("kind") in RAY_SCHEMA_FILES:
        problems = validate_ray_resource(manifest, schema_dir)
    else:
        problems = [problem for version in KUBERNETES_VERSIONS for problem in validate_builtin(manifest, version)]
    return problems + policy_problems(manifest)


# Policies


def pod_specs(manifest: Manifest) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (path, PodSpec) of every pod the manifest creates."""
    kind = manifest.get("kind")
    if kind in RAY_SCHEMA_FILES:
        for path, template in ray_pod_templates(manifest):
            yield path, template.get("spec", {})
    elif kind == "Pod":
        yield "spec", manifest.get("spec", {})
    elif kind == "CronJob":
        yield "spec/jobTemplate/spec/template/spec", manifest["spec"]["jobTemplate"]["spec"]["template"].get("spec", {})
    elif "template" in manifest.get("spec", {}):
        yield "spec/template/spec", manifest["spec"]["template"].get("spec", {})


def containers(manifest: Manifest) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Yield (path, container, pod security context) of every container, including KubeRay's autoscaler."""
    for path, spec in pod_specs(manifest):
        pod_context = spec.get("securityContext", {})
        for field in ("initContainers", "containers"):
            for container in spec.get(field, []):
                yield f"{path}/{field}/{container.get('name')}", container, pod_context
    cluster = manifest.get("spec", {})
    if manifest.get("kind") == "RayJob":
        cluster = cluster.get("rayClusterSpec", {})
    if cluster.get("enableInTreeAutoscaling"):
        head_spec = cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {})
        autoscaler = dict(cluster.get("autoscalerOptions", {}), name="autoscaler")
        # The autoscaler runs the head's image unless its options name one.
        autoscaler.setdefault("image", head_spec.get("containers", [{}])[0].get("image"))
        yield "autoscalerOptions", autoscaler, head_spec.get("securityContext", {})


def policy_problems(manifest: Manifest) -> list[str]:
    """Check resources, security contexts, secret literals and image pins of every container."""
    problems: list[str] = []
    for path, container, pod_context in containers(manifest):
        where = f"{describe(manifest)}: {path}"
        problems += [f"{where}: {problem}" for problem in resource_problems(container)]
        problems += [f"{where}: {problem}" for problem in security_problems(container, pod_context)]
        problems += [f"{where}: {problem}" for problem in secret_literal_problems(container)]
        problems += [f"{where}: {problem}" for problem in image_problems(container.get("image"))]
    problems += [f"{describe(manifest)}: {problem}" for problem in runtime_env_problems(manifest)]
    return problems


def resource_problems(container: dict[str, Any]) -> list[str]:
    """Require CPU and memory requests and limits, and equal GPU requests and limits."""
    resources = container.get("resources", {})
    problems = []
    for section in ("requests", "limits"):
        for name in ("cpu", "memory"):
            if name not in resources.get(section, {}):
                problems.append(f"resources.{section}.{name} is missing")
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if (GPU_RESOURCE in requests or GPU_RESOURCE in limits) and str(requests.get(GPU_RESOURCE)) != str(limits.get(GPU_RESOURCE)):
        problems.append(f"{GPU_RESOURCE} requests {requests.get(GPU_RESOURCE)} differ from limits {limits.get(GPU_RESOURCE)}")
    return problems


def security_problems(container: dict[str, Any], pod_context: dict[str, Any]) -> list[str]:
    """Require a non-root user, no privilege escalation, no capabilities and the RuntimeDefault seccomp profile.

    runAsNonRoot, runAsUser and seccompProfile may come from the pod; the container's own value wins.
    """
    context = container.get("securityContext", {})
    effective = {name: context.get(name, pod_context.get(name)) for name in ("runAsNonRoot", "runAsUser", "seccompProfile")}
    problems = []
    if effective["runAsNonRoot"] is not True:
        problems.append("runAsNonRoot is not true")
    if not isinstance(effective["runAsUser"], int) or effective["runAsUser"] == 0:
        problems.append(f"runAsUser is {effective['runAsUser']}; set a non-zero user id")
    if (effective["seccompProfile"] or {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile.type is not RuntimeDefault")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in context.get("capabilities", {}).get("drop", []):
        problems.append("capabilities.drop does not contain ALL")
    if context.get("privileged"):
        problems.append("privileged is true")
    return problems


def secret_literal_problems(container: dict[str, Any]) -> list[str]:
    """Reject env values of secret-looking names, and credentials written into command or args."""
    problems = []
    for variable in container.get("env", []):
        if SECRET_NAME.search(variable.get("name", "")) and "value" in variable:
            problems.append(f"env {variable['name']} has a literal value; use valueFrom.secretKeyRef")
    for field in ("command", "args"):
        for text in container.get(field, []):
            if SECRET_IN_TEXT.search(str(text)):
                problems.append(f"{field} contains what looks like a credential: {text!r}")
    return problems


def runtime_env_problems(manifest: Manifest) -> list[str]:
    """Reject RayJob runtime environments that install packages or carry credentials, and credentials in the entrypoint."""
    if manifest.get("kind") != "RayJob":
        return []
    spec = manifest.get("spec", {})
    problems = []
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    for installer in ("pip", "conda", "uv"):
        if installer in runtime_env:
            problems.append(f"runtimeEnvYAML installs packages with {installer}; bake them into the image")
    for name, value in (runtime_env.get("env_vars") or {}).items():
        if SECRET_NAME.search(name):
            problems.append(f"runtimeEnvYAML env_vars {name} has a literal value {value!r}; use a Secret")
    if SECRET_IN_TEXT.search(spec.get("entrypoint", "")):
        problems.append("entrypoint contains what looks like a credential")
    return problems


def image_problems(image: str | None) -> list[str]:
    """Require an image pinned by a tag other than `latest`, or by digest."""
    if not image:
        return ["image is missing"]
    if "@sha256:" in image:
        return []
    last_part = image.rsplit("/", 1)[-1]
    if ":" not in last_part:
        return [f"image {image!r} has no tag; pin a version tag or digest"]
    if last_part.rsplit(":", 1)[1] == "latest":
        return [f"image {image!r} uses the tag 'latest'; pin a version tag or digest"]
    return []
