r"""Max-margin losses on latent features: the hinge loss of the max-margin deep generative
models (mmDGMs), and the hat loss and label-balance regulariser of their conditional,
semi-supervised variants (mmDCGMs), Li, Zhu & Zhang (2016).

A linear classifier :math:`F(y; x) = \lambda^\top f(y, x)` scores each class from the
features :math:`f` the recognition model computes (a hidden layer's activations, or the
mean of :math:`z`); with one weight vector per class this is ``scores = W f + b``, a
:class:`MarginClassifier` owned by the guide.  The guide records its features and scores
as deterministic sites inside the data plate::

    pyro.deterministic("features", f, event_dim=1)
    pyro.deterministic("scores", self.classifier(f), event_dim=1)

and the losses here read them from a trace of the guide, so they work with any
model/guide pair whose guide records such sites (scores are computed from ``"features"``
through the guide's :class:`MarginClassifier` when there is no ``"scores"`` site).

**Hinge loss** (eq. 4-5), over the labelled rows, with :math:`\Delta l_n(y) = \ell\,
[y \ne y_n]` (0/1 cost times :math:`\ell`, 1 in the paper):

.. math:: C \sum_n \max_y \big(\Delta l_n(y) + F(y; x_n) - F(y_n; x_n)\big)
          + \frac{\|\lambda\|^2}{2\sigma^2},

whose subgradient is taken at the loss-augmented prediction
:math:`\tilde y_n = \arg\max_y [\Delta l_n(y) + F(y; x_n)]` (Sec. 3.2.2).  The features are
deterministic functions of :math:`x`, so :math:`\mathbb E_q[f] = f` exactly.

**Hat loss** (eq. 13), over the unlabelled rows, the hinge loss with the classifier's own
prediction :math:`\hat y_n = \arg\max_y F(y; x_n)` as putative label: it asks for a
confident decision (a margin of :math:`\ell` between the two best classes), not a correct one.

**Label balance** (eq. 15 relaxed, :math:`\mathcal L_B`), over a batch with both kinds of rows:

.. math:: \Big\| \frac{1}{N_U} \sum_{U} [\hat y_n = y] F(y; x_n)
          - \frac{1}{N_L} \sum_{L} [y_n = y] F(y; x_n) \Big\|_2,

the indicators held fixed (no gradient through :math:`\hat y_n`), as in the paper.

**Objective** (eq. 16): :math:`\mathcal L = \mathcal L_G + \alpha(\mathcal L_L + \alpha_U
\mathcal L_U + \alpha_B \mathcal L_B)`, built by :func:`max_margin_objective` as one
:class:`~pyrodgm.losses.WeightedSum`.  Everything is a sum over the batch's rows, like
:class:`~pyrodgm.losses.SemiSupervisedELBO`; the authors' code uses the same scaling
(``C * sum of hinge losses`` against the summed bound).

References

[1] `Max-Margin Deep Generative Models for (Semi-)Supervised Learning`, Chongxuan Li,
    Jun Zhu, Bo Zhang (2016), arXiv:1611.07119 (extends their NeurIPS 2015 paper)
[2] `Pegasos: Primal Estimated sub-GrAdient SOlver for SVM`, Shai Shalev-Shwartz, Yoram
    Singer, Nathan Srebro (2007)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import NonlocalExit
from torch import nn

from ..validation import UNLABELLED
from .base import Loss, WeightedSum, call_key, step_memo
from .elbo import _check_batch_labels

__all__ = [
    "MarginClassifier",
    "HingeLoss",
    "HatLoss",
    "LabelBalanceLoss",
    "WithoutLabels",
    "max_margin_objective",
    "multiclass_hinge",
    "loss_augmented_prediction",
    "hat_loss",
    "label_balance",
    "margin_scores",
    "margin_predict",
    "margin_error",
]


# --------------------------------------------------------------------------------------
# the classifier
# --------------------------------------------------------------------------------------
class MarginClassifier(nn.Module):
    r"""The linear discriminant :math:`F(y; x) = \lambda^\top f(y, x)` on features
    ``[..., in_features]``: ``scores = features @ W.T + b``, ``[..., num_classes]``.

    ``W`` is :math:`\lambda` reshaped to one row per class (the mean of its Gaussian
    posterior :math:`q(\eta) = \mathcal N(\lambda, \sigma^2 I)`, Sec. 3.2.2); it starts at
    :math:`\mathcal N(0, \text{init\_std}^2)` (the authors' 0.01), so the hinge loss's
    gradient reaches the features from the first step.

    :param int in_features: feature width.
    :param int num_classes: number of classes.
    :param float init_std: standard deviation of the initial weights.
    """

    def __init__(self, in_features: int, num_classes: int, init_std: float = 1e-2) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(f"MarginClassifier needs in_features >= 1 and num_classes >= 2, got {in_features}, {num_classes}")
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.normal_(self.linear.weight, 0.0, init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def penalty(self) -> torch.Tensor:
        r""":math:`\|\lambda\|^2 / 2` (weights only; the bias is unpenalised, as in an SVM)."""
        return 0.5 * self.linear.weight.pow(2).sum()


def find_margin_classifier(guide: Callable) -> Optional[MarginClassifier]:
    """The guide's :class:`MarginClassifier` (``None`` when it has none; an error when it
    has several, since the losses could not tell which one to use)."""
    if not isinstance(guide, nn.Module):
        return None
    found = [m for m in guide.modules() if isinstance(m, MarginClassifier)]
    if len(found) > 1:
        raise ValueError(f"the guide has {len(found)} MarginClassifier modules; the max-margin losses need exactly one")
    return found[0] if found else None


# --------------------------------------------------------------------------------------
# pure tensor functions
# --------------------------------------------------------------------------------------
def _check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(scores, 'dtype', type(scores).__name__)}")
    if scores.dim() != 2 or scores.shape[-1] < 2:
        raise ValueError(f"{name} must have shape [batch, num_classes >= 2], got {tuple(scores.shape)}")
    if is_validation_enabled() and not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} contain NaN or inf")


def _check_class_labels(labels: torch.Tensor, scores: torch.Tensor, name: str = "labels") -> None:
    if not torch.is_tensor(labels) or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"{name} must have shape [{scores.shape[0]}] (one per row of scores), got {tuple(labels.shape)}")
    if is_validation_enabled() and labels.numel() and bool(((labels < 0) | (labels >= scores.shape[-1])).any()):
        bad = labels[(labels < 0) | (labels >= scores.shape[-1])].unique().tolist()
        raise ValueError(f"{name} {bad} out of range: expected class indices in [0, {scores.shape[-1]})")


def _check_cost(cost: float) -> None:
    if not cost > 0 or not math.isfinite(cost):
        raise ValueError(f"the cost of a wrong label must be positive and finite, got {cost}")


def _augmented(scores: torch.Tensor, labels: torch.Tensor, cost: float) -> torch.Tensor:
    r""":math:`\Delta l_n(y) + F(y; x_n)`: the scores plus ``cost`` on every wrong class."""
    wrong = torch.ones_like(scores).scatter_(-1, labels.unsqueeze(-1), 0.0)
    return scores + cost * wrong


def loss_augmented_prediction(scores: torch.Tensor, labels: torch.Tensor, cost: float = 1.0) -> torch.Tensor:
    r""":math:`\tilde y_n = \arg\max_y [\Delta l_n(y) + F(y; x_n)]`, ``[batch]``."""
    _check_scores(scores)
    _check_class_labels(labels, scores)
    _check_cost(cost)
    return _augmented(scores.detach(), labels, cost).argmax(-1)


def multiclass_hinge(scores: torch.Tensor, labels: torch.Tensor, cost: float = 1.0) -> torch.Tensor:
    r"""The per-row multiclass hinge loss (eq. 5), ``[batch]``:
    :math:`\max_y (\Delta l_n(y) + F(y; x_n) - F(y_n; x_n))` with
    :math:`\Delta l_n(y) = \text{cost}\,[y \ne y_n]`, evaluated at the loss-augmented
    prediction :math:`\tilde y_n`, so its gradient is the subgradient
    :math:`\nabla F(\tilde y_n) - \nabla F(y_n)` of Sec. 3.2.2.  Never negative.

    :param scores: ``[batch, num_classes]`` values of :math:`F(y; x_n)`.
    :param labels: ``[batch]`` class indices :math:`y_n`.
    :param float cost: :math:`\ell`, the cost of a wrong label.
    """
    y_tilde = loss_augmented_prediction(scores, labels, cost)
    augmented = _augmented(scores, labels, cost)
    return augmented.gather(-1, y_tilde.unsqueeze(-1)).squeeze(-1) - scores.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def hat_loss(scores: torch.Tensor, cost: float = 1.0) -> torch.Tensor:
    r"""The per-row hat loss (eq. 13), ``[batch]``: the hinge loss with the prediction
    :math:`\hat y_n = \arg\max_y F(y; x_n)` as label, which is
    :math:`\max(0, \ell - (F_{(1)} - F_{(2)}))` for the two largest scores."""
    _check_scores(scores)
    return multiclass_hinge(scores, scores.detach().argmax(-1), cost)


def label_balance(
    scores_unlabelled: torch.Tensor, scores_labelled: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    r"""The relaxed label-balance regulariser :math:`\mathcal L_B` (eq. 15 and below), a
    scalar: per class :math:`y`, the mean over the unlabelled rows of
    :math:`[\hat y_n = y] F(y; x_n)` minus the mean over the labelled rows of
    :math:`[y_n = y] F(y; x_n)`; the Euclidean norm of that vector.  The indicators
    carry no gradient (the paper's approximation).

    :param scores_unlabelled: ``[N_U, num_classes]``, ``N_U >= 1``.
    :param scores_labelled: ``[N_L, num_classes]``, ``N_L >= 1``.
    :param labels: ``[N_L]`` class indices of the labelled rows.
    """
    _check_scores(scores_unlabelled, "scores_unlabelled")
    _check_scores(scores_labelled, "scores_labelled")
    _check_class_labels(labels, scores_labelled)
    if scores_unlabelled.shape[-1] != scores_labelled.shape[-1]:
        raise ValueError(
            f"scores_unlabelled and scores_labelled disagree on the number of classes: "
            f"{scores_unlabelled.shape[-1]} and {scores_labelled.shape[-1]}"
        )
    if not scores_unlabelled.shape[0] or not scores_labelled.shape[0]:
        raise ValueError("label_balance needs at least one unlabelled and one labelled row")
    num_classes = scores_labelled.shape[-1]
    predicted = nn.functional.one_hot(scores_unlabelled.detach().argmax(-1), num_classes).to(scores_unlabelled.dtype)
    observed = nn.functional.one_hot(labels, num_classes).to(scores_labelled.dtype)
    gap = (predicted * scores_unlabelled).mean(0) - (observed * scores_labelled).mean(0)
    return torch.linalg.vector_norm(gap)


# --------------------------------------------------------------------------------------
# reading the scores from a guide
# --------------------------------------------------------------------------------------
def margin_scores(
    guide: Callable, *args, score_site: str = "scores", feature_site: str = "features", **kwargs
) -> torch.Tensor:
    """``[batch, num_classes]`` scores of the guide run on ``(*args, **kwargs)``: its
    ``score_site`` (the guide runs up to it, :func:`~pyro.poutine.escape`, so nothing it
    draws after the scores is drawn), else its ``feature_site`` through its
    :class:`MarginClassifier`.  Site values with leading particle dims are averaged over
    them (:math:`\\mathbb E_q`)."""
    with poutine.trace() as tracer:
        try:
            poutine.escape(guide, escape_fn=lambda msg: msg["name"] == score_site)(*args, **kwargs)
        except NonlocalExit as exit_:  # the messengers have exited: no reset_stack (site_distribution)
            return _particle_mean(exit_.site["value"])
    trace = tracer.trace
    if feature_site not in trace.nodes:
        raise ValueError(f"the guide has neither a '{score_site}' nor a '{feature_site}' site to classify with")
    classifier = find_margin_classifier(guide)
    if classifier is None:
        raise ValueError(f"the guide has no site '{score_site}' and no MarginClassifier to score its '{feature_site}' with")
    return _particle_mean(classifier(trace.nodes[feature_site]["value"]))


def _particle_mean(scores: torch.Tensor) -> torch.Tensor:
    """``[..., batch, K]`` scores averaged over their leading (particle) dims."""
    return scores.reshape((-1,) + tuple(scores.shape[-2:])).mean(0) if scores.dim() > 2 else scores


@torch.no_grad()
def margin_predict(guide: Callable, x: torch.Tensor, batch_size: int = 1000, score_site: str = "scores", feature_site: str = "features") -> torch.Tensor:
    r""":math:`\hat y = \arg\max_y F(y; x)` (eq. 2) for every row of ``x``, ``[N]``."""
    was_training = getattr(guide, "training", False)
    if isinstance(guide, nn.Module):
        guide.eval()
    try:
        with poutine.block():
            chunks = [
                margin_scores(guide, x[i : i + batch_size], score_site=score_site, feature_site=feature_site).argmax(-1)
                for i in range(0, x.shape[0], batch_size)
            ]
    finally:
        if isinstance(guide, nn.Module):
            guide.train(was_training)
    return torch.cat(chunks)


def margin_error(guide: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, **sites) -> float:
    """The fraction of ``x`` the margin classifier gets wrong."""
    return float((margin_predict(guide, x, batch_size, **sites).cpu() != y.cpu()).float().mean())


# --------------------------------------------------------------------------------------
# loss classes
# --------------------------------------------------------------------------------------
class _MarginLoss(Loss):
    """Shared plumbing: run the guide on the whole batch (labels withheld) up to its
    scores, once for all the margin terms of a :class:`~pyrodgm.losses.WeightedSum`
    (:func:`~pyrodgm.losses.base.step_memo`), and read them; the rows are then selected by
    their labels."""

    def __init__(self, feature_site: str, score_site: str, label_site: str, cost: float) -> None:
        super().__init__()
        _check_cost(cost)
        self.feature_site, self.score_site, self.label_site, self.cost = feature_site, score_site, label_site, float(cost)

    def _scores_and_labels(self, guide, args, kwargs, required: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        labels = kwargs.pop(self.label_site, None)
        if labels is None and required:
            raise ValueError(f"{type(self).__name__} needs labels as the keyword '{self.label_site}' (-1 for unlabelled rows)")
        if labels is not None:
            _check_batch_labels(labels, args, kwargs)
        sites = dict(score_site=self.score_site, feature_site=self.feature_site)
        key = ("margin scores", self.score_site, self.feature_site) + call_key(guide, args, kwargs)
        scores = step_memo(key, lambda: margin_scores(guide, *args, **sites, **kwargs))
        return scores, labels


class HingeLoss(_MarginLoss):
    r"""``C`` times the summed multiclass hinge loss of the labelled rows (eq. 4-5, and
    :math:`\mathcal L_L` of eq. 12), plus the prior term :math:`\|\lambda\|^2 / 2\sigma^2`
    of eq. 5 when ``sigma`` is given.

    Labels travel as the keyword ``label_site`` (``svi.step(x, y=labels)``), ``-1`` for
    unlabelled rows, which do not contribute; the guide runs without them.  The gradient
    reaches the classifier and, through the features, the recognition model.

    :param float C: weight of the hinge losses (15 for MMVA, 1e3 for Conv-MMVA on MNIST).
    :param str feature_site: the guide's feature site (used when it has no score site).
    :param str label_site: the labels' keyword.
    :param sigma: standard deviation of the Gaussian prior on :math:`\eta`; ``None``: no
        prior term (:math:`\sigma \to \infty`).
    :param num_data: the number :math:`N` of labelled training examples.  The paper's
        mini-batch objective is :math:`\frac{N}{m}\sum L + \|\lambda\|^2/2\sigma^2 +
        \frac{NC}{m}\sum \ell`; summed over the batch, as here, the prior term is weighted
        :math:`m/N` (``m`` labelled rows in the batch) so that an epoch adds it once.
        ``None``: weight 1 (full-batch training).
    :param float cost: :math:`\ell`, the cost of a wrong label in :math:`\Delta l`.
    :param str score_site: the guide's score site.
    """

    def __init__(
        self,
        C: float = 1.0,
        feature_site: str = "features",
        label_site: str = "y",
        sigma: Optional[float] = None,
        num_data: Optional[int] = None,
        cost: float = 1.0,
        score_site: str = "scores",
    ) -> None:
        super().__init__(feature_site, score_site, label_site, cost)
        if not C >= 0 or not math.isfinite(C):
            raise ValueError(f"C must be non-negative and finite, got {C}")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma must be positive (or None for no prior term), got {sigma}")
        if num_data is not None and (not isinstance(num_data, int) or num_data < 1):
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        self.C, self.sigma, self.num_data = float(C), sigma, num_data

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        scores, labels = self._scores_and_labels(guide, args, dict(kwargs), required=True)
        labelled = labels != UNLABELLED
        if not bool(labelled.any()):
            raise ValueError("the batch has an empty labelled set: every label is -1")
        hinge = multiclass_hinge(scores[labelled], labels[labelled], self.cost).sum()
        value = self.C * hinge
        self.last_components = {"hinge": hinge.detach()}
        if self.sigma is not None:
            classifier = find_margin_classifier(guide)
            if classifier is None:
                raise ValueError("HingeLoss(sigma=...) needs the guide to own a MarginClassifier (the weights lambda)")
            weight = 1.0 if self.num_data is None else int(labelled.sum()) / self.num_data
            prior = weight * classifier.penalty() / self.sigma**2
            self.last_components["prior"] = prior.detach()
            value = value + prior
        return value


class HatLoss(_MarginLoss):
    r"""The summed hat loss of the unlabelled rows (eq. 13, :math:`\mathcal L_U`): the hinge
    loss with the classifier's prediction as putative label.  Rows labelled ``-1`` in the
    keyword ``label_site`` are the unlabelled ones; without labels every row is.  Zero
    for a batch without unlabelled rows."""

    def __init__(self, feature_site: str = "features", label_site: str = "y", cost: float = 1.0, score_site: str = "scores") -> None:
        super().__init__(feature_site, score_site, label_site, cost)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        scores, labels = self._scores_and_labels(guide, args, dict(kwargs), required=False)
        unlabelled = scores[labels == UNLABELLED] if labels is not None else scores
        value = hat_loss(unlabelled, self.cost).sum() if unlabelled.shape[0] else scores.sum() * 0.0
        self.last_components = {"hat": value.detach()}
        return value


class LabelBalanceLoss(_MarginLoss):
    r"""The relaxed label-balance regulariser :math:`\mathcal L_B` (eq. 15) of a batch,
    with the batch's unlabelled and labelled rows standing in for :math:`D_U` and
    :math:`D_L`.  Needs labels (``-1`` for unlabelled rows); zero for a batch without
    unlabelled rows, an error for one without labelled rows."""

    def __init__(self, feature_site: str = "features", label_site: str = "y", score_site: str = "scores") -> None:
        super().__init__(feature_site, score_site, label_site, cost=1.0)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        scores, labels = self._scores_and_labels(guide, args, dict(kwargs), required=True)
        labelled = labels != UNLABELLED
        if not bool(labelled.any()):
            raise ValueError("the batch has an empty labelled set: every label is -1")
        if bool(labelled.all()):
            value = scores.sum() * 0.0
        else:
            value = label_balance(scores[~labelled], scores[labelled], labels[labelled])
        self.last_components = {"balance": value.detach()}
        return value


class WithoutLabels(Loss):
    """``loss`` run with the label keyword removed: the generative term of a model with no
    label site (MMVA's plain VAE bound, :math:`\\mathcal L` of eq. 5) in a batch that
    carries labels for the hinge loss."""

    def __init__(self, loss: Loss, label_site: str = "y") -> None:
        if not isinstance(loss, Loss):
            raise TypeError(f"WithoutLabels wraps a pyrodgm.losses.Loss, got {type(loss).__name__}")
        super().__init__()
        self.inner, self.label_site = loss, label_site

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        kwargs.pop(self.label_site, None)
        value = self.inner.differentiable_loss(model, guide, *args, **kwargs)
        self.last_components = dict(self.inner.last_components)
        return value


def max_margin_objective(
    elbo: Loss,
    alpha: float = 1.0,
    alpha_u: float = 0.0,
    alpha_b: float = 0.0,
    C: float = 1.0,
    sigma: Optional[float] = None,
    num_data: Optional[int] = None,
    cost: float = 1.0,
    feature_site: str = "features",
    score_site: str = "scores",
    label_site: str = "y",
) -> WeightedSum:
    r""":math:`\mathcal L = \mathcal L_G + \alpha(C\,\mathcal L_L + \alpha_U \mathcal L_U +
    \alpha_B \mathcal L_B)` (eq. 16; with ``alpha = 1``, ``C`` and no ``alpha_u``,
    ``alpha_b`` it is the supervised objective of eq. 5) as one
    :class:`~pyrodgm.losses.WeightedSum` with terms ``generative``, ``hinge`` and, when
    their weights are positive, ``hat`` and ``balance``.

    :param elbo: the generative loss :math:`\mathcal L_G` (a negative bound), e.g.
        ``WithoutLabels(SemiSupervisedELBO())`` for MMVA.
    :param float alpha: weight of the max-margin terms (0.1 in the paper's Conv-MMCVA).
    :param float alpha_u: weight of the hat loss (3 in the paper).
    :param float alpha_b: weight of the label-balance term (0.001 in the paper).
    :param C, sigma, num_data, cost: of the :class:`HingeLoss` (``C`` is 1 in eq. 16).
    """
    if not isinstance(elbo, Loss):
        raise TypeError(f"elbo must be a pyrodgm.losses.Loss, got {type(elbo).__name__}")
    for name, value in (("alpha", alpha), ("alpha_u", alpha_u), ("alpha_b", alpha_b)):
        if not value >= 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be non-negative and finite, got {value}")
    sites = dict(feature_site=feature_site, score_site=score_site, label_site=label_site)
    terms: dict = {
        "generative": elbo,
        "hinge": (alpha, HingeLoss(C=C, sigma=sigma, num_data=num_data, cost=cost, **sites)),
    }
    if alpha_u > 0:
        terms["hat"] = (alpha * alpha_u, HatLoss(cost=cost, **sites))
    if alpha_b > 0:
        terms["balance"] = (alpha * alpha_b, LabelBalanceLoss(**sites))
    return WeightedSum(**terms)
