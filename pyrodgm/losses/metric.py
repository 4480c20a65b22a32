r"""The auxiliary losses of the semi-supervised GMVAE (Arias Figueroa & Rivera 2019,
Sec. 4): the *assignment loss* :math:`L_A` and the *metric embedding loss* :math:`L_M`,
both computed on the guide's feature representation :math:`\hat x = g(x)`.

The guide records the features as a deterministic site inside the data plate,
``pyro.deterministic("features", f, event_dim=1)``, before it samples the label.  The
losses run the guide alone, stopped at the label site (:func:`pyro.poutine.escape`, as
:func:`pyrodgm.evaluation.predict_proba` does): the features and the classifier
:math:`q(y|\hat x)` are all they need, so neither the label's enumeration nor ``z``
nor the model is run.

* **Assignment** (eq. 8): each unlabelled feature :math:`\hat x_u` gets the label of the
  distance-weighted vote of its :math:`k` nearest labelled features (Dudani 1976),

  .. math:: y_u = \arg\max_j \sum_{(\hat x_i, y_i) \in D_k(\hat x_u)} w_i\, I(j = y_i),
            \qquad w_i = 1 / \lVert \hat x_u - \hat x_i \rVert_2,

  and :math:`L_A = \sum_u -\log q(y = y_u | \hat x_u)`: the cross-entropy of the
  classifier against the hard (one-hot, no gradient) assignment.
* **Metric embedding**: the lifted structured loss (Oh Song et al. 2016, eq. 4) on the
  features, with Euclidean distances :math:`D_{ij}`,

  .. math:: J_{ij} = \log\Big(\sum_{(i,k) \in N} e^{m - D_{ik}}
            + \sum_{(j,l) \in N} e^{m - D_{jl}}\Big) + D_{ij}, \qquad
            L_M = \frac{1}{2|P|} \sum_{(i,j) \in P} \max(0, J_{ij})^2,

  over the positive pairs :math:`P` (same label, :math:`i \ne j`) and negative pairs
  :math:`N` (different labels).  The paper applies it "after the assignment process
  because it requires all the data labeled": give :class:`LiftedStructuredLoss` a ``k``
  to include the unlabelled rows with their k-NN assignments.

:class:`AuxiliaryTaskLoss` is the paper's :math:`L_{aux} = w_A L_A + w_M L_M` from one run
of the guide (the feature network dominates the cost of these losses).

References

[1] `Semi-Supervised Learning using Deep Generative Models and Auxiliary Tasks`,
    Jhosimar Arias Figueroa, Adín Ramírez Rivera (2019)
[2] `Deep Metric Learning via Lifted Structured Feature Embedding`,
    Hyun Oh Song, Yu Xiang, Stefanie Jegelka, Silvio Savarese (2016)
[3] `The Distance-Weighted k-Nearest-Neighbor Rule`, Sahibsingh A. Dudani (1976)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled

from ..traces import DATA_PLATE, _categorical_logits, _plate_size, guess_plate_nesting, logmeanexp, site_distribution
from ..validation import UNLABELLED, check_features, check_labels
from .base import Loss, published
from .elbo import _check_batch_labels, whole_batch_guide_trace_key

__all__ = [
    "AssignmentLoss",
    "AuxiliaryTaskLoss",
    "GuideFeatures",
    "LiftedStructuredLoss",
    "knn_assignment",
    "knn_votes",
    "lifted_structured",
    "pairwise_distances",
    "trace_guide_features",
]

WEIGHTINGS = ("distance", "uniform")
REDUCTIONS = ("sum", "mean")


# --------------------------------------------------------------------------------------
# tensor functions
# --------------------------------------------------------------------------------------
def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Euclidean distances :math:`\lVert a_i - b_j \rVert_2`, shape ``[len(a), len(b)]``,
    from explicit differences (exact zeros, no cancellation) with a gradient that is
    ``0`` rather than NaN where two points coincide."""
    squared = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)
    positive = squared > 0
    return torch.where(positive, squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt(), torch.zeros_like(squared))


def _check_points(points: torch.Tensor, name: str, dim: Optional[int] = None, allow_empty: bool = False) -> None:
    if not torch.is_tensor(points) or not points.is_floating_point():
        kind = points.dtype if torch.is_tensor(points) else type(points).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {kind}")
    if points.dim() != 2:
        raise ValueError(f"{name} must have shape [rows, feature_dim], got {tuple(points.shape)}")
    if dim is not None and points.shape[1] != dim:
        raise ValueError(f"{name} must have feature dim {dim}, got shape {tuple(points.shape)}")
    if points.shape[0] == 0 and allow_empty:
        return
    if is_validation_enabled():
        check_features(points, name=name)
    elif points.shape[0] == 0:
        raise ValueError(f"{name} is empty: no rows")


