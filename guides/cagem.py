r"""The inference network of CaGeM (Maaløe et al. 2017, Sec. 3.1)::

    q(z1|x)        = N(z1 | mu(x), diag sigma^2(x))                 drawn first
    q(y|z1,x)      = Cat(y | pi(z1, x))                              enumerated (summed exactly)
    q(z2|x,y,z1)   = N(z2 | mu(x, y, z1), diag sigma^2(x, y, z1))    skip connection x -> z2

a bottom-up network reversing every arrow of the generative model
(:class:`pyrodgm.models.cagem.CaGeM`); the skip connection from ``x`` to ``z2`` is the paper's
(footnote 1: +0.18 nats), ``skip=False`` drops it.  For unlabelled data ``y`` is marked
for parallel enumeration, so the ELBO of Sec. 3.1,
:math:`\mathbb E_{q(z_1|x)}[\sum_y q(y|z_1,x)\,\mathbb E_{q(z_2|x,y,z_1)}[\log p/q]]`, sums it
exactly; with labels it is observed.

The inference classifier is :math:`q(y|x) = \mathbb E_{q(z_1|x)}[q(y|z_1,x)]` (Sec. 4, item 1),
what :func:`pyrodgm.evaluation.predict_proba` computes; ``classifier`` and
``classifier_head`` hold its parameters, the ``phi_y`` of App. B.

Networks (App. C): as in the model, those reading ``x`` (``q(z1|x)``, ``q(y|z1,x)``) have
``hidden`` widths (2 x 1024), the z2 encoder, whose ``x`` input is the skip connection, has
``latent_hidden`` widths (2 x 512); batch-norm and ReLU between dense layers.

References

[1] `Semi-Supervised Generation with Cluster-aware Generative Models`, Lars Maaløe, Marco
    Fraccaro, Ole Winther (2017)
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.modeling import PlatedGuide, one_hot
from pyrodgm.models.cagem import check_sizes
from pyrodgm.nets import CategoricalHead, TwoLayerSpec

__all__ = ["CaGeMGuide"]


class CaGeMGuide(PlatedGuide):
    """``q(z1|x) q(y|z1,x) q(z2|x,y,z1)``.  Sites ``"z1"``, ``"y"``, ``"z2"``.  ``spec``:
    the model's (:class:`~pyrodgm.models.cagem.CaGeM`); and

    :param bool skip: the skip connection ``x -> z2``.
    """

    pyro_name = "cagem_guide"

    def __init__(self, spec: TwoLayerSpec, skip: bool = True) -> None:
        super().__init__()
        check_sizes(spec)
        self.spec, self.x_dim, self.num_clusters, self.z1_dim, self.z2_dim = spec, spec.x_dim, spec.num_classes, spec.z_dim, spec.z2_dim
        self.skip = skip
        self.z1_encoder = spec.gaussian(spec.x_dim, spec.z_dim)
        #: phi_y of App. B: the parameters of q(y|z1,x)
        self.classifier = spec.mlp(spec.x_dim + spec.z_dim)
        self.classifier_head = CategoricalHead(self.classifier.out_features, spec.num_classes)
        z2_in = spec.num_classes + spec.z_dim + (spec.x_dim if skip else 0)
        self.z2_encoder = spec.gaussian(z2_in, spec.z2_dim, hidden=spec.hidden2)

    @property
    def num_classes(self) -> int:
        return self.num_clusters

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``z1`` (``[particles, B, z1_dim]``), ``y`` (enumerated when not given,
        ``[K, 1, 1, K]``), then ``z2`` (``[K, particles, B, z2_dim]``)."""
        z1 = pyro.sample("z1", self.z1_encoder.distribution(x))
        if y is None:
            y = pyro.sample("y", self.classify(z1, x), infer={"enumerate": "parallel"})
        else:
            y = one_hot(y, self.num_clusters, x)
        inputs = (x, y, z1) if self.skip else (y, z1)
        return pyro.sample("z2", self.z2_encoder.distribution(*inputs))

    def classify(self, z1: torch.Tensor, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(y|z1,x)``."""
        return self.classifier_head.distribution(self.classifier(x, z1))

    def label_distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """``q(y|z1,x)`` at the mean of ``q(z1|x)`` (a point prediction;
        :func:`pyrodgm.evaluation.predict_proba` averages over samples of ``z1``)."""
        return self.classify(self.z1_encoder(x)[0], x)
