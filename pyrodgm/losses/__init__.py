"""Loss classes for :class:`pyro.infer.SVI`: the semi-supervised ELBO, a classifier
cross-entropy, and a weighted sum of terms with per-term gradient restrictions."""

from .base import Loss, Weighted, WeightedSum
from .elbo import ClassifierCrossEntropy, SemiSupervisedELBO

__all__ = ["Loss", "Weighted", "WeightedSum", "SemiSupervisedELBO", "ClassifierCrossEntropy"]
