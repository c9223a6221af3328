"""The layers import downwards only (issue 21), so a change cannot quietly import upward.

clinml (core) → features → training → serving / monitoring → pipelines. ``serving`` and
``monitoring`` are siblings: both stand on training and neither imports the other (the
prediction log they share is read through ``clinml.predictionlog``, its writer stays in
serving). ``pipelines`` wires every stage together and may import any of them. bench/
and tests/ are outside the layers: they may import anything, and nothing in the layers
may import them (bench/monitor_evaluation.py judges the monitor; the monitor never runs it).

The check walks the syntax tree of every ``.py`` file in the six packages and collects
each import wherever it is: at module level, inside a function, and under ``if
TYPE_CHECKING:`` (a type-only import still couples the layers: the annotation names the
layer above, and the next change turns it into a runtime import). Relative imports are
resolved against the file's package; ``importlib.import_module("...")`` and
``__import__("...")`` with a literal name count too. ``clinml.<layer>`` (the spelling the
design plans for an installed clinml) counts as that layer. No dependency: import-linter
is not installed, and this is all the contracts need.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

# Each layer and the layers it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "clinml": frozenset(),
    "features": frozenset({"clinml"}),
    "training": frozenset({"clinml", "features"}),
    "serving": frozenset({"clinml", "features", "training"}),
    "monitoring": frozenset({"clinml", "features", "training"}),
    "pipelines": frozenset({"clinml", "features", "training", "serving", "monitoring"}),
}
LAYERS = tuple(ALLOWED)
OUTSIDE = ("bench", "tests")  # no layer imports these
DIRECTION = (
    "the layers import downwards only: clinml (core) → features → training → serving and "
    "monitoring (siblings, neither imports the other) → pipelines (the wiring, imports all), "
    "and none imports bench/ or tests/"
)


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    statement: str
    layer: str
    imported: str

    def message(self) -> str:
        allowed = ", ".join(sorted(ALLOWED[self.layer])) or "no other layer"
        return (
            f"{self.path}:{self.line}: `{self.statement}` imports {self.imported}, but "
            f"{self.layer} may import only {allowed}; {DIRECTION}. Move what is needed down "
            "a layer, or have the layer above pass it in."
        )


def layer_of(path: str) -> str:
    """The layer a file (a path relative to the project root) belongs to."""
    top = Path(path).parts[0]
    if top not in ALLOWED:
        raise ValueError(f"{path} is in none of the layers {LAYERS}")
    return top


def _package(path: str) -> list[str]:
    """The package a file's relative imports start from (``features/datasets/x.py``:
    features.datasets; ``features/__init__.py``: features)."""
    return list(Path(path).parent.parts)


def _targets(path: str, tree: ast.AST) -> list[tuple[int, str, str]]:
    """Every import in ``tree``: (line, the statement as written, the module imported)."""
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}", a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ", ".join(a.name for a in node.names)
            written = f"from {'.' * node.level}{node.module or ''} import {names}"
            if node.level:
                package = _package(path)
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "clinml":  # from clinml import serving: a layer, not core
                found += [(node.lineno, written, f"clinml.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, written, module))
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else None
            name = function.id if isinstance(function, ast.Name) else name
            first = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.append((node.lineno, f"{name}({first.value!r})", first.value))
    return found


def imported_layer(module: str) -> str | None:
    """The layer a module belongs to (``clinml.serving.x`` is serving), bench or tests, or
    None (the standard library, a third-party package)."""
    parts = module.split(".")
    if parts[0] == "clinml" and len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return parts[0] if parts[0] in (*ALLOWED, *OUTSIDE) else None


def check_source(path: str, source: str) -> list[Violation]:
    """The imports of one file (``path`` relative to the project root) that go upward or
    sideways."""
    layer = layer_of(path)
    violations = []
    for line, statement, module in _targets(path, ast.parse(source, filename=path)):
        target = imported_layer(module)
        if target is not None and target != layer and target not in ALLOWED[layer]:
            violations.append(Violation(path, line, statement, layer, target))
    return sorted(violations, key=lambda v: (v.path, v.line))


def layer_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (PROJECT_ROOT / layer).rglob("*.py"))


def test_every_layer_imports_only_the_layers_below_it() -> None:
    files = layer_files()
    names = {p.relative_to(PROJECT_ROOT).as_posix() for p in files}
    # The walk sees the files the rules are about (it cannot pass by finding nothing).
    assert {"monitoring/job.py", "training/train.py", "pipelines/cli.py"} <= names
    violations = [
        v
        for p in files
        for v in check_source(p.relative_to(PROJECT_ROOT).as_posix(), p.read_text())
    ]
    assert not violations, "\n".join(v.message() for v in violations)


SYNTHETIC = """
from __future__ import annotations

from typing import TYPE_CHECKING

import training.train
from clinml.spec import UseCaseSpec
from features import store

if TYPE_CHECKING:
    from pipelines.progress import Progress


def read() -> None:
    import importlib

    from serving.requestlog import PredictionLog
    importlib.import_module("monitoring.job")
    from clinml.pipelines import cli
"""


def test_the_check_finds_upward_imports_wherever_they_are() -> None:
    violations = check_source("training/synthetic.py", SYNTHETIC)
    assert [(v.line, v.imported) for v in violations] == [
        (11, "pipelines"),  # under TYPE_CHECKING
        (17, "serving"),  # inside a function
        (18, "monitoring"),  # a literal import_module
        (19, "pipelines"),  # the installed spelling, clinml.<layer>
    ]
    message = violations[0].message()
    assert message.startswith(
        "training/synthetic.py:11: `from pipelines.progress import Progress` imports "
        "pipelines, but training may import only clinml, features;"
    )
    assert "the layers import downwards only" in message


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("clinml/x.py", "from features import ingest\n", ["features"]),
        ("clinml/x.py", "import clinml.settings\nfrom clinml import spec\n", []),
        ("features/x.py", "from clinml import Settings, monitoring\n", ["monitoring"]),
        ("monitoring/x.py", "from serving import requestlog\n", ["serving"]),
        ("serving/x.py", "import monitoring.drift\n", ["monitoring"]),
        ("serving/x.py", "from training.tracking import Tracker\n", []),
        ("pipelines/x.py", "from monitoring import job\nimport serving.service\n", []),
        ("pipelines/x.py", "from bench import monitor_evaluation\n", ["bench"]),
        ("monitoring/x.py", "from tests.conftest import PROJECT_ROOT\n", ["tests"]),
        ("features/datasets/x.py", "from ...training import train\n", ["training"]),
        ("features/datasets/x.py", "from .. import store\nfrom . import readmission\n", []),
    ],
)
def test_the_rules_of_each_layer(path: str, source: str, expected: list[str]) -> None:
    assert [v.imported for v in check_source(path, source)] == expected
