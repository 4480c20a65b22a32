"""The README's "write your own model/guide pair" example runs and does what it says."""

import re
from pathlib import Path

import pyro
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_one_python_example_of_at_most_40_lines():
    blocks = python_blocks()
    assert len(blocks) == 1
    assert len(blocks[0].strip().splitlines()) <= 40


@pytest.mark.slow
def test_readme_example_trains_a_classifier_and_bounds_log_likelihood(capsys):
    pyro.clear_param_store()
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    assert float(namespace["error"]) < 0.05
    # a well-fitted 2-D mixture of 3 isotropic-ish clusters with noise 0.5: log p(x) is
    # near the entropy bound of N(0, 0.5^2 I) in 2-D minus log 3 (about -1.55 - 1.1 - spread)
    assert -4.0 < float(namespace["log_px"]) < -1.0
    assert "IWAE log p(x)" in capsys.readouterr().out
