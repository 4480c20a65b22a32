"""Shared fixtures.

Only :func:`no_subnormal_flush_leak` is autouse; the others are *not*, so that test
modules written for float32 keep their defaults; a module opts in with
``pytestmark = pytest.mark.usefixtures("pyro_test_env")`` (Pyro's own test conventions:
float64, a cleared param store, a fixed seed, validation on).
"""

import os

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def no_subnormal_flush_leak():
    """Subnormal floats computed as usual after every test: the ``pyrodgm`` command (which
    the CLI tests call in-process) flushes them to zero for the whole process
    (pyrodgm.denormals); the default, off, is put back for the next test's thread."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def float64_default():
    """``torch.float64`` as the default dtype for the test, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def clean_param_store():
    """An empty Pyro param store before and after the test."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture
def pyro_validation():
    """Pyro's validation enabled for the test, the previous setting restored afterwards."""
    from pyro.infer.util import is_validation_enabled

    old = is_validation_enabled()
    pyro.enable_validation(True)
    yield
    pyro.enable_validation(old)


@pytest.fixture
def single_thread():
    """One intra-op torch thread for the test (restored afterwards): the tests' tiny
    networks gain nothing from threads, and on a busy machine OpenMP's spinning threads
    slow small matrix products down by orders of magnitude."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def pyro_test_env(float64_default, clean_param_store, pyro_validation, single_thread):
    """float64, a cleared param store, validation on, one torch thread and the RNG seeded
    with 0."""
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def test_device():
    """The device the ``cuda``-marked tests compare with the CPU: ``$PYRODGM_TEST_DEVICE``
    (default ``cuda``; skipped where that is unavailable).  ``PYRODGM_TEST_DEVICE=cpu``
    runs them CPU against CPU: the GPU kit's rehearsal does, so they cannot rot while no GPU
    is lent."""
    device = torch.device(os.environ.get("PYRODGM_TEST_DEVICE", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (PYRODGM_TEST_DEVICE=cpu rehearses these tests on the CPU)")
    return device


@pytest.fixture
def drawn_figures(monkeypatch) -> list:
    """The matplotlib figures a test's code saves, in order, instead of writing them: what
    was drawn (lines, labels, legends) can then be asserted on."""
    import matplotlib.figure

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    return drawn
