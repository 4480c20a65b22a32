"""The same random numbers on every device, to compare a run on an accelerator with a CPU run.

Torch's CUDA generator draws other numbers than its CPU generator for the same seed, so a
model's loss on CUDA and on the CPU agree only in expectation.  Inside
:func:`host_random_numbers` every random operator (every aten op tagged
``nondeterministic_seeded``: ``normal_``, ``uniform_``, ``bernoulli``, ``rand``,
``randn``, ``native_dropout``, ...) runs on CPU copies of its inputs, drawing from torch's
CPU generator, and its result is copied to the device its inputs (or its ``device=``
argument) named.  A program run on CUDA inside the block then draws exactly the numbers
the same program draws on the CPU after the same :func:`pyro.set_rng_seed`, so the two
runs compute the same loss and gradients up to the devices' rounding.  On the CPU the
block changes nothing.

It is a tool for tests and device comparisons (every draw crosses to the host and back,
which costs a synchronisation each), not for training.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["host_random_numbers"]

_CPU = torch.device("cpu")


def _is_random(func: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())


def _target_device(args: tuple, kwargs: dict) -> Optional[torch.device]:
    """The device a random op's result belongs on: its ``device=`` argument, else its
    first tensor input's device (``None`` for a CPU-only op)."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for value in tree_flatten((args, kwargs))[0]:
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _to_host(value: Any) -> Any:
    return value.to(_CPU) if isinstance(value, torch.Tensor) else value


class _HostRandomNumbers(TorchDispatchMode):
    """Runs every seeded random aten op on the CPU and copies its result back."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_random(func):
            return func(*args, **kwargs)
        device = _target_device(args, kwargs)
        if device is None or device.type == "cpu":
            return func(*args, **kwargs)
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type != "cpu":
            raise RuntimeError(
                f"host_random_numbers: {func} was given a {generator.device} generator; it can only replace "
                "the default generators (pass a CPU generator, or none)"
            )
        host_args, host_kwargs = tree_map(_to_host, (args, kwargs))
        if "device" in host_kwargs:
            host_kwargs["device"] = _CPU
        result = func(*host_args, **host_kwargs)
        if func._schema.is_mutable:  # in place (normal_, bernoulli_, ...) or out=: write back what was drawn
            written = args[0] if kwargs.get("out") is None else kwargs["out"]
            host_written = host_args[0] if kwargs.get("out") is None else host_kwargs["out"]
            written.copy_(host_written)
            return written
        if func is torch.ops.aten.native_dropout.default:
            # the CPU kernel's mask is of the input's dtype, the accelerators' (and their backward's) boolean
            output, mask = result
            return output.to(device), mask.to(device=device, dtype=torch.bool)
        return tree_map(lambda value: value.to(device) if isinstance(value, torch.Tensor) else value, result)


@contextlib.contextmanager
def host_random_numbers() -> Iterator[None]:
    """Within the block, random numbers are drawn on the CPU whatever the device (module
    docstring).  Example::

        pyro.set_rng_seed(0)
        with host_random_numbers():
            loss_on_cuda = elbo.differentiable_loss(model_on_cuda, guide_on_cuda, x.cuda())
        pyro.set_rng_seed(0)
        loss_on_cpu = elbo.differentiable_loss(model, guide, x)  # equal up to rounding
    """
    with _HostRandomNumbers():
        yield
