r"""Conv-MMCVA's recognition side (Li, Zhu, Zhang, Sec. 3.3 and 4.1.3): a max-margin CNN
classifier and a label-conditioned convolutional ``q(z|x,y)``, completely separate
networks ("the mmDCGM separates the classifier and the recognition model")::

    F(y; x) = lambda_y^T f(x)          the max-margin classifier: a CNN f (batch-norm,
                                       dropout, global average pooling) and a linear
                                       layer lambda; recorded as the deterministic sites
                                       "features" (f) and "scores" (F) for the hinge, hat
                                       and label-balance losses (eq. 12-15)
    y_hat = argmax_y F(y; x)           the point estimate of an unlabelled label (eq. 10):
                                       the sample of a delta distribution
                                       (:class:`ArgmaxOneHotCategorical`), entropy 0
    q(z|x,y) = N(mu(x,y), sigma^2(x,y))  a CNN whose every layer sees the label maps

For labelled rows :class:`~pyrodgm.losses.SemiSupervisedELBO` observes ``y`` (eq. 8); for
unlabelled ones the guide samples ``y_hat`` and the model replays it, so the loss's
ordinary ELBO *is* eq. 10-11 (``log p(y_hat) - log q(y_hat) = log p(y_hat)``; the closed
form KL registered below gives the same).  No gradient reaches the classifier through
``y_hat``; the classifier learns from the max-margin terms of eq. 16
(:mod:`pyrodgm.losses.margin`).  Because the site keeps the scores as its logits,
:func:`~pyrodgm.evaluation.predict_proba` and
:func:`~pyrodgm.evaluation.classification_error` read the max-margin classifier: the
softmax of the scores is no calibrated probability, but its argmax is the prediction rule
eq. 2.

Architecture (the authors' ``cdgm-mnist-ssl_100.sh``): classifier convolutions of 32, 64,
64, 128, 128 channels (5x5 then 3x3), batch-norm, ReLU, 2x2 max-pooling and dropout 0.5
after the first and third, global average pooling, a linear layer to the ``K`` scores;
encoder convolutions of 32, 32, 64, 64, 64 channels with the label maps concatenated to
every input, max-pooling after the first and third, a linear layer to ``mu`` and
``log sigma^2``.  Padding is "same" (the authors mix "valid" and "same", which fits 28x28
only), so the nets take any image size (8x8 digits included).

References

[1] `Max-Margin Deep Generative Models for (Semi-)Supervised Learning`, Chongxuan Li,
    Jun Zhu, Bo Zhang (2018), eq. 2, 8-16, Sec. 4.1.3
[2] `Network In Network`, Min Lin, Qiang Chen, Shuicheng Yan (2014) (global average pooling)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import OneHotCategorical as _TorchOneHotCategorical
from torch.distributions import register_kl

from pyrodgm.losses.margin import MarginClassifier
from pyrodgm.modeling import PlatedGuide, one_hot, record
from pyrodgm.models.mmcva import ConvMMCVASpec, LabelMapConv, as_images, broadcast_leading
from pyrodgm.nets import NormalHead, _check_image_shape

__all__ = ["ArgmaxOneHotCategorical", "MaxMarginCNN", "ConditionalConvEncoder", "ConvMMCVAGuide"]

#: Pooling after these layers (0-based), as in the authors' MNIST script.
POOL_AFTER = (0, 2)


class ArgmaxOneHotCategorical(dist.OneHotCategorical):
    r"""The delta distribution at ``one_hot(argmax logits)``: the point estimate
    :math:`\hat y = \arg\max_y \tilde q(y|x)` of eq. 10, written as a Pyro distribution so
    that it can be a latent site of a guide.

    Its samples are that one-hot vector (no randomness, no gradient: ``rsample`` returns a
    constant, a valid reparameterisation with zero derivative), ``log_prob`` is 0 there and
    ``-inf`` elsewhere, the entropy is 0.  The logits (the classifier's scores) are kept,
    so code that reads a label site's categorical (``predict_proba``) sees the classifier.
    """

    has_rsample = True

    @property
    def mode(self) -> torch.Tensor:
        logits = self.logits
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    @property
    def mean(self) -> torch.Tensor:
        return self.mode

    @property
    def variance(self) -> torch.Tensor:
        return torch.zeros_like(self.logits)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.mode.detach().expand(self._extended_shape(sample_shape))

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        hit = (value == self.mode).all(-1)
        zero = torch.zeros((), dtype=self.logits.dtype, device=self.logits.device)
        return torch.where(hit, zero, torch.full_like(zero, -math.inf))

    def entropy(self) -> torch.Tensor:
        return torch.zeros(self.batch_shape, dtype=self.logits.dtype, device=self.logits.device)


@register_kl(ArgmaxOneHotCategorical, _TorchOneHotCategorical)
def _kl_argmax_one_hot(q: ArgmaxOneHotCategorical, p: _TorchOneHotCategorical) -> torch.Tensor:
    """``KL(delta_{y_hat} || p) = -log p(y_hat)`` (without it the categorical-categorical KL
    of the parent class would be used, which is wrong for a delta)."""
    return -p.log_prob(q.mode)


class MaxMarginCNN(nn.Module):
    r"""The max-margin classifier :math:`F(y; x) = \lambda_y^\top f(x)`: a CNN feature
    extractor ``f`` ending in global average pooling, and the linear layer ``lambda`` (a
    :class:`~pyrodgm.losses.margin.MarginClassifier`, so the hinge loss's Gaussian prior
    on ``lambda`` finds it).

    :param image_shape: ``(C, H, W)``.
    :param int num_classes: ``K``.
    :param channels: convolution widths (paper: 32, 64, 64, 128, 128).
    :param float dropout: dropout after the pooling layers (paper's code: 0.5).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 64, 128, 128),
        batch_norm: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.convs = _conv_stack(self.image_shape, channels, 0, batch_norm, dropout)
        self.out_features = channels[-1]
        self.scores = MarginClassifier(self.out_features, num_classes)  # lambda, N(0, 0.01^2) init as the authors'

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``: ``[..., C*H*W] -> [..., channels[-1]]``."""
        (flat,), shape = broadcast_leading(x)
        h = _run_stack(self.convs, as_images(flat, self.image_shape), None)
        return h.mean(dim=(-2, -1)).reshape(shape + (self.out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scores ``F(y; x)`` for every ``y``: ``[..., K]``."""
        return self.scores(self.features(x))


class ConditionalConvEncoder(nn.Module):
    """``q(z|x,y)``: convolutions over the image with the label maps concatenated to the
    input of every layer, then a linear Normal head on the flattened maps.

    :param channels: convolution widths (paper: 32, 32, 64, 64, 64).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        z_dim: int,
        channels: Sequence[int] = (32, 32, 64, 64, 64),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.convs = _conv_stack(self.image_shape, channels, num_classes, batch_norm, 0.0)
        c, h, w = self.image_shape
        for _ in POOL_AFTER[: len(channels)]:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        self.head = NormalHead(channels[-1] * h * w, z_dim, scale="exp")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, ``[..., z_dim]`` for ``x`` ``[..., C*H*W]`` and one-hot ``y``
        ``[..., K]`` (leading dims broadcast)."""
        (x_flat, y_flat), shape = broadcast_leading(x, y)
        h = _run_stack(self.convs, as_images(x_flat, self.image_shape), y_flat).flatten(1)
        loc, scale = self.head(h)
        return loc.reshape(shape + loc.shape[-1:]), scale.reshape(shape + scale.shape[-1:])

    def distribution(self, x: torch.Tensor, y: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self(x, y)
        return dist.Normal(loc, scale).to_event(1)


def _conv_stack(image_shape, channels: Sequence[int], num_classes: int, batch_norm: bool, dropout: float) -> nn.ModuleList:
    """Conv blocks (5x5 first, then 3x3), 2x2 max-pooling (ceil mode) and dropout after the
    layers in :data:`POOL_AFTER`."""
    layers, width = nn.ModuleList(), image_shape[0]
    for i, out in enumerate(channels):
        block = nn.ModuleDict({"conv": LabelMapConv(width, out, 5 if i == 0 else 3, num_classes, batch_norm=batch_norm)})
        if i in POOL_AFTER:
            pool: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)]
            if dropout > 0:
                pool.append(nn.Dropout(dropout))
            block["pool"] = nn.Sequential(*pool)
        layers.append(block)
        width = out
    return layers


def _run_stack(layers: nn.ModuleList, h: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
    for block in layers:
        h = block["conv"](h, y)
        if "pool" in block:
            h = block["pool"](h)
    return h



class ConvMMCVAGuide(PlatedGuide):
    """The classifier's scores (sites ``features``, ``scores``), the point-estimate label
    ``y`` for unlabelled rows, and ``q(z|x,y)`` (module docstring).

    Called with ``y`` (integer labels) it uses them and has no ``y`` site, as
    :class:`~pyrodgm.guides.M2Guide` does; the losses instead observe the site through
    a messenger.  ``spec``: the model's (:class:`~pyrodgm.models.mmcva.ConvMMCVA`).
    """

    pyro_name = "conv_mmcva_guide"

    def __init__(self, spec: ConvMMCVASpec) -> None:
        super().__init__()
        self.spec, self.image_shape = spec, spec.image_shape
        self.x_dim, self.num_classes, self.z_dim = math.prod(self.image_shape), spec.num_classes, spec.z_dim
        self.classifier = MaxMarginCNN(self.image_shape, spec.num_classes, spec.classifier_channels, dropout=spec.dropout)
        self.encoder = ConditionalConvEncoder(self.image_shape, spec.num_classes, spec.z_dim, spec.encoder_channels)

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        features = self.classifier.features(x)
        scores = self.classifier.scores(features)
        record("features", features)
        record("scores", scores)
        if y is None:
            y = pyro.sample("y", ArgmaxOneHotCategorical(logits=scores))
        else:
            y = one_hot(y, self.num_classes, x)
        return pyro.sample("z", self.encoder.distribution(x, y))

    def label_distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """The point estimate ``delta(argmax_y F(y; x))`` (its logits are the scores)."""
        return ArgmaxOneHotCategorical(logits=self.classifier(x))
