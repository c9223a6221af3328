"""Pieces the seeded generators share (readmission, noshow, ade)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Columns:
    """Column buffers filled one generation step at a time."""

    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, keep: np.ndarray, **values: np.ndarray) -> None:
        """Append the rows ``keep`` selects of each column."""
        for name, value in values.items():
            self.columns.setdefault(name, []).append(value[keep])

    def concat(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.columns.items()}
