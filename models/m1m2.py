r"""Kingma et al.'s stacked model M1+M2: M2 on the latent features of M1.

Generative story (Kingma et al. 2014, Sec. 2.2, "stacked generative semi-supervised model")::

    y  ~ Cat(pi)                     p(y)
    z2 ~ N(0, I)                     p(z2)
    z1 ~ N(mu(y, z2), sigma^2(y, z2)) p(z1|y,z2), M2 with a Gaussian likelihood
    x  ~ f(x; z1, theta)             p(x|z1), M1's decoder

with the guide ``q(z1|x) q(y|z1) q(z2|y,z1)`` (:class:`pyrodgm.guides.M1M2Guide`).  As in
the paper, M1 may be trained first and frozen (``freeze_m1=True``): its parameters then get
no gradient and its batch-norm statistics stay fixed, so training optimises M2 on samples
``z1 ~ q(z1|x)``, and the loss still bounds ``log p(x)`` of the whole stack.  With
``freeze_m1=False`` the stack is trained end to end.

References

[1] `Semi-Supervised Learning with Deep Generative Models`, Kingma, Rezende, Mohamed,
    Welling (2014)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pyrodgm.modeling import FreezableStack, PlatedModel

from .m2 import M2
from .vae import VAE


def check_stack(m1_z_dim: int, m2: nn.Module) -> None:
    """M2's data must be M1's latent features, with a Gaussian likelihood."""
    if m2.x_dim != m1_z_dim:
        raise ValueError(f"M2 models {m2.x_dim} features but M1's latent has {m1_z_dim} dimensions")


class M1M2(FreezableStack, PlatedModel):
    """``p(y) p(z2) p(z1|y,z2) p(x|z1)``.

    :param VAE m1: the M1 model (its decoder gives ``p(x|z1)``).
    :param M2 m2: an M2 over ``m1.z_dim`` features with ``likelihood="gaussian"``.
    :param bool freeze_m1: keep M1's parameters fixed (the paper's pre-trained stacking).
    """

    pyro_name = "m1m2"
    lower, upper = "m1", "m2"

    def __init__(self, m1: VAE, m2: M2, freeze_m1: bool = True) -> None:
        super().__init__()
        check_stack(m1.z_dim, m2)
        if m2.likelihood_kind != "gaussian":
            raise ValueError("M2 inside M1+M2 models continuous features: use likelihood='gaussian'")
        self.m1, self.m2, self.freeze_m1 = m1, m2, freeze_m1
        self.x_dim, self.num_classes, self.likelihood_kind = m1.x_dim, m2.num_classes, m1.likelihood_kind
        self._freeze_lower()

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        """M2's sites as ``y, z2, z1``, then M1's ``x``."""
        z1 = self.m2.generate(None, y, names=("y", "z2", "z1"))
        return self.m1.observe("x", z1, x)
