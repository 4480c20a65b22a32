"""Tests of pyrodgm.denormals: the flush reaches torch's worker threads when called first,
and says so when it cannot (the mode is per thread; workers copy it when they start).

Each case runs in a fresh interpreter, since whether the workers have started, and with
which mode, is the process's history."""

import subprocess
import sys
import textwrap

import pytest
import torch

PROBE = """
import warnings
import torch
from pyrodgm.denormals import SubnormalFlushWarning, _threads_computing_with_subnormals, flush_denormals
torch.set_num_threads(2)
if {workers_first}:
    torch.ones(1 << 18).mul(2.0).sum()  # starts the worker threads, unflushed
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    supported = flush_denormals()
print(supported, _threads_computing_with_subnormals(), [w.category is SubnormalFlushWarning for w in caught])
"""


def run_probe(workers_first: bool) -> str:
    script = textwrap.dedent(PROBE.format(workers_first=workers_first))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("False"):
        pytest.skip("this CPU cannot flush subnormal floats")
    return done.stdout.strip()


def test_flush_before_the_first_parallel_operation_reaches_every_worker_thread():
    assert run_probe(workers_first=False) == "True False []"


def test_flush_after_the_workers_started_warns_that_they_still_compute_with_subnormals():
    """Had the probe been wrong (it looks at the product's bits across all of a parallel
    operation's shares), no warning would name the workers that kept their mode."""
    assert run_probe(workers_first=True) == "True True [True]"


def test_the_probe_sees_subnormals_where_nothing_is_flushed():
    from pyrodgm.denormals import _threads_computing_with_subnormals

    torch.set_flush_denormal(False)
    assert _threads_computing_with_subnormals()
