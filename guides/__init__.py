"""Amortised guides, one per model in :mod:`pyrodgm.models` (installed as
:mod:`pyrodgm.guides`).  Each is an :class:`torch.nn.Module` whose ``forward(x, y=None)`` is a
Pyro guide with its data in ``pyro.plate("data", ...)``; discrete labels are enumerated in
parallel, relaxed (Gumbel-softmax) or point-estimated, as each guide documents."""

from .adgm import ADGMGuide
from .cagem import CaGeMGuide
from .gmvae import GMVAEGuide
from .hierarchical import HierarchicalGuide, LadderGuide
from .m1m2 import M1M2Guide
from .m2 import M2Guide
from .mmcva import ConvMMCVAGuide
from .mmva import ConvMMVAGuide, MMVAGuide
from .vae import VAEGuide

__all__ = [
    "VAEGuide", "M2Guide", "M1M2Guide", "ADGMGuide", "MMVAGuide", "ConvMMVAGuide", "ConvMMCVAGuide", "GMVAEGuide",
    "CaGeMGuide", "HierarchicalGuide", "LadderGuide",
]
