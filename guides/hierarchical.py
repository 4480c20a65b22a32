r"""Guides of the two-layer VAE :class:`pyrodgm.models.hierarchical.HierarchicalVAE`.

Bottom-up (Burda et al. 2016, Sec. 2, with ``L = 2``; the VAE and IWAE baselines)::

    z1 ~ N(mu(x), sigma^2(x))                q(z1|x)
    z2 ~ N(mu(z1), sigma^2(z1))              q(z2|z1)

Ladder (Sønderby et al. 2016, Sec. 2.2).  A deterministic bottom-up pass computes
"approximate likelihood" Gaussians at every layer::

    d1 = MLP(x),   (mu^_1, sigma^_1) = heads(d1)
    d2 = MLP(d1),  (mu^_2, sigma^_2) = heads(d2)

then a top-down pass samples the latents from the top, each combining its bottom-up
Gaussian with the generative model's top-down prior by precision weighting (eqs. 18-19)::

    z2 ~ N(mu^_2, sigma^_2^2)                                     q(z2|x)
    sigma_q^-2 = sigma^_1^-2 + sigma_p^-2,   mu_q = (mu^_1 sigma^_1^-2 + mu_p sigma_p^-2) sigma_q^2
    z1 ~ N(mu_q, sigma_q^2),  (mu_p, sigma_p) = p(z1|z2)'s        q(z1|x, z2)

The top-down networks are the *model's* (parameter sharing between inference and
generative model is what makes it a ladder): :class:`LadderGuide` holds a reference to the
model, calls its :meth:`~pyrodgm.models.hierarchical.HierarchicalVAE.z1_prior`, and
registers the model's parameters under the model's own Pyro names, so the param store and
the optimiser see one set of top-down parameters, updated by the gradients of both the
``log p`` and the ``log q`` terms.  The model is kept out of the guide's submodules (so
out of its ``state_dict`` and checkpoint: it is saved once, as the model).

References

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)
[2] `Ladder Variational Autoencoders`, Casper K. Sønderby, Tapani Raiko, Lars Maaløe,
    Søren K. Sønderby, Ole Winther (2016)
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.models.hierarchical import HierarchicalVAE
from pyrodgm.modeling import PlatedGuide, register_module
from pyrodgm.nets import TwoLayerSpec

__all__ = ["HierarchicalGuide", "LadderGuide", "precision_weighted"]


def _no_label(y: Optional[torch.Tensor]) -> None:
    if y is not None:
        raise ValueError("the hierarchical VAE has no label site: call its guide without y")


class HierarchicalGuide(PlatedGuide):
    """``q(z1|x) q(z2|z1)``, each an MLP with a Gaussian head; ``spec``: the model's
    (:class:`HierarchicalVAE`): ``hidden`` the widths between ``x`` and ``z1`` (200, 200 in
    Burda et al.), ``hidden2`` those between ``z1`` and ``z2`` (100, 100)."""

    pyro_name = "vae2_guide"

    def __init__(self, spec: TwoLayerSpec) -> None:
        super().__init__()
        self.spec, self.x_dim, self.z1_dim, self.z2_dim = spec, spec.x_dim, spec.z_dim, spec.z2_dim
        self.q_z1 = spec.gaussian(spec.x_dim, spec.z_dim)
        self.q_z2 = spec.gaussian(spec.z_dim, spec.z2_dim, hidden=spec.hidden2)

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sites ``z1, z2``, bottom-up."""
        _no_label(y)
        z1 = pyro.sample("z1", self.q_z1.distribution(x))
        return pyro.sample("z2", self.q_z2.distribution(z1))


def precision_weighted(
    loc_a: torch.Tensor, scale_a: torch.Tensor, loc_b: torch.Tensor, scale_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(loc, scale)`` of ``N(loc_a, scale_a^2) N(loc_b, scale_b^2)`` normalised: the
    precisions add and the means are precision-weighted (Sønderby et al. 2016, eqs. 18-19).
    Arguments broadcast against each other."""
    precision_a, precision_b = scale_a.pow(-2), scale_b.pow(-2)
    variance = 1.0 / (precision_a + precision_b)
    return (loc_a * precision_a + loc_b * precision_b) * variance, variance.sqrt()


class LadderGuide(PlatedGuide):
    """The Ladder VAE's inference model for a :class:`HierarchicalVAE` (module docstring).

    :param model: the generative model whose top-down network ``p(z1|z2)`` the guide
        shares, and whose spec it takes: ``hidden`` the widths of the bottom-up MLP
        ``x -> d1``, ``hidden2`` those of ``d1 -> d2``, ``scale`` the bottom-up scales'
        (``"softplus"``: Sønderby et al.'s ``softplus`` variance, up to the square).
    """

    pyro_name = "lvae_guide"

    def __init__(self, model: HierarchicalVAE) -> None:
        if not isinstance(model, HierarchicalVAE):
            raise TypeError(f"LadderGuide needs the HierarchicalVAE whose top-down network it shares, got {type(model).__name__}")
        super().__init__()
        spec = model.spec
        self.spec, self.x_dim, self.z1_dim, self.z2_dim = spec, model.x_dim, model.z1_dim, model.z2_dim
        self.up1 = spec.mlp(self.x_dim)
        self.up2 = spec.mlp(self.up1.out_features, hidden=spec.hidden2)
        self.head1 = spec.normal_head(self.up1.out_features, self.z1_dim)
        self.head2 = spec.normal_head(self.up2.out_features, self.z2_dim)
        self._shared = (model,)  # a plain reference: not a submodule, not in state_dict

    @property
    def model(self) -> HierarchicalVAE:
        """The generative model whose top-down network this guide uses."""
        return self._shared[0]

    def register(self) -> None:
        """Register the guide's bottom-up parameters, and the model's under the model's
        own Pyro names (the same parameters the model registers)."""
        register_module(self.pyro_name, self)
        self.model.register()

    def bottom_up(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The deterministic pass: ``((mu^_1, sigma^_1), (mu^_2, sigma^_2))``."""
        d1 = self.up1(x)
        d2 = self.up2(d1)
        return self.head1(d1), self.head2(d2)

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sites ``z2, z1``, top-down."""
        _no_label(y)
        (loc1_hat, scale1_hat), (loc2, scale2) = self.bottom_up(x)
        z2 = pyro.sample("z2", dist.Normal(loc2, scale2).to_event(1))
        loc1, scale1 = precision_weighted(loc1_hat, scale1_hat, *self.model.z1_prior(z2))
        return pyro.sample("z1", dist.Normal(loc1, scale1).to_event(1))
