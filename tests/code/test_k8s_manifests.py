"""Static checks of the Kubernetes manifests in ``deploy/k8s/`` (docs/deployment.md).

Every document is validated offline against the Kubernetes JSON schemas that the
``kubernetes-validate`` package bundles, in strict mode: an unknown field is an error,
as are a wrong type and a missing required field. A test checks that the validator
rejects such manifests, so a pass means something.

Then what no schema knows: every ``CLINML_*`` variable is a setting clinml reads, the
commands are real ``clinml`` subcommands with real options, every referenced Secret,
ConfigMap and claim exists, the HorizontalPodAutoscaler scales the API (and nothing
else), the API reaches the GPU model service at that service's Service and port, the
model service runs the executor on a GPU node and only the API pods may reach it, every
pod runs as the image's non-root user on a read-only root filesystem, and the MLflow and
Feast configuration is read the way the manifests assume (checked against the installed
MLflow and Feast).
"""

from __future__ import annotations

import ast
import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PROJECT_ROOT
from tests.yaml_tree import walk

K8S = PROJECT_ROOT / "deploy" / "k8s"
# The oldest Kubernetes release the manifests are written for (CronJob timeZone and
# autoscaling/v2 are GA well before it) and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
IMAGE = "registry.example.org/clinml:"
# Variables whose values are secrets: they must come from a Secret, never a literal.
SECRET_VARIABLES = {
    "CLINML_PSEUDONYM_KEY",
    "CLINML_API_KEYS",
    "CLINML_ALERT_WEBHOOK_URL",
    "MLFLOW_BACKEND_STORE_URI",
    "FEATURE_STORE_PG_PASSWORD",
    "FEATURE_STORE_REDIS_PASSWORD",
}
FEATURE_STORE_CONFIGMAP = "clinml-feature-store"
FEATURE_STORE_FILE = "feature_store.yaml"
# The GPU model service: `bentoml serve clinml.serving.executor:ModelExecutor` on its own.
MODEL_SERVICE = "clinml-model"
EXECUTOR = "clinml.serving.executor:ModelExecutor"


# --- loading -----------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in _manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path, document))
    return found


DOCUMENTS = _documents()


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCUMENTS if d["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def _pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def _workloads() -> list[dict[str, Any]]:
    return [d for _, d in DOCUMENTS if d["kind"] in {"Deployment", "CronJob"}]


def _pods() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) of every Deployment and CronJob."""
    return [(w["metadata"]["name"], _pod_template(w)["spec"]) for w in _workloads()]


def _containers(pod: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", []) if init else []) + list(pod["containers"])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _runs_clinml(container: dict[str, Any]) -> bool:
    """The image's CMD (the API), a ``clinml`` command, or ``bentoml serve
    clinml.serving.…``."""
    argv = container.get("command", ["clinml"])
    return argv[0] == "clinml" or (
        argv[:2] == ["bentoml", "serve"] and argv[2].startswith("clinml.serving.")
    )


def _clinml_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) for every container that runs clinml itself (the
    API, the model service, the scheduled commands), not the MLflow server or an init
    step."""
    return [
        (name, pod, c)
        for name, pod in _pods()
        for c in _containers(pod, init=False)
        if _runs_clinml(c)
    ]


