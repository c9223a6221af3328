"""The prediction log's reader: the PHI-free rows the service logged, for a time window.

The service writes the log (``clinml.serving.requestlog.PredictionLog``, off the request
path); monitoring reads it (``clinml.monitoring.job``, ``clinml.monitoring.retraining``).
The reader lives in core, below both, so monitoring never imports the serving layer to read it.

The log is a directory of parquet files, ``date=YYYY-MM-DD/part-<UTC
time>-<uuid8>.parquet``, partitioned by each row's ``time`` (UTC); each file is written
under a temporary name starting with ``.`` and renamed, so a reader never sees half a file.

Rows scored by a shadow version (``clinml shadow start``; docs/serving.md, "Shadow") sit
beside the served ones with ``shadow`` True and their own ``model_version``. The served rows
have no ``shadow`` column, or a null or False there. Nothing was answered from a shadow row,
so :func:`read_predictions` leaves them out unless asked: monitoring judges the traffic the
champion answered.

Usage::

    frame = read_predictions(settings.home / "predictions", since=week_ago, until=now)
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


# The column that marks a shadow version's rows (absent, null or False: a served row).
SHADOW_COLUMN = "shadow"


def read_predictions(
    directory: Path,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    shadow: bool = False,
) -> pd.DataFrame:
    """The logged predictions with ``since <= time < until`` (either bound optional).

    Only the ``date=`` partitions that overlap the window are read.

    Args:
        directory: the prediction log's directory.
        since, until: aware datetimes.
        shadow: False (the default): only the rows the service answered with, without a
            ``shadow`` column. True: the shadow versions' rows too, each marked by a
            boolean ``shadow`` column (False for a served row).

    Returns:
        The rows sorted by ``time`` (UTC); an empty DataFrame when there are none.

    Raises:
        ValueError: a bound has no time zone.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    for name, bound in (("since", since), ("until", until)):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"read_predictions: {name} needs a time zone (use UTC)")
    first = since.astimezone(UTC).date() if since is not None else None
    last = until.astimezone(UTC).date() if until is not None else None
    directory = Path(directory)
    frames = []
    if directory.is_dir():
        for partition in sorted(directory.glob("date=*")):
            try:
                day = date.fromisoformat(partition.name.removeprefix("date="))
            except ValueError:
                continue  # not one of ours
            if (first is not None and day < first) or (last is not None and day > last):
                continue
            for file in sorted(partition.glob("part-*.parquet")):
                frames.append(pq.ParquetFile(file).read().to_pandas())
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    keep = pd.Series(True, index=frame.index)
    if since is not None:
        keep &= frame["time"] >= since
    if until is not None:
        keep &= frame["time"] < until
    # absent, null (a served row in a file beside shadow rows) or False: served
    marked = (
        frame[SHADOW_COLUMN].eq(True)
        if SHADOW_COLUMN in frame
        else pd.Series(False, index=frame.index)
    )
    if shadow:
        frame[SHADOW_COLUMN] = marked
    else:
        keep &= ~marked
        frame = frame.drop(columns=[SHADOW_COLUMN], errors="ignore")
    return frame[keep].sort_values("time", kind="stable").reset_index(drop=True)
