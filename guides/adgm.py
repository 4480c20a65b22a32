r"""The guide of the ADGM and the SDGM (Maaløe et al. 2016, eq. 6)::

    q(a|x)     = N(a | mu(x), diag sigma^2(x))        drawn first
    q(y|a,x)   = Cat(y | pi(a, x))                    the classifier, enumerated for unlabelled data
    q(z|y,x)   = N(z | mu(y, x), diag sigma^2(y, x))  (q(z|a,y,x) with z_sees_a=True, the SDGM's)

The classifier of the model is ``E_q(a|x)[q(y|a,x)]``: :func:`pyrodgm.evaluation.predict_proba`
averages the categorical at ``y`` over samples of ``a`` (100 in the paper), and the
``alpha`` term of :class:`pyrodgm.losses.SemiSupervisedELBO` is ``-log`` of it, averaged over
the loss's particles (eq. 9).

**Deterministic auxiliary unit** (``deterministic_auxiliary=True``, the paper's Fig. 2a
ablation): ``a = f(x)`` is a linear layer on the auxiliary MLP and *no* site ``"a"`` is
sampled, so the classifier is ``q(y|f(x), x)``.  The matching model has no ``a`` either
(:class:`pyrodgm.models.ADGM` with ``auxiliary_prior="none"``), and the bound is then M2's
bound, valid as it stands.  A :class:`~pyro.distributions.Delta` site would not do: its
"log-density" is 0 at its point, so ``log p(a=f(x)|...) - log q(a|x)`` would add a density
of the model at a point with no entropy term to pay for it, which is no bound on
``log p(x)`` at all (a conditional ``p(a|x,y,z)`` could shrink its scale around ``f(x)`` and
send the objective to infinity); the model and guide would also disagree about which
sites are latent.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.modeling import PlatedGuide, one_hot
from pyrodgm.nets import AuxiliarySpec, CategoricalHead

__all__ = ["ADGMGuide"]


class ADGMGuide(PlatedGuide):
    """``q(a|x) q(y|a,x) q(z|y,x)`` (or ``q(z|a,y,x)``); ``y`` is marked for parallel
    enumeration when no labels are given.  Sites ``"a"``, ``"y"``, ``"z"``.

    :param AuxiliarySpec spec: the model's sizes and layers (:class:`~pyrodgm.models.ADGM`).
    :param bool z_sees_a: ``q(z|a,y,x)`` instead of ``q(z|y,x)`` (the SDGM's encoder).
    :param bool deterministic_auxiliary: ``a = f(x)``, no site ``"a"`` (module docstring).
    :param bool learn_auxiliary: ``False`` keeps ``q(a|x)`` at its initial weights (no
        gradient reaches them; the ADGM authors' code of Dec 2015 left them out of the
        update, making ``a`` a fixed random noisy projection of ``x``).
    """

    pyro_name = "adgm_guide"

    def __init__(
        self, spec: AuxiliarySpec, z_sees_a: bool = False, deterministic_auxiliary: bool = False, learn_auxiliary: bool = True
    ) -> None:
        super().__init__()
        self.learn_auxiliary = learn_auxiliary
        self.spec, self.x_dim, self.num_classes, self.z_dim, self.a_dim = spec, spec.x_dim, spec.num_classes, spec.z_dim, spec.a_dim
        self.z_sees_a, self.deterministic_auxiliary = z_sees_a, deterministic_auxiliary
        if deterministic_auxiliary:
            self.auxiliary = spec.mlp(spec.x_dim, out_dim=spec.a_dim)
        else:
            self.auxiliary = spec.gaussian(spec.x_dim, spec.a_dim)
        self.classifier = spec.mlp(spec.x_dim + spec.a_dim)
        self.classifier_head = CategoricalHead(self.classifier.out_features, spec.num_classes, init=spec.init)
        encoder_in = spec.x_dim + spec.num_classes + (spec.a_dim if z_sees_a else 0)
        self.encoder = spec.gaussian(encoder_in, spec.z_dim)

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a`` (``[particles, B, a_dim]`` under a particle plate), then ``y`` (enumerated
        when not given, ``[K, 1, 1, K]``), then ``z`` (``[K, particles, B, z_dim]``)."""
        a = self.auxiliary_sample(x)
        if y is None:
            y = pyro.sample("y", self.classify(a, x), infer={"enumerate": "parallel"})
        else:
            y = one_hot(y, self.num_classes, x)
        inputs = (x, y, a) if self.z_sees_a else (x, y)
        return pyro.sample("z", self.encoder.distribution(*inputs))

    def auxiliary_sample(self, x: torch.Tensor) -> torch.Tensor:
        """``a ~ q(a|x)`` at the site ``"a"``, or ``a = f(x)`` for a deterministic unit."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.learn_auxiliary):
            if self.deterministic_auxiliary:
                return self.auxiliary(x)
            q_a = self.auxiliary.distribution(x)
        return pyro.sample("a", q_a)

    def classify(self, a: torch.Tensor, x: torch.Tensor) -> dist.TorchDistribution:
        """The classifier ``q(y|a,x)``."""
        return self.classifier_head.distribution(self.classifier(x, a))

    def label_distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(y|a,x)`` at the mean of ``q(a|x)`` (a quick point prediction;
        :func:`pyrodgm.evaluation.predict_proba` averages over samples of ``a``, which is
        the model's classifier)."""
        a = self.auxiliary(x) if self.deterministic_auxiliary else self.auxiliary(x)[0]
        return self.classify(a, x)