def _feature_store_readers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The clinml containers that open the feature store: all but the model service."""
    return [entry for entry in _clinml_containers() if entry[0] != MODEL_SERVICE]


def _dockerfile() -> str:
    return (PROJECT_ROOT / "Dockerfile").read_text()


def _api_deployment() -> dict[str, Any]:
    hpa = _named("HorizontalPodAutoscaler", "clinml-api")
    return _named("Deployment", hpa["spec"]["scaleTargetRef"]["name"])


# --- the schemas -------------------------------------------------------------------------


def test_the_manifests_hold_every_object_the_deployment_needs() -> None:
    kinds = [d["kind"] for _, d in DOCUMENTS]
    for kind, least in {
        "Deployment": 3,  # API, GPU model service, MLflow
        "Service": 3,
        "NetworkPolicy": 2,  # MLflow, GPU model service
        "HorizontalPodAutoscaler": 1,
        "CronJob": 2,
        "Secret": 1,
        "ConfigMap": 1,
        "PersistentVolumeClaim": 1,
    }.items():
        assert kinds.count(kind) >= least, kind
    commands = [" ".join(c["command"][:2]) for _, _, c in _clinml_containers() if "command" in c]
    assert "clinml monitor" in commands and "clinml materialize" in commands


def test_the_manifests_are_namespace_agnostic() -> None:
    for path, document in DOCUMENTS:
        assert "namespace" not in document["metadata"], path.name


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "document",
    [d for _, d in DOCUMENTS],
    ids=[f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}" for p, d in DOCUMENTS],
)
def test_every_document_validates_strictly_against_the_kubernetes_schema(
    document: dict[str, Any], version: str
) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"Kubernetes {version}: {where}: {exc.message}")
    # A kind without a schema would raise SchemaNotFoundError: nothing passes unchecked.


def _broken(mutate: str) -> dict[str, Any]:
    deployment = copy.deepcopy(_api_deployment())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if mutate == "unknown container field":
        container["imagePullPolicyy"] = "Always"
    elif mutate == "unknown pod field":
        pod["nodeSelectors"] = {"nvidia.com/gpu.present": "true"}
    elif mutate == "wrong type":
        deployment["spec"]["replicas"] = "two"
    elif mutate == "port out of type":
        container["ports"][0]["containerPort"] = "http"
    elif mutate == "missing required field":
        del container["name"]
    elif mutate == "probe port missing":
        del container["readinessProbe"]["httpGet"]["port"]
    return deployment


@pytest.mark.parametrize(
    "mutate",
    [
        "unknown container field",
        "unknown pod field",
        "wrong type",
        "port out of type",
        "missing required field",
        "probe port missing",
    ],
)
def test_the_validator_rejects_an_invalid_deployment(mutate: str) -> None:
    import kubernetes_validate

    version = KUBERNETES_VERSIONS[-1]
    kubernetes_validate.validate(_api_deployment(), version, strict=True)  # the original
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_broken(mutate), version, strict=True)


# --- clinml's configuration --------------------------------------------------------------


def test_every_clinml_variable_is_a_setting() -> None:
    from clinml.settings import Settings

    fields = set(Settings.model_fields)
    names = {
        e["name"]
        for _, pod in _pods()
        for c in _containers(pod)
        for e in c.get("env", [])
        if e["name"].startswith("CLINML_")
    }
    assert names, "no CLINML_ variables at all"
    unknown = {n for n in names if n.removeprefix("CLINML_").lower() not in fields}
    assert not unknown, f"not fields of clinml.settings.Settings: {sorted(unknown)}"


def test_every_clinml_pod_runs_the_production_profile_with_the_same_configuration() -> None:
    containers = _clinml_containers()
    assert len(containers) >= 5
    assert {"clinml-api", MODEL_SERVICE} <= {name for name, _, _ in containers}
    for name, pod, container in containers:
        env = _env(container)
        assert env["CLINML_PROFILE"]["value"] == "production", name
        assert env["CLINML_HOME"]["value"] == "/data", name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "clinml-data"
        # The same pseudonym key everywhere, or ids stop matching across stages.
        assert env["CLINML_PSEUDONYM_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "clinml-secrets",
            "key": "pseudonym-key",
        }, name
        for variable, key in (
            ("CLINML_TRACKING_URI", "tracking-uri"),
            ("CLINML_ARTIFACT_ROOT", "artifact-root"),
        ):
            ref = env[variable]["valueFrom"]["configMapKeyRef"]
            assert ref == {"name": "clinml-config", "key": key}, (name, variable)
        assert not container.get("envFrom"), "envFrom would hide which variables are secrets"


def test_no_service_link_variable_is_read_as_a_setting() -> None:
    # Kubernetes gives every pod <SERVICE>_SERVICE_HOST, <SERVICE>_PORT, ... for each
    # Service in the namespace (enableServiceLinks). Services named clinml-* make them
    # CLINML_*: none may land on a clinml setting.
    from clinml.settings import Settings

    fields = set(Settings.model_fields)
    for service in _kind("Service"):
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        names = [f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"]
        for port in service["spec"]["ports"]:
            names.append(f"{prefix}_SERVICE_PORT_{port['name'].upper()}")
            tcp = f"{prefix}_PORT_{port['port']}_TCP"
            names += [tcp, f"{tcp}_PROTO", f"{tcp}_PORT", f"{tcp}_ADDR"]
        for name in names:
            if name.startswith("CLINML_"):
                assert name.removeprefix("CLINML_").lower() not in fields, name


def _feature_store_yaml() -> str:
    return _named("ConfigMap", FEATURE_STORE_CONFIGMAP)["data"][FEATURE_STORE_FILE]


def test_feature_store_yaml_is_mounted_where_clinml_is_told_to_read_it() -> None:
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", _feature_store_yaml()))
    assert referenced, "feature_store.yaml should take its passwords from the environment"
    for name, pod, container in _clinml_containers():
        env = _env(container)
        path = Path(env["CLINML_FEATURE_STORE_YAML"]["value"])
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == FEATURE_STORE_CONFIGMAP, name
        items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
        assert items.get(path.name, path.name) == FEATURE_STORE_FILE, name
        if name == MODEL_SERVICE:
            # The production profile needs the setting, but the executor never opens
            # the store: it gets none of the store's passwords.
            given = referenced & set(env)
            assert not given, f"{name} never opens the feature store: {sorted(given)}"
            continue
        # Feast leaves an unset ${NAME} as literal text: each must be set in the pod.
        missing = referenced - set(env)
        assert not missing, f"{name}: feature_store.yaml needs {sorted(missing)}"


def _mounted(container: dict[str, Any], path: str) -> bool:
    return any(path.startswith(m["mountPath"].rstrip("/") + "/") for m in container["volumeMounts"])


def test_files_the_store_configurations_name_are_mounted() -> None:
    # The CA for TLS to PostgreSQL and Redis, named inside feature_store.yaml and inside
    # the MLflow server's backend store URI.
    files = re.compile(r"/etc/clinml/[A-Za-z0-9_./-]+")
    named = set(files.findall(_feature_store_yaml()))
    assert named, "feature_store.yaml names no CA: TLS without verification?"
    for name, _, container in _feature_store_readers():
        for path in named:
            assert _mounted(container, path), f"{name}: {path} is not mounted"
    uri = _named("Secret", "clinml-mlflow")["stringData"]["backend-store-uri"]
    (server,) = _named("Deployment", "clinml-mlflow")["spec"]["template"]["spec"]["containers"]
    for path in files.findall(uri):
        assert _mounted(server, path), f"clinml-mlflow: {path} is not mounted"
    assert "sslmode=verify-full" in uri


def test_secrets_come_from_secrets_and_the_placeholders_are_not_applied_with_the_rest() -> None:
    for _, pod in _pods():
        for container in _containers(pod):
            for variable, entry in _env(container).items():
                if variable in SECRET_VARIABLES or "PASSWORD" in variable:
                    assert "value" not in entry, f"{variable} has a literal value"
                    assert "secretKeyRef" in entry["valueFrom"], variable
    for path, document in DOCUMENTS:
        if document["kind"] != "Secret":
            continue
        # `kubectl apply -f deploy/k8s/` does not recurse: placeholders never overwrite
        # real Secrets.
        assert path.parent != K8S, f"{path.name}: keep Secrets out of deploy/k8s/ itself"
        values = {**document.get("stringData", {}), **document.get("data", {})}
        assert values
        for key, value in values.items():
            assert "REPLACE-ME" in value, f"{document['metadata']['name']}/{key} looks real"


def test_every_referenced_secret_configmap_and_claim_exists() -> None:
    secrets = {
        (d["metadata"]["name"], key)
        for d in _kind("Secret")
        for key in {**d.get("stringData", {}), **d.get("data", {})}
    }
    configmaps = {(d["metadata"]["name"], key) for d in _kind("ConfigMap") for key in d["data"]}
    claims = {d["metadata"]["name"] for d in _kind("PersistentVolumeClaim")}
    for workload in _workloads():
        for ref in walk(workload, "secretKeyRef"):
            assert (ref["name"], ref["key"]) in secrets, ref
        for ref in walk(workload, "configMapKeyRef"):
            assert (ref["name"], ref["key"]) in configmaps, ref
        for volume in _pod_template(workload)["spec"].get("volumes", []):
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                for item in volume["configMap"].get("items", []):
                    assert (name, item["key"]) in configmaps, item
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
            if "secret" in volume:
                assert volume["secret"]["secretName"] in {n for n, _ in secrets}, volume


def _resolved_env(container: dict[str, Any], feature_store_yaml: Path) -> dict[str, str]:
    """The container's environment as Kubernetes would set it: literal values, ConfigMap
    values, and a stand-in for each Secret value."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in _kind("ConfigMap")}
    resolved = {}
    for name, entry in _env(container).items():
        if "value" in entry:
            resolved[name] = entry["value"]
        elif "configMapKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["configMapKeyRef"]
            resolved[name] = configmaps[ref["name"]][ref["key"]]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            resolved[name] = f"test-secret-{ref['name']}-{ref['key']}"
    resolved["CLINML_FEATURE_STORE_YAML"] = str(feature_store_yaml)
    return resolved


