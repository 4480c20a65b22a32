"""models/ and guides/ install as pyrodgm.models and pyrodgm.guides, editable and as a wheel."""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_models_and_guides_import_from_the_top_level_folders():
    import pyrodgm.guides
    import pyrodgm.models

    assert Path(pyrodgm.models.__file__).resolve().parent == ROOT / "models"
    assert Path(pyrodgm.guides.__file__).resolve().parent == ROOT / "guides"
    assert importlib.import_module("pyrodgm.models.m2").M2 is pyrodgm.models.M2


@pytest.mark.slow
def test_wheel_contains_pyrodgm_models_and_guides(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("pyrodgm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("pyrodgm/models/m2.py", "pyrodgm/models/cagem.py", "pyrodgm/guides/gmvae.py", "pyrodgm/losses/elbo.py",
                   "pyrodgm/losses/margin.py", "pyrodgm/recipes/cagem.py", "pyrodgm/cli.py"):
        assert module in names
    assert not any(name.startswith(("models/", "guides/", "tests/", "experiments/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pyrodgm = pyrodgm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
