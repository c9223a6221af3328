"""Static checks of the Dockerfile and bentofile (no Docker engine runs here)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import PROJECT_ROOT

LAYERS = ("features", "training", "serving", "monitoring", "pipelines")


def _instructions() -> list[tuple[str, str]]:
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)  # fold line continuations
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_and_runs_the_service_as_non_root() -> None:
    steps = _instructions()
    keywords = [k for k, _ in steps]
    assert keywords[0] == "FROM" and "python:3.11" in steps[0][1]
    runs = " ".join(rest for k, rest in steps if k == "RUN")
    # the tested pins, with Ray: the same image runs a KubeRay cluster's nodes and the
    # training job that submits to it (deploy/k8s/raycluster.yaml)
    assert "pip install --constraint constraints.txt '.[ray]'" in runs
    copied = " ".join(rest for k, rest in steps if k == "COPY")
    assert "constraints.txt" in copied
    assert "torch==2.13.0" in runs
    users = [rest for k, rest in steps if k == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert keywords.index("USER") < keywords.index("CMD")
    assert "useradd" in runs and users[-1] in runs
    cmd = dict(steps)["CMD"]
    assert "clinml.serving.service:ClinicalService" in cmd and "bentoml" in cmd
    assert "HEALTHCHECK" in keywords and "/readyz" in dict(steps)["HEALTHCHECK"]


def test_dockerfile_copies_every_package_it_installs() -> None:
    copied = {rest.split()[0] for k, rest in _instructions() if k == "COPY"}
    packages = ["clinml", "features", "training", "serving", "monitoring", "pipelines"]
    for package in [*packages, "configs"]:
        assert package in copied, package


def test_bentofile_points_at_the_service_and_builds_offline() -> None:
    bentofile = yaml.safe_load((PROJECT_ROOT / "bentofile.yaml").read_text())
    assert bentofile["service"] == "clinml.serving.service:ClinicalService"
    # `bentoml serve NAME:TAG` imports NAME as a module first: named `clinml`, a bento
    # served where clinml is installed ran the installed code, not its own.
    assert not bentofile["name"].isidentifier(), bentofile["name"]
    assert bentofile["python"]["lock_packages"] is False
    assert "configs/*.yaml" in bentofile["include"]
    pins = {p.split("==")[0]: p for p in bentofile["python"]["packages"] if "==" in p}
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    for name in ("bentoml", "mlflow", "scikit-learn", "torch"):
        assert f'"{pins[name]}"' in pyproject, f"{name} pinned differently in pyproject.toml"


def test_the_bento_includes_every_package_the_service_imports() -> None:
    import ast

    bentofile = yaml.safe_load((PROJECT_ROOT / "bentofile.yaml").read_text())
    included = {pattern.split("/")[0] for pattern in bentofile["include"]}
    imported: set[str] = set()
    for module in ("service.py", "runtime.py", "fastpath.py", "auth.py", "requestlog.py"):
        tree = ast.parse((PROJECT_ROOT / "serving" / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")  # clinml.features.store: the features/ folder
                layer = parts[0] == "clinml" and len(parts) > 1 and parts[1] in LAYERS
                imported.add(parts[1] if layer else parts[0])
    ours = imported & {"clinml", *LAYERS}
    assert {"clinml", "features", "training"} <= ours  # the walk sees clinml's imports
    assert ours <= included, ours - included


def test_no_secret_is_baked_into_the_image_or_the_bento() -> None:
    bentofile = yaml.safe_load((PROJECT_ROOT / "bentofile.yaml").read_text())
    names = {env["name"] for env in bentofile.get("envs", [])}
    docker_env = " ".join(rest for k, rest in _instructions() if k in {"ENV", "ARG"})
    for secret in ("CLINML_PSEUDONYM_KEY", "CLINML_API_KEYS"):
        assert secret not in names and secret not in docker_env, secret
    assert {"CLINML_AUTH"} <= names  # auth is on in the bento