def test_the_production_profile_accepts_every_clinml_pods_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clinml.settings import Settings

    feature_store_yaml = tmp_path / FEATURE_STORE_FILE
    feature_store_yaml.write_text(_feature_store_yaml())
    for name, _, container in _clinml_containers():
        for variable in [v for v in os.environ if v.startswith("CLINML_")]:
            monkeypatch.delenv(variable)
        env = _resolved_env(container, feature_store_yaml)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        settings = Settings()  # the production profile refuses a bad configuration here
        assert settings.profile == "production", name
        environment = settings.feast_environment  # shared stores only, in production
        assert environment.offline_type == "postgres", name
        assert settings.mlflow_uri == env["CLINML_TRACKING_URI"], name
        assert settings.mlflow_artifact_root == env["CLINML_ARTIFACT_ROOT"], name


# --- the API, its autoscaler and the GPU model service -----------------------------------


def _port(name: str, container: dict[str, Any]) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def test_the_autoscaler_scales_the_api_deployment_on_cpu() -> None:
    hpa = _named("HorizontalPodAutoscaler", "clinml-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    api = _named("Deployment", target["name"])
    assert api["metadata"]["labels"]["app.kubernetes.io/component"] == "api"
    assert "replicas" not in api["spec"], "the autoscaler owns the replica count"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    for container in api["spec"]["template"]["spec"]["containers"]:
        # CPU utilisation is measured against the request: without one the HPA is blind.
        assert "cpu" in container["resources"]["requests"], container["name"]


def _serves_with_probes_behind_a_matching_service(deployment: str) -> dict[str, Any]:
    """The Deployment's one container probes /livez and /readyz on its `http` port, and a
    Service of the same name selects its pods and targets that port."""
    workload = _named("Deployment", deployment)
    template = workload["spec"]["template"]
    (container,) = template["spec"]["containers"]
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    service = _named("Service", deployment)
    labels = template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    return container


def _exposed_port() -> int:
    exposed = re.search(r"^EXPOSE (\d+)$", _dockerfile(), re.MULTILINE)
    assert exposed
    return int(exposed.group(1))


def test_the_api_runs_the_images_entrypoint_with_probes_and_a_matching_service() -> None:
    container = _serves_with_probes_behind_a_matching_service("clinml-api")
    assert "command" not in container and "args" not in container, "the Dockerfile's CMD"
    assert _port("http", container) == _exposed_port()
    assert f'"--port", "{_exposed_port()}"' in _dockerfile()


def _bentoml_serve_options() -> set[str]:
    from bentoml_cli.cli import create_bentoml_cli

    return _options(create_bentoml_cli().commands["serve"])


def _is_bentoml_service_class(module: Path, name: str) -> bool:
    """``module`` defines class ``name`` under ``@bentoml.service(...)``."""
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return any(
                ast.unparse(d.func if isinstance(d, ast.Call) else d) == "bentoml.service"
                for d in node.decorator_list
            )
    return False


def test_the_model_service_serves_the_executor_alone_with_probes() -> None:
    container = _serves_with_probes_behind_a_matching_service(MODEL_SERVICE)
    argv = container["command"] + container.get("args", [])
    assert argv[:3] == ["bentoml", "serve", EXECUTOR], argv
    module, _, name = EXECUTOR.partition(":")
    source = PROJECT_ROOT / (module.removeprefix("clinml.").replace(".", "/") + ".py")
    assert _is_bentoml_service_class(source, name), f"{EXECUTOR} is not a BentoML service"
    options = _bentoml_serve_options()
    for word in argv[3:]:
        if word.startswith("-"):
            assert word in options, f"`bentoml serve` has no option {word}"
    # Reachable from other pods, on the port the container declares.
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert int(argv[argv.index("--port") + 1]) == _port("http", container)
    # The executor must not itself be pointed at an executor.
    env = _env(container)
    assert "CLINML_EXECUTOR_URL" not in env and "CLINML_EXECUTION" not in env


def _resolve_port(port: int | str, container: dict[str, Any]) -> int:
    """A Service targetPort or NetworkPolicy port, by number or by container port name."""
    return _port(port, container) if isinstance(port, str) else int(port)


def test_the_api_reaches_the_model_service_at_its_service_and_port() -> None:
    api = _api_deployment()
    (container,) = api["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert env["CLINML_EXECUTION"]["value"] == "split"
    url = env["CLINML_EXECUTOR_URL"]["value"]
    found = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
    assert found, f"{url}: expected http://<Service>:<port> in the namespace"
    host, port = found.group(1), int(found.group(2))
    assert host == MODEL_SERVICE, url
    service = _named("Service", host)
    model = _named("Deployment", host)["spec"]["template"]
    (executor,) = model["spec"]["containers"]
    assert service["spec"]["selector"].items() <= model["metadata"]["labels"].items()
    targets = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == port]
    assert len(targets) == 1, f"{url}: Service {host} has no port {port}"
    (target,) = targets
    argv = executor["command"]
    assert _resolve_port(target, executor) == int(argv[argv.index("--port") + 1])


def _pod_labels() -> dict[str, dict[str, str]]:
    return {w["metadata"]["name"]: _pod_template(w)["metadata"]["labels"] for w in _workloads()}


def _matching(selector: dict[str, Any]) -> set[str]:
    """The workloads whose pods a label selector selects (matchLabels only)."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    wanted = selector.get("matchLabels", {}).items()
    return {name for name, labels in _pod_labels().items() if wanted <= labels.items()}


def _admitted(policy: dict[str, Any]) -> tuple[set[str], set[int | str]]:
    """(workloads admitted, ports admitted) by a NetworkPolicy's ingress rules. A rule
    without peers or ports, or a peer outside the namespace's pods, admits anything."""
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    workloads: set[str] = set()
    ports: set[int | str] = set()
    for rule in spec.get("ingress", []):
        assert rule.get("from"), "a rule without `from` admits every source"
        assert rule.get("ports"), "a rule without `ports` admits every port"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"admits beyond the namespace's pods: {peer}"
            workloads |= _matching(peer["podSelector"])
        ports |= {p["port"] for p in rule["ports"] if p.get("protocol", "TCP") == "TCP"}
    return workloads, ports


def test_only_the_api_pods_reach_the_model_service() -> None:
    # The executor's endpoints have no authentication: this policy is all that guards them.
    policy = _named("NetworkPolicy", MODEL_SERVICE)
    assert _matching(policy["spec"]["podSelector"]) == {MODEL_SERVICE}
    workloads, ports = _admitted(policy)
    assert workloads == {_api_deployment()["metadata"]["name"]}
    (executor,) = _named("Deployment", MODEL_SERVICE)["spec"]["template"]["spec"]["containers"]
    argv = executor["command"]
    assert {_resolve_port(p, executor) for p in ports} == {int(argv[argv.index("--port") + 1])}


@pytest.mark.parametrize(
    "widen",
    ["every clinml pod", "another namespace", "any port"],
)
def test_a_wider_model_service_policy_is_caught(widen: str) -> None:
    policy = copy.deepcopy(_named("NetworkPolicy", MODEL_SERVICE))
    rule = policy["spec"]["ingress"][0]
    if widen == "every clinml pod":
        rule["from"] = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "clinml"}}}]
        workloads, _ = _admitted(policy)
        assert workloads != {_api_deployment()["metadata"]["name"]}
        return
    if widen == "another namespace":
        rule["from"][0]["namespaceSelector"] = {}
    elif widen == "any port":
        del rule["ports"]
    with pytest.raises(AssertionError):
        _admitted(policy)


