"""Which rows a model may be trained on, and which rows two models can be compared on.

**The test assignment.** A patient is a test patient when a keyed hash of their
pseudonymised id falls below the spec's ``training.test_size``:
``sha256(salt || 0x00 || patient_id)`` read as a number in [0, 1). The assignment depends
on the patient alone, not on who else is in the data, so a patient added tomorrow never
moves anyone else between training and test, and every retrain and every candidate sees
the same test patients. (A shuffle-based split, ``GroupShuffleSplit`` over the patients
present today, reshuffles everyone as soon as one patient is added: the next gate then
scores the champion on patients it was trained on.)

**The training window.** With ``training.temporal_holdout_months`` the most recent months
are a second, temporal test set, and training stops ``label.horizon_days`` before it: a
30-day readmission label of an event on the last training day is decided by what happens
in the holdout, so without the gap a training label would look into the test period.

**What a version was trained on.** :class:`TrainingRecord` is stored with every
registered version (model-version tags): the salt and share of its assignment, the first
and last training event, and a digest and count of its training patients. From it the
gate rebuilds which current rows a version was trained on (:meth:`TrainingRecord.trained`)
and compares two versions only on rows neither was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from clinml.errors import SpecError
from clinml.spec import UseCaseSpec

HASH = "sha256"
# Model-version tag holding the JSON of a TrainingRecord.
TAG = "training_record"
_SCALE = float(2**64)


@dataclass(frozen=True)
class PatientAssignment:
    """Test patients by a keyed hash of the pseudonymised patient id."""

    salt: str
    fraction: float

    @classmethod
    def from_spec(cls, spec: UseCaseSpec) -> PatientAssignment:
        return cls(spec.training.test_salt or spec.name, spec.training.test_size)

    def position(self, patients: np.ndarray | pd.Series) -> np.ndarray:
        """Each row's patient as a number in [0, 1): the same patient, the same number."""
        codes, uniques = pd.factorize(pd.Series(np.asarray(patients, dtype=object)))
        if (codes < 0).any():
            raise SpecError("the test assignment needs a patient id on every row")
        prefix = self.salt.encode() + b"\x00"
        values = np.fromiter(
            (
                int.from_bytes(hashlib.sha256(prefix + str(p).encode()).digest()[:8], "big")
                for p in uniques
            ),
            dtype=np.float64,
            count=len(uniques),
        )
        return (values / _SCALE)[codes]

    def is_test(self, patients: np.ndarray | pd.Series) -> np.ndarray:
        """True for the rows of test patients."""
        return self.position(patients) < self.fraction


def patients_digest(patients: np.ndarray | pd.Series) -> str:
    """SHA-256 over the sorted distinct patient ids (pseudonyms): the same set, the same digest."""
    distinct = sorted({str(p) for p in np.asarray(patients, dtype=object)})
    return hashlib.sha256("\n".join(distinct).encode()).hexdigest()


@dataclass(frozen=True)
class TrainingRecord:
    """What a model version was trained on, in terms that survive data growth."""

    salt: str
    fraction: float
    window_start: pd.Timestamp
    window_end: pd.Timestamp
    patients: int
    patients_sha256: str
    rows: int

    @property
    def assignment(self) -> PatientAssignment:
        return PatientAssignment(self.salt, self.fraction)

    @classmethod
    def of(
        cls, assignment: PatientAssignment, patients: np.ndarray, times: pd.Series
    ) -> TrainingRecord:
        """The record of a training set: its patients and event times."""
        stamps = pd.to_datetime(times, utc=True)
        return cls(
            salt=assignment.salt,
            fraction=assignment.fraction,
            window_start=stamps.min(),
            window_end=stamps.max(),
            patients=int(pd.Series(patients).nunique()),
            patients_sha256=patients_digest(patients),
            rows=len(stamps),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": HASH,
                "salt": self.salt,
                "fraction": self.fraction,
                "window_start": self.window_start.isoformat(),
                "window_end": self.window_end.isoformat(),
                "patients": self.patients,
                "patients_sha256": self.patients_sha256,
                "rows": self.rows,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> TrainingRecord:
        raw: dict[str, Any] = json.loads(text)
        if raw.get("method") != HASH:
            raise ValueError(f"unknown test-assignment method {raw.get('method')!r}")
        return cls(
            salt=str(raw["salt"]),
            fraction=float(raw["fraction"]),
            window_start=pd.Timestamp(raw["window_start"]),
            window_end=pd.Timestamp(raw["window_end"]),
            patients=int(raw["patients"]),
            patients_sha256=str(raw["patients_sha256"]),
            rows=int(raw["rows"]),
        )

    def candidate_rows(self, patients: np.ndarray, times: pd.Series) -> np.ndarray:
        """Rows the assignment and window put in training (on today's data)."""
        stamps = utc_instants(times)
        inside = (stamps >= utc_instant(self.window_start)) & (
            stamps <= utc_instant(self.window_end)
        )
        return inside & ~self.assignment.is_test(patients)

    def rebuilt(self, patients: np.ndarray, times: pd.Series) -> bool:
        """Whether today's data rebuilds exactly the recorded training patients."""
        return self.training_rows(patients, times)[1]

    def trained(self, patients: np.ndarray, times: pd.Series) -> np.ndarray:
        """Rows of today's data this version may have been trained on.

        When today's data rebuilds the recorded training patients exactly, these are the
        non-test rows of the training window. When it does not (rows were added to or
        removed from the window since, or the pseudonym key changed), every row of the
        window counts as trained: the comparison loses rows, never gains unfair ones.
        """
        return self.training_rows(patients, times)[0]

    def training_rows(self, patients: np.ndarray, times: pd.Series) -> tuple[np.ndarray, bool]:
        """:meth:`trained`'s rows, and whether they rebuilt the recorded patients exactly."""
        rows = self.candidate_rows(patients, times)
        found = np.asarray(patients, dtype=object)[rows]
        if len(set(found)) == self.patients and patients_digest(found) == self.patients_sha256:
            return rows, True
        return utc_instants(times) <= utc_instant(self.window_end), False


def utc_instants(times: pd.Series | np.ndarray) -> np.ndarray:
    """Timestamps (naive ones read as UTC) as ``datetime64[ns]`` UTC instants."""
    return pd.DatetimeIndex(pd.to_datetime(times, utc=True)).tz_localize(None).to_numpy()


def utc_instant(stamp: pd.Timestamp) -> np.datetime64:
    """One timestamp as a ``datetime64[ns]`` UTC instant."""
    stamp = pd.Timestamp(stamp)
    stamp = stamp.tz_convert("UTC") if stamp.tzinfo else stamp
    return np.datetime64(stamp.tz_localize(None).as_unit("ns"))
