"""A whole SVI step captured in a CUDA graph and replayed.

On a GPU the step of a small model costs far more in Python (Pyro's handlers, traces,
plates, a few hundred kernel launches) than in arithmetic.  A CUDA graph records the
kernels of one step once and replays them for every later batch with a single launch, so
the Python runs once per capture instead of once per step.  That needs a step that never
looks at its data on the host:

* static shapes: every batch has the same number of rows, its first ``num_labelled``
  labelled and the others unlabelled (:class:`~pyrodgm.data.SemiSupervisedBatches` lays
  batches out so), and the losses slice the batch at that fixed count
  (:func:`~pyrodgm.losses.elbo.labelled_prefix`) instead of selecting rows by a boolean
  mask, which reads the labels back;
* no host synchronisation: Pyro's validation is off during the capture, labels are
  one-hot encoded without reading them (:func:`~pyrodgm.modeling.one_hot_rows`), the loss
  stays a device tensor (:meth:`~pyrodgm.losses.Loss.differentiate`), and the layout of
  the labels is checked on the device and read only when :meth:`StaticStep.check` asks;
* a capturable optimiser: :class:`~pyrodgm.optim.FusedAdam` built with
  ``{"capturable": True}`` (its step counters live on the device);
* graph-safe random numbers: torch's default CUDA generator, which
  :func:`torch.cuda.graph` registers, so each replay draws the numbers the eager step
  would have drawn.

:class:`StaticStep` is that step run eagerly, on any device; :class:`CapturedStep` warms it
up on a side stream, captures it and replays it.  The eager :class:`~pyro.infer.SVI` step
stays the default everywhere and the only path on the CPU.

A captured step bakes in every Python value it read: the learning rate and other
optimiser settings, the loss's weights (KL warm-up, ``alpha``), the modules' train/eval
modes and attributes such as a Gumbel-softmax temperature, and the parameter objects
themselves.  :class:`CapturedStep` fingerprints those before every step and captures again
when one has changed, so a schedule is never replayed stale.

References

[1] `CUDA Graphs`, PyTorch documentation (whole-network capture, graph-safe RNG).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer.util import zero_grads
from torch import nn

from .losses import Loss, Weighted
from .losses.elbo import labelled_prefix
from .validation import UNLABELLED

__all__ = ["StaticStep", "CapturedStep", "LabelLayoutError"]


class LabelLayoutError(ValueError):
    """Batches given to a :class:`StaticStep` did not have the layout it was built for."""


class StaticStep:
    """One SVI step for batches of a fixed layout, with no host synchronisation.

    ``step(x, y)`` does what ``SVI(model, guide, optim, loss).step(x, y=y)`` does (the loss
    and its gradients, then ``optim`` on the parameters met) for a batch whose first
    ``num_labelled`` rows are labelled and whose other rows are unlabelled (``-1``), and
    returns the loss as a device tensor instead of a float.  ``y`` may be omitted for an
    unlabelled model (``num_labelled`` is then ignored).  The labels' layout is checked
    on the device: the count of misplaced labels accumulates and :meth:`check` raises
    :class:`LabelLayoutError` if it is not zero (call it once an epoch, say: it reads the
    count back, a synchronisation).

    :param model: the model.
    :param guide: the guide.
    :param Loss loss: a pyrodgm loss (it has :meth:`~pyrodgm.losses.Loss.differentiate`).
    :param optim: a Pyro optimiser (:class:`~pyrodgm.optim.FusedAdam`).
    :param int num_labelled: the labelled rows at the head of every batch.
    :param str label_site: the keyword the labels travel as.
    """

    def __init__(self, model: Callable, guide: Callable, loss: Loss, optim: Callable, num_labelled: int = 0,
                 label_site: str = "y") -> None:
        if not isinstance(loss, Loss):
            raise TypeError(f"StaticStep needs a pyrodgm loss (pyrodgm.losses.Loss), got {type(loss).__name__}")
        if not isinstance(num_labelled, int) or isinstance(num_labelled, bool) or num_labelled < 0:
            raise ValueError(f"num_labelled must be a non-negative integer, got {num_labelled!r}")
        self.model, self.guide, self.loss, self.optim = model, guide, loss, optim
        self.num_labelled, self.label_site = num_labelled, label_site
        self._misplaced: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One step on ``(x, y)``; the loss as a detached device tensor."""
        kwargs = {}
        if y is not None:
            self._count_misplaced(y)
            kwargs[self.label_site] = y
        with labelled_prefix(self.num_labelled), poutine.trace(param_only=True) as capture:
            value = self.loss.differentiate(self.model, self.guide, x, **kwargs)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        self.optim(params)
        zero_grads(params)
        return value

    def _count_misplaced(self, y: torch.Tensor) -> None:
        if not torch.is_tensor(y) or y.dim() != 1:
            raise LabelLayoutError(f"y must be a 1-d tensor of labels, got {type(y).__name__} of shape {getattr(y, 'shape', None)}")
        if y.shape[0] < self.num_labelled:
            raise LabelLayoutError(f"the batch has {y.shape[0]} rows, fewer than the {self.num_labelled} labelled rows it must start with")
        head, tail = y[: self.num_labelled], y[self.num_labelled :]
        misplaced = (head < 0).sum() + (tail != UNLABELLED).sum()
        if self._misplaced is None or self._misplaced.device != y.device:
            self._misplaced = torch.zeros((), dtype=torch.int64, device=y.device)
        self._misplaced.add_(misplaced)  # in place: a captured step updates the same counter

    def check(self) -> None:
        """Raise :class:`LabelLayoutError` if a batch so far broke the layout (reads one
        number back from the device)."""
        count = 0 if self._misplaced is None else int(self._misplaced)
        if count:
            self._misplaced.zero_()
            raise LabelLayoutError(
                f"{count} label(s) broke the batch layout this step was built for: the first {self.num_labelled} rows "
                "of every batch must be labelled (class indices) and the others unlabelled (-1); those steps trained "
                "on wrongly split rows"
            )


