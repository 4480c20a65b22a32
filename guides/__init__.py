"""Amortised guides, one per model in :mod:`pyrodgm.models` (installed as
:mod:`pyrodgm.guides`).  Each is an :class:`torch.nn.Module` whose ``forward(x, y=None)`` is a
Pyro guide with its data in ``pyro.plate("data", ...)``; discrete labels are marked for
parallel enumeration."""

from .adgm import ADGMGuide
from .m1m2 import M1M2Guide
from .m2 import M2Guide
from .vae import VAEGuide

__all__ = ["VAEGuide", "M2Guide", "M1M2Guide", "ADGMGuide"]
