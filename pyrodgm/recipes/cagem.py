"""The ``cagem`` recipe's parts (Maaløe et al. 2017): the pair, the objective of App. B,
the KL warm-up schedule and the extra metrics, with App. C's hyper-parameters.

Hyper-parameters (:class:`CaGeMConfig`): ``z_dim`` (``dim(z1)``, 64), ``top_z_dim`` (``dim(z2)``, 32), ``hidden``
(networks reading or writing ``x``, 1024-1024), ``top_hidden`` (networks among the latents,
512-512), ``num_clusters`` (``K``; ``None``: the number of classes), ``kl_warmup_epochs``
(100), ``min_scale`` (1e-3, a floor on the Gaussian scales that the paper does not have:
see :class:`~pyrodgm.models.cagem.CaGeM`), ``gaussian_scale`` (``None``: the paper's
``exp``; ``"softplus"`` cannot overflow), ``alpha_factor`` (the paper's beta, 0.1: ``alpha = beta (N_u + N_l) / N_l`` per
labelled example), ``num_particles``.

With labels (CaGeM-20/50/100) ``K`` must equal the number of classes (Sec. 4) and the
checkpoint is chosen on the error of ``q(y|x)``; ``labels=0`` (CaGeM-0) trains the
unsupervised model with any ``K``, the checkpoint chosen on the validation ELBO.  The
extra metrics are ``p_error``, the error of the model's classifier ``p(y|x)`` (the one the
paper's Table 3 reports), computed only where ``K`` equals the number of classes, and
``cluster_error``, the error of ``p(y|x)``'s argmax after mapping every cluster to the
class most frequent in it (any ``K``; for CaGeM-0 the only meaningful one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pyrodgm.guides.cagem import CaGeMGuide
from pyrodgm.models.cagem import CaGeM, CaGeMSpec

from ..configs import ClassifierConfig, ClustersConfig, TopLayerConfig, option
from ..losses import Loss, SemiSupervisedELBO, WeightedSum
from ..losses.cagem import cagem_objective, model_label_log_prob
from .warmup import kl_warmup_weight

__all__ = ["CaGeMConfig", "CAGEM_DEFAULTS", "build_cagem", "cagem_loss", "cagem_warmup", "cagem_metrics", "class_probabilities"]

@dataclass
class CaGeMConfig(ClustersConfig, TopLayerConfig, ClassifierConfig):
    """CaGeM's two stochastic layers, its clusters, its beta (``alpha_factor``) and the
    guards of its Gaussian scales."""

    gaussian_scale: Optional[str] = option(
        None, "sigma = exp(Linear) (the paper's) or softplus(Linear)", choices=("exp", "softplus")
    )  # None: "exp" (older checkpoints)
    min_scale: float = option(0.0, "floor of the Gaussian scales (0: none)")  # 0 in checkpoints that predate it


#: The latent sites whose ``log p - log q`` the warm-up weighs.
LATENT_SITES = ("z1", "y", "z2")

#: Appendix C: z1 64, z2 32, 2x1024 / 2x512 ReLU + batch-norm, Adam 1e-3 annealed x0.75
#: every 50 epochs, KL warm-up over 100 epochs, beta 0.1.  Batches as in the ADGM [20]
#: (200 rows, 100 labelled), which the paper does not state.
CAGEM_DEFAULTS = dict(
    z_dim=64, top_z_dim=32, hidden=(1024, 1024), top_hidden=(512, 512), activation="relu",
    lr=1e-3, lr_decay=0.75, lr_decay_every=50, kl_warmup_epochs=100, alpha_factor=0.1,
    batch_size=200, labelled_per_batch=100, num_particles=1, eval_particles=10, min_scale=1e-3,
)


def _num_clusters(config, num_classes: int) -> int:
    clusters = num_classes if config.params.num_clusters is None else config.params.num_clusters
    if config.labels and clusters != num_classes:
        raise ValueError(
            f"cagem with labels needs --num-clusters equal to the number of classes ({num_classes}), got {clusters}; "
            "other numbers of clusters are for the unsupervised CaGeM-0 (--labels 0)"
        )
    return clusters


def build_cagem(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """``p(z2)p(y|z2)p(z1|y,z2)p(x|y,z1)`` and ``q(z1|x)q(y|z1,x)q(z2|x,y,z1)``."""
    p = config.params
    spec = CaGeMSpec(
        x_dim, _num_clusters(config, num_classes), p.z_dim, p.hidden, p.activation, scale=p.gaussian_scale or "exp",
        min_scale=p.min_scale, z2_dim=p.top_z_dim, hidden2=p.top_hidden,
    )
    return CaGeM(spec, likelihood=p.likelihood), CaGeMGuide(spec)


def cagem_loss(config, num_data: int, num_labels: int) -> Loss:
    """:func:`~pyrodgm.losses.cagem.cagem_objective` with ``alpha = beta N / N_l`` per
    labelled example (``N`` the training set, which includes the labelled examples), or
    the ELBO alone for ``num_labels = 0``."""
    alpha = config.params.alpha_factor * num_data / num_labels if num_labels else 0.0
    weights = {site: kl_warmup_weight(0, config.params.kl_warmup_epochs) for site in LATENT_SITES}
    return cagem_objective(alpha, num_particles=config.num_particles, latent_weights=weights)


def _elbo_term(loss: Loss) -> SemiSupervisedELBO:
    if isinstance(loss, WeightedSum):
        loss = loss.terms["elbo"].loss
    if not isinstance(loss, SemiSupervisedELBO):
        raise TypeError(f"the cagem schedule needs the loss of cagem_loss, got {type(loss).__name__}")
    return loss


def cagem_warmup(config, epoch: int, model: nn.Module, guide: nn.Module, loss: Loss) -> None:
    """The recipe's ``schedule``: the weight of the ``z1``, ``y`` and ``z2`` terms (the
    "temperature on the KL-terms", App. C) for ``epoch``, a function of the epoch only."""
    weight = kl_warmup_weight(epoch, config.params.kl_warmup_epochs)
    _elbo_term(loss).latent_weights = {site: weight for site in LATENT_SITES}


@torch.no_grad()
def class_probabilities(model: nn.Module, guide: nn.Module, x: torch.Tensor, num_particles: int = 1, batch_size: int = 1000) -> torch.Tensor:
    """The model's classifier ``p(y|x) ~ E_q(z2|x)[p(y|z2)]`` (Sec. 4, item 2), a
    ``(batch, K)`` tensor of probabilities, ``batch_size`` rows at a time."""
    chunks = [
        model_label_log_prob(model, guide, (x[i : i + batch_size],), {}, num_particles, "y", 1).exp()
        for i in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def cluster_error(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """The error of ``clusters`` once every cluster is mapped to its most frequent class
    (scikit-learn's contingency matrix)."""
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(labels.cpu().numpy(), clusters.cpu().numpy())  # (classes, clusters present)
    return 1.0 - float(table.max(axis=0).sum()) / labels.numel()


def cagem_metrics(model: nn.Module, guide: nn.Module, data) -> dict:
    """``p_error`` (where ``K`` is the number of classes) and ``cluster_error`` of the
    model's classifier ``p(y|x)`` on ``data`` (module docstring)."""
    model.eval(), guide.eval()
    x, labels = data.flat(), data.y
    predicted = class_probabilities(model, guide, x).argmax(-1).cpu()
    metrics = {"cluster_error": cluster_error(predicted, labels)}
    if model.num_clusters == data.num_classes:
        metrics["p_error"] = float((predicted != labels.cpu()).double().mean())
    return metrics
