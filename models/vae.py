r"""The variational auto-encoder, Kingma et al.'s latent-feature model M1.

Generative story (Kingma & Welling 2014; Kingma et al. 2014, eq. 1)::

    z ~ N(0, I)                      p(z)
    x ~ f(x; z, theta)               p(x|z), Bernoulli or Gaussian, an MLP of z

Its guide is :class:`pyrodgm.guides.VAEGuide`; the bound is eq. 5 of Kingma et al. (2014),
with the Gaussian KL in closed form.

References

[1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014)
[2] `Semi-Supervised Learning with Deep Generative Models`, Kingma, Rezende, Mohamed,
    Welling (2014)
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.distributions import StandardNormal
from pyrodgm.modeling import PlatedModel
from pyrodgm.nets import MLPSpec, likelihood_head


class VAE(PlatedModel):
    """``p(z) p(x|z)``.

    :param MLPSpec spec: ``x_dim`` (a flattened image), ``z_dim`` (50 in Kingma et al.
        2014) and the decoder MLP's ``hidden`` widths (600, 600 for M1), shared with the
        guide; its ``num_classes`` is unused.
    :param str likelihood: ``"bernoulli"`` or ``"gaussian"``.
    """

    pyro_name = "vae"

    def __init__(self, spec: MLPSpec, likelihood: str = "bernoulli") -> None:
        super().__init__()
        self.spec, self.x_dim, self.z_dim, self.likelihood_kind = spec, spec.x_dim, spec.z_dim, likelihood
        self.decoder = spec.mlp(spec.z_dim)
        self.likelihood = likelihood_head(likelihood, self.decoder.out_features, spec.x_dim)
        self.register_buffer("z_loc", torch.zeros(spec.z_dim))

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sites ``z, x``.  M1 has no label: passing ``y`` is an error."""
        if y is not None:
            raise ValueError("the VAE (M1) has no label site: call it without y")
        z = pyro.sample("z", self.prior())
        return self.observe("x", z, x)

    def prior(self) -> dist.TorchDistribution:
        """``p(z) = N(0, I)``."""
        return StandardNormal(self.z_loc).to_event(1)

    def observe(self, name: str, z: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:
        """Sample (or observe) site ``name`` from ``p(x|z)``."""
        return pyro.sample(name, self.likelihood.distribution(self.decoder(z)), obs=x)
