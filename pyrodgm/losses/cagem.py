r"""The semi-supervised objective of CaGeM (Maaløe et al. 2017, Sec. 4 and App. B), and the
pieces it is made of, which work for any model/guide pair:

* :class:`ModelClassifierCrossEntropy`: the cross-entropy of the *generative* model's
  classifier :math:`p(y|x) = \int p(y|z)\,p(z|x)\,dz \approx \mathbb E_{q(z|x)}[p(y|z)]`,
  read off the model's label site with the guide's latents replayed into it; the guide's
  own enumerated sites are summed with their probabilities, so for CaGeM :math:`q(z_2|x)`
  is the marginal :math:`\sum_{y'} \int q(z_2|x,y',z_1)\,q(y'|z_1,x)\,q(z_1|x)\,dz_1`
  (Sec. 4, item 2: a cascade of the two classifiers).
* :class:`FrozenBatchNormStats`: runs a loss with every batch-norm layer of the model and
  guide normalising with the batch's statistics but *not* updating its running averages
  (App. C: "we only collect statistics for the batch-normalization during unlabelled
  inference").
* :func:`cagem_objective`: :math:`\mathcal I = \sum_{x_u} \mathcal F(x_u) - \alpha
  \sum_{(x_l, y_l)} (\mathcal H_p + \mathcal H_q)` as a :class:`~pyrodgm.losses.WeightedSum`
  whose cross-entropies reach only :math:`\theta_y` (``p(y|z2)``) and :math:`\phi_y`
  (``q(y|z1,x)``): ``H_q`` depends on :math:`\phi_y` alone, ``H_p`` on both (App. B).

References

[1] `Semi-Supervised Generation with Cluster-aware Generative Models`, Lars Maaløe, Marco
    Fraccaro, Ole Winther (2017)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.params.param_store import param_with_module_name
from torch import nn

from ..traces import _categorical_logits, enumerated_log_q, guess_plate_nesting, guide_trace, logmeanexp, site_distribution
from .base import Loss, Weighted, WeightedSum
from .elbo import ClassifierCrossEntropy, SemiSupervisedELBO, labelled_rows

__all__ = [
    "FrozenBatchNormStats",
    "ModelClassifierCrossEntropy",
    "cagem_objective",
    "frozen_batch_norm_stats",
    "model_label_log_prob",
    "module_params",
]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def model_label_log_prob(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int = 1,
    label_site: str = "y",
    plate_nesting: Optional[int] = None,
) -> torch.Tensor:
    r"""``log E_q[p(y | ...)]`` for every class, a ``(batch, K)`` tensor: the guide is run
    with its label site unobserved (enumerated, with ``num_particles`` vectorised particles),
    the model is replayed against it up to its label site, and the model's categorical
    there is averaged with the guide's enumerated probabilities (summed exactly) and over
    the particles.  Gradients reach the model's label network and the guide's enumerated
    probabilities (and, unless restricted, the reparameterised latents)."""
    nesting = guess_plate_nesting(model, guide, args, kwargs) if plate_nesting is None else plate_nesting
    trace = guide_trace(guide, args, kwargs, num_particles, nesting)
    replayed = poutine.replay(model, trace=trace)
    log_p = _categorical_logits(site_distribution(replayed, args, kwargs, label_site, num_particles, nesting, role="model"))  # (enum..., particles, batch, K)
    log_q = enumerated_log_q(trace)
    if log_q is not None:
        log_p = log_p + log_q.unsqueeze(-1)
    enum_dims = log_p.dim() - (nesting + 2)
    if enum_dims > 0:
        log_p = log_p.logsumexp(dim=tuple(range(enum_dims)))
    num_classes = log_p.shape[-1]
    batch = log_p.shape[-2]
    log_p = log_p.expand((num_particles,) + tuple(log_p.shape[-(nesting + 1):])).reshape(num_particles, -1, num_classes)
    if log_p.shape[1] != batch:
        raise ValueError(f"the model's site '{label_site}' must lie in exactly one plate, the data plate")
    return logmeanexp(log_p, dim=0)


class ModelClassifierCrossEntropy(Loss):
    r""":math:`\sum_{(x,y)} -\log \bar p(y|x)` over the labelled rows, with
    :math:`\bar p(y|x) = \mathbb E_{q}[p(y|\cdot)]` the model's categorical at the label site
    averaged over the guide's latents (:func:`model_label_log_prob`): CaGeM's
    :math:`\mathcal H_p` (App. B).  Unlabelled rows (``-1``) are ignored; labels travel as
    the keyword ``label_site``, as for :class:`~pyrodgm.losses.ClassifierCrossEntropy`."""

    def __init__(self, num_particles: int = 1, label_site: str = "y", max_plate_nesting: float = float("inf")) -> None:
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.label_site = label_site

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        args_l, kwargs_l, labels_l = labelled_rows(type(self).__name__, self.label_site, args, kwargs)
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(model, guide, args_l, kwargs_l)
        log_p = model_label_log_prob(
            model, guide, args_l, kwargs_l, self.num_particles, self.label_site, int(self.max_plate_nesting)
        )
        num_classes = log_p.shape[-1]
        if is_validation_enabled() and bool(((labels_l < 0) | (labels_l >= num_classes)).any()):
            bad = labels_l[(labels_l < 0) | (labels_l >= num_classes)][0].item()
            raise ValueError(
                f"label {bad} is out of range for the model's site '{self.label_site}' with {num_classes} classes"
            )
        value = -log_p.gather(-1, labels_l.to(log_p.device).unsqueeze(-1)).sum()
        self.last_components = {"classification": value.detach()}
        return value


@contextlib.contextmanager
def frozen_batch_norm_stats(*modules: object) -> Iterator[None]:
    """Within the block, the batch-norm layers of ``modules`` (those that are
    :class:`torch.nn.Module` s) still normalise with the batch's statistics in training
    mode but leave their running mean, variance and batch count exactly as they were
    (momentum 0; the count restored)."""
    layers = [m for module in modules if isinstance(module, nn.Module) for m in module.modules() if isinstance(m, _BATCH_NORMS)]
    layers = [m for m in layers if m.track_running_stats and m.num_batches_tracked is not None]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class FrozenBatchNormStats(Loss):
    """``loss`` computed within :func:`frozen_batch_norm_stats` of the model and guide, so
    that its passes (over labelled rows, say) do not enter the batch-norm running
    averages used at evaluation time."""

    def __init__(self, loss: Loss) -> None:
        if not isinstance(loss, Loss):
            raise TypeError(f"FrozenBatchNormStats wraps a pyrodgm.losses.Loss, got {type(loss).__name__}")
        super().__init__(num_particles=loss.num_particles)
        self.loss = loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        with frozen_batch_norm_stats(model, guide):
            value = self.loss.differentiable_loss(model, guide, *args, **kwargs)
        self.last_components = dict(self.loss.last_components)
        return value


def module_params(pyro_name: str, *attributes: str) -> Callable[[str], bool]:
    """A predicate on Pyro parameter names accepting those of the submodules ``attributes``
    of a module registered with ``pyro.module(pyro_name, module)``, for
    :class:`~pyrodgm.losses.Weighted` ``params=``."""
    if not attributes:
        raise ValueError("module_params needs at least one submodule name")
    prefixes = tuple(param_with_module_name(pyro_name, f"{attribute}.") for attribute in attributes)
    return lambda name: name.startswith(prefixes)


def _either(*predicates: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda name: any(predicate(name) for predicate in predicates)


def cagem_objective(
    alpha: float,
    num_particles: int = 1,
    latent_weights: Optional[dict[str, float]] = None,
    label_site: str = "y",
    model_name: str = "cagem",
    guide_name: str = "cagem_guide",
) -> Loss:
    r"""CaGeM's :math:`-\mathcal I` (App. B) for :class:`~pyrodgm.models.cagem.CaGeM` and
    :class:`~pyrodgm.guides.cagem.CaGeMGuide`: a :class:`~pyrodgm.losses.WeightedSum` of

    * ``elbo``: :math:`-\sum_{x_u} \mathcal F(x_u)`, the bound on the unlabelled rows only
      (:class:`~pyrodgm.losses.SemiSupervisedELBO` with ``labelled_elbo=False``), ``y``
      summed exactly, the closed-form KL at ``z2``, Monte Carlo at ``z1``;
      ``latent_weights`` is the KL warm-up;
    * ``q_classifier``: ``alpha`` x :math:`\mathcal H_q`, gradient to :math:`\phi_y` only;
    * ``p_classifier``: ``alpha`` x :math:`\mathcal H_p`, gradient to :math:`\theta_y` and
      :math:`\phi_y` only,

    the two cross-entropies run with the batch-norm running statistics frozen.  ``alpha``
    is per labelled example: the paper's :math:`\alpha = \beta (N_u + N_l) / N_l`
    (:func:`pyrodgm.zoo.kingma_alpha` with ``factor = beta``).  With ``alpha = 0`` (no
    labels, CaGeM-0) this is the ELBO alone.  ``model_name`` and ``guide_name`` are the
    ``pyro_name`` s of the model and guide: :math:`\theta_y` is the model's submodule
    ``cluster_prior``, :math:`\phi_y` the guide's ``classifier`` and ``classifier_head``.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")
    elbo = SemiSupervisedELBO(
        num_particles=num_particles, label_site=label_site, max_plate_nesting=1,
        latent_weights=latent_weights, labelled_elbo=False,
    )
    if alpha == 0:
        return WeightedSum(elbo=elbo)
    phi_y = module_params(guide_name, "classifier", "classifier_head")
    theta_y = module_params(model_name, "cluster_prior")
    h_q = FrozenBatchNormStats(ClassifierCrossEntropy(num_particles, label_site, max_plate_nesting=1))
    h_p = FrozenBatchNormStats(ModelClassifierCrossEntropy(num_particles, label_site, max_plate_nesting=1))
    return WeightedSum(
        elbo=elbo,
        q_classifier=Weighted(h_q, alpha, params=phi_y),
        p_classifier=Weighted(h_p, alpha, params=_either(theta_y, phi_y)),
    )