def test_no_autoscaler_targets_the_model_service() -> None:
    # One GPU, one pod: scaling the model service is a deliberate change, not a default.
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in _kind("HorizontalPodAutoscaler")}
    assert targets == {_api_deployment()["metadata"]["name"]}
    assert MODEL_SERVICE not in targets


@pytest.mark.parametrize("deployment", ["clinml-api", MODEL_SERVICE])
def test_each_service_pod_has_its_own_bentoml_home_with_the_packaged_model(
    deployment: str,
) -> None:
    # `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir at start: replicas
    # must not share it on the /data volume.
    pod = _named("Deployment", deployment)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    home = _env(container)["BENTOML_HOME"]["value"]
    assert not home.startswith("/data")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[home]]
    (copy_model,) = pod["initContainers"]
    script = " ".join(copy_model["command"])
    usecase = _env(container)["CLINML_USECASE"]["value"]
    assert f"/data/bentoml/models/{usecase}" in script and f"{home}/models" in script
    assert (PROJECT_ROOT / "configs" / f"{usecase}.yaml").is_file()


def test_the_model_service_asks_for_a_gpu_on_a_gpu_node_and_executes_there() -> None:
    pod = _named("Deployment", MODEL_SERVICE)["spec"]["template"]["spec"]
    assert pod.get("nodeSelector"), "no nodeSelector"
    tolerations = pod.get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)
    (container,) = pod["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert container["image"].endswith("-cuda"), "the GPU variant of the image"
    env = _env(container)
    assert env["CLINML_GPU"]["value"] == "1"
    assert env["CLINML_DEVICE"]["value"] == "cuda"
    # It follows the champion alias itself: nothing else reloads it on a schedule.
    assert float(env["CLINML_RELOAD_INTERVAL_S"]["value"]) > 0
    # No other pod takes a GPU or tolerates the GPU nodes' taint.
    for name, other in _pods():
        if name != MODEL_SERVICE:
            assert "nvidia.com/gpu" not in str(other), name


# --- the scheduled commands --------------------------------------------------------------


def _clinml_command_line() -> Any:
    import typer

    from clinml.pipelines.cli import app

    return typer.main.get_command(app)


def _options(command: Any) -> set[str]:
    return {
        opt
        for param in command.params
        for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]
        if opt.startswith("-")
    }


