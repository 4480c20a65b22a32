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
"""

from __future__ import annotations

import torch

__all__ = ["flush_denormals"]


def flush_denormals() -> bool:
    """Flush subnormal floats to zero in this process's CPU arithmetic (module docstring).

    :returns: whether the CPU supports it (x86 with SSE3; ``False`` elsewhere, and
        nothing changed).
    """
    return bool(torch.set_flush_denormal(True))
