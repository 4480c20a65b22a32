r"""The inference model of Arias Figueroa & Rivera's semi-supervised GMVAE (2019, Sec. 3.2,
Fig. 2a, App. A)::

    x_hat    = g(x)                                  deterministic conv features (Table 4)
    q(y|x)   = Cat(pi(x_hat))                        fsz - fsz - c, leaky ReLU (eq. 5)
    q(z|x,y) = N(mu(x_hat, y), diag sigma^2(x_hat, y))  (fsz + c) - zsz - zsz - zsz (eq. 6)

The features are recorded as the deterministic site ``"features"`` inside the data plate,
for the auxiliary losses (:class:`~pyrodgm.losses.AssignmentLoss`,
:class:`~pyrodgm.losses.LiftedStructuredLoss`) and the t-SNE plots.  The paper samples
``y`` from a Gumbel-softmax whose temperature is annealed from 1 to 0.5 (``label_mode=
"relaxed"``, the default here); ``"enumerate"`` sums over the classes exactly and
``"straight-through"`` uses hard samples (:mod:`pyrodgm.labels`).

The authors' released code (``networks/CatVAENetwork.py``) reads ``z`` from the features
alone, ``q(z|x_hat)`` with one linear map each for the mean and the log-variance
(``GMVAESpec.z_encoder="linear"``), and its logits are linear in ``x_hat``
(``classifier_layers=0``).

References

[1] `Semi-Supervised Learning using Deep Generative Models and Auxiliary Tasks`,
    Jhosimar Arias Figueroa, Adín Ramírez Rivera (2019)
"""

from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.labels import RelaxableLabel
from pyrodgm.modeling import PlatedGuide, one_hot, record
from pyrodgm.models.gmvae import ConvFeatures, GMVAESpec
from pyrodgm.nets import MLP, CategoricalHead, GaussianMLP, NormalHead

__all__ = ["GMVAEGuide"]


class GMVAEGuide(RelaxableLabel, PlatedGuide):
    """``g(x)``, ``q(y|x_hat) q(z|x_hat, y)``.

    :param GMVAESpec spec: the model's sizes (:class:`~pyrodgm.models.gmvae.GMVAE`).
    :param str label_mode: ``"relaxed"`` (the paper), ``"straight-through"`` or
        ``"enumerate"``.
    :param float temperature: the Gumbel-softmax temperature (a schedule anneals it).
    """

    pyro_name = "gmvae_guide"

    def __init__(self, spec: GMVAESpec, label_mode: str = "relaxed", temperature: float = 1.0) -> None:
        super().__init__()
        self.label_mode, self.temperature = label_mode, temperature
        self.spec, self.image_shape, feature_dim = spec, spec.image_shape, spec.feature_dim
        self.features = ConvFeatures(self.image_shape, feature_dim, spec.geometry, spec.activation)
        self.x_dim, self.num_classes, self.z_dim = math.prod(self.image_shape), spec.num_classes, spec.z_dim
        self.classifier = MLP(feature_dim, (feature_dim,) * spec.classifier_layers, activation="leaky_relu")
        self.classifier_head = CategoricalHead(feature_dim, spec.num_classes)
        self.reads_label = spec.z_encoder == "mlp"
        if self.reads_label:
            self.encoder = GaussianMLP(feature_dim + spec.num_classes, (spec.z_dim, spec.z_dim), spec.z_dim, activation="leaky_relu", init="default")
        else:
            self.encoder = NormalHead(feature_dim, spec.z_dim, scale="exp")

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sites ``features`` (deterministic), ``y`` (when no labels are given) and ``z``."""
        features = self.features(x)
        record("features", features)
        if y is None:
            y = self.sample_label("y", self.classifier_head(self.classifier(features)))
        else:
            y = one_hot(y, self.num_classes, features)
        return pyro.sample("z", self.encoder.distribution(features, y) if self.reads_label else self.encoder.distribution(features))

    def label_distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """The classifier ``q(y|g(x))`` as a one-hot categorical."""
        return self.classifier_head.distribution(self.classifier(self.features(x)))

    @torch.no_grad()
    def feature_vectors(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """``g(x)`` for ``[N, C*H*W]`` images, ``batch_size`` rows at a time (for plots)."""
        return torch.cat([self.features(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