def _check_int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_class_indices(labels: torch.Tensor, rows: int) -> None:
    """``labels``: a 1-D integer tensor of ``rows`` non-negative class indices."""
    if not torch.is_tensor(labels) or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        kind = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor (e.g. torch.int64), got {kind}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape [{rows}] (one per feature row), got {tuple(labels.shape)}")
    if bool((labels < 0).any()):
        raise ValueError(f"labels must be class indices >= 0, found {labels[labels < 0].unique().tolist()}")


def knn_votes(
    unlabelled: torch.Tensor,
    labelled: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    num_classes: int,
    weighting: str = "distance",
) -> torch.Tensor:
    r"""The k-NN votes :math:`\sum_{i \in D_k(u)} w_i I(j = y_i)` of eq. 8, shape
    ``[len(unlabelled), num_classes]``, computed without gradient.

    :param unlabelled: ``[U, D]`` features to assign.
    :param labelled: ``[L, D]`` features with known labels.
    :param labels: ``[L]`` integer labels of ``labelled``.
    :param k: neighbours, ``1 <= k <= L``.
    :param weighting: ``"distance"``: :math:`w_i = 1/\text{distance}` (the paper); where
        some of the ``k`` neighbours coincide with the point, those alone vote (the limit
        of the weights).  ``"uniform"``: :math:`w_i = 1`, a majority vote (the authors'
        released code).
    """
    _check_int(num_classes, "num_classes", 1)
    _check_int(k, "k", 1)
    _check_choice(weighting, "weighting", WEIGHTINGS)
    _check_points(labelled, "labelled features")
    _check_points(unlabelled, "unlabelled features", dim=labelled.shape[1], allow_empty=True)
    check_labels(labels, num_classes, batch_size=labelled.shape[0], allow_unlabelled=False, name="labels")
    if k > labelled.shape[0]:
        raise ValueError(f"k = {k} nearest neighbours asked for, but only {labelled.shape[0]} labelled rows are given")
    with torch.no_grad():
        distances = pairwise_distances(unlabelled.detach(), labelled.detach())
        nearest, index = distances.topk(k, dim=-1, largest=False)
        if weighting == "uniform":
            weights = torch.ones_like(nearest)
        else:
            exact = nearest == 0
            weights = torch.where(exact.any(-1, keepdim=True), exact.to(nearest.dtype), nearest.reciprocal())
        votes = nearest.new_zeros(unlabelled.shape[0], num_classes)
        return votes.scatter_add_(-1, labels.to(index.device)[index], weights)


def knn_assignment(
    unlabelled: torch.Tensor,
    labelled: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    num_classes: int,
    weighting: str = "distance",
) -> torch.Tensor:
    """The assigned label of each unlabelled row (eq. 8): the argmax of :func:`knn_votes`
    (a tie goes to the smallest class index), an ``int64`` tensor of shape ``[U]``."""
    return knn_votes(unlabelled, labelled, labels, k, num_classes, weighting).argmax(-1)


