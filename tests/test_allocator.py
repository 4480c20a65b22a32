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
import resource, sys, torch
from pyrodgm.allocator import tune_glibc_malloc
applied = tune_glibc_malloc() if sys.argv[1] == "tune" else None
faults = []
for step in range(8):  # the same 4 MB and 12 MB tensors allocated and freed each step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(1_000_000).fill_(1.0)
    b = torch.empty(3_000_000).fill_(1.0)
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _page_faults(mode: str, env: dict | None = None) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(STEPS), mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], [int(n) for n in out[1:]]


def test_tuned_steps_fault_no_pages_in_once_the_heap_has_grown():
    applied, faults = _page_faults("tune")
    assert applied == "True"
    assert max(faults[-3:]) < 50  # 12 MB is ~2,900 pages: none of them faulted in again
    assert faults[0] > 2_000  # the first step did fault them in (the measurement works)


@pytest.mark.parametrize("setting", [("MALLOC_TOP_PAD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])
def test_the_users_malloc_setting_wins(setting):
    applied, _ = _page_faults("tune", env={**os.environ, setting[0]: setting[1]})
    assert applied == "False"


def test_rejects_non_positive_thresholds():
    with pytest.raises(ValueError, match="thresholds must be positive"):
        tune_glibc_malloc(mmap_threshold=0)
