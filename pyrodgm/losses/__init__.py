"""Loss classes for :class:`pyro.infer.SVI`, each usable like :class:`~pyro.infer.Trace_ELBO`:
the semi-supervised ELBO and a classifier cross-entropy (Kingma et al.; Maaløe et al.), the
importance-weighted bound (Burda et al.), CaGeM's restricted cross-entropies, the
max-margin terms and the straight-through label gradient (Li et al.), the GMVAE's assignment and metric-embedding losses, and a
weighted sum of terms with per-term gradient restrictions."""

from .base import Loss, Weighted, WeightedSum
from .cagem import ModelClassifierCrossEntropy, cagem_objective
from .elbo import ClassifierCrossEntropy, SemiSupervisedELBO
from .iwae import ImportanceWeightedELBO
from .margin import HatLoss, HingeLoss, LabelBalanceLoss, MarginClassifier, WithoutLabels, max_margin_objective
from .metric import AssignmentLoss, AuxiliaryTaskLoss, LiftedStructuredLoss
from .straight_through import StraightThroughELBO, StraightThroughLabels

__all__ = [
    "Loss", "Weighted", "WeightedSum",
    "SemiSupervisedELBO", "ClassifierCrossEntropy", "ImportanceWeightedELBO",
    "ModelClassifierCrossEntropy", "cagem_objective",
    "HingeLoss", "HatLoss", "LabelBalanceLoss", "MarginClassifier", "WithoutLabels", "max_margin_objective",
    "AssignmentLoss", "AuxiliaryTaskLoss", "LiftedStructuredLoss",
    "StraightThroughELBO", "StraightThroughLabels",
]
