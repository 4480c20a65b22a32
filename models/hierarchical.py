r"""A VAE with two stochastic layers, the hierarchical baseline of Burda et al. (2016) and of
the Ladder VAE (Sønderby et al. 2016), as compared against in CaGeM's Table 1.

Generative story (Burda et al. 2016, Sec. 2, with ``L = 2``; Sønderby et al. 2016, Sec. 2,
eqs. 1-3)::

    z2 ~ N(0, I)                             p(z2)
    z1 ~ N(mu(z2), sigma^2(z2))              p(z1|z2), an MLP of z2 ("top-down" network)
    x  ~ f(x; z1, theta)                     p(x|z1), Bernoulli or Gaussian, an MLP of z1

The same generative model is trained three ways in :mod:`pyrodgm.zoo`:

* ``vae2``: the ELBO with the bottom-up guide ``q(z1|x) q(z2|z1)``
  (:class:`pyrodgm.guides.hierarchical.HierarchicalGuide`; Burda et al. 2016, Sec. 2).
* ``iwae``: the same pair trained on the importance-weighted bound with ``k`` samples
  (:class:`pyrodgm.losses.ImportanceWeightedELBO`; Burda et al. 2016, eq. 8).
* ``lvae``: the ELBO with the Ladder guide
  (:class:`pyrodgm.guides.hierarchical.LadderGuide`), whose top-down pass reuses this
  model's :meth:`HierarchicalVAE.z1_prior` (Sønderby et al. 2016, Sec. 2.2, eqs. 18-19).

Architecture.  The defaults are those of Burda et al.'s two-stochastic-layer MNIST model as
released with their paper (``yburda/iwae``, ``experiments.py``, ``--layers 2``): ``z1``
100 and ``z2`` 50 units; two deterministic ``tanh`` layers of 200 units between ``x`` and
``z1`` and two of 100 units between ``z1`` and ``z2``, in both the generative and the
recognition networks; Gaussian scales ``exp`` of a linear layer (``scale="exp"``).  CaGeM
(Maaløe et al. 2017, Table 1) quotes the resulting numbers (IWAE, L=2, IW=1: -85.33; IW=50:
-82.90 nats); its own L=2 networks (z1 64, z2 32, 1024/512 units, App. C) are CaGeM's, not
the baselines'.

References

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)
[2] `Ladder Variational Autoencoders`, Casper K. Sønderby, Tapani Raiko, Lars Maaløe,
    Søren K. Sønderby, Ole Winther (2016)
[3] `Semi-Supervised Generation with Cluster-aware Generative Models` (CaGeM), Lars Maaløe,
    Marco Fraccaro, Ole Winther (2017)
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.distributions import StandardNormal
from pyrodgm.modeling import PlatedModel
from pyrodgm.nets import TwoLayerSpec, likelihood_head

__all__ = ["HierarchicalVAE", "BURDA_L2"]

#: Burda et al.'s two-stochastic-layer MNIST architecture (authors' code, ``--layers 2``):
#: :class:`~pyrodgm.nets.TwoLayerSpec`'s defaults.
BURDA_L2 = dict(z_dim=100, z2_dim=50, hidden=(200, 200), hidden2=(100, 100), activation="tanh", scale="exp")


class HierarchicalVAE(PlatedModel):
    """``p(z2) p(z1|z2) p(x|z1)``.

    :param TwoLayerSpec spec: the sizes and layers shared with the guide: ``x_dim`` (a
        flattened image), ``z_dim``, the units of ``z1`` (100 in Burda et al.), ``z2_dim``
        (50), ``hidden``, the deterministic widths between ``z1`` and ``x`` (200, 200),
        ``hidden2``, those between ``z2`` and ``z1`` (100, 100), ``activation`` (``tanh``),
        ``scale`` (``"exp"``, Burda et al., or ``"softplus"``) for ``sigma(z2)``,
        ``batch_norm`` (Sønderby et al.); its ``num_classes`` is unused.
    :param str likelihood: ``"bernoulli"`` or ``"gaussian"``.
    """

    pyro_name = "vae2"

    def __init__(self, spec: TwoLayerSpec, likelihood: str = "bernoulli") -> None:
        super().__init__()
        for name in ("x_dim", "z_dim", "z2_dim"):
            value = getattr(spec, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.spec, self.x_dim, self.z1_dim, self.z2_dim, self.likelihood_kind = spec, spec.x_dim, spec.z_dim, spec.z2_dim, likelihood
        self.top_down = spec.gaussian(spec.z2_dim, spec.z_dim, hidden=spec.hidden2)
        self.decoder = spec.mlp(spec.z_dim, hidden=tuple(reversed(spec.hidden)))
        self.likelihood = likelihood_head(likelihood, self.decoder.out_features, spec.x_dim)
        self.register_buffer("z2_loc", torch.zeros(spec.z2_dim))

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sites ``z2, z1, x``.  The model has no label: passing ``y`` is an error."""
        if y is not None:
            raise ValueError("the hierarchical VAE has no label site: call it without y")
        z2 = pyro.sample("z2", StandardNormal(self.z2_loc).to_event(1))
        loc, scale = self.z1_prior(z2)
        z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
        return pyro.sample("x", self.likelihood.distribution(self.decoder(z1)), obs=x)

    def z1_prior(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu(z2), sigma(z2))`` of ``p(z1|z2)``: the top-down network, shared with the
        Ladder guide."""
        return self.top_down(z2)
