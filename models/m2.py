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

from typing import Optional

import pyro
import torch

from pyrodgm.distributions import StandardNormal
from pyrodgm.labels import LabelPrior
from pyrodgm.modeling import PlatedModel, one_hot
from pyrodgm.nets import MLPSpec, init_weights_, likelihood_head


class M2(PlatedModel):
    """``p(y) p(z) p(x|y,z)``.

    :param MLPSpec spec: ``x_dim``, ``num_classes``, ``z_dim`` (50 in the paper) and the
        decoder MLP's ``hidden`` widths (one layer of 500), shared with the guide.
    :param str likelihood: ``"bernoulli"`` or ``"gaussian"``.
    """

    pyro_name = "m2"

    def __init__(self, spec: MLPSpec, likelihood: str = "bernoulli") -> None:
        super().__init__()
        self.spec, self.likelihood_kind = spec, likelihood
        self.x_dim, self.num_classes, self.z_dim = spec.x_dim, spec.num_classes, spec.z_dim
        self.decoder = spec.mlp(spec.z_dim + spec.num_classes)
        self.likelihood = likelihood_head(likelihood, self.decoder.out_features, spec.x_dim)
        self.register_buffer("y_logits", torch.zeros(spec.num_classes))
        self.register_buffer("z_loc", torch.zeros(spec.z_dim))
        init_weights_(self, spec.init)

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
