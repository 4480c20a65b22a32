"""Deep generative models for semi-supervised learning, written in Pyro.

``pyrodgm.SemiSupervisedClassifier`` (:mod:`pyrodgm.estimator`) is the scikit-learn
estimator; it is imported on first use, so ``import pyrodgm`` stays cheap."""

__all__ = ["SemiSupervisedClassifier"]


def __getattr__(name: str):
    if name == "SemiSupervisedClassifier":
        from .estimator import SemiSupervisedClassifier

        return SemiSupervisedClassifier
    raise AttributeError(f"module 'pyrodgm' has no attribute {name!r}")
