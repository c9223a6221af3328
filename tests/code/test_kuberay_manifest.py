"""Static checks of the KubeRay RayCluster in ``deploy/kuberay/`` (issue 25).

No Kubernetes schema covers a custom resource, and KubeRay's CRD is not bundled here, so
the checks are split: the head's and the workers' pod templates are validated strictly
against the Kubernetes schemas ``kubernetes-validate`` bundles (wrapped as ``v1``
PodTemplates: an unknown field, a wrong type or a missing required field fails), and the
RayCluster's own fields are checked against the fields of KubeRay's ``ray.io/v1``
RayCluster spec that clinml may use. Then what the design needs: the clinml image at the
Ray version it installs, the same pod security as every clinml pod, the object store's
shared memory, whole-CPU workers, and a training CronJob that reaches the head's client
port at the Service KubeRay names after the cluster.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

MANIFEST = PROJECT_ROOT / "deploy" / "kuberay" / "raycluster.yaml"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
IMAGE = "registry.example.org/clinml:"
# KubeRay ray.io/v1 RayCluster fields clinml's manifest may set (a subset of the CRD's).
CLUSTER_FIELDS = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "suspend",
}
AUTOSCALER_FIELDS = {"idleTimeoutSeconds", "upscalingMode", "resources", "env"}
HEAD_FIELDS = {"rayStartParams", "template", "serviceType", "enableIngress"}
WORKER_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "idleTimeoutSeconds",
}


def _cluster() -> dict[str, Any]:
    [document] = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return document


def _templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"]["template"])] + [
        (group["groupName"], group["template"]) for group in spec["workerGroupSpecs"]
    ]


def _as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_pod_templates_validate_strictly_against_the_kubernetes_schema(version: str) -> None:
    import kubernetes_validate

    for name, template in _templates(_cluster()):
        try:
            kubernetes_validate.validate(_as_pod_template(name, template), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{name}: Kubernetes {version}: {where}: {exc.message}")


@pytest.mark.parametrize("mutate", ["unknown container field", "wrong type", "no image"])
def test_the_validator_rejects_a_broken_pod_template(mutate: str) -> None:
    import kubernetes_validate

    name, template = _templates(_cluster())[1]
    broken = copy.deepcopy(template)
    container = broken["spec"]["containers"][0]
    if mutate == "unknown container field":
        container["imagePullPolicyy"] = "Always"
    elif mutate == "wrong type":
        container["resources"]["limits"] = ["4"]
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_as_pod_template(name, broken), KUBERNETES_VERSIONS[-1], True)


def test_the_cluster_uses_known_kuberay_fields_and_the_images_ray() -> None:
    cluster = _cluster()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert "namespace" not in cluster["metadata"]
    spec = cluster["spec"]
    assert set(spec) <= CLUSTER_FIELDS, set(spec) - CLUSTER_FIELDS
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_FIELDS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_FIELDS, set(group) - WORKER_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    # rayStartParams values are strings in the CRD
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())
    pinned = re.search(r"^ray==(\S+)$", (PROJECT_ROOT / "constraints.txt").read_text(), re.M)
    assert pinned and spec["rayVersion"] == pinned.group(1)
    assert f'"ray=={pinned.group(1)}"' in (PROJECT_ROOT / "pyproject.toml").read_text()
    assert "'.[ray]'" in (PROJECT_ROOT / "Dockerfile").read_text()  # the image has Ray


def test_every_node_runs_the_clinml_image_as_its_non_root_user() -> None:
    tags = {
        match.group(1)
        for path in (PROJECT_ROOT / "deploy" / "k8s").glob("*.yaml")
        for match in re.finditer(rf"image: {re.escape(IMAGE)}(\S+)", path.read_text())
    }
    uid = int(re.search(r"--uid (\d+)", (PROJECT_ROOT / "Dockerfile").read_text()).group(1))
    for name, template in _templates(_cluster()):
        pod = template["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        assert container["image"].removeprefix(IMAGE) in tags, name  # the deployed version
        assert "command" not in container  # KubeRay starts Ray in it
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        env = {e["name"]: e for e in container["env"]}
        assert env["HOME"]["value"] == "/tmp"  # Ray's session and token files
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # object store
        assert not any(k.startswith("CLINML_") for k in env)  # the driver holds the config
        assert not any("secret" in v or "persistentVolumeClaim" in v for v in volumes.values())


def test_workers_offer_whole_cpus_and_the_head_computes_nothing() -> None:
    spec = _cluster()["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]
        assert re.fullmatch(r"[1-9]\d*", str(resources["limits"]["cpu"]))


def test_the_training_job_reaches_the_heads_client_port_by_kuberays_service_name() -> None:
    cluster = _cluster()
    documents = [
        d for d in yaml.safe_load_all((PROJECT_ROOT / "deploy/k8s/cronjobs.yaml").read_text()) if d
    ]
    [job] = [d for d in documents if d["metadata"]["name"] == "clinml-train-readmission"]
    assert job["spec"]["suspend"] is True and job["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    argv = container["command"]
    assert argv[:3] == ["clinml", "train", "readmission"]
    address = argv[argv.index("--ray") + 1]
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    client = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    assert address == f"ray://{cluster['metadata']['name']}-head-svc:{client}"


def test_the_manifest_is_described_where_operators_look() -> None:
    text = Path(PROJECT_ROOT / "docs" / "deployment.md").read_text()
    assert "deploy/kuberay/raycluster.yaml" in text and "clinml-train-readmission" in text
