"""Small helpers shared by the models and guides in :mod:`pyrodgm.models` and
:mod:`pyrodgm.guides`: batch sizes, label encodings and cheap input checks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch import nn

from .validation import check_features, check_labels

__all__ = [
    "PlatedModel",
    "PlatedGuide",
    "FreezableStack",
    "data_size",
    "one_hot",
    "one_hot_rows",
    "check_model_input",
    "parameter_dtype",
    "record",
    "register_module",
    "register_programs",
    "registered_once",
]

# one set of (name, module id) per open ``registered_once()`` context, innermost last
_REGISTERED: list[set[tuple[str, int]]] = []


@contextmanager
def registered_once() -> Iterator[None]:
    """Within this context :func:`register_module` registers each module with
    :func:`pyro.module` on its first call only.

    A loss that runs the model and the guide several times for one value (labelled and
    unlabelled rows, particles of different terms) enters it around the runs: the first
    run's ``param`` sites reach every outer handler (:class:`~pyro.infer.SVI`'s parameter
    capture, :class:`~pyrodgm.losses.Weighted` ``params=``), the later runs skip the ~30 µs
    a parameter costs to send through the handler stack again.  Every run must use the same
    outer handlers; a run under :func:`~pyro.poutine.block` opens a context of its own.
    Contexts nest: an inner one starts empty and is forgotten on exit.
    """
    _REGISTERED.append(set())
    try:
        yield
    finally:
        _REGISTERED.pop()


def register_module(name: str, module: nn.Module) -> None:
    """:func:`pyro.module` ``(name, module)``, skipped if it already ran for this module in
    the innermost :func:`registered_once` context."""
    if _REGISTERED:
        key = (name, id(module))
        if key in _REGISTERED[-1]:
            return
        _REGISTERED[-1].add(key)
    pyro.module(name, module)


def register_programs(*programs) -> None:
    """Register now the parameters of each pyrodgm model or guide among ``programs``
    (:class:`PlatedModel`, :class:`PlatedGuide`), so that their runs inside the innermost
    :func:`registered_once` context skip it.

    A loss calls it first, directly under the handlers that collect parameters
    (:class:`~pyro.infer.SVI`, :class:`~pyrodgm.losses.Weighted` ``params=``): the
    ``param`` sites then reach those without passing through the loss's own traces,
    plates and enumeration (about 10 µs a parameter and run; the traces never read them).
    Any other callable registers its parameters as it runs.
    """
    for program in programs:
        if isinstance(program, (PlatedModel, PlatedGuide)):
            program.register()


def data_size(x: Optional[torch.Tensor], y: Optional[torch.Tensor] = None, batch_size: Optional[int] = None) -> int:
    """The size of the ``data`` plate: from ``x``, else ``y``, else ``batch_size``."""
    for value in (x, y):
        if value is not None:
            return value.shape[0]
    if batch_size is None:
        raise ValueError("give x, y or batch_size so the model knows how many examples to generate")
    return batch_size


def one_hot(y: Optional[torch.Tensor], num_classes: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Integer labels as one-hot rows of ``like``'s dtype and device (``None`` stays ``None``)."""
    if y is None:
        return None
    if is_validation_enabled():
        check_labels(y, num_classes, allow_unlabelled=False)
    return one_hot_rows(y.to(like.device), num_classes, like.dtype)


