"""Pipelines: wire the stages together and hold the ``clinml`` command line.

Nothing here does data science; each function calls stage functions in order and
reports progress. ``pipelines.cli`` is the Typer app behind the ``clinml`` command.
"""
