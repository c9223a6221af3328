"""Static checks of the scheduling examples in ``deploy/scheduling/``.

The examples are documentation, but they name real commands, options and secrets, so they
are checked like code: the CronJob manifest and crontab are parsed, the Airflow DAG is
parsed with ``ast`` and never imported (Airflow is not installed, and must not be), and the
monitor wrapper the DAG runs is executed against a stand-in ``clinml``.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PROJECT_ROOT
from tests.yaml_tree import walk

SCHEDULING = PROJECT_ROOT / "deploy" / "scheduling"
DAG_FILE = SCHEDULING / "airflow_monitor_dag.py"
SCHEDULE = ["15", "6", "*", "*", "*"]
SECRET_VARIABLES = {"CLINML_PSEUDONYM_KEY", "CLINML_ALERT_WEBHOOK_URL"}
CRON_FIELD = re.compile(r"^[0-9*/,\-]+$")
MONITOR_7D = re.compile(r"\bclinml monitor readmission\b.*--window 7d\b")


# --- Kubernetes CronJob -----------------------------------------------------------------


def _cronjob() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((SCHEDULING / "monitor-cronjob.yaml").read_text()))
    cronjobs = [d for d in documents if d and d.get("kind") == "CronJob"]
    assert len(cronjobs) == 1, "expected exactly one CronJob in monitor-cronjob.yaml"
    return cronjobs[0]


def test_cronjob_is_a_batch_v1_cronjob_that_never_overlaps_or_retries() -> None:
    cronjob = _cronjob()
    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["metadata"]["namespace"] == "clinml"
    spec = cronjob["spec"]
    assert spec["schedule"].split() == SCHEDULE
    assert all(CRON_FIELD.match(field) for field in spec["schedule"].split())
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    # Exit 1 means "alert delivered": a retry would only repeat the work.
    assert job["backoffLimit"] == 0
    assert job["activeDeadlineSeconds"] > 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"


def _cronjob_pod() -> dict[str, Any]:
    return _cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _cronjob_container() -> dict[str, Any]:
    (container,) = _cronjob_pod()["containers"]
    return container


def test_cronjob_runs_the_monitor_as_the_images_non_root_user() -> None:
    pod = _cronjob_pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = pod["securityContext"]["runAsUser"]
    assert uid != 0
    assert f"--uid {uid}" in (PROJECT_ROOT / "Dockerfile").read_text(), "uid differs from image"
    (container,) = pod["containers"]
    assert container["command"][:3] == ["clinml", "monitor", "readmission"]
    assert MONITOR_7D.search(" ".join(container["command"]))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "clinml-data"
    env = {e["name"]: e for e in container["env"]}
    assert env["CLINML_HOME"]["value"] == "/data"
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(resources["requests"]) <= set(resources["limits"])


def test_cronjob_takes_secrets_only_from_the_clinml_secrets_secret() -> None:
    cronjob = _cronjob()
    refs = walk(cronjob, "secretKeyRef")
    assert refs, "no secretKeyRef at all"
    assert {ref["name"] for ref in refs} == {"clinml-secrets"}
    envs = [e for env in walk(cronjob, "env") for e in env]
    by_name = {e["name"]: e for e in envs}
    for name in SECRET_VARIABLES:
        assert "value" not in by_name[name], f"{name} has a literal value"
        assert by_name[name]["valueFrom"]["secretKeyRef"]["name"] == "clinml-secrets"
    assert {ref["key"] for ref in refs} == {"pseudonym-key", "alert-webhook-url"}
    assert by_name["CLINML_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["key"]
    assert not walk(cronjob, "envFrom"), "envFrom would hide which variables are secrets"


# --- crontab ----------------------------------------------------------------------------


def _crontab_job() -> tuple[list[str], str]:
    """The one job line: its five schedule fields and the command it runs."""
    lines = [
        line.strip()
        for line in (SCHEDULING / "crontab").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    jobs = [line for line in lines if not re.match(r"^[A-Z_]+=", line)]
    assert len(jobs) == 1, jobs
    fields = jobs[0].split(maxsplit=5)
    return fields[:5], fields[5]


def test_crontab_runs_the_7_day_monitor_daily_under_flock() -> None:
    schedule, command = _crontab_job()
    assert schedule == SCHEDULE
    assert all(CRON_FIELD.match(field) for field in schedule)
    assert "%" not in command, "cron turns an unescaped % into a newline"
    assert re.search(r"\bflock -n\b", command)
    # flock's own conflict status is 1, which would read as "alert delivered".
    conflict = re.search(r"\bflock -n -E (\d+)\b", command)
    assert conflict and conflict.group(1) != "1"
    # flock -n -E N LOCKFILE COMMAND...: the lock wraps the monitor itself.
    assert re.search(r"\bflock -n -E \d+ \S+ (\S*/)?clinml monitor readmission\b", command)
    assert MONITOR_7D.search(command)
    assert re.search(r">>\s*\S+\.log 2>&1", command), "output goes to a log file"


# --- Airflow DAG (parsed, never imported) ------------------------------------------------


def _dag_tree() -> ast.Module:
    source = DAG_FILE.read_text()
    compile(source, str(DAG_FILE), "exec")  # compiles; never executed as a whole
    return ast.parse(source)


def _dag_strings() -> dict[str, str]:
    """The DAG file's module-level string constants, evaluated without importing it."""
    tree = _dag_tree()
    assigns = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant | ast.JoinedStr)
        and all(isinstance(t, ast.Name) for t in node.targets)
    ]
    namespace: dict[str, Any] = {"__builtins__": {}}
    exec(compile(ast.Module(body=assigns, type_ignores=[]), str(DAG_FILE), "exec"), namespace)
    return {k: v for k, v in namespace.items() if isinstance(v, str)}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)
    ]


