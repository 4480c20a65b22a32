r"""The Gaussian-mixture VAE of Arias Figueroa & Rivera's semi-supervised model (2019,
Sec. 3, Fig. 2b).

Generative story (eq. 2-4)::

    y ~ Cat(pi)                          p(y), uniform
    z ~ N(mu(y), diag sigma^2(y))        p(z|y), a learned mixture: two linear maps of y
    x ~ B(f(z)) or N(f(z), 1/2)          p(x|z), a transposed-convolution decoder (Table 5)

Its guide (:class:`pyrodgm.guides.gmvae.GMVAEGuide`) reads deterministic features
:math:`\hat x = g(x)`; the bound is eq. 7, :math:`\mathcal L_R + w_G \mathcal L_G + w_C
\mathcal L_C` with :math:`\mathcal L_G = \mathrm{KL}(q(z|\hat x, y) \| p(z|y))` and
:math:`\mathcal L_C = \mathrm{KL}(q(y|\hat x) \| p(y))`:
:class:`~pyrodgm.losses.SemiSupervisedELBO` with ``latent_weights={"z": w_G, "y": w_C}``.

Choices where the paper is silent or inconsistent:

* **Geometry.**  The (kernel, stride, padding) triples of Tables 4-5 give neither a
  :math:`1 \times 1` feature map nor a :math:`28 \times 28` image back (the encoder ends at
  :math:`5 \times 5` with padding 1, the decoder at :math:`10 \times 10` from
  :math:`1 \times 1`).  :data:`CONV_GEOMETRY` keeps the tables' layer counts and channels
  (16-32-64-128-``fsz``, 128-64-32-16-C) with the kernels and strides of the authors'
  released code, unpadded, so that ``g(x)`` is exactly a ``fsz``-vector and the decoder,
  its mirror image (:func:`conv_sizes`), returns exactly the input size.
* **Likelihood.**  The semi-supervised runs use "the mean square error" with a sigmoid
  output: ``likelihood="gaussian"`` is :math:`\mathcal N(\mathrm{sigmoid}(f(z)), 1/2)`,
  whose negative log-density is :math:`\lVert x - \mathrm{sigmoid}(f(z)) \rVert^2` plus a
  constant, i.e. the MSE summed over pixels.  The clustering runs use binary cross-entropy:
  ``likelihood="bernoulli"`` (on binarised pixels, as Pyro's Bernoulli requires).
* **p(z|y)** is :class:`~pyrodgm.nets.NormalHead` on ``y`` (linear mean, softplus scale),
  linear in ``y`` so that a relaxed label interpolates the mixture's components.

References

[1] `Semi-Supervised Learning using Deep Generative Models and Auxiliary Tasks`,
    Jhosimar Arias Figueroa, Adín Ramírez Rivera (2019)
[2] `A note on deep variational models for unsupervised clustering`, Rui Shu (2017)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrodgm.distributions import IndependentBernoulli
from pyrodgm.labels import LabelPrior
from pyrodgm.modeling import PlatedModel, one_hot
from pyrodgm.nets import ImageSpec, NormalHead, _flatten_batch

__all__ = ["CONV_GEOMETRY", "ConvFeatures", "ConvImageDecoder", "GMVAE", "GMVAESpec", "conv_geometry", "conv_sizes"]

#: Per image shape ``(C, H, W)``: the channels of the hidden convolutions, then the kernel
#: sizes and strides of all of them (the last convolution has ``fsz`` channels), unpadded,
#: ending at 1x1.  MNIST/Fashion-MNIST and SVHN as in the authors' released code; 8x8
#: scikit-learn digits (offline tests) with stride-1 kernels.
CONV_GEOMETRY: dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    (1, 28, 28): ((16, 32, 64, 128), (5, 5, 4, 5, 3), (1, 1, 2, 2, 1)),
    (3, 32, 32): ((16, 32, 64, 128, 256), (5, 5, 5, 3, 4, 8), (1, 1, 1, 1, 2, 1)),
    (1, 8, 8): ((16, 32, 64, 128), (3, 3, 2, 2, 2), (1, 1, 1, 1, 1)),
}

#: The fixed standard deviation of the ``"gaussian"`` likelihood: ``-log N(x; m, 1/2) =
#: (x - m)^2 + log(pi) / 2``, the paper's squared error.
MSE_SCALE = math.sqrt(0.5)

Geometry = tuple[Sequence[int], Sequence[int], Sequence[int]]


def conv_sizes(size: int, kernels: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Spatial sizes through unpadded convolutions: ``[size, ..., final]``."""
    sizes = [size]
    for kernel, stride in zip(kernels, strides):
        sizes.append((sizes[-1] - kernel) // stride + 1)
    return sizes


def conv_geometry(image_shape: Sequence[int], geometry: Optional[Geometry] = None) -> Geometry:
    """``geometry``, or :data:`CONV_GEOMETRY`'s for ``image_shape``, checked to reach 1x1."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    if geometry is None:
        if shape not in CONV_GEOMETRY:
            raise ValueError(f"no convolution geometry for images {shape}; pass geometry=(channels, kernels, strides)")
        geometry = CONV_GEOMETRY[shape]
    channels, kernels, strides = (tuple(int(v) for v in part) for part in geometry)
    if len(kernels) != len(channels) + 1 or len(strides) != len(kernels):
        raise ValueError(f"geometry needs one kernel and stride per convolution (channels + 1), got {geometry}")
    for size in shape[1:]:
        sizes = conv_sizes(size, kernels, strides)
        if min(sizes) < 1 or sizes[-1] != 1:
            raise ValueError(f"geometry {geometry} maps size {size} through {sizes}, not to 1x1")
    return channels, kernels, strides


class ConvFeatures(nn.Module):
    """``g(x)`` of Table 4: unpadded convolutions, each followed by batch-norm and a leaky
    ReLU, down to a ``feature_dim x 1 x 1`` map, flattened.  Takes flat images
    ``[..., C*H*W]``; returns ``[..., feature_dim]``."""

    def __init__(self, image_shape: Sequence[int], feature_dim: int, geometry: Optional[Geometry] = None) -> None:
        super().__init__()
        channels, kernels, strides = conv_geometry(image_shape, geometry)
        self.image_shape = tuple(int(s) for s in image_shape)
        layers: list[nn.Module] = []
        c_in = self.image_shape[0]
        for c_out, kernel, stride in zip(channels + (feature_dim,), kernels, strides):
            layers += [nn.Conv2d(c_in, c_out, kernel, stride), nn.BatchNorm2d(c_out), nn.LeakyReLU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.out_features = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, batch_shape = _flatten_batch(x, 1)
        h = self.convs(flat.reshape((flat.shape[0],) + self.image_shape))
        return h.reshape(batch_shape + (self.out_features,))


class ConvImageDecoder(nn.Module):
    """``f(z)`` of Table 5: a linear map of ``z`` to a ``feature_dim x 1 x 1`` map, then the
    transposed convolutions mirroring :class:`ConvFeatures` (channels reversed, output
    padding chosen so every size is met exactly), batch-norm and ReLU after all but the last.
    Returns flat pre-sigmoid images ``[..., C*H*W]``."""

    def __init__(self, z_dim: int, image_shape: Sequence[int], feature_dim: int, geometry: Optional[Geometry] = None) -> None:
        super().__init__()
        channels, kernels, strides = conv_geometry(image_shape, geometry)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.feature_dim = feature_dim
        self.linear = nn.Linear(z_dim, feature_dim)
        heights = conv_sizes(self.image_shape[1], kernels, strides)
        widths = conv_sizes(self.image_shape[2], kernels, strides)
        c_in, layers = feature_dim, []
        outs = tuple(reversed(channels)) + (self.image_shape[0],)
        for i, (c_out, kernel, stride) in enumerate(zip(outs, reversed(kernels), reversed(strides))):
            j = len(kernels) - i  # from size j to size j - 1
            padding = tuple(size[j - 1] - ((size[j] - 1) * stride + kernel) for size in (heights, widths))
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel, stride, output_padding=padding))
            if i < len(kernels) - 1:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.deconvs = nn.Sequential(*layers)
        self.out_features = math.prod(self.image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat, batch_shape = _flatten_batch(z, 1)
        h = self.linear(flat).reshape(flat.shape[0], self.feature_dim, 1, 1)
        return self.deconvs(h).reshape(batch_shape + (self.out_features,))


@dataclass(frozen=True)
class GMVAESpec(ImageSpec):
    """The sizes that the GMVAE and its guide share (the defaults: the paper's MNIST ones),
    an :class:`~pyrodgm.nets.ImageSpec` whose ``num_classes`` are the mixture's components
    (classes or clusters) and ``z_dim`` the Gaussian size ``gsz`` (100 MNIST, 150 SVHN and
    MNIST clustering, 50 Fashion-MNIST).

    :param int feature_dim: ``fsz``, the width of the guide's features ``x_hat`` and of what
        the decoder starts from (100 MNIST/SVHN, 200 Fashion-MNIST).
    :param geometry: ``(channels, kernels, strides)`` overriding :data:`CONV_GEOMETRY`.
    """

    z_dim: int = 100
    feature_dim: int = 100
    geometry: Optional[Geometry] = None


class GMVAE(PlatedModel):
    """``p(y) p(z|y) p(x|z)`` (module docstring).

    :param GMVAESpec spec: the sizes shared with the guide.
    :param str likelihood: ``"gaussian"`` (the paper's MSE) or ``"bernoulli"`` (BCE).
    """

    pyro_name = "gmvae"

    def __init__(self, spec: GMVAESpec, likelihood: str = "gaussian") -> None:
        super().__init__()
        if likelihood not in ("gaussian", "bernoulli"):
            raise ValueError(f"Unknown likelihood {likelihood!r}; expected 'bernoulli' or 'gaussian'")
        self.spec, self.image_shape, self.x_dim = spec, spec.image_shape, math.prod(spec.image_shape)
        self.num_classes, self.z_dim, self.likelihood_kind = spec.num_classes, spec.z_dim, likelihood
        self.prior = NormalHead(spec.num_classes, spec.z_dim)
        self.decoder = ConvImageDecoder(spec.z_dim, spec.image_shape, spec.feature_dim, spec.geometry)
        self.register_buffer("y_logits", torch.zeros(spec.num_classes))

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        y = pyro.sample("y", LabelPrior(logits=self.y_logits), obs=one_hot(y, self.num_classes, self.y_logits))
        z = pyro.sample("z", self.prior.distribution(y))
        return pyro.sample("x", self.observation(self.decoder(z)), obs=x)

    def observation(self, out: torch.Tensor) -> dist.TorchDistribution:
        """``p(x|z)`` from the decoder's output ``out``."""
        if self.likelihood_kind == "bernoulli":
            return IndependentBernoulli(out)
        return dist.Normal(torch.sigmoid(out), MSE_SCALE).to_event(1)
