"""Flush subnormal floats to zero on the CPU, where arithmetic on them is many times slower.

A weight that only the N(0, s²) weight prior moves (``--weight-prior-std``: the first
layer's weights from MNIST's always-blank border pixels, the weights into a dead ReLU
unit) gets the gradient ``w / (N s²)``; once that is far below Adam's ``eps`` the step is
proportional to ``w`` and the weight decays geometrically, through the subnormal range
(below about 1.2e-38 in float32) on its way to zero, and so do Adam's moving averages of
exactly-zero gradients. x86 CPUs handle subnormal operands in microcode: the MNIST ADGM
run with the ADGM authors' options (``adgm_mnist_100.py --authors-code``) slowed from
about 60 s an epoch to 300-1,100 s as its weights went subnormal (41,193 of the
classifier's first layer's 442,000 at epoch 37); a training step from that checkpoint took
0.88 s, and 0.11 s with subnormals flushed (1 torch thread). :func:`flush_denormals` sets
the CPU's flush-to-zero and denormals-are-zero modes (:func:`torch.set_flush_denormal`):
such a number reads and writes as 0, which changes nothing a model computes at any visible
precision. Like :func:`pyrodgm.allocator.tune_glibc_malloc` it is an application's choice
for the whole process: the ``pyrodgm`` command and the experiments call it, the library
never does on its own.

The mode is a per-thread CPU register, and torch's worker threads (OpenMP, which MKL's
matrix products share) copy it from the thread that starts them, when they start: called
before the first multi-threaded torch operation, :func:`flush_denormals` reaches every
thread; called later (in a notebook, after some torch work) it reaches only the calling
thread, and the workers' share of every parallel operation still computes with subnormals.
It checks, and warns (:class:`SubnormalFlushWarning`) when that happened.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["SubnormalFlushWarning", "flush_denormals"]

_PROBE_SIZE = 1 << 18  # elements: several of ATen's parallel grains (32,768), about 1 ms
_SUBNORMAL_BITS = 1000  # a float32 bit pattern below 2**-126: about 1.4e-42


class SubnormalFlushWarning(RuntimeWarning):
    """:func:`flush_denormals` reached only some of torch's threads."""


def flush_denormals() -> bool:
    """Flush subnormal floats to zero in this process's CPU arithmetic (module docstring).

    Warns :class:`SubnormalFlushWarning` when torch's worker threads had started before
    this call and keep computing with subnormals (module docstring).

    :returns: whether the CPU supports it (x86 with SSE3; ``False`` elsewhere, and
        nothing changed).
    """
    if not torch.set_flush_denormal(True):
        return False
    if torch.get_num_threads() > 1 and _threads_computing_with_subnormals():
        warnings.warn(
            "subnormal floats are flushed to zero in this thread only: torch's worker threads "
            "started before flush_denormals() was called and keep their own CPU mode, so their "
            "share of every multi-threaded operation still computes with subnormals (many times "
            "slower). Call pyrodgm.denormals.flush_denormals() at the start of the process, before "
            "the first torch operation, or train with one torch thread (torch.set_num_threads(1))",
            SubnormalFlushWarning,
            stacklevel=2,
        )
    return True


def _threads_computing_with_subnormals() -> bool:
    """Whether some thread of a parallel elementwise product keeps a subnormal: with the
    flush on in every thread, each one's share comes out exactly 0 (read as bits, so no
    comparison on a flushed thread hides it)."""
    subnormals = torch.full((_PROBE_SIZE,), _SUBNORMAL_BITS, dtype=torch.int32).view(torch.float32)
    return bool((subnormals * 2.0).view(torch.int32).any())