def _keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {kw.arg: kw.value for kw in call.keywords if kw.arg}


def _bash_command(task_id: str) -> str:
    strings = _dag_strings()
    for call in _calls(_dag_tree(), "BashOperator"):
        kwargs = _keywords(call)
        if ast.literal_eval(kwargs["task_id"]) == task_id:
            command = kwargs["bash_command"]
            if isinstance(command, ast.Name):
                return strings[command.id]
            return ast.literal_eval(command)
    raise AssertionError(f"no BashOperator with task_id {task_id!r}")


def test_dag_file_defines_the_monitor_dag_without_running_anything() -> None:
    tree = _dag_tree()
    assert ast.get_docstring(tree) and "not a dependency" in ast.get_docstring(tree)
    imports = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "airflow" in imports and "airflow.operators.bash" in imports
    (dag,) = _calls(tree, "DAG")
    kwargs = _keywords(dag)
    assert ast.literal_eval(kwargs["dag_id"]) == "clinml_monitor_readmission"
    assert ast.literal_eval(kwargs["schedule"]).split() == SCHEDULE
    assert ast.literal_eval(kwargs["catchup"]) is False
    assert ast.literal_eval(kwargs["max_active_runs"]) == 1
    assert _calls(tree, "ShortCircuitOperator") or _calls(tree, "BranchPythonOperator")


def test_dag_runs_the_7_day_monitor_and_ingests_labels_first() -> None:
    assert MONITOR_7D.search(_bash_command("monitor"))
    assert "clinml labels ingest readmission" in _bash_command("ingest_labels")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("monitor_status", "task_status", "xcom"),
    [(0, 0, "ok /data/v.json"), (1, 0, "alert /data/v.json"), (2, 2, None)],
)
def test_dag_monitor_wrapper_turns_an_alert_into_a_result_not_a_failure(
    tmp_path: Path, monitor_status: int, task_status: int, xcom: str | None
) -> None:
    fake = tmp_path / "clinml"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "args: $*" >&2\n'
        "echo 'drift: 2/10 features'\n"
        "echo 'report: /data/r.html'\n"
        "echo 'verdict: /data/v.json'\n"
        f"exit {monitor_status}\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", _bash_command("monitor")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == task_status, done.stderr
    assert "args: monitor readmission --window 7d" in done.stderr
    if xcom is None:
        assert "exit status 2" in done.stderr
    else:
        # BashOperator pushes the last line of stdout to XCom.
        assert done.stdout.splitlines()[-1] == xcom
        assert "verdict: /data/v.json" in done.stdout, "clinml's own output stays in the log"


# --- the examples against the project -----------------------------------------------------


def test_nothing_in_the_project_imports_airflow() -> None:
    packages = ["clinml", "features", "training", "serving", "monitoring", "pipelines"]
    for path in sorted(p for pkg in packages for p in (PROJECT_ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n.split(".")[0] == "airflow" for n in names), path
    assert "airflow" not in (PROJECT_ROOT / "pyproject.toml").read_text().lower()


def _help(*args: str) -> subprocess.CompletedProcess[str]:
    clinml = Path(sys.executable).parent / "clinml"
    if not clinml.exists():
        pytest.skip(f"no clinml entry point next to {sys.executable}")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [str(clinml), *args, "--help"], capture_output=True, text=True, env=env, timeout=120
    )


def _options_in_examples() -> set[str]:
    _, crontab_command = _crontab_job()
    cronjob_command = " ".join(_cronjob_container()["command"])
    commands = [crontab_command, cronjob_command, _bash_command("monitor")]
    used = set()
    for command in commands:
        monitor = command[command.index("clinml monitor") :].split(">>")[0].split(")")[0]
        used |= set(re.findall(r"(?<!\S)(--[a-z][a-z-]*)", monitor))
    return used


def test_the_monitor_options_the_examples_use_exist() -> None:
    done = _help("monitor")
    assert done.returncode == 0, done.stderr
    if "--window" not in done.stdout:
        pytest.skip("`clinml monitor --window` is not there yet")
    used = _options_in_examples()
    assert "--window" in used
    # --retrain-on-drift is documented in the README rather than used in a schedule.
    for option in used | {"--retrain-on-drift"}:
        assert option in done.stdout, option


def test_the_labels_command_the_dag_uses_exists() -> None:
    done = _help("labels", "ingest")
    if done.returncode != 0 and "No such command 'labels'" in done.stderr:
        pytest.skip("`clinml labels` is not there yet")
    assert done.returncode == 0, done.stderr