class CapturedStep:
    """:class:`StaticStep` captured in a CUDA graph and replayed (module docstring).

    The first ``warmup_steps`` calls run the step eagerly on a side stream (the first with
    Pyro's validation as the caller set it, so bad input is caught with its usual message;
    they also create the parameters and the optimiser's state); the next call captures the
    step on its batch and replays it, and every later call copies its batch into the
    graph's input tensors and replays.  Each call trains on its own batch exactly once.

    A batch of another shape than the captured one runs eagerly (correct, just not
    replayed).  Before every replay the Python values the graph baked in are compared with
    their values now (optimiser settings, the loss's and the modules' plain attributes,
    train/eval modes, the parameter and buffer objects); if any changed, the step is
    captured again.
    :meth:`invalidate` forces that.

    :param model: the model, its parameters on one CUDA device.
    :param guide: the guide.
    :param Loss loss: the loss.
    :param optim: :class:`~pyrodgm.optim.FusedAdam` created with ``{"capturable": True}``.
    :param int num_labelled: the labelled rows at the head of every batch.
    :param int warmup_steps: eager steps before the capture (at least 1).
    :param str label_site: the keyword the labels travel as.
    """

    def __init__(self, model: Callable, guide: Callable, loss: Loss, optim: Callable, num_labelled: int = 0,
                 warmup_steps: int = 3, label_site: str = "y") -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device, and none is available: use the eager step (the default)")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps!r}")
        self.step = StaticStep(model, guide, loss, optim, num_labelled, label_site)
        self.warmup_steps = warmup_steps
        self.steps_run = 0
        self.captures = 0
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._inputs: tuple[torch.Tensor, Optional[torch.Tensor]] = (torch.empty(0), None)
        self._output: Optional[torch.Tensor] = None
        self._fingerprint: Optional[tuple] = None
        self._warmup_stream: Optional[torch.cuda.Stream] = None

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One step on ``(x, y)``; the loss as a device tensor."""
        if x.device.type != "cuda":
            raise ValueError(f"CapturedStep runs on CUDA tensors, got x on {x.device}")
        self.steps_run += 1
        if self.steps_run <= self.warmup_steps:
            return self._eager_on_side_stream(x, y, validate=self.steps_run == 1)
        if not self._matches_capture(x, y):
            if self._graph is not None and not self._same_shapes(x, y):
                return self._eager(x, y)
            self._capture(x, y)
        else:
            self._inputs[0].copy_(x)
            if y is not None:
                self._inputs[1].copy_(y)
        self._graph.replay()
        return self._output.clone()  # the graph overwrites its output at the next replay

    def check(self) -> None:
        """:meth:`StaticStep.check`."""
        self.step.check()

    def invalidate(self) -> None:
        """Capture again at the next step."""
        self._graph, self._fingerprint = None, None

    # ---------------------------------------------------------------------------------
    def _eager(self, x: torch.Tensor, y: Optional[torch.Tensor], validate: bool = False) -> torch.Tensor:
        with pyro.validation_enabled(validate and pyro.infer.util.is_validation_enabled()):
            return self.step(x, y)

    def _eager_on_side_stream(self, x: torch.Tensor, y: Optional[torch.Tensor], validate: bool) -> torch.Tensor:
        """An eager step on a side stream, as PyTorch asks before a capture (lazy
        initialisation of cuBLAS handles, autograd's streams, the optimiser's state)."""
        if self._warmup_stream is None:
            self._warmup_stream = torch.cuda.Stream(device=x.device)
        current = torch.cuda.current_stream(x.device)
        self._warmup_stream.wait_stream(current)
        with torch.cuda.stream(self._warmup_stream):
            value = self._eager(x, y, validate)
        current.wait_stream(self._warmup_stream)
        return value

    def _same_shapes(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> bool:
        static_x, static_y = self._inputs
        same_y = (y is None) == (static_y is None) and (y is None or (y.shape == static_y.shape and y.dtype == static_y.dtype))
        return x.shape == static_x.shape and x.dtype == static_x.dtype and x.device == static_x.device and same_y

    def _matches_capture(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> bool:
        return self._graph is not None and self._same_shapes(x, y) and self._fingerprint == self._current_fingerprint()

    def _current_fingerprint(self) -> tuple:
        step = self.step
        return (
            _optimizer_settings(step.optim),
            _plain_state(step.loss),
            tuple(_module_state(m) for m in (step.model, step.guide)),
        )

    def _capture(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        _check_capturable(self.step.optim)
        self._graph = None  # frees the previous graph's memory pool before the new capture
        inputs = (x.clone(), None if y is None else y.clone())
        graph = torch.cuda.CUDAGraph()
        try:
            with pyro.validation_enabled(False), torch.cuda.graph(graph):
                output = self.step(*inputs)
        except RuntimeError as error:
            raise RuntimeError(
                f"capturing the step in a CUDA graph failed ({error}); the model or loss does something a graph "
                "cannot hold (a host synchronisation, data-dependent shapes, a CPU tensor copied to the device): "
                "train with the eager step"
            ) from error
        self._graph, self._inputs, self._output = graph, inputs, output
        self._fingerprint = self._current_fingerprint()
        self.captures += 1


def _check_capturable(optim: Any) -> None:
    optimizer = getattr(optim, "optimizer", None)
    groups = getattr(optimizer, "param_groups", None)
    if not groups or not all(group.get("capturable") for group in groups):
        raise ValueError(
            "the optimiser is not capturable: create it as FusedAdam({..., 'capturable': True}) for a CUDA graph "
            "(its step counters must live on the device)"
        )


def _optimizer_settings(optim: Any) -> tuple:
    optimizer = getattr(optim, "optimizer", None)
    if optimizer is None:
        return ()
    return tuple(
        tuple(sorted((k, _plain(v)) for k, v in group.items() if k != "params")) + (tuple(id(p) for p in group["params"]),)
        for group in optimizer.param_groups
    )


def _plain(value: Any) -> Any:
    """``value`` if it is a plain Python value a graph would bake in, else a marker."""
    if value is None or isinstance(value, (bool, numbers.Number, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return ("object", type(value).__name__)


def _plain_state(obj: Any, depth: int = 0) -> tuple:
    """The plain attributes of a loss and of the losses inside it (WeightedSum terms)."""
    if depth > 4:
        return ()
    state = []
    for name, value in sorted(vars(obj).items()):
        if name == "last_components":
            continue
        if isinstance(value, Loss):
            state.append((name, _plain_state(value, depth + 1)))
        elif isinstance(value, dict) and any(isinstance(v, Weighted) for v in value.values()):  # WeightedSum.terms
            state.append((name, tuple((k, _plain(v.weight), _plain_state(v.loss, depth + 1)) for k, v in value.items())))
        else:
            state.append((name, _plain(value)))
    return tuple(state)


def _module_state(module: Any) -> tuple:
    """Plain attributes (the train/eval mode among them) and parameter and buffer objects of
    every submodule."""
    if not isinstance(module, nn.Module):
        return ()
    return tuple(
        (name, tuple((k, _plain(v)) for k, v in vars(sub).items() if not k.startswith("_")),
         tuple(id(p) for p in sub._parameters.values()), tuple(id(b) for b in sub._buffers.values()))
        for name, sub in module.named_modules()
    )

