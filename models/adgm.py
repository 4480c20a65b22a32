r"""The auxiliary deep generative model (ADGM) and the skip deep generative model (SDGM) of
Maaløe et al. (2016).

ADGM, generative story (eq. 5; the paper's option ``p(a|x,y,z)`` with ``auxiliary_prior="conditional"``)::

    y ~ Cat(pi)                          p(y), uniform
    z ~ N(0, I)                          p(z)
    x ~ f(x; y, z, theta)                p(x|y,z), an MLP of [z, y]
    a ~ N(0, I)                          p(a)                                  (default)
    a ~ N(mu(x, y, z), sigma^2(x, y, z)) p(a|x,y,z), auxiliary_prior="conditional"

``a`` is *auxiliary*: it leaves the marginal ``p(x, y, z)`` untouched (``∫ p(a|...) da = 1``)
and exists only so that the guide ``q(a|x) q(y|a,x) q(z|y,x)`` (eq. 6,
:class:`pyrodgm.guides.ADGMGuide`) may use a stochastic ``a``: the labelled bound (eq. 7) and
the unlabelled bound (eq. 8, ``y`` summed exactly as in eq. 11) then still bound
``log p(x, y)`` and ``log p(x)``.  With ``p(a|x,y,z)`` the site ``a`` is drawn *after* ``x``
(it conditions on the data); with ``p(a)`` it is drawn first.  ``auxiliary_prior="none"``
leaves ``a`` out of the model altogether, for the paper's Fig. 2a ablation with a
deterministic auxiliary unit (the guide's ``deterministic_auxiliary=True``).

SDGM (Maaløe et al. 2016, the "skip" variant; Table 1's 1.32% on MNIST with 100 labels)::

    y ~ Cat(pi)                          p(y)
    z ~ N(0, I)                          p(z)
    a ~ N(mu(z, y), sigma^2(z, y))       p(a|z,y)
    x ~ f(x; a, z, y, theta)             p(x|a,z,y), skip connections from z and y

Here ``a`` is a latent variable of the generative model itself (a second stochastic layer
with skip connections), inferred by the same guide family ``q(a|x) q(y|a,x) q(z|a,y,x)``.

Both models are trained with :class:`pyrodgm.losses.SemiSupervisedELBO`, whose ``alpha`` term
is ``-log E_q(a|x)[q(y|a,x)]`` (eq. 9-10), and predict with
:func:`pyrodgm.evaluation.predict_proba`, which averages ``q(y|a,x)`` over samples of ``a``.

Networks: MLPs (2x500 ReLU in the paper), Glorot-initialised (``init="xavier"``); Gaussian
layers output a mean and a positive scale (``scale="softplus"``, or ``"exp"`` for the paper's
log-variance parameterisation, up to a factor 2).

References

[1] `Auxiliary Deep Generative Models`, Lars Maaløe, Casper K. Sønderby, Søren K. Sønderby,
    Ole Winther (2016)
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrodgm.distributions import StandardNormal
from pyrodgm.modeling import PlatedModel, one_hot
from pyrodgm.nets import AuxiliarySpec, GaussianMLP, init_weights_, likelihood_head

__all__ = ["ADGM", "SDGM", "AUXILIARY_PRIORS"]

#: The choices of :class:`ADGM`'s ``auxiliary_prior``.
AUXILIARY_PRIORS = ("conditional", "standard", "none")


class _LabelledLatentModel(PlatedModel):
    """Shared parts of :class:`ADGM` and :class:`SDGM`: the priors ``p(y)`` (uniform),
    ``p(z) = N(0, I)`` and, for :class:`ADGM`'s ``"standard"`` option, ``p(a) = N(0, I)``,
    and the likelihood head."""

    def _init_shared(self, spec: AuxiliarySpec, likelihood: str) -> None:
        self.spec, self.likelihood_kind = spec, likelihood
        self.x_dim, self.num_classes, self.z_dim, self.a_dim = spec.x_dim, spec.num_classes, spec.z_dim, spec.a_dim
        self.register_buffer("y_logits", torch.zeros(spec.num_classes))
        self.register_buffer("z_loc", torch.zeros(spec.z_dim))
        self.register_buffer("a_loc", torch.zeros(spec.a_dim))

    @staticmethod
    def _likelihood(spec: AuxiliarySpec, kind: str, in_features: int) -> nn.Module:
        return init_weights_(likelihood_head(kind, in_features, spec.x_dim), spec.init)

    def _sample_y(self, y: Optional[torch.Tensor]) -> torch.Tensor:
        return pyro.sample("y", dist.OneHotCategorical(logits=self.y_logits), obs=one_hot(y, self.num_classes, self.z_loc))

    def _sample_z(self) -> torch.Tensor:
        return pyro.sample("z", StandardNormal(self.z_loc).to_event(1))


class ADGM(_LabelledLatentModel):
    """``p(a) p(y) p(z) p(x|y,z)`` (default, eq. 5), ``p(y) p(z) p(x|y,z) p(a|x,y,z)``
    (``auxiliary_prior="conditional"``) or ``p(y) p(z) p(x|y,z)`` (``"none"``, for a
    guide with a deterministic auxiliary unit).  Sites ``"y"``, ``"z"``, ``"x"``, ``"a"``.

    :param AuxiliarySpec spec: the sizes and layers shared with the guide: ``x_dim``,
        ``num_classes``, ``z_dim`` and ``a_dim`` (100 and 100 in the paper), the ``hidden``
        widths of every MLP (two layers of 500), ``activation`` (``"relu"``),
        ``batch_norm`` (not used in the paper), ``init`` (``"xavier"``, Glorot, the paper's)
        and the Gaussian ``scale`` parameterisation.
    :param str likelihood: ``"bernoulli"`` or ``"gaussian"``.
    :param str auxiliary_prior: ``"conditional"``, ``"standard"`` or ``"none"``.
    """

    pyro_name = "adgm"

    def __init__(self, spec: AuxiliarySpec, likelihood: str = "bernoulli", auxiliary_prior: str = "standard") -> None:
        super().__init__()
        if auxiliary_prior not in AUXILIARY_PRIORS:
            raise ValueError(f"auxiliary_prior must be one of {AUXILIARY_PRIORS}, got {auxiliary_prior!r}")
        self.auxiliary_prior = auxiliary_prior
        self.decoder = spec.mlp(spec.z_dim + spec.num_classes)
        self.likelihood = self._likelihood(spec, likelihood, self.decoder.out_features)
        self.auxiliary: Optional[GaussianMLP] = None
        if auxiliary_prior == "conditional":
            self.auxiliary = spec.gaussian(spec.x_dim + spec.num_classes + spec.z_dim, spec.a_dim)
        self._init_shared(spec, likelihood)

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        """``a`` first (standard prior), ``y, z, x``, then ``a`` given ``x, y, z``
        (conditional prior)."""
        if self.auxiliary_prior == "standard":
            pyro.sample("a", StandardNormal(self.a_loc).to_event(1))
        y = self._sample_y(y)
        z = self._sample_z()
        x = pyro.sample("x", self.likelihood.distribution(self.decoder(z, y)), obs=x)
        if self.auxiliary is not None:
            pyro.sample("a", self.auxiliary.distribution(x, y, z))
        return x


class SDGM(_LabelledLatentModel):
    """``p(y) p(z) p(a|z,y) p(x|a,z,y)``: the auxiliary ``a`` is a latent of the generative
    model.  Sites ``"y"``, ``"z"``, ``"a"``, ``"x"``.  Parameters as for :class:`ADGM`."""

    pyro_name = "sdgm"

    def __init__(self, spec: AuxiliarySpec, likelihood: str = "bernoulli") -> None:
        super().__init__()
        self.auxiliary = spec.gaussian(spec.z_dim + spec.num_classes, spec.a_dim)
        self.decoder = spec.mlp(spec.a_dim + spec.z_dim + spec.num_classes)
        self.likelihood = self._likelihood(spec, likelihood, self.decoder.out_features)
        self._init_shared(spec, likelihood)

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        """``y, z``, then ``a`` given ``z, y``, then ``x`` given ``a, z, y``."""
        y = self._sample_y(y)
        z = self._sample_z()
        a = pyro.sample("a", self.auxiliary.distribution(z, y))
        return pyro.sample("x", self.likelihood.distribution(self.decoder(a, z, y)), obs=x)
