"""Every experiment script runs end to end with tiny arguments (Pyro's test_examples
pattern), so none can rot.  They use the offline digits data instead of MNIST."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = {
    "m2_mnist_100.py": ["--epochs", "1"],
    "m1m2_mnist_100.py": ["--epochs", "1", "--m1-epochs", "1"],
}


def test_every_experiment_script_is_covered():
    scripts = {p.name for p in EXPERIMENTS.glob("*.py") if p.name not in ("common.py", "results_table.py")}
    assert scripts == set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_experiment_runs_and_writes_results(script, tmp_path):
    args = [sys.executable, str(EXPERIMENTS / script), "--dataset", "digits", "--validation", "300", "--device", "cpu",
            "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--quiet", *SCRIPTS[script]]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    (result_file,) = (tmp_path / "results").glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["epochs_completed"] == 1
    assert result["device"] and result["wall_seconds"] > 0
    assert 0.0 <= result["test"]["error"] <= 1.0
    assert result["paper"]["test_error"] > 0


def test_readme_results_table_is_generated_from_the_results_json():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import results_table
    finally:
        sys.path.remove(str(EXPERIMENTS))
    readme = (EXPERIMENTS.parent / "README.md").read_text()
    table = "\n".join(results_table.rows(EXPERIMENTS / "results"))
    assert results_table.BEGIN + "\n" + table + "\n" + results_table.END in readme
