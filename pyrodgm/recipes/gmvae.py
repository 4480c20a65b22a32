r"""The recipes of the semi-supervised GMVAE (Arias Figueroa & Rivera 2019): ``gmvae``
(semi-supervised classification, Sec. 5.2, Table 1) and ``gmvae-clustering`` (unsupervised
clustering, Sec. 5.3.1, Table 3), with the paper's hyper-parameters per data set.

Objective (eq. 1, 7): :math:`\mathcal L_{var} + \mathcal L_{aux}` with
:math:`\mathcal L_{var} = \mathcal L_R + w_G \mathcal L_G + w_C \mathcal L_C` and
:math:`\mathcal L_{aux} = w_A \mathcal L_A + w_M \mathcal L_M`:

* :math:`\mathcal L_{var}`: :class:`~pyrodgm.losses.SemiSupervisedELBO` with
  ``latent_weights={"z": w_G, "y": w_C}`` on *every* row with the label unseen
  (:class:`~pyrodgm.losses.WithoutLabels`): "we consider the complete model as
  unsupervised and we include the knowledge of the labeled data through our auxiliary
  tasks" (Sec. 1).
* :math:`\mathcal L_A`: :class:`~pyrodgm.losses.AssignmentLoss` (distance-weighted k-NN,
  eq. 8) with the labelled rows' cross-entropy against their true labels included, as
  in the authors' released code: the paper's only use of the labels besides
  :math:`\mathcal L_M`.
* :math:`\mathcal L_M`: :class:`~pyrodgm.losses.LiftedStructuredLoss` over all rows, the
  unlabelled ones with their k-NN assignments ("applied after the assignment process").

Where the authors' released code (``model/SSVAE.py``, ``networks/CatVAENetwork.py``,
``utils/assignment.py``) differs from the paper, an option of :class:`GMVAEConfig` follows
it: the k-NN vote (``knn_weighting="uniform"``, a majority), the reconstruction term
(``likelihood="cross-entropy"``, the binary cross-entropy of grey pixels), TensorFlow's
initialisation and batch-norm (``init="xavier"``, ``batch_norm="tensorflow"``), the networks (``z_prior``,
``z_encoder``, ``classifier_layers``, ``conv_activation``, ``decoder_head``:
:class:`~pyrodgm.models.gmvae.GMVAESpec`); ``experiments/gmvae_mnist_100.py
--authors-code`` sets all of them with the values of its ``run.sh``.

All terms are sums over the rows of a batch (the paper's batch means times the batch size),
so the weights keep the paper's meaning.  The clustering recipe trains :math:`\mathcal
L_{var}` alone (no labels, ``w_G = 5``, batches of 64, binary cross-entropy), its
checkpoint chosen on the validation ELBO and reported with ACC and NMI.  The Gumbel-softmax
temperature goes from 1 to 0.5 over the first 50 epochs (:func:`gumbel_temperature`,
exponential as in the authors' code).

References

[1] `Semi-Supervised Learning using Deep Generative Models and Auxiliary Tasks`,
    Jhosimar Arias Figueroa, Adín Ramírez Rivera (2019)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from pyrodgm.nets import INITS, init_weights_

from pyrodgm.guides.gmvae import GMVAEGuide
from pyrodgm.models.gmvae import DECODER_HEADS, GMVAE, LIKELIHOODS, Z_ENCODERS, Z_PRIORS, GMVAESpec

from ..configs import ClustersConfig, GumbelConfig, ModelConfig, option
from ..data import image_shape_of
from ..losses import AssignmentLoss, LiftedStructuredLoss, Loss, SemiSupervisedELBO, WeightedSum, WithoutLabels
from ..losses.metric import WEIGHTINGS

__all__ = [
    "GMVAE_CLUSTERING_DATASETS",
    "GMVAE_CLUSTERING_DEFAULTS",
    "GMVAE_DATASETS",
    "GMVAE_DEFAULTS",
    "GMVAEConfig",
    "BATCH_NORMS",
    "TEMPERATURE_DECAYS",
    "build_gmvae",
    "gmvae_loss",
    "gmvae_metrics",
    "gmvae_schedule",
    "gumbel_temperature",
    "set_batch_norm",
]

TEMPERATURE_DECAYS = ("exponential", "linear")

#: Batch-norm's running-average momentum and epsilon, in PyTorch's convention (the new
#: batch's share): PyTorch's defaults, or TensorFlow's ``tf.layers.batch_normalization``
#: (``momentum=0.99`` for the old average, ``epsilon=1e-3``), the authors' code's.
BATCH_NORMS: dict[str, tuple[float, float]] = {"torch": (0.1, 1e-5), "tensorflow": (0.01, 1e-3)}

@dataclass
class GMVAEConfig(ClustersConfig, GumbelConfig, ModelConfig):
    """The GMVAE's networks, its Gumbel-softmax schedule and the weights of eq. 1 and 7."""

    likelihood: str = option("bernoulli", "p(x|z); cross-entropy: of grey pixels (authors' code)", choices=LIKELIHOODS)
    temperature_min: float = option(0.5, "final Gumbel-softmax temperature")
    temperature_epochs: int = option(50, "epochs of temperature annealing")
    temperature_decay: str = option("exponential", "shape of the temperature annealing", choices=TEMPERATURE_DECAYS)
    feature_dim: int = option(100, "feature size fsz of the conv feature extractor")
    w_gaussian: float = option(1.0, "w_G, the weight of the Gaussian KL")
    w_categorical: float = option(1.0, "w_C, the weight of the categorical KL")
    knn: int = option(5, "neighbours of the k-NN label assignment")
    knn_weighting: str = option("distance", "k-NN vote: 1/distance (the paper) or a majority (authors' code)", choices=WEIGHTINGS)
    w_assign: float = option(1.0, "w_A, the weight of the assignment loss")
    w_metric: float = option(1.0, "w_M, the weight of the metric embedding loss")
    metric_margin: float = option(2.0, "margin of the lifted structured loss")
    z_prior: str = option("mixture", "learned p(z|y) (the paper) or N(0, I) and a decoder of z and y (authors' code)", choices=Z_PRIORS)
    z_encoder: str = option("mlp", "q(z|x_hat, y) an MLP (the paper) or q(z|x_hat) linear (authors' code)", choices=Z_ENCODERS)
    classifier_layers: int = option(1, "hidden layers of q(y|x_hat), of width fsz (authors' code: 0)")
    conv_activation: str = option("leaky_relu", "activation of the feature convolutions (authors' code: relu)", choices=("leaky_relu", "relu"))
    decoder_head: str = option("deconv", "decoder ends with a transposed conv (the paper) or a dense layer (authors' code)", choices=DECODER_HEADS)
    init: str = option("default", "initial weights: PyTorch's, Glorot-uniform with zero biases (the authors' TensorFlow), or N(0, 0.001^2)", choices=INITS)
    batch_norm: str = option("torch", "batch-norm momentum and eps: PyTorch's (0.1, 1e-5) or TensorFlow's (0.01, 1e-3)", choices=tuple(BATCH_NORMS))


