"""tune_glibc_malloc: freed CPU tensor memory stays in the process, so a step that
allocates what the last one freed faults no pages in.  Each check runs in a fresh Python
process, since the settings are process-wide (and the CLI tests apply them to this one)."""

import os
import subprocess
import sys
import textwrap

import pytest

from pyrodgm.allocator import _glibc, tune_glibc_malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="glibc only")

STEPS = """
import ctypes, resource, sys, torch
from pyrodgm.allocator import tune_glibc_malloc
libc = ctypes.CDLL("libc.so.6")  # glibc's static default thresholds (128 KiB), not yet adjusted to the workload
libc.mallopt(-3, 128 * 1024), libc.mallopt(-1, 128 * 1024)
applied = tune_glibc_malloc() if sys.argv[1] == "tune" else None
faults = []
for step in range(12):  # a step's activations: twenty 1 MB tensors, allocated then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.empty(250_000).fill_(1.0) for _ in range(20)]
    del activations
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _page_faults(mode: str, env: dict | None = None) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(STEPS), mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], [int(n) for n in out[1:]]


def test_tuned_steps_fault_no_pages_in_where_the_defaults_fault_them_all():
    """20 MB a step is ~4,900 pages.  glibc's thresholds before it adapts them (and, as
    measured in M2 steps, often after) trim the freed heap and fault every page in again
    each step; tuned, only the first steps do."""
    applied, faults = _page_faults("tune")
    assert applied == "True"
    assert faults[0] > 4_000 and max(faults[-5:]) < 50
    _, default_faults = _page_faults("default")
    assert min(default_faults[-5:]) > 4_000


@pytest.mark.parametrize("setting", [("MALLOC_TOP_PAD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])
def test_the_users_malloc_setting_wins(setting):
    applied, _ = _page_faults("tune", env={**os.environ, setting[0]: setting[1]})
    assert applied == "False"


def test_rejects_non_positive_thresholds():
    with pytest.raises(ValueError, match="thresholds must be positive"):
        tune_glibc_malloc(mmap_threshold=0)
