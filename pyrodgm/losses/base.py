"""The base class of every pyrodgm loss, and the combinator of weighted loss terms.

A pyrodgm loss is a :class:`pyro.infer.ELBO` subclass: give it to
:class:`pyro.infer.SVI` exactly like :class:`~pyro.infer.Trace_ELBO`.  A subclass writes
one method, :meth:`Loss.differentiable_loss`; :meth:`Loss.loss` and
:meth:`Loss.loss_and_grads` follow from it.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item

__all__ = [
    "Loss", "Weighted", "WeightedSum", "batch_tensor", "call_key", "check_batch_not_empty", "publish", "published", "shared_step",
    "step_memo",
]


#: What the terms of one loss evaluation have computed of their programs, or ``None``
#: outside :func:`shared_step`.
_STEP_MEMO: ContextVar[Optional[dict]] = ContextVar("pyrodgm_step_memo", default=None)


@contextlib.contextmanager
def _memo_scope(memo: Optional[dict]) -> Iterator[None]:
    """Within the block, :func:`step_memo`, :func:`publish` and :func:`published` use
    ``memo`` (``None``: nothing is shared)."""
    token = _STEP_MEMO.set(memo)
    try:
        yield
    finally:
        _STEP_MEMO.reset(token)


def shared_step() -> contextlib.AbstractContextManager:
    """Within the block, loss terms share what they compute of the same program on the
    same batch (:func:`step_memo`): :class:`WeightedSum` opens one per evaluation, so that
    its terms run a guide's feature network once, as the papers' code does, not once per
    term."""
    return _memo_scope({})


def step_memo(key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered under ``key`` for the rest of the :func:`shared_step`
    block (computed afresh outside one)."""
    memo = _STEP_MEMO.get()
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def publish(key: tuple, value: Any) -> None:
    """Offer ``value`` under ``key`` to the later terms of the :func:`shared_step` block
    (nothing outside one)."""
    memo = _STEP_MEMO.get()
    if memo is not None:
        memo[key] = value


def published(key: tuple) -> Any:
    """What an earlier term of the :func:`shared_step` block offered under ``key``, or ``None``."""
    memo = _STEP_MEMO.get()
    return None if memo is None else memo.get(key)


def call_key(program: Callable, args: tuple, kwargs: dict) -> tuple:
    """The identity of a call: the program and its arguments' objects (a term of a step
    sees the same objects as the others; a sub-batch sliced from them is another call)."""
    return (id(program), tuple(id(a) for a in args), tuple(sorted((k, id(v)) for k, v in kwargs.items())))


