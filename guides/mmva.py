r"""The recognition models of MMVA and Conv-MMVA (Li, Zhu & Zhang 2016), with the features
and the max-margin classifier that the hinge loss trains.

``q(z|x) = N(mu(x), diag sigma^2(x))`` (eq. 7, a function of ``x`` only), whose mean and
variance are an affine map of the recognition network's last layer (Sec. 4.1.2).  The
classifier :math:`F(y; x) = \lambda^\top f(y, x)` (eq. 2) shares layers with it:

* MMVA: a two-layer MLP of 500 units; the features are the activations of **both**
  layers concatenated (1000-d), as in the paper ("We concatenate the activations of 2
  layers as the features").
* Conv-MMVA: a CNN (convolution, ReLU, max-pooling) and a 500-unit layer; the features are
  that last deterministic layer's activations.

The guide records ``features`` and ``scores`` (the classifier's :math:`F(y; x)` for every
class) as deterministic sites inside the data plate; :class:`~pyrodgm.losses.HingeLoss`
reads them, and the prediction :math:`\hat y = \arg\max_y F(y; x)` is
:func:`pyrodgm.losses.margin.margin_predict`.  The classifier's weights :math:`\lambda`
are guide parameters (a :class:`~pyrodgm.losses.MarginClassifier`, registered with the
guide through :func:`pyro.module`), trained by the hinge loss only.

References

[1] `Max-Margin Deep Generative Models for (Semi-)Supervised Learning`, Chongxuan Li,
    Jun Zhu, Bo Zhang (2016), arXiv:1611.07119
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pyro
import torch

from pyrodgm.losses.margin import MarginClassifier
from pyrodgm.modeling import PlatedGuide, record
from pyrodgm.nets import CONV_MMVA_LAYERS, ConvMMVASpec, MLPSpec, NormalHead, PoolingConvEncoder, conv_layers_fit

__all__ = ["MMVAGuide", "ConvMMVAGuide", "SMALL_IMAGE_LAYERS", "conv_mmva_layers"]

#: Conv layers for images too small for the paper's (8x8 digits): "same" padding, two
#: poolings (8 -> 4 -> 2).
SMALL_IMAGE_LAYERS: tuple[tuple[int, int, int, str], ...] = (
    (32, 3, 2, "same"), (32, 3, 1, "same"), (64, 3, 2, "same"), (64, 3, 1, "same"), (64, 3, 1, "same"),
)


def conv_mmva_layers(image_shape: Sequence[int]) -> tuple[tuple[int, int, int, str], ...]:
    """The paper's MNIST layers where they fit the images (28x28, 32x32), else
    :data:`SMALL_IMAGE_LAYERS`."""
    return CONV_MMVA_LAYERS if conv_layers_fit(image_shape, CONV_MMVA_LAYERS) else SMALL_IMAGE_LAYERS



class _MarginGuide(PlatedGuide):
    """``q(z|x)`` from a network's last layer, with ``features`` and ``scores`` sites."""

    classifier: MarginClassifier
    head: NormalHead

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sites ``features``, ``scores`` (deterministic) and ``z``; the label is not used
        (the recognition model is unsupervised, eq. 7), so ``y`` is ignored."""
        last, features = self.encode(x)
        record("features", features)
        record("scores", self.classifier(features))
        return pyro.sample("z", self.head.distribution(last))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(last layer, features)`` of the recognition network."""
        raise NotImplementedError


class MMVAGuide(_MarginGuide):
    """MMVA's recognition model: an MLP (2x500 in the paper), ``q(z|x)`` from its last
    layer, features = all hidden layers' activations concatenated.

    :param MLPSpec spec: the model's (:class:`~pyrodgm.models.MMVA`): ``x_dim``, the
        margin classifier's ``num_classes``, ``z_dim`` (50) and the ``hidden`` widths (500,
        500).
    """

    pyro_name = "mmva_guide"

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        if not spec.hidden:
            raise ValueError("MMVA's recognition model needs at least one hidden layer (its features)")
        self.spec, self.x_dim, self.z_dim, self.num_classes = spec, spec.x_dim, spec.z_dim, spec.num_classes
        self.encoder = spec.mlp(spec.x_dim)
        self.head = spec.normal_head(self.encoder.out_features, spec.z_dim)
        self.classifier = MarginClassifier(sum(spec.hidden), spec.num_classes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.encoder.forward_features(x)
        return layers[-1], torch.cat(layers, dim=-1)


class ConvMMVAGuide(_MarginGuide):
    """Conv-MMVA's recognition model: a max-pooling CNN and a fully connected layer
    (:class:`~pyrodgm.nets.PoolingConvEncoder`), ``q(z|x)`` and the features from that
    last layer.

    :param ConvMMVASpec spec: the model's (:class:`~pyrodgm.models.ConvMMVA`), with the
        margin classifier's ``num_classes``.
    """

    pyro_name = "conv_mmva_guide"

    def __init__(self, spec: ConvMMVASpec) -> None:
        super().__init__()
        self.spec, self.image_shape = spec, spec.image_shape
        self.x_dim, self.z_dim, self.num_classes = math.prod(self.image_shape), spec.z_dim, spec.num_classes
        self.encoder = PoolingConvEncoder(self.image_shape, spec.layers, spec.hidden, spec.activation)
        self.head = NormalHead(spec.hidden, spec.z_dim)
        self.classifier = MarginClassifier(spec.hidden, spec.num_classes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, h
