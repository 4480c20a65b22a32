r"""The recipes' pieces for the supervised max-margin deep generative models of Li, Zhu &
Zhang (2016, Sec. 3.2 and 4.1.2) and their VA+Pegasos baselines: ``mmva``, ``conv-mmva``,
``va-pegasos`` and ``conv-va-pegasos``.

MMVA and Conv-MMVA minimise eq. 5, the negative variational bound of a plain VAE plus
``C`` times the multiclass hinge loss of a linear classifier on the recognition model's
features (:func:`~pyrodgm.losses.margin.max_margin_objective` with ``alpha = 1``), with
every training example labelled (:attr:`~pyrodgm.zoo.Recipe.supervised`).  They have no
label site: the classification error of validation and test is the margin classifier's
(:func:`margin_metrics`, the recipes' ``metrics`` hook), and the checkpoint is chosen on it.

VA+Pegasos trains the same VAE (same guide, features recorded) with the bound alone, then
fits a linear SVM on its features (:mod:`pyrodgm.svm`); ``experiments/mmva_mnist.py``
does the second step.  With no labels its checkpoint is chosen on the validation ELBO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..configs import ActivationConfig, MLPConfig, config_fields, option
from ..data import image_shape_of
from ..losses import Loss, SemiSupervisedELBO
from ..losses.margin import WithoutLabels, margin_error, max_margin_objective

__all__ = [
    "MarginConfig", "MMVAConfig", "ConvMMVAConfig", "MMVA_DEFAULTS", "CONV_MMVA_DEFAULTS", "VA_PEGASOS_DEFAULTS", "CONV_VA_PEGASOS_DEFAULTS",
    "build_mmva", "build_conv_mmva", "mmva_loss", "vae_loss", "margin_metrics",
]

#: MMVA (Sec. 4.1.2; the authors' ``run_mmva.sh``): z 50, 2x500 MLPs (Kingma et al.'s
#: settings), C = 15, wrong-label cost ell = 3, features = both hidden layers.
MMVA_DEFAULTS = dict(
    z_dim=50, hidden=(500, 500), activation="softplus", batch_size=100, lr=3e-4, margin_C=15.0, margin_cost=3.0,
    eval_particles=1,
)

#: Conv-MMVA on MNIST (Sec. 4.1.2; the authors' ``run_supervised_6layer_cmmva_mnist.sh``:
#: C / D = 1 / 1e-3): C = 1e3, batches of 500, Adam 3e-4, ReLU.
CONV_MMVA_DEFAULTS = dict(
    z_dim=50, activation="relu", batch_size=500, lr=3e-4, margin_C=1e3, margin_cost=1.0, eval_particles=1,
)

@dataclass
class MarginConfig:
    """The hinge loss of eq. 4-5 (Li et al.)."""

    margin_C: float = option(15.0, "C, the weight of the hinge loss")
    margin_sigma: Optional[float] = option(None, "prior std sigma of lambda (default: no prior term)")
    margin_cost: float = option(1.0, "the cost ell of a wrong label in the hinge loss")


def _without_margin(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in config_fields(MarginConfig)}


@dataclass
class MMVAConfig(MarginConfig, MLPConfig):
    """MMVA: MLPs and the hinge loss."""


@dataclass
class ConvMMVAConfig(MarginConfig, ActivationConfig):
    """Conv-MMVA: the paper's conv layers (fixed by the image shape) and the hinge loss."""


#: The VA+Pegasos baselines: the same VAEs, no labels and no hinge loss.
VA_PEGASOS_DEFAULTS = dict(_without_margin(MMVA_DEFAULTS), labels=0, labelled_per_batch=0)
CONV_VA_PEGASOS_DEFAULTS = dict(_without_margin(CONV_MMVA_DEFAULTS), labels=0, labelled_per_batch=0)


def build_mmva(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """MMVA: :class:`~pyrodgm.models.mmva.MMVA` and :class:`~pyrodgm.guides.mmva.MMVAGuide`
    with ``config.z_dim`` and ``config.hidden`` (both networks)."""
    from pyrodgm.guides.mmva import MMVAGuide
    from pyrodgm.models.mmva import MMVA
    from pyrodgm.nets import MLPSpec

    p = config.params
    spec = MLPSpec(x_dim, num_classes, p.z_dim, p.hidden, p.activation)
    return MMVA(spec, likelihood=p.likelihood), MMVAGuide(spec)


def build_conv_mmva(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Conv-MMVA for ``config.dataset``'s image shape: the paper's MNIST layers where they
    fit, smaller "same"-padded ones on 8x8 digits
    (:func:`~pyrodgm.guides.mmva.conv_mmva_layers`)."""
    from pyrodgm.guides.mmva import ConvMMVAGuide, conv_mmva_layers
    from pyrodgm.models.mmva import ConvMMVA
    from pyrodgm.nets import ConvMMVASpec

    image_shape = image_shape_of(config)
    if x_dim != image_shape[0] * image_shape[1] * image_shape[2]:
        raise ValueError(f"conv-mmva on {config.dataset} expects images {image_shape}, got {x_dim} features")
    p = config.params
    spec = ConvMMVASpec(image_shape, num_classes, p.z_dim, conv_mmva_layers(image_shape), activation=p.activation)
    return ConvMMVA(spec, likelihood=p.likelihood), ConvMMVAGuide(spec)


def mmva_loss(config, num_data: int, num_labels: int) -> Loss:
    """Eq. 5 summed over the batch: the VAE's negative bound (labels withheld from it) plus
    ``C`` times the hinge losses, and the prior on lambda when ``margin_sigma`` is set."""
    elbo = WithoutLabels(SemiSupervisedELBO(num_particles=config.num_particles, max_plate_nesting=1))
    p = config.params
    return max_margin_objective(elbo, alpha=1.0, C=p.margin_C, sigma=p.margin_sigma, num_data=num_labels or None, cost=p.margin_cost)


def vae_loss(config, num_data: int, num_labels: int) -> Loss:
    """The VAE's negative bound alone (VA+Pegasos's first step)."""
    return SemiSupervisedELBO(num_particles=config.num_particles, max_plate_nesting=1)


def margin_metrics(model, guide, data) -> dict:
    """``error``: the margin classifier's (``argmax_y F(y; x)``, eq. 2) on ``data``."""
    return {"error": margin_error(guide, data.flat(), data.y)}
