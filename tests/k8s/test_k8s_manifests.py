"""The manifests under k8s/: schema-valid at both Kubernetes versions, policy-clean, and consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import k8s_checks
from aeplat.platform import k8s
from aeplat.platform.cli import build_parser
from aeplat.platform.cli_k8s import render_job
from k8s_checks import K8S_DIR, Manifest

BASE = K8S_DIR / "base"
EXAMPLE_JOB = K8S_DIR / "examples" / "rayjob-brats-flair.yaml"
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def _base() -> list[Manifest]:
    return k8s_checks.load_kustomization_resources(BASE)


def _find(documents: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [document for document in documents if document["kind"] == kind and document["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def test_base_manifests_valid(ray_schema_dir: Path) -> None:
    documents = _base() + k8s_checks.load_documents(BASE / "secrets.example.yaml")

    problems = [problem for document in documents for problem in k8s_checks.validate_manifest(document, ray_schema_dir)]

    assert problems == []


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_overlay_manifests_valid(overlay: str, built_overlays: dict[str, list[Manifest]], ray_schema_dir: Path) -> None:
    documents = built_overlays[overlay]

    problems = [problem for document in documents for problem in k8s_checks.validate_manifest(document, ray_schema_dir)]

    assert problems == []
    assert len(documents) == len(_base()) + 1


@pytest.mark.parametrize(("overlay", "namespace"), [("dev", "aeplat-dev"), ("gpu", "aeplat")])
def test_overlay_sets_namespace(overlay: str, namespace: str, built_overlays: dict[str, list[Manifest]]) -> None:
    documents = built_overlays[overlay]

    for document in documents:
        if document["kind"] not in CLUSTER_SCOPED_KINDS:
            assert document["metadata"].get("namespace") == namespace, k8s_checks.describe(document)
    binding = _find(documents, "RoleBinding", "aeplat-submitter")
    assert binding["subjects"][0]["namespace"] == namespace
    assert _find(documents, "Namespace", namespace)


def test_dev_overlay_shrinks_cluster(built_overlays: dict[str, list[Manifest]]) -> None:
    cluster = _find(built_overlays["dev"], "RayCluster", "aeplat")
    postgres = _find(built_overlays["dev"], "StatefulSet", "postgres")

    assert cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 1
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_secret_templates_not_applied() -> None:
    kustomization = k8s_checks.load_documents(BASE / "kustomization.yaml")[0]
    secrets = k8s_checks.load_documents(BASE / "secrets.example.yaml")

    assert "secrets.example.yaml" not in kustomization["resources"]
    assert all(document["kind"] != "Secret" for document in _base())
    assert {secret["metadata"]["name"] for secret in secrets} == {k8s.S3_SECRET, "postgres-credentials"}


def test_raycluster_matches_rendered_cluster() -> None:
    cluster = _find(_base(), "RayCluster", "aeplat")

    assert cluster["spec"] == k8s.ray_cluster_spec(k8s.ClusterOptions()), (
        "k8s/base/raycluster.yaml differs from aeplat.platform.k8s.ray_cluster_spec; update one to match the other"
    )


def test_example_rayjob_is_current() -> None:
    command = EXAMPLE_JOB.read_text(encoding="utf-8").splitlines()[0].removeprefix("# Written by: aeplat ")
    args = build_parser().parse_args(command.split())

    assert k8s_checks.load_documents(EXAMPLE_JOB)[0] == render_job(args), (
        f"{EXAMPLE_JOB} is stale; rewrite it with: aeplat {command} (keeping its two comment lines)"
    )


def test_example_rayjob_valid(ray_schema_dir: Path) -> None:
    assert k8s_checks.validate_manifest(k8s_checks.load_documents(EXAMPLE_JOB)[0], ray_schema_dir) == []


def test_mlflow_server_settings() -> None:
    documents = _base()
    pod = _find(documents, "Deployment", "mlflow")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    settings = _find(documents, "ConfigMap", "mlflow-settings")["data"]

    assert container["args"][0] == "server"
    assert "--serve-artifacts" in container["args"]
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in container["args"]
    assert settings["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert settings["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "mlflow:5000" in settings["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(volume["name"] == "tmp" and "emptyDir" in volume for volume in pod["volumes"])


def test_mlflow_credentials_from_secrets() -> None:
    documents = _base()
    for kind, name in (("Deployment", "mlflow"), ("Job", "mlflow-db-upgrade")):
        container = _find(documents, kind, name)["spec"]["template"]["spec"]["containers"][0]
        env = {variable["name"]: variable for variable in container["env"]}

        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "postgres-credentials", "key": "password"}
        assert all("value" not in variable for variable in container["env"])
        assert not any("PASSWORD" in argument for argument in container["args"])


def test_migration_job_upgrades_database() -> None:
    job = _find(_base(), "Job", "mlflow-db-upgrade")
    container = job["spec"]["template"]["spec"]["containers"][0]

    assert container["args"][:2] == ["db", "upgrade"]
    assert container["image"] == _find(_base(), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]


def test_postgres_statefulset() -> None:
    documents = _base()
    statefulset = _find(documents, "StatefulSet", "postgres")
    service = _find(documents, "Service", statefulset["spec"]["serviceName"])
    container = statefulset["spec"]["template"]["spec"]["containers"][0]

    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "pg_isready" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert {variable["name"] for variable in container["env"]} == {"POSTGRES_USER", "POSTGRES_PASSWORD"}


def test_network_policies() -> None:
    policies = {document["metadata"]["name"]: document["spec"] for document in _base() if document["kind"] == "NetworkPolicy"}

    assert policies["default-deny-all"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert policies["allow-dns-egress"]["egress"][0]["ports"][0] == {"protocol": "UDP", "port": 53}
    ray = {"matchLabels": {"app.kubernetes.io/name": "aeplat-ray"}}
    assert policies["allow-ray-internal"]["podSelector"] == ray
    assert policies["allow-mlflow-from-ray"]["ingress"][0]["from"][0]["podSelector"] == ray
    assert policies["allow-postgres-from-mlflow"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]
    assert policies["allow-mlflow-s3-egress"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 443}]
    assert policies["allow-kuberay-operator-to-ray"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8265}]


def test_network_policies_select_pods() -> None:
    # Every pod must be selected by some allow policy, or default deny cuts it off completely.
    documents = _base()
    selectors = [
        document["spec"]["podSelector"].get("matchLabels", {})
        for document in documents
        if document["kind"] == "NetworkPolicy" and document["spec"]["podSelector"]
    ]
    for document in documents:
        for path, template in _pod_templates(document):
            labels = template["metadata"]["labels"]
            selected = any(selector and selector.items() <= labels.items() for selector in selectors)
            assert selected, f"{k8s_checks.describe(document)} {path} is selected by no allow policy"


def _pod_templates(document: Manifest) -> list[tuple[str, dict]]:
    if document["kind"] in k8s_checks.RAY_SCHEMA_FILES:
        return k8s_checks.ray_pod_templates(document)
    if "template" in document.get("spec", {}):
        return [("spec/template", document["spec"]["template"])]
    return []


def test_submitter_role_manages_ray_jobs() -> None:
    role = _find(_base(), "Role", "aeplat-submitter")
    ray_rule = next(rule for rule in role["rules"] if "rayjobs" in rule["resources"])

    assert ray_rule["apiGroups"] == ["ray.io"]
    assert set(ray_rule["resources"]) == {"rayjobs", "rayclusters"}
    assert {"create", "get", "list", "watch", "delete"} <= set(ray_rule["verbs"])


def test_overlay_yaml_parses() -> None:
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        with path.open(encoding="utf-8") as stream:
            assert list(yaml.safe_load_all(stream)), path
