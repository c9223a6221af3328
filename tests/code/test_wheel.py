"""``pip install clinml`` puts one package at the top level: ``clinml`` (issue 21).

The wheel is built from this checkout and installed into a bare folder; what lands there
is what a user's ``site-packages`` would gain. A user project with its own ``features``
or ``training`` package must not shadow clinml's, or be shadowed by it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

LAYERS = ("features", "training", "serving", "monitoring", "pipelines")
IGNORED = shutil.ignore_patterns("__pycache__")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, installed (without dependencies) into a bare folder."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy, so setuptools' build/ and egg-info never land in the checkout.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    for name in ("clinml", *LAYERS, "configs"):
        shutil.copytree(PROJECT_ROOT / name, source / name, ignore=IGNORED)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # setuptools is in the virtual environment: no build isolation, nothing downloaded.
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), "."],
        cwd=source,
        check=True,
    )
    (wheel,) = (work / "dist").glob("clinml-*.whl")
    target = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


@pytest.mark.slow
def test_the_wheel_installs_only_clinml_at_the_top_level(installed: Path) -> None:
    top = {p.name for p in installed.iterdir() if p.name not in ("bin", "__pycache__")}
    importable = {name for name in top if not name.endswith(".dist-info")}
    assert importable == {"clinml"}, f"top-level names besides clinml: {importable}"
    for layer in LAYERS:
        assert (installed / "clinml" / layer / "__init__.py").is_file(), layer
    assert (installed / "clinml" / "features" / "datasets" / "__init__.py").is_file()
    # the built-in specs travel inside the package
    assert (installed / "clinml" / "configs" / "pathology.yaml").is_file()
    script = (installed / "bin" / "clinml").read_text()
    assert "from clinml.pipelines.cli import main" in script


@pytest.mark.slow
def test_the_installed_layers_import_from_inside_the_package(
    installed: Path, tmp_path: Path
) -> None:
    """From a folder with a ``features`` package of its own, the installed clinml imports
    its layers from inside itself, the user's ``features`` stays the user's, and the
    built-in specs are found inside the package."""
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "__init__.py").write_text("OWNER = 'user'\n")
    probe = (
        "import sys; sys.path[:0] = [sys.argv[1], '']\n"
        "import clinml, clinml.features.store, clinml.serving.launch, features\n"
        "from clinml.spec import load_spec\n"
        "from clinml.settings import BUILTIN_CONFIG_DIR as BUILTIN\n"
        "print(clinml.__file__, clinml.features.__file__, clinml.LAYERS_BESIDE, features.OWNER,\n"
        "      BUILTIN, load_spec('pathology').name)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINML_")}
    env["CLINML_HOME"] = str(tmp_path / "home")  # no specs of the user's: the built-in one
    out = subprocess.run(
        [sys.executable, "-c", probe, str(installed)],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0] == str(installed / "clinml" / "__init__.py")
    assert out[1] == str(installed / "clinml" / "features" / "__init__.py")
    assert out[2:4] == ["False", "user"]
    assert out[4:] == [str(installed / "clinml" / "configs"), "pathology"]