def lifted_structured(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    r"""The lifted structured loss :math:`\frac{1}{2|P|}\sum_{(i,j)\in P}\max(0, J_{ij})^2`
    (module docstring) of ``features`` ``[B, D]`` with integer ``labels`` ``[B]``.

    :math:`\log(\sum e^{\cdot} + \sum e^{\cdot})` is computed as a ``logaddexp`` of two
    ``logsumexp``, stably.  The loss is ``0`` when the batch has no positive pair or no
    negative pair (one class only): :math:`J_{ij} = -\infty` then.
    """
    _check_points(features, "features")
    _check_class_indices(labels, features.shape[0])
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin >= 0 or margin == float("inf"):
        raise ValueError(f"margin must be a finite non-negative number, got {margin!r}")
    labels = labels.to(features.device)
    same = labels.unsqueeze(-1) == labels.unsqueeze(-2)
    positive = same & ~torch.eye(labels.shape[0], dtype=torch.bool, device=features.device)
    negative = ~same
    if not bool(positive.any()) or not bool(negative.any()):
        return features.new_zeros(())
    distances = pairwise_distances(features, features)
    log_negatives = torch.where(negative, margin - distances, torch.full_like(distances, -float("inf"))).logsumexp(-1)
    j = torch.logaddexp(log_negatives.unsqueeze(-1), log_negatives.unsqueeze(-2)) + distances
    # positive counts ordered pairs: sum over them = 2 * sum over unordered pairs
    return j.clamp_min(0).pow(2)[positive].sum() / (2 * positive.sum())


# --------------------------------------------------------------------------------------
# reading the guide
# --------------------------------------------------------------------------------------
@dataclass
class GuideFeatures:
    """What the guide computes before its label site.

    :ivar features: ``[P, B, D]``: the feature site's value, with a leading particle dim
        (``P = 1`` when the features depend on no sampled variable).
    :ivar log_q: ``[B, C]``: ``log E_q[q(y|..., x)]``, the classifier averaged over the
        particles of whatever is sampled before the label; ``None`` when the guide has no
        label site.
    """

    features: torch.Tensor
    log_q: Optional[torch.Tensor]


def trace_guide_features(
    guide: Callable,
    args: tuple,
    kwargs: dict,
    feature_site: str = "features",
    label_site: str = "y",
    num_particles: int = 1,
    plate_nesting: int = 1,
) -> GuideFeatures:
    """Run ``guide(*args, **kwargs)`` with ``num_particles`` vectorised particles (plate
    dim ``-(plate_nesting + 1)``), stopped at ``label_site``, and read its feature site
    and its classifier.  Sample sites are hidden from outer handlers, parameter sites are
    not (so :class:`~pyro.infer.SVI` and :class:`~pyrodgm.losses.Weighted` ``params=`` see
    the parameters used).  Within a :class:`~pyrodgm.losses.WeightedSum` whose ELBO ran
    the same guide on the same batch with as many particles, its guide trace is read
    instead (:func:`~pyrodgm.losses.base.shared_step`): the feature network runs once."""
    trace = published(whole_batch_guide_trace_key(guide, args, kwargs, num_particles))
    if trace is not None and feature_site in trace.nodes:
        label_fn = trace.nodes[label_site]["fn"] if label_site in trace.nodes else None
    else:
        with poutine.block(hide_types=["sample"]), poutine.trace() as tracer:
            label_fn = site_distribution(guide, args, kwargs, label_site, num_particles, plate_nesting, required=False)
        trace = tracer.trace
    site = trace.nodes.get(feature_site)
    if site is None or site["type"] != "sample":
        before = f" before its label site '{label_site}'" if label_fn is not None else ""
        raise ValueError(
            f"the guide records no site '{feature_site}'{before}: record the features inside "
            f"pyro.plate('data') with pyro.deterministic('{feature_site}', f, event_dim=1)"
        )
    value = site["value"]
    batch = _plate_size(trace, DATA_PLATE)
    if not torch.is_tensor(value) or value.dim() < 2 or (batch is not None and value.shape[-2] != batch):
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"the feature site '{feature_site}' must have shape [..., batch, feature_dim], got {shape}")
    features = value.reshape((-1,) + tuple(value.shape[-2:]))
    log_q = None
    if label_fn is not None:
        logits = _categorical_logits(label_fn)
        log_q = logmeanexp(logits.reshape((-1,) + tuple(logits.shape[-2:])), dim=0)
    return GuideFeatures(features, log_q)


class _FeatureLoss(Loss):
    """Shared: the labels from the keyword ``label_site``, the guide read by
    :func:`trace_guide_features`, plate nesting guessed once."""

    def __init__(self, feature_site: str, label_site: str, num_particles: int, max_plate_nesting: float, reduction: str) -> None:
        _check_choice(reduction, "reduction", REDUCTIONS)
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.feature_site = feature_site
        self.label_site = label_site
        self.reduction = reduction

    def _read(self, guide: Callable, args: tuple, kwargs: dict) -> tuple[GuideFeatures, torch.Tensor, torch.Tensor]:
        """The guide's features and classifier, the batch's labels and their mask."""
        labels = kwargs.pop(self.label_site, None)
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs labels as the keyword '{self.label_site}' (-1 for unlabelled rows)")
        _check_batch_labels(labels, args, kwargs)
        labelled = labels != UNLABELLED
        if not bool(labelled.any()):
            raise ValueError("the batch has an empty labelled set: every label is -1")
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(None, guide, args, kwargs)
        out = trace_guide_features(
            guide, args, kwargs, self.feature_site, self.label_site, self.num_particles, int(self.max_plate_nesting)
        )
        if out.features.shape[-2] != labels.shape[0]:
            raise ValueError(f"the feature site has {out.features.shape[-2]} rows but the batch has {labels.shape[0]} labels")
        if out.log_q is not None:
            check_labels(labels, out.log_q.shape[-1], name=self.label_site)
        return out, labels, labelled

    def _num_classes(self, out: GuideFeatures, labels: torch.Tensor) -> int:
        return out.log_q.shape[-1] if out.log_q is not None else int(labels.max()) + 1


