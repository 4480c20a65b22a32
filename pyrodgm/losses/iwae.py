r"""The importance-weighted bound of Burda et al. (2016) as a training loss.

For ``k`` samples :math:`z_1, \dots, z_k \sim q(z|x)` the bound (eq. 8)

.. math:: \mathcal L_k(x) = \mathbb E\Big[\log \frac1k \sum_{j=1}^k w_j\Big],
          \qquad w_j = \frac{p(x, z_j)}{q(z_j|x)},

is a lower bound on :math:`\log p(x)` that tightens as ``k`` grows (Theorem 1);
:math:`\mathcal L_1` is the ELBO.  Its reparameterised gradient weighs each
sample's :math:`\nabla \log w_j` by its normalised weight :math:`\tilde w_j` (Sec. 3), which is
what autograd computes from :math:`\log \frac1k \sum_j w_j`.

The weights come from :mod:`pyrodgm.traces` exactly as the evaluator's do
(:func:`~pyrodgm.evaluation.iwae_log_likelihood`): ``k`` vectorised particles, the guide's
enumerated discrete sites summed exactly inside each weight
(:meth:`~pyrodgm.traces.TraceTerms.importance_log_weights`), so on the same random numbers
the loss is minus the evaluator's estimate summed over the batch.

KL warm-up (Sønderby et al. 2016) carries over as a tempered weight: with
``latent_weights={"z": beta}`` each :math:`\log w_j` becomes
:math:`\log p(x|z_j) + \beta\,(\log p(z_j) - \log q(z_j|x))` (via
:class:`~pyrodgm.traces.ScaleLatents`, as in the ELBO), a bound on :math:`\log p(x)` again
at :math:`\beta = 1`.

References

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)
[2] `Ladder Variational Autoencoders`, Casper K. Sønderby, Tapani Raiko, Lars Maaløe,
    Søren K. Sønderby, Ole Winther (2016)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..traces import check_reparameterized
from .elbo import _TracingLoss

__all__ = ["ImportanceWeightedELBO"]


class ImportanceWeightedELBO(_TracingLoss):
    r"""Minus the IWAE bound :math:`\sum_n \log \frac1k \sum_{j=1}^k w_{nj}` of a batch, for
    :class:`~pyro.infer.SVI` (``svi.step(x)``).

    Every sample site must sit in ``pyro.plate("data", ...)``; every continuous guide site
    must be reparameterised; discrete guide sites marked
    ``infer={"enumerate": "parallel"}`` are summed exactly.  Labels are not taken: this is
    the unsupervised bound.

    :param int num_particles: ``k``, the importance samples per datapoint (vectorised).
    :param max_plate_nesting: plate dims of the model; guessed on the first call if omitted.
    :param latent_weights: site name -> weight of that latent's ``log p - log q`` inside each
        importance weight (KL warm-up); the attribute may be changed between steps.
    :ivar dict last_components: ``{"iwae_bound": ...}`` of the last call (detached).
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        latent_weights: Optional[dict[str, float]] = None,
    ) -> None:
        super().__init__(num_particles, max_plate_nesting, analytic_kl=False, latent_weights=latent_weights)

    def log_weights(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """``log w`` of each particle and datapoint, a ``(num_particles, batch)`` tensor."""
        terms = self._terms(model, guide, args, kwargs)
        check_reparameterized(terms.guide_trace, type(self).__name__)
        return terms.importance_log_weights()

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        log_weights = self.log_weights(model, guide, *args, **kwargs)
        bound = (log_weights.logsumexp(0) - math.log(self.num_particles)).sum()
        self.last_components = {"iwae_bound": bound.detach()}
        return -bound
