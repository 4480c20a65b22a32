"""Generative models, one file per paper's generative story (installed as
:mod:`pyrodgm.models`).  Each is an :class:`torch.nn.Module` whose ``forward(x, y=None)`` is a
Pyro model with its data in ``pyro.plate("data", ...)``; its guide is in
:mod:`pyrodgm.guides`."""

from .adgm import ADGM, SDGM
from .cagem import CaGeM
from .gmvae import GMVAE
from .hierarchical import HierarchicalVAE
from .m1m2 import M1M2
from .m2 import M2
from .mmcva import ConvMMCVA
from .mmva import MMVA, ConvMMVA
from .vae import VAE

__all__ = ["VAE", "M2", "M1M2", "ADGM", "SDGM", "MMVA", "ConvMMVA", "ConvMMCVA", "GMVAE", "CaGeM", "HierarchicalVAE"]