class Loss(ELBO):
    """A loss for :class:`~pyro.infer.SVI` defined by a differentiable value.

    :ivar dict last_components: detached values of the named parts of the last loss
        computed (for logging; no device synchronisation is forced).
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf")) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True)
        # Pyro's ELBO counts its particle plate in max_plate_nesting when num_particles > 1;
        # pyrodgm's is the program's plates alone, the particles sit left of them
        self.max_plate_nesting = max_plate_nesting
        self.last_components: dict[str, torch.Tensor] = {}

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - not used
        raise NotImplementedError("pyrodgm losses trace through pyrodgm.traces.particle_traces")

    @abstractmethod
    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """The loss as a differentiable scalar tensor."""
        raise NotImplementedError

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss as a float.  Like Pyro's losses it runs with autograd on (a guide may
        differentiate inside); call it under :func:`torch.no_grad` to build no graph."""
        check_batch_not_empty(args, kwargs)
        return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss as a float; its gradients are accumulated into the parameters' ``.grad``."""
        return torch_item(self.differentiate(model, guide, *args, **kwargs))

    def differentiate(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """:meth:`loss_and_grads` without reading the value back to the host: the
        gradients are accumulated into the parameters' ``.grad`` and the loss is returned
        as a detached tensor on its device (what a step captured in a CUDA graph calls,
        :mod:`pyrodgm.graphs`)."""
        check_batch_not_empty(args, kwargs)
        value = self.differentiable_loss(model, guide, *args, **kwargs)
        if value.requires_grad:
            value.backward()
        return value.detach()


@dataclass
class Weighted:
    """A loss term, its weight, and optionally the parameters its gradient may reach.

    :param params: a predicate on Pyro parameter names (e.g. ``"guide.classifier"`` prefixes);
        the term's gradient reaches only the parameters it accepts.  ``None``: all.
    """

    loss: Loss
    weight: float = 1.0
    params: Optional[Callable[[str], bool]] = None


class WeightedSum(Loss):
    r"""A weighted sum of named loss terms, :math:`\sum_i w_i L_i`, each computed by its own
    loss object on the same ``(model, guide, *args, **kwargs)``.  The terms share what they
    compute of the guide on the whole batch (:func:`shared_step`): a feature or score site
    one term's run recorded is read by the next, not computed again (the margin terms'
    classifier scores, the metric terms' features, taken from the ELBO's guide trace
    where it ran the whole batch); a term restricted to some parameters (``params=``)
    runs its own.

    A term built with :class:`Weighted` ``params=`` sends its gradient only to the
    parameters whose names pass the predicate (CaGeM's cross-entropies, for instance, must
    update only the parameters into ``y``); the others backpropagate into everything.

    Example::

        loss = WeightedSum(elbo=SemiSupervisedELBO(), hinge=(15.0, HingeLoss(...)))
        SVI(model, guide, Adam({"lr": 1e-3}), loss).step(x, y=y)
    """

    def __init__(self, **terms: Union[Loss, tuple[float, Loss], Weighted]) -> None:
        if not terms:
            raise ValueError("WeightedSum needs at least one loss term")
        super().__init__()
        self.terms: dict[str, Weighted] = {name: _as_weighted(name, term) for name, term in terms.items()}

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        values = self._term_values(model, guide, args, kwargs)
        return sum(self.terms[name].weight * value for name, (value, _) in values.items())

    def differentiate(self, model, guide, *args, **kwargs) -> torch.Tensor:
        check_batch_not_empty(args, kwargs)
        values = self._term_values(model, guide, args, kwargs)
        free = []
        for name, (value, params) in values.items():
            term = self.terms[name]
            weighted = term.weight * value
            if term.params is None:
                free.append(weighted)
            elif weighted.requires_grad:
                _accumulate_grads(weighted, [p for n, p in params.items() if term.params(n)])
        total = sum(free) if free else torch.zeros(())
        if torch.is_tensor(total) and total.requires_grad:
            total.backward()
        return sum(self.terms[n].weight * v.detach() for n, (v, _) in values.items())

    def _term_values(self, model, guide, args, kwargs) -> dict[str, tuple[torch.Tensor, dict]]:
        values = {}
        with shared_step():
            for name, term in self.terms.items():
                values[name] = self._term_value(name, term, model, guide, args, kwargs)
        return values

    def _term_value(self, name: str, term: Weighted, model, guide, args, kwargs) -> tuple[torch.Tensor, dict]:
        """One term's value and the parameters its run used (those it restricts its
        gradient to are among them: such a term shares nothing)."""
        # a term whose parameters are captured from its own run neither reads nor offers
        with contextlib.nullcontext() if term.params is None else _memo_scope(None):
            with poutine.trace(param_only=True) as capture:
                value = term.loss.differentiable_loss(model, guide, *args, **kwargs)
        params = {n: s["value"].unconstrained() for n, s in capture.trace.nodes.items()}
        self.last_components[name] = value.detach()
        for part, part_value in term.loss.last_components.items():
            self.last_components[f"{name}.{part}"] = part_value
        return value, params


def batch_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The tensor that carries the batch: the first tensor argument with a batch dim."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim() > 0:
            return value
    return None


def check_batch_not_empty(args: tuple, kwargs: dict) -> None:
    """An error if the batch (:func:`batch_tensor`) has no rows, raised before the model or
    guide runs: SVI would otherwise step its optimiser on zero gradients, and Adam's
    momentum moves every parameter all the same."""
    batch = batch_tensor(args, kwargs)
    if batch is not None and batch.shape[0] == 0:
        raise ValueError(
            f"the batch is empty (its data has shape {tuple(batch.shape)}): there is nothing to learn from, "
            "and no parameter was changed"
        )


def _as_weighted(name: str, term) -> Weighted:
    if isinstance(term, Weighted):
        weighted = term
    elif isinstance(term, tuple) and len(term) == 2:
        weighted = Weighted(loss=term[1], weight=float(term[0]))
    else:
        weighted = Weighted(loss=term)
    if not isinstance(weighted.loss, Loss):
        raise TypeError(f"term '{name}' must be a pyrodgm.losses.Loss, got {type(weighted.loss).__name__}")
    return weighted


def _accumulate_grads(value: torch.Tensor, params: list[torch.Tensor]) -> None:
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    for param, grad in zip(params, grads):
        if grad is not None:
            param.grad = grad if param.grad is None else param.grad + grad