#: Sec. 5.2 (MNIST values): Adam 1e-3, 200 epochs, batches of 200 half labelled, MSE
#: reconstruction on [0, 1] intensities, Gumbel-softmax 1 -> 0.5 over 50 epochs, fsz 100,
#: gsz 100, 5 neighbours, w_A = w_M = 1, margin 2; w_G = w_C = 1 (not stated: the authors'
#: code's defaults).
GMVAE_DEFAULTS = dict(
    lr=1e-3, epochs=200, batch_size=200, labelled_per_batch=100, likelihood="gaussian", binarize=False,
    label_mode="relaxed", temperature=1.0, temperature_min=0.5, temperature_epochs=50, temperature_decay="exponential",
    feature_dim=100, z_dim=100, w_gaussian=1.0, w_categorical=1.0, knn=5, w_assign=1.0, w_metric=1.0,
    metric_margin=2.0, eval_particles=1, num_particles=1,
)

#: Sec. 5.1-5.2 per data set (20% of the training set for validation).
GMVAE_DATASETS: dict[str, dict] = {
    "mnist": dict(validation=12000),
    "fashion-mnist": dict(validation=12000, feature_dim=200, z_dim=50, knn=3, w_assign=1.0, w_metric=0.1, metric_margin=1.0),
    "svhn": dict(
        validation=14651, batch_size=400, labelled_per_batch=200, labels=1000, feature_dim=100, z_dim=150, knn=3,
        w_assign=5.0, w_metric=3.0, metric_margin=0.5,
    ),
}

#: Sec. 5.3.1 (MNIST values): no labels, batches of 64, fsz 100, gsz 150, w_G = 5, binary
#: cross-entropy (on dynamically binarised pixels).
GMVAE_CLUSTERING_DEFAULTS = dict(
    GMVAE_DEFAULTS, labels=0, labelled_per_batch=0, batch_size=64, z_dim=150, w_gaussian=5.0,
    likelihood="bernoulli", binarize=True, w_assign=0.0, w_metric=0.0,
)

#: Sec. 5.3.1 per data set.
GMVAE_CLUSTERING_DATASETS: dict[str, dict] = {
    "mnist": dict(validation=12000),
    "fashion-mnist": dict(validation=12000, feature_dim=200, z_dim=50),
}


