r"""A linear SVM on learned features, trained Pegasos-style: the VA+Pegasos baselines of
Li, Zhu & Zhang (2016, Sec. 4.1), which fit "a linear SVM classifier on these features
using the Pegasos stochastic subgradient algorithm".

Pegasos (Shalev-Shwartz et al. 2007) minimises :math:`\frac{\lambda}{2}\|w\|^2 +
\frac{1}{n}\sum_i \max(0, 1 - y_i w^\top x_i)` by stochastic subgradient steps of size
:math:`1 / (\lambda t)`.  scikit-learn's :class:`~sklearn.linear_model.SGDClassifier` with
``loss="hinge"``, ``penalty="l2"`` and ``learning_rate="optimal"`` runs the same
iteration (step :math:`1 / (\alpha (t + t_0))`, :math:`t_0` a warm-start offset) with
:math:`\alpha = \lambda`.  The SVM primal :math:`\frac12\|w\|^2 + C\sum_i \text{hinge}_i`
is that objective times :math:`C n` with :math:`\lambda = 1 / (C n)`, so ``C`` maps to
``alpha = 1 / (C n)``.  Multiclass: scikit-learn trains one binary SVM per class
(one-vs-rest) where the authors' Pegasos used the multiclass (Crammer-Singer) hinge loss.

References

[1] `Pegasos: Primal Estimated sub-GrAdient SOlver for SVM`, Shai Shalev-Shwartz, Yoram
    Singer, Nathan Srebro (2007)
[2] `Max-Margin Deep Generative Models for (Semi-)Supervised Learning`, Chongxuan Li,
    Jun Zhu, Bo Zhang (2016), arXiv:1611.07119
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from pyro import poutine
from sklearn.linear_model import SGDClassifier

__all__ = ["fit_linear_svm", "svm_predict", "svm_error", "guide_features"]


def _as_numpy(values, name: str, floating: bool) -> np.ndarray:
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if floating and (array.ndim != 2 or not np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be a floating-point array of shape [N, D], got {array.dtype} {array.shape}")
    if floating and not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or inf")
    if not floating and (array.ndim != 1 or not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be an integer array of shape [N], got {array.dtype} {array.shape}")
    return array


def fit_linear_svm(features, labels, C: float = 1.0, epochs: int = 20, seed: int = 0) -> SGDClassifier:
    """A linear SVM with soft-margin parameter ``C`` fitted on ``features`` ``[N, D]`` and
    integer ``labels`` ``[N]`` by Pegasos-style SGD (module docstring: ``alpha = 1/(C N)``),
    ``epochs`` shuffled passes (Pegasos's ``T = epochs * N`` steps, no early stop)."""
    x = _as_numpy(features, "features", floating=True)
    y = _as_numpy(labels, "labels", floating=False)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"features and labels must have the same, non-zero number of rows, got {x.shape[0]} and {y.shape[0]}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    if len(np.unique(y)) < 2:
        raise ValueError("a classifier needs at least two classes among the labels")
    svm = SGDClassifier(
        loss="hinge", penalty="l2", alpha=1.0 / (C * x.shape[0]), learning_rate="optimal",
        max_iter=epochs, tol=None, random_state=seed,
    )
    return svm.fit(x, y)


def svm_predict(svm: SGDClassifier, features) -> torch.Tensor:
    """The SVM's class for every row of ``features``, as an int64 tensor."""
    return torch.as_tensor(svm.predict(_as_numpy(features, "features", floating=True)), dtype=torch.int64)


def svm_error(svm: SGDClassifier, features, labels) -> float:
    """The fraction of rows the SVM gets wrong."""
    return float((svm_predict(svm, features) != torch.as_tensor(_as_numpy(labels, "labels", floating=False))).float().mean())


@torch.no_grad()
def guide_features(guide: Callable, x: torch.Tensor, site: str = "features", batch_size: int = 1000) -> torch.Tensor:
    """The guide's deterministic ``site`` for every row of ``x`` (eval mode, no
    gradient), ``[N, D]`` on the CPU."""
    was_training = getattr(guide, "training", False)
    if isinstance(guide, torch.nn.Module):
        guide.eval()
    chunks = []
    try:
        with poutine.block():
            for i in range(0, x.shape[0], batch_size):
                trace = poutine.trace(guide).get_trace(x[i : i + batch_size])
                if site not in trace.nodes:
                    raise ValueError(f"the guide has no site '{site}'")
                chunks.append(trace.nodes[site]["value"].cpu())
    finally:
        if isinstance(guide, torch.nn.Module):
            guide.train(was_training)
    return torch.cat(chunks)
