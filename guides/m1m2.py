r"""The guide of the stacked M1+M2 model (Kingma et al. 2014, Sec. 2.2)::

    q(z1|x)       M1's encoder (frozen when M1 is pre-trained)
    q(y|z1)       M2's classifier on the features, enumerated for unlabelled data
    q(z2|y,z1)    M2's encoder
"""

from __future__ import annotations

from typing import Optional

import torch

from pyrodgm.modeling import FreezableStack, PlatedGuide

from .m2 import M2Guide
from .vae import VAEGuide


class M1M2Guide(FreezableStack, PlatedGuide):
    """``q(z1|x) q(y|z1) q(z2|y,z1)``.

    :param VAEGuide m1_guide: M1's encoder.
    :param M2Guide m2_guide: M2's guide over ``m1_guide.z_dim`` features.
    :param bool freeze_m1: keep M1's encoder fixed (pre-trained stacking).
    """

    pyro_name = "m1m2_guide"
    lower, upper = "m1_guide", "m2_guide"

    def __init__(self, m1_guide: VAEGuide, m2_guide: M2Guide, freeze_m1: bool = True) -> None:
        super().__init__()
        if m2_guide.x_dim != m1_guide.z_dim:
            raise ValueError(f"M2's guide reads {m2_guide.x_dim} features but M1's latent has {m1_guide.z_dim}")
        self.m1_guide, self.m2_guide, self.freeze_m1 = m1_guide, m2_guide, freeze_m1
        self.x_dim, self.num_classes = m1_guide.x_dim, m2_guide.num_classes
        self._freeze_lower()

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``z1`` from M1's encoder, then M2's ``y, z2`` on it."""
        z1 = self.m1_guide.infer(x, name="z1")
        return self.m2_guide.infer(z1, y, names=("y", "z2"))

    def label_distribution(self, x: torch.Tensor):
        """The classifier ``q(y|z1)`` at the mean of ``q(z1|x)`` (a quick point prediction;
        :func:`pyrodgm.evaluation.predict_proba` averages over samples of ``z1``)."""
        loc, _ = self.m1_guide.head(self.m1_guide.encoder(x))
        return self.m2_guide.label_distribution(loc)