def one_hot_rows(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``labels`` (class indices) as one-hot rows of ``dtype``, without reading the labels
    back to the host: a label outside ``[0, num_classes)`` fails a device-side assertion
    (:func:`torch._assert_async`; an error at once on the CPU) where
    :func:`torch.nn.functional.one_hot` would synchronise to check it on the CPU.  So the
    step stays free of host synchronisation, as a CUDA graph needs (:mod:`pyrodgm.graphs`)."""
    torch._assert_async(
        ((labels >= 0) & (labels < num_classes)).all(), f"labels must be class indices in [0, {num_classes - 1}]"
    )
    return (labels.unsqueeze(-1) == torch.arange(num_classes, device=labels.device)).to(dtype)


def check_model_input(
    x: Optional[torch.Tensor], num_features: int, unit_interval: bool, name: str = "x",
    dtype: Optional[torch.dtype] = None, binary: bool = False,
) -> None:
    """Shape and dtype always (no device sync; ``dtype``: the model's parameters'); NaN/inf,
    the range (``unit_interval``) and, for a Bernoulli likelihood, binary values
    (``binary``) only while Pyro's validation is enabled (``pyro.enable_validation(False)``
    turns it off for speed)."""
    if x is None:
        return
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 2 or x.shape[-1] != num_features:
        check_features(x, name=name, event_shape=(num_features,))
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [batch, {num_features}], got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{name} is {x.dtype} but the model's parameters are {dtype}: convert the data (x.to({dtype})) or the "
            f"model and guide (.to({x.dtype}))"
        )
    if not is_validation_enabled():
        return
    if binary:
        not_binary = (x != 0) & (x != 1)  # NaN and infinities included
        if not bool(not_binary.any()):
            return
        check_features(x, name=name, event_shape=(num_features,), unit_interval=True)  # NaN, inf, range: their own message
        raise ValueError(
            f"{name} must be binary (0 or 1) for a Bernoulli likelihood, but {int(not_binary.sum())} values are not "
            f"(e.g. {float(x[not_binary][0]):g}): binarise it (pyrodgm.data.binarize) or use likelihood='gaussian'"
        )
    check_features(x, name=name, event_shape=(num_features,), unit_interval=unit_interval)


def parameter_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of ``module`` (``None`` if it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def record(name: str, value: torch.Tensor, event_dim: int = 1) -> torch.Tensor:
    """Record ``value`` (features, classifier scores) as a deterministic guide site for the
    losses that read it from a trace (:mod:`pyrodgm.losses.margin`,
    :mod:`pyrodgm.losses.metric`).  The site is marked auxiliary: a guide-only value, not a
    latent the model must also have (Pyro would otherwise warn)."""
    with poutine.infer_config(config_fn=_auxiliary):
        return pyro.deterministic(name, value, event_dim=event_dim)


def _auxiliary(msg: dict) -> dict:
    return {"is_auxiliary": True}


class PlatedModel(nn.Module):
    """Base of the generative models: ``forward(x, y=None, *, batch_size=None)`` registers
    the module's parameters with :func:`pyro.module`, checks ``x`` and runs
    :meth:`generate` inside ``pyro.plate("data", ...)``.  Subclasses set ``pyro_name``,
    ``x_dim`` and ``likelihood_kind`` and write :meth:`generate`."""

    pyro_name: str
    x_dim: int
    likelihood_kind: str = "bernoulli"

    def forward(
        self,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        *,
        batch_size: Optional[int] = None,
    ) -> torch.Tensor:
        self.register()
        bernoulli = self.likelihood_kind == "bernoulli"
        unit_interval = self.likelihood_kind != "gaussian"  # "cross-entropy": grey values in [0, 1]
        check_model_input(x, self.x_dim, unit_interval, dtype=parameter_dtype(self), binary=bernoulli)
        with pyro.plate("data", data_size(x, y, batch_size)):
            return self.generate(x, y)

    def register(self) -> None:
        """Register the trainable parameters with :func:`pyro.module` (once per
        :func:`registered_once` context)."""
        register_module(self.pyro_name, self)

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class PlatedGuide(nn.Module):
    """Base of the amortised guides: ``forward(x, y=None)`` registers the parameters,
    checks ``x`` and runs :meth:`infer` inside ``pyro.plate("data", ...)``."""

    pyro_name: str
    x_dim: int

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.register()
        check_model_input(x, self.x_dim, unit_interval=False, dtype=parameter_dtype(self))
        with pyro.plate("data", x.shape[0]):
            return self.infer(x, y)

    register = PlatedModel.register

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class FreezableStack:
    """Mixin for a stack of two parts whose lower part may be frozen (a pre-trained M1
    under M2): frozen parameters get ``requires_grad=False``, stay out of the param store
    (so out of the optimiser) and the part stays in eval mode (fixed batch-norm
    statistics).  Set ``lower``/``upper`` to the attribute names and call
    :meth:`_freeze_lower` at the end of ``__init__``."""

    lower: str
    upper: str
    freeze_m1: bool
    pyro_name: str

    def _freeze_lower(self) -> None:
        if self.freeze_m1:
            getattr(self, self.lower).requires_grad_(False)
            getattr(self, self.lower).eval()

    def register(self) -> None:
        """Register the upper part's parameters, and the lower part's unless frozen."""
        register_module(f"{self.pyro_name}.{self.upper}", getattr(self, self.upper))
        if not self.freeze_m1:
            register_module(f"{self.pyro_name}.{self.lower}", getattr(self, self.lower))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_m1:
            getattr(self, self.lower).eval()
        return self
