"""Pipelines: wire the stages together and hold the ``clinml`` command line.

Nothing here does data science; each function calls stage functions in order and
reports progress.

Modules:
    cli           the Typer app behind the ``clinml`` command
    keys_cli      ``clinml keys``: create, list and revoke API keys
    patients_cli  ``clinml patients``: patient ids to try ``/predict_patient`` with
    shadow_cli    ``clinml shadow``: score another version beside the champion (audited)
    stages        each stage wired to its collaborators built from settings
    demo          ``clinml demo``: every stage in order on a built-in use case
    progress      numbered progress steps with timings
    runtime       process-wide set-up done once by the CLI (settings, logging)
"""
