r"""The amortised guide of the VAE / M1: ``q(z|x) = N(mu(x), diag sigma^2(x))``
(Kingma et al. 2014, eq. 3)."""

from __future__ import annotations

from typing import Optional

import pyro
import torch

from pyrodgm.modeling import PlatedGuide
from pyrodgm.nets import MLPSpec


class VAEGuide(PlatedGuide):
    """``q(z|x)``, an MLP encoder with a Normal head; ``spec``: the model's
    (:class:`~pyrodgm.models.VAE`)."""

    pyro_name = "vae_guide"

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        self.spec, self.x_dim, self.z_dim = spec, spec.x_dim, spec.z_dim
        self.encoder = spec.mlp(spec.x_dim)
        self.head = spec.normal_head(self.encoder.out_features, spec.z_dim)

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, name: str = "z") -> torch.Tensor:
        """Sample site ``name`` from ``q(z|x)`` (M1 has no label; ``y`` is ignored)."""
        return pyro.sample(name, self.head.distribution(self.encoder(x)))
