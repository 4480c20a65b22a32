r"""The amortised guide of the VAE / M1: ``q(z|x) = N(mu(x), diag sigma^2(x))``
(Kingma et al. 2014, eq. 3)."""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import torch

from pyrodgm.modeling import PlatedGuide
from pyrodgm.nets import MLP, NormalHead


class VAEGuide(PlatedGuide):
    """``q(z|x)``, an MLP encoder with a Normal head."""

    pyro_name = "vae_guide"

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 50,
        hidden: Sequence[int] = (600, 600),
        activation: str = "softplus",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = MLP(x_dim, hidden, activation=activation, batch_norm=batch_norm)
        self.head = NormalHead(self.encoder.out_features, z_dim)

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, name: str = "z") -> torch.Tensor:
        """Sample site ``name`` from ``q(z|x)`` (M1 has no label; ``y`` is ignored)."""
        return pyro.sample(name, self.head.distribution(self.encoder(x)))
