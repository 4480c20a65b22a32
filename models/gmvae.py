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
  ``likelihood="bernoulli"`` (on binarised pixels, as Pyro's Bernoulli requires).  The
  authors' code's semi-supervised MNIST run uses the binary cross-entropy of the *grey*
  pixels: ``likelihood="cross-entropy"``, Bernoulli's log-mass evaluated at values in
  [0, 1] (not a normalised density: its bound is a pseudo-likelihood's).
* **p(z|y)** is :class:`~pyrodgm.nets.NormalHead` on ``y`` (linear mean, softplus scale),
  linear in ``y`` so that a relaxed label interpolates the mixture's components.

The authors' released code (``networks/CatVAENetwork.py``, ``model/SSVAE.py``) builds a
different network, each difference a field of :class:`GMVAESpec`: ``z_prior="standard"``
(:math:`p(z) = \mathcal N(0, I)` and a decoder that reads ``y`` as well, ``dense(z) +
dense(y)``: :math:`p(y) p(z) p(x|y, z)`), ``activation="relu"`` in the feature
convolutions and ``decoder_head="dense"`` (batch-norm and ReLU after the last transposed
convolution too, then a dense layer on the flat image).

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
from pyrodgm.nets import activation as make_activation

__all__ = [
    "CONV_GEOMETRY", "DECODER_HEADS", "LIKELIHOODS", "Z_ENCODERS", "Z_PRIORS", "ConvFeatures", "ConvImageDecoder", "GMVAE", "GMVAESpec",
    "conv_geometry", "conv_sizes",
]

#: ``p(x|z)``: the paper's squared error, binary pixels, or grey pixels' cross-entropy (the authors' code).
LIKELIHOODS = ("gaussian", "bernoulli", "cross-entropy")
#: ``p(z|y)`` learned (the paper) or ``p(z) = N(0, I)`` with ``f(z, y)`` (the authors' code).
Z_PRIORS = ("mixture", "standard")
#: ``q(z|x_hat, y)`` an MLP (the paper) or ``q(z|x_hat)`` linear (the authors' code).
Z_ENCODERS = ("mlp", "linear")
#: The decoder's last layer: the transposed convolution (the paper) or a dense layer (the authors' code).
DECODER_HEADS = ("deconv", "dense")

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
    ReLU (``activation``: any of :data:`~pyrodgm.nets.ACTIVATIONS`; the authors' code: a
    ReLU), down to a ``feature_dim x 1 x 1`` map, flattened.  Takes flat images
    ``[..., C*H*W]``; returns ``[..., feature_dim]``."""

    def __init__(
        self, image_shape: Sequence[int], feature_dim: int, geometry: Optional[Geometry] = None, activation: str = "leaky_relu"
    ) -> None:
        super().__init__()
        channels, kernels, strides = conv_geometry(image_shape, geometry)
        self.image_shape = tuple(int(s) for s in image_shape)
        layers: list[nn.Module] = []
        c_in = self.image_shape[0]
        for c_out, kernel, stride in zip(channels + (feature_dim,), kernels, strides):
            layers += [nn.Conv2d(c_in, c_out, kernel, stride), nn.BatchNorm2d(c_out), make_activation(activation)]
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
    Returns flat pre-sigmoid images ``[..., C*H*W]``.

    :param int label_dim: with ``label_dim > 0`` the decoder reads a label ``y`` too, its
        own linear map added to ``z``'s (``f(z, y)``, the authors' code).
    :param str head: ``"deconv"``: the image is the last transposed convolution's output;
        ``"dense"``: batch-norm and ReLU after that one too, then a dense layer on the flat
        image (the authors' code).
    """

    def __init__(
        self, z_dim: int, image_shape: Sequence[int], feature_dim: int, geometry: Optional[Geometry] = None,
        label_dim: int = 0, head: str = "deconv",
    ) -> None:
        super().__init__()
        if head not in DECODER_HEADS:
            raise ValueError(f"head must be one of {DECODER_HEADS}, got {head!r}")
        channels, kernels, strides = conv_geometry(image_shape, geometry)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.feature_dim = feature_dim
        self.linear = nn.Linear(z_dim, feature_dim)
        self.label_linear = nn.Linear(label_dim, feature_dim) if label_dim > 0 else None
        heights = conv_sizes(self.image_shape[1], kernels, strides)
        widths = conv_sizes(self.image_shape[2], kernels, strides)
        c_in, layers = feature_dim, []
        outs = tuple(reversed(channels)) + (self.image_shape[0],)
        for i, (c_out, kernel, stride) in enumerate(zip(outs, reversed(kernels), reversed(strides))):
            j = len(kernels) - i  # from size j to size j - 1
            padding = tuple(size[j - 1] - ((size[j] - 1) * stride + kernel) for size in (heights, widths))
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel, stride, output_padding=padding))
            if i < len(kernels) - 1 or head == "dense":
                layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.deconvs = nn.Sequential(*layers)
        self.out_features = math.prod(self.image_shape)
        self.dense = nn.Linear(self.out_features, self.out_features) if head == "dense" else nn.Identity()

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flat pre-sigmoid images of ``z`` (and of the label ``y``, one-hot or relaxed,
        broadcast against ``z``, when the decoder reads one)."""
        h = self.linear(z)
        if self.label_linear is not None:
            if y is None:
                raise ValueError("this decoder reads a label: call it with z and y")
            h = h + self.label_linear(y)
        flat, batch_shape = _flatten_batch(h, 1)
        out = self.deconvs(flat.reshape(flat.shape[0], self.feature_dim, 1, 1)).reshape(flat.shape[0], self.out_features)
        return self.dense(out).reshape(batch_shape + (self.out_features,))


@dataclass(frozen=True)
class GMVAESpec(ImageSpec):
    """The sizes that the GMVAE and its guide share (the defaults: the paper's MNIST ones),
    an :class:`~pyrodgm.nets.ImageSpec` whose ``num_classes`` are the mixture's components
    (classes or clusters) and ``z_dim`` the Gaussian size ``gsz`` (100 MNIST, 150 SVHN and
    MNIST clustering, 50 Fashion-MNIST).

    :param int feature_dim: ``fsz``, the width of the guide's features ``x_hat`` and of what
        the decoder starts from (100 MNIST/SVHN, 200 Fashion-MNIST).
    :param geometry: ``(channels, kernels, strides)`` overriding :data:`CONV_GEOMETRY`.
    :param str activation: of the feature convolutions (the authors' code: ``"relu"``).
    :param str z_prior: ``"mixture"``: the paper's learned ``p(z|y)``, the decoder ``f(z)``;
        ``"standard"``: ``p(z) = N(0, I)`` and the decoder ``f(z, y)`` (the authors' code).
    :param str z_encoder: ``"mlp"``: the paper's ``q(z|x_hat, y)``, an MLP (fsz + c) - zsz -
        zsz - zsz; ``"linear"``: ``q(z|x_hat)``, one linear map each for the mean and the
        log-scale (the authors' code).
    :param int classifier_layers: hidden layers of width ``fsz`` of ``q(y|x_hat)`` before
        its logits (the paper: 1; the authors' code: 0, logits linear in ``x_hat``).
    :param str decoder_head: ``"deconv"`` or ``"dense"`` (:class:`ConvImageDecoder`).
    """

    z_dim: int = 100
    feature_dim: int = 100
    geometry: Optional[Geometry] = None
    activation: str = "leaky_relu"
    z_prior: str = "mixture"
    z_encoder: str = "mlp"
    classifier_layers: int = 1
    decoder_head: str = "deconv"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, choices in (("z_prior", Z_PRIORS), ("z_encoder", Z_ENCODERS), ("decoder_head", DECODER_HEADS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if isinstance(self.classifier_layers, bool) or not isinstance(self.classifier_layers, int) or self.classifier_layers < 0:
            raise ValueError(f"classifier_layers must be a non-negative integer, got {self.classifier_layers!r}")


class GMVAE(PlatedModel):
    """``p(y) p(z|y) p(x|z)`` (module docstring).

    :param GMVAESpec spec: the sizes shared with the guide.
    :param str likelihood: ``"gaussian"`` (the paper's MSE), ``"bernoulli"`` (BCE of binary
        pixels) or ``"cross-entropy"`` (BCE of grey pixels, the authors' code).
    """

    pyro_name = "gmvae"

    def __init__(self, spec: GMVAESpec, likelihood: str = "gaussian") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"Unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
        self.spec, self.image_shape, self.x_dim = spec, spec.image_shape, math.prod(spec.image_shape)
        self.num_classes, self.z_dim, self.likelihood_kind = spec.num_classes, spec.z_dim, likelihood
        mixture = spec.z_prior == "mixture"
        self.prior = NormalHead(spec.num_classes, spec.z_dim) if mixture else None
        label_dim = 0 if mixture else spec.num_classes
        self.decoder = ConvImageDecoder(spec.z_dim, spec.image_shape, spec.feature_dim, spec.geometry, label_dim, spec.decoder_head)
        self.register_buffer("y_logits", torch.zeros(spec.num_classes))
        if not mixture:
            self.register_buffer("z_loc", torch.zeros(spec.z_dim))

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        y = pyro.sample("y", LabelPrior(logits=self.y_logits), obs=one_hot(y, self.num_classes, self.y_logits))
        if self.prior is None:
            z = pyro.sample("z", dist.Normal(self.z_loc, 1.0).to_event(1))
            return pyro.sample("x", self.observation(self.decoder(z, y)), obs=x)
        z = pyro.sample("z", self.prior.distribution(y))
        return pyro.sample("x", self.observation(self.decoder(z)), obs=x)

    def observation(self, out: torch.Tensor) -> dist.TorchDistribution:
        """``p(x|z)`` from the decoder's output ``out``."""
        if self.likelihood_kind == "bernoulli":
            return IndependentBernoulli(out)
        if self.likelihood_kind == "cross-entropy":  # grey values: Bernoulli's support is not checked
            return IndependentBernoulli(out, validate_args=False)
        return dist.Normal(torch.sigmoid(out), MSE_SCALE).to_event(1)
