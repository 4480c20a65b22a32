r"""The generative side of the max-margin deep generative models (mmDGMs) of Li, Zhu &
Zhang (2016): MMVA (MLP networks) and Conv-MMVA (a CNN recognition model and an
unpooling "unconvnet" generative model).

Generative story (Li et al. 2016, eq. 1; Kingma & Welling 2014)::

    z ~ N(0, I)                      p(z)
    x ~ f(x; z, theta)               p(x|z), Bernoulli (MMVA: or Gaussian)

The model is a plain VAE; what makes it max-margin is the learning problem (eq. 4-5): the
variational bound plus ``C`` times a multiclass hinge loss of a linear classifier on the
recognition model's features, so the supervision shapes ``q(z|x)`` and through it the
generative model.  The recognition model, its features and the classifier are in
:mod:`pyrodgm.guides.mmva`; the losses in :mod:`pyrodgm.losses.margin`.

References

[1] `Max-Margin Deep Generative Models for (Semi-)Supervised Learning`, Chongxuan Li,
    Jun Zhu, Bo Zhang (2016), arXiv:1611.07119
[2] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014)
[3] `Learning to Generate Chairs with Convolutional Neural Networks`, Dosovitskiy,
    Springenberg, Brox (2015) (unpooling)
"""

from __future__ import annotations

import math
from typing import Optional

import pyro
import torch

from pyrodgm.distributions import IndependentBernoulli, StandardNormal
from pyrodgm.modeling import PlatedModel
from pyrodgm.nets import ConvMMVASpec, MLPSpec, UnpoolingConvDecoder

from .vae import VAE

__all__ = ["MMVA", "ConvMMVA"]


class MMVA(VAE):
    """MMVA's generative model ``p(z) p(x|z)`` (Li et al. 2016, Sec. 4.1.2): a two-layer
    MLP of 500 units from ``z`` (50-d) to ``x``, as in Kingma et al. (2014).  The same
    parameters as :class:`~pyrodgm.models.VAE` (the paper's ``hidden=(500, 500)``)."""

    pyro_name = "mmva"

    def __init__(self, spec: MLPSpec, likelihood: str = "bernoulli") -> None:
        super().__init__(spec, likelihood)


class ConvMMVA(PlatedModel):
    """Conv-MMVA's generative model ``p(z) p(x|z)`` (Li et al. 2016, Sec. 4.1.2, Fig. 2):
    ``z -> 500 -> C'H'W'`` fully connected, then the recognition CNN's layers mirrored as
    unpooling, convolution and ReLU (:class:`~pyrodgm.nets.UnpoolingConvDecoder`).

    :param ConvMMVASpec spec: the sizes and layers shared with the guide: ``image_shape``,
        ``z_dim`` (50 in the paper), the recognition CNN's ``layers``, the fully connected
        width ``hidden`` (500), the ``activation``.
    :param str likelihood: ``"bernoulli"`` only (the paper's Gaussian SVHN setting, with
        local contrast normalisation, is not implemented).
    """

    pyro_name = "conv_mmva"

    def __init__(self, spec: ConvMMVASpec, likelihood: str = "bernoulli") -> None:
        super().__init__()
        self.spec, self.image_shape = spec, spec.image_shape
        self.x_dim, self.z_dim, self.likelihood_kind = math.prod(self.image_shape), spec.z_dim, likelihood
        if likelihood != "bernoulli":
            raise ValueError(f"Conv-MMVA has a Bernoulli likelihood (the paper's MNIST setting), got likelihood={likelihood!r}")
        self.decoder = UnpoolingConvDecoder(spec.z_dim, self.image_shape, spec.layers, spec.hidden, spec.activation)
        self.register_buffer("z_loc", torch.zeros(spec.z_dim))

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sites ``z, x``; there is no label site (passing ``y`` is an error)."""
        if y is not None:
            raise ValueError("Conv-MMVA's generative model has no label site: call it without y")
        z = pyro.sample("z", StandardNormal(self.z_loc).to_event(1))
        return pyro.sample("x", IndependentBernoulli(self.decoder(z)), obs=x)
