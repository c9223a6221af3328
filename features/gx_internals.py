"""The one private part of Great Expectations that clinml stands on.

``clinml.features.validate`` runs its gate in an ephemeral GX context and turns GX's progress
bars off, or every validation writes "Calculating Metrics" bars to stderr (the CLI's
output and the logs would fill with them). Written for Great Expectations 1.24.1;
``tests/code/test_library_internals.py`` fails, naming the version found and what
changed, when an upgrade moves it.

GX is imported inside the function: ``import great_expectations`` takes seconds.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

WRITTEN_FOR = "1.24.1"  # the Great Expectations release this module was written for


def gx_version() -> str:
    """The installed Great Expectations release (``importlib.metadata``)."""
    return importlib.metadata.version("great-expectations")


def quiet_progress_bars(context: Any) -> None:
    """Turn off the context's progress bars.

    Uses ``great_expectations.data_context.types.base.ProgressBarsConfig(globally=...)``,
    the value ``context.variables.progress_bars`` takes; the class is not exported from a
    public namespace nor marked ``@public_api``. The only public alternative is a whole
    ``project_config`` for ``gx.get_context``: a complete configuration (``config_version``
    and every store), whose in-memory store defaults for an ephemeral context
    (``InMemoryStoreBackendDefaults``) live in the same private module.
    Written for Great Expectations 1.24.1.
    """
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False)
