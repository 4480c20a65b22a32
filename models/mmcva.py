r"""Conv-MMCVA's class-conditional generative model (Li, Zhu, Zhang, "Max-margin Deep
Generative Models for (Semi-)Supervised Learning", Sec. 3.3 and 4.1.3).

Generative story (the conditional VA of Kingma et al. 2014 with conv nets)::

    y ~ Cat(1/K)                     p(y), uniform
    z ~ N(0, I)                      p(z)
    x ~ Bernoulli(f(y, z))           p(x|y,z): a deconvolutional net ("unconv-net") whose
                                     every hidden layer sees the one-hot label as extra
                                     constant feature maps (Sec. 4.1.3, "concatenates the
                                     feature maps and additional label maps in one-hot
                                     encoding format at each layer")

The bound of a labelled pair is eq. 8, ``L(x, y)``.  An unlabelled ``x`` is *not* summed
over ``y`` as in M2 (eq. 9): the max-margin classifier's prediction
``y_hat = argmax_y F(y; x)`` is a point estimate, a delta distribution in the guide, so
its entropy is zero and the bound is ``L(x, y_hat)`` (eq. 10); the generative loss of a
batch is eq. 11.  The guide (:class:`pyrodgm.guides.mmcva.ConvMMCVAGuide`) expresses
``y_hat`` as the sample of :class:`~pyrodgm.guides.mmcva.ArgmaxOneHotCategorical`, so the
ordinary :class:`~pyrodgm.losses.SemiSupervisedELBO` computes eq. 11 unchanged.

Architecture (the authors' MNIST script, ``cdgm-mnist-ssl_100.sh``): a linear layer from
``[z, y]`` to a ``channels[0]``-map at a quarter of the image size, then convolutions
(3x3, ReLU) whose inputs carry the label maps, a 2x up-sampling ("unpool") before the
second half of them, and a final up-sampling and 5x5 convolution to the pixel logits.
Padding is "same" throughout and the output is centre-cropped, so any image size works
(28x28 MNIST, 32x32 SVHN, 8x8 scikit-learn digits).

References

[1] `Max-Margin Deep Generative Models for (Semi-)Supervised Learning`, Chongxuan Li,
    Jun Zhu, Bo Zhang (2018), eq. 8-11 and Sec. 4.1.3
[2] `Semi-Supervised Learning with Deep Generative Models`, Kingma, Rezende, Mohamed,
    Welling (2014)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrodgm.distributions import IndependentBernoulli, StandardNormal
from pyrodgm.modeling import PlatedModel, one_hot
from pyrodgm.nets import ImageSpec, _check_image_shape, batch_shape

__all__ = ["ConvMMCVA", "ConvMMCVASpec", "LabelMapConv", "ConditionalConvDecoder", "broadcast_leading", "as_images"]


def broadcast_leading(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Size]:
    """Expand ``tensors`` (``[..., D_i]``) to a common leading shape and flatten it: returns
    the ``[N, D_i]`` tensors and the leading shape to restore."""
    shape = batch_shape(tensors)
    flat = [t.expand(shape + t.shape[-1:]).reshape(-1, t.shape[-1]) for t in tensors]
    return flat, shape


def as_images(x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """``[N, C*H*W]`` rows as ``[N, C, H, W]`` images."""
    if x.shape[-1] != math.prod(image_shape):
        raise ValueError(f"expected rows of {math.prod(image_shape)} pixels for images {image_shape}, got {x.shape[-1]}")
    return x.reshape((-1,) + tuple(image_shape))


class LabelMapConv(nn.Module):
    """A "same"-padded convolution whose input gets the one-hot label as ``K`` constant
    feature maps (the ``ConvConcatLayer`` of the paper's code), then optional batch-norm,
    ReLU, optional dropout.  With ``num_classes=0`` it is a plain convolution block.

    :param int in_channels: channels of the image or feature map (without label maps).
    :param int out_channels: output channels.
    :param int kernel_size: odd kernel size.
    :param int num_classes: number of label maps concatenated (0: none).
    :param bool activation: apply ReLU (the output layer does not).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_classes: int = 0,
        batch_norm: bool = False,
        dropout: float = 0.0,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels + num_classes, out_channels, kernel_size, padding=kernel_size // 2)
        layers: list[nn.Module] = [nn.BatchNorm2d(out_channels)] if batch_norm else []
        if activation:
            layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.post = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``h``: ``[N, C, H, W]``; ``y``: one-hot ``[N, K]`` when ``num_classes > 0``."""
        if self.num_classes:
            maps = y[:, :, None, None].expand(-1, -1, h.shape[-2], h.shape[-1])
            h = torch.cat([h, maps.to(h.dtype)], dim=1)
        return self.post(self.conv(h))


class ConditionalConvDecoder(nn.Module):
    """``[z, y] -> `` pixel logits (or means) ``[..., C*H*W]``, the label concatenated as
    feature maps before every hidden convolution.

    :param int z_dim: latent width.
    :param int num_classes: label classes ``K``.
    :param image_shape: ``(C, H, W)``.
    :param channels: widths of the hidden convolutions; the first half runs at a quarter
        of the image size, the second half at half of it (paper: 64, 64, 32, 32).
    :param int out_kernel: kernel of the output convolution (paper: 5).
    """

    def __init__(
        self,
        z_dim: int,
        num_classes: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (64, 64, 32, 32),
        out_kernel: int = 5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        channels = tuple(channels)
        if len(channels) < 2:
            raise ValueError(f"the decoder needs at least two hidden convolutions, got channels={channels}")
        c, h, w = self.image_shape
        self.start_shape = (channels[0], math.ceil(h / 4), math.ceil(w / 4))
        self.split = len(channels) // 2
        self.linear = nn.Sequential(nn.Linear(z_dim + num_classes, math.prod(self.start_shape)), nn.ReLU())
        widths = (channels[0],) + channels
        self.hidden = nn.ModuleList(
            LabelMapConv(widths[i], widths[i + 1], 3, num_classes, batch_norm=batch_norm) for i in range(len(channels))
        )
        self.output = LabelMapConv(channels[-1], c, out_kernel, activation=False)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.out_features = c * h * w

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``z``: ``[..., z_dim]``, ``y``: one-hot ``[..., K]`` (leading dims broadcast)."""
        (z_flat, y_flat), shape = broadcast_leading(z, y)
        h = self.linear(torch.cat([z_flat, y_flat], -1)).reshape((-1,) + self.start_shape)
        for i, layer in enumerate(self.hidden):
            if i == self.split:
                h = self.upsample(h)
            h = layer(h, y_flat)
        h = self.output(self.upsample(h))
        _, height, width = self.image_shape
        top, left = (h.shape[-2] - height) // 2, (h.shape[-1] - width) // 2
        h = h[..., top : top + height, left : left + width]
        return h.reshape(shape + (self.out_features,))


@dataclass(frozen=True)
class ConvMMCVASpec(ImageSpec):
    """The sizes and layers of Conv-MMCVA and its guide (the paper's code's defaults):
    ``image_shape`` (``x`` is given flattened, ``[batch, C*H*W]``), ``num_classes``,
    ``z_dim`` (100), the decoder's hidden convolution widths ``decoder_channels`` (and its
    ``batch_norm``), the max-margin CNN's ``classifier_channels`` and ``dropout``, and the
    encoder's ``encoder_channels``."""

    z_dim: int = 100
    decoder_channels: tuple[int, ...] = (64, 64, 32, 32)
    batch_norm: bool = False
    classifier_channels: tuple[int, ...] = (32, 64, 64, 128, 128)
    encoder_channels: tuple[int, ...] = (32, 32, 64, 64, 64)
    dropout: float = 0.5


class ConvMMCVA(PlatedModel):
    """``p(y) p(z) p(x|y,z)`` with a label-conditioned deconvolutional ``p(x|y,z)``
    (module docstring).  The label site ``y`` is one-hot, observed for labelled rows.

    :param ConvMMCVASpec spec: the sizes and layers shared with the guide.
    """

    pyro_name = "conv_mmcva"

    def __init__(self, spec: ConvMMCVASpec) -> None:
        super().__init__()
        self.spec, self.image_shape = spec, spec.image_shape
        self.x_dim, self.num_classes, self.z_dim = math.prod(self.image_shape), spec.num_classes, spec.z_dim
        self.likelihood_kind = "bernoulli"
        self.decoder = ConditionalConvDecoder(
            spec.z_dim, spec.num_classes, self.image_shape, spec.decoder_channels, batch_norm=spec.batch_norm
        )
        self.register_buffer("y_logits", torch.zeros(spec.num_classes))
        self.register_buffer("z_loc", torch.zeros(spec.z_dim))

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        """The sites ``y`` (one-hot), ``z`` and ``x``."""
        y = pyro.sample("y", dist.OneHotCategorical(logits=self.y_logits), obs=one_hot(y, self.num_classes, self.z_loc))
        z = pyro.sample("z", StandardNormal(self.z_loc).to_event(1))
        logits = self.decoder(z, y)
        return pyro.sample("x", IndependentBernoulli(logits), obs=x)
