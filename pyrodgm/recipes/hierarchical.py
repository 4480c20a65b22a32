"""The builders, losses and schedules behind the ``vae2``, ``iwae`` and ``lvae`` recipes of
:mod:`pyrodgm.zoo`: the hierarchical baselines of CaGeM's Table 1 (Maaløe et al. 2017).

All three share the generative model :class:`~pyrodgm.models.hierarchical.HierarchicalVAE`
(``config.z_dim`` units in ``z1``, ``config.top_z_dim`` in ``z2``; ``config.hidden``
between ``x`` and ``z1``, ``config.top_hidden`` between ``z1`` and ``z2``):

* ``vae2``: bottom-up guide, the ELBO (closed-form KL where sound: at ``z2``, not at ``z1``,
  whose prior depends on the ``z2`` the guide draws after it).
* ``iwae``: the same pair trained on the importance-weighted bound with
  ``iw_samples`` samples (Burda et al. 2016); ``iw_samples=1`` is the ELBO with
  every term sampled, Burda et al.'s k = 1 estimator.
* ``lvae``: the Ladder guide and the ELBO with KL warm-up over ``kl_warmup_epochs``
  (Sønderby et al. 2016); with ``iw_samples > 1`` the importance-weighted bound instead
  (their IW rows).

KL warm-up (``kl_warmup_epochs``, any of the three) weighs ``log p(z) - log q(z)``
of ``z1`` and ``z2`` by ``beta = epoch / N`` (capped at 1): in the ELBO that is the KL term,
in the importance-weighted bound the latent part of each log-weight.

Training settings, from the papers where they fit this code:

* Burda et al. (2016, Sec. 5): Adam (beta1 0.9, beta2 0.999, eps 1e-4), batches of 20,
  3^i passes at learning rate 1e-3 * 10^(-i/7) for i = 0..7 (3,280 epochs).  Here: batches
  of 20, a constant 1e-3 (``--lr-decay``/``--lr-decay-every`` give a step decay), PyTorch's
  eps 1e-8; the stage schedule is not reproduced.
* Sønderby et al. (2016, Sec. 3): Adam 2e-3, batches of 256, batch normalisation, leaky
  rectifiers, KL warm-up over the first 200 epochs.  Here the same, on the two-layer
  architecture of Burda et al. (the paper's Table 1 LVAE has five layers of
  64-32-16-8-4 units) so that the three baselines differ in their inference only.

References

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)
[2] `Ladder Variational Autoencoders`, Casper K. Sønderby, Tapani Raiko, Lars Maaløe,
    Søren K. Sønderby, Ole Winther (2016)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pyrodgm.guides.hierarchical import HierarchicalGuide, LadderGuide
from pyrodgm.models.hierarchical import HierarchicalVAE
from pyrodgm.nets import TwoLayerSpec

from ..configs import MLPConfig, TopLayerConfig, option
from ..losses import ImportanceWeightedELBO, Loss, SemiSupervisedELBO
from .warmup import kl_warmup_weight

__all__ = [
    "HierarchicalConfig",
    "VAE2_DEFAULTS",
    "IWAE_DEFAULTS",
    "LVAE_DEFAULTS",
    "LATENT_SITES",
    "build_vae2",
    "build_lvae",
    "vae2_loss",
    "iwae_loss",
    "lvae_loss",
    "kl_warmup",
]

#: The latent sites whose KL terms warm-up scales.
LATENT_SITES = ("z1", "z2")

@dataclass
class HierarchicalConfig(TopLayerConfig, MLPConfig):
    """Two stochastic layers (``hidden`` between ``x`` and ``z1``, ``top_hidden`` between
    ``z1`` and ``z2``) and the importance samples of the training bound."""

    iw_samples: int = option(1, "importance samples k of the IWAE bound")


#: Burda et al.'s two-stochastic-layer MNIST model (authors' code, ``--layers 2``).
VAE2_DEFAULTS = dict(
    z_dim=100, top_z_dim=50, hidden=(200, 200), top_hidden=(100, 100), activation="tanh",
    labels=0, labelled_per_batch=0, batch_size=20, lr=1e-3, num_particles=1, iw_samples=1,
)
IWAE_DEFAULTS = dict(VAE2_DEFAULTS, iw_samples=50)
LVAE_DEFAULTS = dict(VAE2_DEFAULTS, activation="leaky_relu", batch_size=256, lr=2e-3, kl_warmup_epochs=200)


def _spec(config, x_dim: int, scale: str, batch_norm: bool) -> TwoLayerSpec:
    p = config.params
    return TwoLayerSpec(
        x_dim, z_dim=p.z_dim, hidden=p.hidden, activation=p.activation, batch_norm=batch_norm, scale=scale,
        z2_dim=p.top_z_dim, hidden2=p.top_hidden,
    )


def build_vae2(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """``p(z2) p(z1|z2) p(x|z1)`` with the bottom-up guide ``q(z1|x) q(z2|z1)`` (the
    ``vae2`` and ``iwae`` recipes; ``exp`` scales and no batch norm, as Burda et al.)."""
    spec = _spec(config, x_dim, scale="exp", batch_norm=False)
    return HierarchicalVAE(spec, likelihood=config.params.likelihood), HierarchicalGuide(spec)


def build_lvae(config, x_dim: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The same generative model with the Ladder guide, which shares its top-down network;
    softplus scales and batch norm, as Sønderby et al."""
    model = HierarchicalVAE(_spec(config, x_dim, scale="softplus", batch_norm=True), likelihood=config.params.likelihood)
    return model, LadderGuide(model)


def _check_warmup(config) -> int:
    epochs = config.params.kl_warmup_epochs or 0
    if epochs < 0:
        raise ValueError(f"kl_warmup_epochs must be non-negative, got {epochs}")
    return epochs


def _warmup_weights(config) -> dict | None:
    return {site: 1.0 for site in LATENT_SITES} if _check_warmup(config) else None


def _elbo(config) -> SemiSupervisedELBO:
    return SemiSupervisedELBO(num_particles=config.num_particles, max_plate_nesting=1, latent_weights=_warmup_weights(config))


def _importance_weighted(config) -> ImportanceWeightedELBO:
    return ImportanceWeightedELBO(num_particles=config.params.iw_samples, max_plate_nesting=1, latent_weights=_warmup_weights(config))


def vae2_loss(config, num_data: int, num_labels: int) -> Loss:
    """The ELBO with ``config.num_particles`` samples (and warm-up if asked for)."""
    if config.params.iw_samples != 1:
        raise ValueError(f"vae2 trains on the ELBO; for iw_samples={config.params.iw_samples} use the 'iwae' recipe")
    return _elbo(config)


def iwae_loss(config, num_data: int, num_labels: int) -> Loss:
    """The IWAE bound with ``iw_samples`` samples."""
    return _importance_weighted(config)


def lvae_loss(config, num_data: int, num_labels: int) -> Loss:
    """The ELBO with warm-up, or the IWAE bound when ``iw_samples > 1``."""
    return _importance_weighted(config) if config.params.iw_samples > 1 else _elbo(config)


def kl_warmup(config, epoch: int, model: nn.Module, guide: nn.Module, loss: Loss) -> None:
    """The recipes' ``schedule``: set the KL weight of ``z1`` and ``z2`` for ``epoch``
    (a function of the epoch only, so a resumed run sets the same)."""
    if _check_warmup(config) and isinstance(loss, (SemiSupervisedELBO, ImportanceWeightedELBO)):
        weight = kl_warmup_weight(epoch, config.params.kl_warmup_epochs)
        loss.latent_weights = {site: weight for site in LATENT_SITES}