def _assigned(
    features: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor, k: int, num_classes: int, weighting: str
) -> torch.Tensor:
    """``labels`` with each unlabelled row's ``-1`` replaced by its k-NN assignment."""
    targets = labels.clone()
    if not bool(labelled.all()):
        unlabelled = ~labelled
        targets[unlabelled] = knn_assignment(
            features[unlabelled], features[labelled], labels[labelled], k, num_classes, weighting
        )
    return targets


def _assignment_value(log_q: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The cross-entropy of the classifier ``log_q`` against ``targets`` on ``rows``."""
    nll = -log_q[rows].gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
    return nll.sum() if reduction == "sum" else nll.sum() / max(nll.numel(), 1)


def _metric_value(
    features: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, margin: float, reduction: str
) -> torch.Tensor:
    """The lifted structured loss of ``features[rows]`` with labels ``targets[rows]``."""
    value = lifted_structured(features[rows], targets[rows], margin)
    return value * int(rows.sum()) if reduction == "sum" else value


def _check_margin(margin: object) -> float:
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < float("inf"):
        raise ValueError(f"margin must be a finite non-negative number, got {margin!r}")
    return float(margin)


def _check_k_fits(k: int, labelled: torch.Tensor) -> None:
    num_labelled = int(labelled.sum())
    if k > num_labelled:
        raise ValueError(f"k = {k} nearest neighbours asked for, but the batch has only {num_labelled} labelled rows")


class AssignmentLoss(_FeatureLoss):
    r"""The assignment loss :math:`L_A` (module docstring): the cross-entropy of the
    guide's classifier against the distance-weighted k-NN labels of the unlabelled rows.

    Labels travel as the keyword ``label_site`` (``svi.step(x, y=labels)``, ``-1`` for
    unlabelled rows); model and guide are called without it.  The assignment is a hard,
    detached label (eq. 8 is an argmax); the gradient reaches the classifier and, through
    it, the feature network.  With feature particles (features depending on a sampled
    variable) the loss is averaged over them.

    :param int k: nearest labelled neighbours (the paper: 5 for MNIST, 3 for SVHN and
        Fashion-MNIST); at most the number of labelled rows in a batch.
    :param str weighting: ``"distance"`` (eq. 8) or ``"uniform"`` (majority vote).
    :param bool include_labelled: also add the labelled rows' cross-entropy against their
        true labels, as the authors' released code does (the paper's text names the
        unlabelled rows only; :class:`~pyrodgm.losses.ClassifierCrossEntropy` or the
        ELBO's ``alpha`` may already cover them).
    :param str reduction: ``"sum"`` over the rows (the convention of the library's summed
        ELBO, so weights keep their per-example meaning) or ``"mean"``.
    :param int num_particles: particles of what the guide samples before the label.
    """

    def __init__(
        self,
        k: int = 5,
        feature_site: str = "features",
        label_site: str = "y",
        num_particles: int = 1,
        weighting: str = "distance",
        include_labelled: bool = False,
        reduction: str = "sum",
        max_plate_nesting: float = float("inf"),
    ) -> None:
        _check_int(k, "k", 1)
        _check_choice(weighting, "weighting", WEIGHTINGS)
        super().__init__(feature_site, label_site, num_particles, max_plate_nesting, reduction)
        self.k = k
        self.weighting = weighting
        self.include_labelled = bool(include_labelled)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        out, labels, labelled = self._read(guide, args, kwargs)
        if out.log_q is None:
            raise ValueError(f"the guide has no sample site '{self.label_site}' to classify with")
        _check_k_fits(self.k, labelled)
        rows = torch.ones_like(labelled) if self.include_labelled else ~labelled
        num_classes = out.log_q.shape[-1]
        values = [
            _assignment_value(out.log_q, _assigned(f, labels, labelled, self.k, num_classes, self.weighting), rows, self.reduction)
            for f in out.features
        ]
        value = torch.stack(values).mean()
        self.last_components = {"assignment": value.detach()}
        return value


class LiftedStructuredLoss(_FeatureLoss):
    r"""The metric embedding loss :math:`L_M`: the lifted structured loss (module
    docstring) of the guide's features.

    By default over the labelled rows only.  With ``k`` the unlabelled rows join with
    their k-NN assignments (:func:`knn_assignment`, detached), which is the paper's setup
    ("applied after the assignment process because it requires all the data labeled").

    :param float margin: :math:`m` (the paper: 2 for MNIST, 0.5 for SVHN, 1 for
        Fashion-MNIST).
    :param k: neighbours for assigning the unlabelled rows, or ``None`` to leave them out.
    :param str reduction: ``"mean"``: the value of Oh Song et al. (a mean over the positive
        pairs of a batch); ``"sum"``: that value times the number of rows it covers, the
        scale of a sum over examples like the library's ELBO.
    """

    def __init__(
        self,
        margin: float = 1.0,
        feature_site: str = "features",
        label_site: str = "y",
        k: Optional[int] = None,
        weighting: str = "distance",
        reduction: str = "sum",
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
    ) -> None:
        self.margin = _check_margin(margin)
        if k is not None:
            _check_int(k, "k", 1)
        _check_choice(weighting, "weighting", WEIGHTINGS)
        super().__init__(feature_site, label_site, num_particles, max_plate_nesting, reduction)
        self.k = k
        self.weighting = weighting

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        out, labels, labelled = self._read(guide, args, kwargs)
        if self.k is None:
            rows = labelled
        else:
            rows = torch.ones_like(labelled)
            _check_k_fits(self.k, labelled)
        values = []
        for f in out.features:
            if self.k is None:
                targets = labels
            else:
                targets = _assigned(f, labels, labelled, self.k, self._num_classes(out, labels), self.weighting)
            values.append(_metric_value(f, targets, rows, self.margin, self.reduction))
        value = torch.stack(values).mean()
        self.last_components = {"metric": value.detach()}
        return value


class AuxiliaryTaskLoss(_FeatureLoss):
    r"""The paper's auxiliary task loss :math:`L_{aux} = w_A L_A + w_M L_M` from *one* run
    of the guide: :class:`AssignmentLoss` plus :class:`LiftedStructuredLoss` over all rows
    with the same k-NN assignments (the paper's setup).  Equal to
    ``WeightedSum(assignment=(w_A, AssignmentLoss(k, ...)), metric=(w_M,
    LiftedStructuredLoss(margin, k=k, ...)))`` but the feature network runs once, not
    twice.  ``last_components``: ``"assignment"`` and ``"metric"`` (unweighted).

    :param float assignment_weight: :math:`w_A`.
    :param float metric_weight: :math:`w_M`.
    Other parameters as in :class:`AssignmentLoss` and :class:`LiftedStructuredLoss`.
    """

    def __init__(
        self,
        k: int = 5,
        margin: float = 1.0,
        assignment_weight: float = 1.0,
        metric_weight: float = 1.0,
        feature_site: str = "features",
        label_site: str = "y",
        num_particles: int = 1,
        weighting: str = "distance",
        include_labelled: bool = False,
        reduction: str = "sum",
        max_plate_nesting: float = float("inf"),
    ) -> None:
        _check_int(k, "k", 1)
        self.margin = _check_margin(margin)
        _check_choice(weighting, "weighting", WEIGHTINGS)
        for name, weight in (("assignment_weight", assignment_weight), ("metric_weight", metric_weight)):
            if not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
                raise ValueError(f"{name} must be a finite non-negative number, got {weight!r}")
        super().__init__(feature_site, label_site, num_particles, max_plate_nesting, reduction)
        self.k, self.weighting, self.include_labelled = k, weighting, bool(include_labelled)
        self.assignment_weight, self.metric_weight = float(assignment_weight), float(metric_weight)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        out, labels, labelled = self._read(guide, args, kwargs)
        if out.log_q is None:
            raise ValueError(f"the guide has no sample site '{self.label_site}' to classify with")
        _check_k_fits(self.k, labelled)
        every = torch.ones_like(labelled)
        rows = every if self.include_labelled else ~labelled
        assignment, metric = [], []
        for f in out.features:
            targets = _assigned(f, labels, labelled, self.k, out.log_q.shape[-1], self.weighting)
            assignment.append(_assignment_value(out.log_q, targets, rows, self.reduction))
            metric.append(_metric_value(f, targets, every, self.margin, self.reduction))
        assignment_value, metric_value = torch.stack(assignment).mean(), torch.stack(metric).mean()
        self.last_components = {"assignment": assignment_value.detach(), "metric": metric_value.detach()}
        return self.assignment_weight * assignment_value + self.metric_weight * metric_value