@pytest.mark.parametrize("cronjob", [c["metadata"]["name"] for c in _kind("CronJob")])
def test_cronjobs_run_real_clinml_subcommands_with_real_options(cronjob: str) -> None:
    workload = _named("CronJob", cronjob)
    assert workload["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod_template(workload)["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    argv = list(container["command"]) + list(container.get("args", []))
    assert argv[0] == "clinml"
    command, rest = _clinml_command_line(), argv[1:]
    while hasattr(command, "commands"):  # groups: `clinml models list`
        assert rest and rest[0] in command.commands, f"{argv}: no subcommand {rest[:1]}"
        command, rest = command.commands[rest[0]], rest[1:]
    options = _options(command)
    for word in rest:
        if word.startswith("-"):
            assert word in options, f"{argv}: `clinml {argv[1]}` has no option {word}"
    usecase = rest[0]
    assert (PROJECT_ROOT / "configs" / f"{usecase}.yaml").is_file(), usecase
    if argv[1] == "monitor":
        # Exit 1 is "alert delivered": a retry would only repeat the work.
        assert workload["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0


# --- every pod ---------------------------------------------------------------------------


def test_every_pod_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    uid = re.search(r"--uid (\d+)", _dockerfile())
    assert uid
    for name, pod in _pods():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == int(uid.group(1)), name
        assert pod["automountServiceAccountToken"] is False, name
        for container in _containers(pod):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert container["image"].startswith(IMAGE), (name, container["image"])
            assert {"requests", "limits"} <= set(container["resources"]), name
        for container in _containers(pod, init=False):
            # A read-only root: HOME and temporary files go to a writable emptyDir.
            assert _env(container)["HOME"]["value"] == "/tmp", name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name


# --- MLflow and Feast read the configuration as the manifests assume ----------------------


@pytest.mark.slow
def test_the_mlflow_server_options_exist_and_clients_reach_it() -> None:
    from mlflow.cli import cli

    server = cli.commands["server"]
    options = _options(server)
    pod = _named("Deployment", "clinml-mlflow")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"]
    assert argv[:2] == ["mlflow", "server"]
    for word in argv[2:]:
        if word.startswith("-"):
            assert word in options, f"`mlflow server` has no option {word}"
    # The database password comes from the Secret through the option's variable.
    assert "--backend-store-uri" not in argv
    (backend,) = [p for p in server.params if "--backend-store-uri" in p.opts]
    assert backend.envvar in _env(container)
    assert "secretKeyRef" in _env(container)[backend.envvar]["valueFrom"]
    # Clients use the Service's name and port, which the server must accept as Host.
    uri = _named("ConfigMap", "clinml-config")["data"]["tracking-uri"]
    host = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", uri)
    assert host, uri
    service = _named("Service", host.group(1))
    assert [p["port"] for p in service["spec"]["ports"]] == [int(host.group(2))]
    allowed = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert f"{host.group(1)}:{host.group(2)}" in allowed
    destination = argv[argv.index("--artifacts-destination") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert destination in mounts
    # Artifacts go through the server's proxy. MLflow refuses a location naming a host
    # unless that host is the one of the server's own --default-artifact-root.
    server = f"mlflow-artifacts://{host.group(1)}:{host.group(2)}/"
    root = _named("ConfigMap", "clinml-config")["data"]["artifact-root"]
    assert root.startswith(server), root
    assert argv[argv.index("--default-artifact-root") + 1] == server
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        # /health is exempt from MLflow's Host check; other paths are not.
        assert container[probe]["httpGet"]["path"] == "/health"


@pytest.mark.slow
def test_feast_reads_the_feature_store_yaml_with_passwords_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from feast.repo_config import load_repo_config

    config = tmp_path / FEATURE_STORE_FILE
    # clinml adds these two per use case.
    config.write_text("project: readmission\nprovider: local\n" + _feature_store_yaml())
    for name in ("FEATURE_STORE_PG_PASSWORD", "FEATURE_STORE_REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    unset = load_repo_config(tmp_path, config)
    assert unset.offline_store.password == "${FEATURE_STORE_PG_PASSWORD}", "left as text"

    monkeypatch.setenv("FEATURE_STORE_PG_PASSWORD", "pg-secret")
    monkeypatch.setenv("FEATURE_STORE_REDIS_PASSWORD", "redis-secret")
    loaded = load_repo_config(tmp_path, config)
    assert loaded.offline_store.type == "postgres"
    assert loaded.offline_store.password == "pg-secret"
    assert loaded.online_store.type == "redis"
    assert "password=redis-secret" in loaded.online_store.connection_string
    assert loaded.registry.registry_type == "sql"
    assert loaded.registry.path.startswith("postgresql+psycopg://feast:pg-secret@")
    assert "pg-secret" not in config.read_text(), "the file itself holds no secret"
