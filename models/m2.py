r"""Kingma et al.'s generative semi-supervised model M2.

Generative story (Kingma et al. 2014, eq. 2)::

    y ~ Cat(pi)                      p(y), uniform
    z ~ N(0, I)                      p(z)
    x ~ f(x; y, z, theta)            p(x|y,z), an MLP of [z, y]

The label is observed for labelled data and a latent variable, summed out exactly by
enumeration in the guide (:class:`pyrodgm.guides.M2Guide`), for unlabelled data; the
bounds are eq. 6-7 and the objective eq. 9 (:class:`pyrodgm.losses.SemiSupervisedELBO`).

References

[1] `Semi-Supervised Learning with Deep Generative Models`, Kingma, Rezende, Mohamed,
    Welling (2014)
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import torch

from pyrodgm.distributions import StandardNormal
from pyrodgm.labels import LabelPrior
from pyrodgm.modeling import PlatedModel, one_hot
from pyrodgm.nets import MLP, likelihood_head


class M2(PlatedModel):
    """``p(y) p(z) p(x|y,z)``.

    :param int x_dim: features per example.
    :param int num_classes: number of classes of ``y``.
    :param int z_dim: latent dimension (50 in the paper).
    :param hidden: hidden widths of the decoder MLP (one layer of 500 in the paper).
    :param str likelihood: ``"bernoulli"`` or ``"gaussian"``.
    """

    pyro_name = "m2"

    def __init__(
        self,
        x_dim: int,
        num_classes: int = 10,
        z_dim: int = 50,
        hidden: Sequence[int] = (500,),
        activation: str = "softplus",
        likelihood: str = "bernoulli",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.x_dim, self.num_classes, self.z_dim, self.likelihood_kind = x_dim, num_classes, z_dim, likelihood
        self.decoder = MLP(z_dim + num_classes, hidden, activation=activation, batch_norm=batch_norm)
        self.likelihood = likelihood_head(likelihood, self.decoder.out_features, x_dim)
        self.register_buffer("y_logits", torch.zeros(num_classes))
        self.register_buffer("z_loc", torch.zeros(z_dim))

    def generate(
        self,
        x: Optional[torch.Tensor],
        y: Optional[torch.Tensor],
        names: tuple[str, str, str] = ("y", "z", "x"),
    ) -> torch.Tensor:
        """The sites ``y, z, x`` under the given names (:class:`~pyrodgm.models.M1M2`
        reuses them as ``y, z2, z1``)."""
        y_name, z_name, x_name = names
        y = pyro.sample(y_name, LabelPrior(logits=self.y_logits), obs=one_hot(y, self.num_classes, self.z_loc))
        z = pyro.sample(z_name, StandardNormal(self.z_loc).to_event(1))
        return pyro.sample(x_name, self.likelihood.distribution(self.decoder(z, y)), obs=x)
