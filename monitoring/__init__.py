"""Monitoring stage: watch the served model's inputs, outputs and performance.

Modules:
    drift        Evidently reports: feature drift, prediction drift, data quality and
                 subgroup drift -> verdict (JSON), HTML reports, Evidently workspace
    statistics   what a drift alert stands on: effect-size floors, patient-clustered
                 tests, power
    performance  ground-truth labels: ingestion, the join to predictions, windowed
                 AUROC / sensitivity / ECE with bootstrap CIs against the spec's floors
    performance_report
                 performance over time: one HTML page per monitor run, and the Evidently
                 history
    alerts       the alert file, the webhook (timeout, retries) and the cooldown
    job          ``clinml monitor``: one window, judged, alerted on, optionally retrained
    retraining   what a retrain on drift learns from: the monitored rows whose outcomes
                 are known, and the account of what it trained on
"""
