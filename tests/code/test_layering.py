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
``__import__("...")`` with a literal name count too. ``clinml.<layer>`` counts as that
layer. No dependency: import-linter is not installed, and this is all the contracts need.

The layers are one package (issue 21): every import spells them ``clinml.<layer>``. A bare
``features`` or ``serving`` is not installed (the wheel's only top-level package is
``clinml``) and, where it resolves (a source checkout), loads a second copy of the module
beside ``clinml.<layer>``'s; :func:`bare_imports` finds them in the layers, tests and bench.
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

import clinml.training.train
from clinml.spec import UseCaseSpec
from clinml.features import store

if TYPE_CHECKING:
    from clinml.pipelines.progress import Progress


def read() -> None:
    import importlib

    from clinml.serving.requestlog import PredictionLog
    importlib.import_module("clinml.monitoring.job")
    from clinml.pipelines import cli
"""


def test_the_check_finds_upward_imports_wherever_they_are() -> None:
    violations = check_source("training/synthetic.py", SYNTHETIC)
    assert [(v.line, v.imported) for v in violations] == [
        (11, "pipelines"),  # under TYPE_CHECKING
        (17, "serving"),  # inside a function
        (18, "monitoring"),  # a literal import_module
        (19, "pipelines"),  # from clinml import <layer>
    ]
    message = violations[0].message()
    assert message.startswith(
        "training/synthetic.py:11: `from clinml.pipelines.progress import Progress` imports "
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
        ("serving/x.py", "from clinml.training.tracking import Tracker\n", []),
        ("pipelines/x.py", "from monitoring import job\nimport serving.service\n", []),
        ("pipelines/x.py", "from bench import monitor_evaluation\n", ["bench"]),
        ("monitoring/x.py", "from tests.conftest import PROJECT_ROOT\n", ["tests"]),
        ("features/datasets/x.py", "from ...training import train\n", ["training"]),
        ("features/datasets/x.py", "from .. import store\nfrom . import readmission\n", []),
    ],
)
def test_the_rules_of_each_layer(path: str, source: str, expected: list[str]) -> None:
    assert [v.imported for v in check_source(path, source)] == expected


def bare_imports(path: str, source: str) -> list[str]:
    """Each absolute import in ``source`` that names a layer without ``clinml.``."""
    return [
        f"{path}:{line}: `{statement}`: spell it clinml.{module}"
        for line, statement, module in _targets(path, ast.parse(source, filename=path))
        if module.split(".")[0] in LAYERS[1:] and not statement.startswith("from .")
    ]


def test_every_import_spells_the_layers_as_one_package() -> None:
    files = sorted(
        p
        for top in (*LAYERS, *OUTSIDE)
        for p in (PROJECT_ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert len(files) > 100  # the walk sees the tree (it cannot pass by finding nothing)
    found = [
        line
        for p in files
        for line in bare_imports(p.relative_to(PROJECT_ROOT).as_posix(), p.read_text())
        if p.name != "test_layering.py"  # its examples spell both on purpose
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from features import store\n", 1),
        ("import serving.service\n", 1),
        ("def f():\n    import importlib\n    importlib.import_module('monitoring.job')\n", 1),
        ("from clinml.features import store\nimport clinml.serving.service\n", 0),
        ("from clinml import training\nfrom . import x\n", 0),
        ("import featuretools\nfrom pipelinesx import y\n", 0),
    ],
)
def test_bare_imports_are_found(source: str, expected: int) -> None:
    assert len(bare_imports("tests/x.py", source)) == expected
