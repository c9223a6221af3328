"""Monitoring stage: compare live data with the champion's training reference.

Modules:
    drift  Evidently data-drift report -> verdict (JSON), HTML report, exit code
"""
