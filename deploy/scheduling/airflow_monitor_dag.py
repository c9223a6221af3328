"""Example Airflow DAG: daily clinml monitoring of the readmission model.

An EXAMPLE for sites that schedule with Airflow (2.4 or later); copy it into the DAGs
folder and adapt it. Airflow is not a dependency of clinml and nothing in clinml imports
this file; the tests only parse it.

    labels_waiting ─┬─ ingest_labels ─┬─ monitor ── alert_raised ── review_alert
                    └─ no_new_labels ─┘

``labels_waiting`` ingests a labels file first when one has been dropped at the
``labels_file`` parameter, so the monitor's performance checks see the newest outcomes.
``monitor`` runs ``clinml monitor readmission --window 7d``, whose exit status is 0 for no
alert, 1 for drift or another alert (the alert file is written and the webhook already
sent) and 2 for an error. Only 2 fails the task: an alert is a result of the pipeline, not
a failure of it. The task's last line of output, pushed to XCom, is ``ok <verdict path>``
or ``alert <verdict path>``; ``alert_raised`` lets ``review_alert`` run only after an alert.

The worker needs ``clinml`` on its PATH and the ``CLINML_*`` environment clinml reads:
CLINML_HOME, CLINML_TRACKING_URI, and the secrets CLINML_PSEUDONYM_KEY and
CLINML_ALERT_WEBHOOK_URL (from the deployment's secret store, never from this file).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.empty import EmptyOperator
from airflow.operators.python import BranchPythonOperator, ShortCircuitOperator
from airflow.utils.trigger_rule import TriggerRule

USECASE = "readmission"

# Exit 1 (alert delivered) becomes success with "alert <verdict>" as the XCom value; any
# other non-zero status fails the task. The verdict path is the "verdict: " line clinml
# prints. Airflow renders this with Jinja, so it avoids "{#" (a Jinja comment).
MONITOR_COMMAND = f"""
out="$(clinml monitor {USECASE} --window 7d)"
rc=$?
printf '%s\\n' "$out"
verdict="$(printf '%s\\n' "$out" | sed -n 's/^verdict: //p' | tail -n 1)"
case "$rc" in
  0) echo "ok $verdict" ;;
  1) echo "alert $verdict" ;;
  *) echo "clinml monitor {USECASE} failed with exit status $rc" >&2; exit "$rc" ;;
esac
"""

# The file is renamed once ingested, so the next run does not ingest it again.
INGEST_COMMAND = f"""
set -eu
labels="{{{{ params.labels_file }}}}"
clinml labels ingest {USECASE} "$labels"
mv "$labels" "$labels.ingested-{{{{ ts_nodash }}}}"
"""

# Print the verdict named by the monitor's XCom ("alert <verdict path>").
REVIEW_COMMAND = """
cat "{{ ti.xcom_pull(task_ids='monitor').split(' ', 1)[1] }}"
"""


def _labels_branch(params: dict) -> str:
    """Ingest labels first when a labels file is waiting."""
    return "ingest_labels" if Path(params["labels_file"]).is_file() else "no_new_labels"


def _alert_raised(ti) -> bool:
    """True when the monitor reported an alert, so the review step runs."""
    return str(ti.xcom_pull(task_ids="monitor") or "").startswith("alert ")


with DAG(
    dag_id="clinml_monitor_readmission",
    description="Daily drift and performance monitoring of the readmission model (clinml).",
    schedule="15 6 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),  # the schedule's zone
    catchup=False,  # a missed day is not worth a backlog of monitors
    max_active_runs=1,  # never two monitors writing the same state
    params={"labels_file": f"/srv/clinml/inbox/{USECASE}-labels.csv"},
    default_args={
        "owner": "mlops",
        # An error (exit 2) needs a person; re-running cannot fix a missing champion.
        "retries": 0,
        "execution_timeout": timedelta(hours=1),
    },
    tags=["clinml", "monitoring", "example"],
    doc_md=__doc__,
) as dag:
    labels_waiting = BranchPythonOperator(task_id="labels_waiting", python_callable=_labels_branch)
    ingest_labels = BashOperator(task_id="ingest_labels", bash_command=INGEST_COMMAND)
    no_new_labels = EmptyOperator(task_id="no_new_labels")
    monitor = BashOperator(
        task_id="monitor",
        bash_command=MONITOR_COMMAND,
        # Runs after whichever branch was taken (the other is skipped); a failed ingest
        # stops the run where it shows, rather than monitoring on stale labels.
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
    )
    alert_raised = ShortCircuitOperator(task_id="alert_raised", python_callable=_alert_raised)
    # The webhook has already told the on-call team; this is where a site opens its ticket.
    # The verdict is PHI-free JSON, so it may go to the task log.
    review_alert = BashOperator(
        task_id="review_alert",
        bash_command=REVIEW_COMMAND,
    )

    labels_waiting >> [ingest_labels, no_new_labels] >> monitor
    monitor >> alert_raised >> review_alert
