r"""The Cluster-aware Generative Model (CaGeM) of Maaløe, Fraccaro and Winther (2017).

Generative story (Sec. 3, the joint below eq. 1; Fig. 1)::

    z2 ~ N(0, I)                                 p(z2)
    y  ~ Cat(pi(z2))                             p(y|z2), K clusters (classes when labelled)
    z1 ~ N(mu(y, z2), diag sigma^2(y, z2))       p(z1|y,z2)
    x  ~ f(x; y, z1, theta)                      p(x|y,z1), Bernoulli for binarised images

so that :math:`p(x, z_1, z_2) = \sum_y p(x|y,z_1)\,p(z_1|y,z_2)\,p(y|z_2)\,p(z_2)`.  The
categorical ``y`` depends on ``z2`` alone, so ``z2`` must stay active for the model to
represent clusters (App. A); ``z1`` and ``x`` also see ``y``.  ``K`` (``num_clusters``) is
free (5, 10 and 20 in Table 1 for the unsupervised CaGeM-0); with labels ``K`` equals the
number of classes (Sec. 4) and ``y`` is then observed for the labelled examples.

The guide is :class:`pyrodgm.guides.cagem.CaGeMGuide` (Sec. 3.1,
``q(z1|x) q(y|z1,x) q(z2|x,y,z1)``, ``y`` summed exactly).  The semi-supervised objective
of Sec. 4 / App. B (the ELBO on unlabelled data plus the cross-entropies of the two
classifiers ``p(y|x)`` and ``q(y|x)``, which update only the networks into ``y``) is
:func:`pyrodgm.losses.cagem.cagem_objective`.  Random samples draw ``y ~ p(y|z2)``; class
(cluster) conditional samples observe ``y`` (App. D, Fig. 3).

Architecture (App. C; the defaults): every Gaussian is ``d = NN(inputs)``,
``mu = Linear(d)``, ``log sigma^2 = Linear(d)`` (``scale="exp"``: ``sigma = exp(Linear(d))``,
the same family); NNs are two dense layers with batch-norm and ReLU, of 1024 units for the
networks at the ``x``/``z1`` level (``p(x|y,z1)``) and 512 for those between the latent
layers (``p(y|z2)``, ``p(z1|y,z2)``); ``dim(z1) = 64``, ``dim(z2) = 32``; the Bernoulli
output is a dense layer of logits (a sigmoid output).

References

[1] `Semi-Supervised Generation with Cluster-aware Generative Models`, Lars Maaløe, Marco
    Fraccaro, Ole Winther (2017)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.distributions import StandardNormal
from pyrodgm.modeling import PlatedModel, one_hot
from pyrodgm.nets import TwoLayerSpec, likelihood_head

__all__ = ["CaGeM", "CaGeMSpec"]


@dataclass(frozen=True)
class CaGeMSpec(TwoLayerSpec):
    """A :class:`~pyrodgm.nets.TwoLayerSpec` with CaGeM's defaults (App. C): ``K`` 10, z1
    64, z2 32, 2x1024 and 2x512 ReLU with batch norm, ``exp`` scales floored at 1e-3."""

    z_dim: int = 64
    hidden: tuple[int, ...] = (1024, 1024)
    activation: str = "relu"
    batch_norm: bool = True
    init: str = "default"
    scale: str = "exp"
    min_scale: float = 1e-3
    z2_dim: int = 32
    hidden2: tuple[int, ...] = (512, 512)


def check_sizes(spec: TwoLayerSpec) -> None:
    """``x_dim``, ``z_dim``, ``z2_dim`` positive integers, ``num_classes`` (``K``) at least 2."""
    for name in ("x_dim", "num_classes", "z_dim", "z2_dim"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if spec.num_classes < 2:
        raise ValueError(f"num_classes (K, the clusters) must be at least 2, got {spec.num_classes}")


class CaGeM(PlatedModel):
    """``p(z2) p(y|z2) p(z1|y,z2) p(x|y,z1)``.  Sites ``"z2"``, ``"y"`` (one-hot, ``K``
    categories), ``"z1"``, ``"x"``.

    :param CaGeMSpec spec: the sizes and layers shared with the guide: ``x_dim``;
        ``num_classes``, ``K``, the categories of ``y`` (the number of classes when trained
        with labels); ``z_dim``, ``z1``'s units (64 in the paper); ``z2_dim`` (32);
        ``hidden``, the widths of ``p(x|y,z1)`` (two layers of 1024); ``hidden2``, those
        of ``p(y|z2)`` and ``p(z1|y,z2)`` (two of 512); ``activation`` (``"relu"``);
        ``batch_norm`` (the paper's); ``scale``, the Gaussian scale parameterisation
        (``"exp"``, the paper's ``log sigma^2 = Linear(d)``, or ``"softplus"``); and
        ``min_scale``, a floor of every Gaussian scale (not in the paper): a numerical
        guard, since without labels the prior ``p(z1|y,z2)`` of a cluster that ``q(y|x)``
        stops using is unconstrained and its ``exp`` scale underflows until
        ``log p(z1|y,z2)`` is ``-inf`` (an unsupervised MNIST run diverged in its second
        epoch without it).
    :param str likelihood: ``"bernoulli"`` or ``"gaussian"``.
    """

    pyro_name = "cagem"

    def __init__(self, spec: TwoLayerSpec, likelihood: str = "bernoulli") -> None:
        super().__init__()
        check_sizes(spec)
        num_clusters, z1_dim, z2_dim = spec.num_classes, spec.z_dim, spec.z2_dim
        self.spec, self.x_dim, self.num_clusters, self.z1_dim, self.z2_dim = spec, spec.x_dim, num_clusters, z1_dim, z2_dim
        self.likelihood_kind = likelihood
        #: theta_y of App. B: the parameters of p(y|z2)
        self.cluster_prior = spec.mlp(z2_dim, out_dim=num_clusters, hidden=spec.hidden2)
        self.z1_prior = spec.gaussian(num_clusters + z2_dim, z1_dim, hidden=spec.hidden2)
        self.decoder = spec.mlp(z1_dim + num_clusters)
        self.likelihood = likelihood_head(likelihood, self.decoder.out_features, spec.x_dim)
        self.register_buffer("z2_loc", torch.zeros(z2_dim))

    @property
    def num_classes(self) -> int:
        """``K``: what the label site holds (class-conditional sample grids use it)."""
        return self.num_clusters

    def generate(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> torch.Tensor:
        """``z2``, then ``y`` given ``z2`` (observed when labels are given), ``z1`` given
        ``y, z2``, ``x`` given ``y, z1``."""
        z2 = pyro.sample("z2", StandardNormal(self.z2_loc).to_event(1))
        y = pyro.sample("y", self.cluster_distribution(z2), obs=one_hot(y, self.num_clusters, self.z2_loc))
        z1 = pyro.sample("z1", self.z1_prior.distribution(y, z2))
        return pyro.sample("x", self.likelihood.distribution(self.decoder(z1, y)), obs=x)

    def cluster_distribution(self, z2: torch.Tensor) -> dist.TorchDistribution:
        """``p(y|z2)``, a one-hot categorical over the ``K`` clusters."""
        return dist.OneHotCategorical(logits=self.cluster_prior(z2))
