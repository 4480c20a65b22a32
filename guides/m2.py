r"""The amortised guide of M2 (Kingma et al. 2014, eq. 4)::

    q(y|x)   = Cat(pi(x))                 the classifier, enumerated for unlabelled data
    q(z|x,y) = N(mu(x, y), diag sigma^2(x, y))

``label_mode`` (:mod:`pyrodgm.labels`) switches the unlabelled ``y`` from exact enumeration
(the default, Kingma et al.'s sum over classes) to a Gumbel-softmax sample, plain
(``"relaxed"``) or straight-through, at the guide's ``temperature``; the ELBO then keeps the
categorical KL of ``q(y|x)`` to ``p(y)`` in closed form.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrodgm.labels import RelaxableLabel
from pyrodgm.modeling import PlatedGuide, one_hot
from pyrodgm.nets import CategoricalHead, MLPSpec, init_weights_


class M2Guide(RelaxableLabel, PlatedGuide):
    """``q(y|x) q(z|x,y)``; ``y`` is marked for parallel enumeration (``label_mode=
    "enumerate"``) or sampled from a Gumbel-softmax at ``temperature`` (``"relaxed"``,
    ``"straight-through"``), see :mod:`pyrodgm.labels`.  ``spec``: the model's
    (:class:`~pyrodgm.models.M2`)."""

    pyro_name = "m2_guide"

    def __init__(self, spec: MLPSpec, label_mode: str = "enumerate", temperature: float = 1.0) -> None:
        super().__init__()
        self.label_mode, self.temperature = label_mode, temperature
        self.spec, self.x_dim, self.num_classes, self.z_dim = spec, spec.x_dim, spec.num_classes, spec.z_dim
        self.classifier = spec.mlp(spec.x_dim)
        self.classifier_head = CategoricalHead(self.classifier.out_features, spec.num_classes)
        self.encoder = spec.mlp(spec.x_dim + spec.num_classes)
        self.encoder_head = spec.normal_head(self.encoder.out_features, spec.z_dim)
        init_weights_(self, spec.init)

    def infer(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, names: tuple[str, str] = ("y", "z")) -> torch.Tensor:
        """The sites ``y, z`` under the given names; ``y`` is sampled (enumerated) only when
        no labels are given, as in Pyro's semi-supervised VAE idiom."""
        if y is None:
            y = self.sample_label(names[0], self.classifier_head(self.classifier(x)))
        else:
            y = one_hot(y, self.num_classes, x)
        return pyro.sample(names[1], self.encoder_head.distribution(self.encoder(x, y)))

    def label_distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """The classifier ``q(y|x)``."""
        return self.classifier_head.distribution(self.classifier(x))