def gumbel_temperature(
    epoch: int, initial: float = 1.0, minimum: float = 0.5, anneal_epochs: int = 50, decay: str = "exponential"
) -> float:
    """The Gumbel-softmax temperature of 0-based ``epoch``: ``initial`` at epoch 0,
    ``minimum`` from epoch ``anneal_epochs`` on, in between exponential
    (``initial * (minimum / initial) ** (epoch / anneal_epochs)``, the authors' code) or
    linear.  ``anneal_epochs = 0``: ``minimum`` throughout."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    if not 0 < minimum <= initial < math.inf:
        raise ValueError(f"temperatures must satisfy 0 < minimum <= initial < inf, got minimum {minimum}, initial {initial}")
    if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
        raise ValueError(f"anneal_epochs must be a non-negative integer, got {anneal_epochs!r}")
    if decay not in TEMPERATURE_DECAYS:
        raise ValueError(f"decay must be one of {TEMPERATURE_DECAYS}, got {decay!r}")
    progress = 1.0 if anneal_epochs == 0 else min(1.0, epoch / anneal_epochs)
    if decay == "exponential":
        return initial * (minimum / initial) ** progress
    return initial + (minimum - initial) * progress


def _config_temperature(config, epoch: int) -> float:
    p = config.params
    return gumbel_temperature(epoch, p.temperature, p.temperature_min, p.temperature_epochs, p.temperature_decay)


def _num_components(config, num_classes: int) -> int:
    clusters = config.params.num_clusters
    if clusters is None:
        return num_classes
    if config.labels and clusters != num_classes:
        raise ValueError(f"gmvae with labels needs as many mixture components as classes ({num_classes}), got {clusters}")
    return clusters


def build_gmvae(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """:class:`~pyrodgm.models.gmvae.GMVAE` and :class:`~pyrodgm.guides.gmvae.GMVAEGuide`
    for ``config.dataset``'s images.  The guide's temperature is the schedule's last (what
    a checkpoint is evaluated at; a training run's schedule sets every epoch's)."""
    image_shape = image_shape_of(config)
    if math.prod(image_shape) != x_dim:
        raise ValueError(f"gmvae on {config.dataset} expects {math.prod(image_shape)} features per example, got {x_dim}")
    p = config.params
    spec = GMVAESpec(
        image_shape, _num_components(config, num_classes), p.z_dim, p.feature_dim, activation=p.conv_activation,
        z_prior=p.z_prior, z_encoder=p.z_encoder, classifier_layers=p.classifier_layers, decoder_head=p.decoder_head,
    )
    temperature = _config_temperature(config, max(config.epochs - 1, 0))
    model, guide = GMVAE(spec, likelihood=p.likelihood), GMVAEGuide(spec, label_mode=p.label_mode, temperature=temperature)
    for module in (model, guide):
        set_batch_norm(init_weights_(module, p.init), p.batch_norm)
    return model, guide


def set_batch_norm(module: nn.Module, kind: str) -> nn.Module:
    """Every batch-norm layer of ``module`` with the momentum and epsilon of
    :data:`BATCH_NORMS` ``[kind]``; returns ``module``."""
    momentum, eps = BATCH_NORMS[kind]
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum, layer.eps = momentum, eps
    return module


def gmvae_loss(config, num_data: int, num_labels: int) -> Loss:
    """``L_var + w_A L_A + w_M L_M`` (module docstring) as a
    :class:`~pyrodgm.losses.WeightedSum` with terms ``elbo``, ``assignment``, ``metric``
    (terms of weight 0 left out); ``L_var`` alone without labels."""
    p = config.params
    weights = {"z": p.w_gaussian, "y": p.w_categorical}
    elbo = WithoutLabels(SemiSupervisedELBO(num_particles=config.num_particles, max_plate_nesting=1, latent_weights=weights))
    terms: dict = {"elbo": elbo}
    if num_labels and p.w_assign:
        assignment = AssignmentLoss(k=p.knn, weighting=p.knn_weighting, include_labelled=True, max_plate_nesting=1)
        terms["assignment"] = (p.w_assign, assignment)
    if num_labels and p.w_metric:
        metric = LiftedStructuredLoss(margin=p.metric_margin, k=p.knn, weighting=p.knn_weighting, max_plate_nesting=1)
        terms["metric"] = (p.w_metric, metric)
    return WeightedSum(**terms)


def gmvae_schedule(config, epoch: int, model: nn.Module, guide: nn.Module, loss: Loss) -> None:
    """The recipe's ``schedule``: the guide's Gumbel-softmax temperature for ``epoch``."""
    guide.temperature = _config_temperature(config, epoch)


def gmvae_metrics(model: nn.Module, guide: nn.Module, data) -> dict:
    """Clustering accuracy and NMI of the guide's classifier (Table 3's metrics)."""
    from ..clustering import clustering_metrics

    return clustering_metrics(model, guide, data)
