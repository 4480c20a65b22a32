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

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.distributions import StandardNormal
from pyrodgm.modeling import PlatedModel, one_hot
from pyrodgm.nets import MLP, GaussianMLP, likelihood_head

__all__ = ["CaGeM"]


class CaGeM(PlatedModel):
    """``p(z2) p(y|z2) p(z1|y,z2) p(x|y,z1)``.  Sites ``"z2"``, ``"y"`` (one-hot, ``K``
    categories), ``"z1"``, ``"x"``.

    :param int x_dim: features per example.
    :param int num_clusters: ``K``, the categories of ``y`` (the number of classes when
        trained with labels).
    :param int z1_dim: dimension of the lower latent ``z1`` (64 in the paper).
    :param int z2_dim: dimension of the top latent ``z2`` (32 in the paper).
    :param hidden: hidden widths of ``p(x|y,z1)`` (two layers of 1024).
    :param latent_hidden: hidden widths of ``p(y|z2)`` and ``p(z1|y,z2)`` (two of 512).
    :param str activation: hidden activation (``"relu"``).
    :param bool batch_norm: batch-norm in the hidden layers (the paper's).
    :param str likelihood: ``"bernoulli"`` or ``"gaussian"``.
    :param float min_scale: floor of every Gaussian scale (not in the paper): a numerical
        guard, since without labels the prior ``p(z1|y,z2)`` of a cluster that ``q(y|x)``
        stops using is unconstrained and its ``exp`` scale underflows until ``log p(z1|y,z2)``
        is ``-inf`` (an unsupervised MNIST run diverged in its second epoch without it).
    :param str scale: Gaussian scale parameterisation, ``"exp"`` (the paper's
        ``log sigma^2 = Linear(d)``) or ``"softplus"``.
    """

    pyro_name = "cagem"

    def __init__(
        self,
        x_dim: int,
        num_clusters: int = 10,
        z1_dim: int = 64,
        z2_dim: int = 32,
        hidden: Sequence[int] = (1024, 1024),
        latent_hidden: Sequence[int] = (512, 512),
        activation: str = "relu",
        batch_norm: bool = True,
        likelihood: str = "bernoulli",
        scale: str = "exp",
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        for name, value in (("x_dim", x_dim), ("num_clusters", num_clusters), ("z1_dim", z1_dim), ("z2_dim", z2_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be at least 2, got {num_clusters}")
        self.x_dim, self.num_clusters, self.z1_dim, self.z2_dim = x_dim, num_clusters, z1_dim, z2_dim
        self.likelihood_kind = likelihood
        #: theta_y of App. B: the parameters of p(y|z2)
        self.cluster_prior = MLP(z2_dim, latent_hidden, out_dim=num_clusters, activation=activation, batch_norm=batch_norm)
        self.z1_prior = GaussianMLP(num_clusters + z2_dim, latent_hidden, z1_dim, activation, batch_norm, "default", scale, min_scale)
        self.decoder = MLP(z1_dim + num_clusters, hidden, activation=activation, batch_norm=batch_norm)
        self.likelihood = likelihood_head(likelihood, self.decoder.out_features, x_dim)
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
