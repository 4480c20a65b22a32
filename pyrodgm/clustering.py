r"""Clustering evaluation of a guide's classifier (Arias Figueroa & Rivera 2019, Sec.
5.3.1): the clustering accuracy (ACC) and the normalized mutual information (NMI).

* ACC (Xie et al. 2016) is the accuracy under the best one-to-one map :math:`m` of
  clusters to classes, :math:`\max_m \frac1N \sum_i I(t_i = m(c_i))`, found by the
  Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment`) on the
  clusters-by-classes contingency matrix.  The matrix may be rectangular (more or fewer
  clusters than classes): unmatched clusters count as errors.
* NMI (Strehl & Ghosh 2002) is :func:`sklearn.metrics.normalized_mutual_info_score`,
  :math:`I(c; t) / \text{mean}(H(c), H(t))` with the arithmetic mean by default
  (scikit-learn's default since 0.22, the common choice); ``"geometric"`` is Strehl &
  Ghosh's original normalisation.

Both are returned as fractions in ``[0, 1]`` (the paper reports percentages).

References

[1] `Semi-Supervised Learning using Deep Generative Models and Auxiliary Tasks`,
    Jhosimar Arias Figueroa, Adín Ramírez Rivera (2019)
[2] `Unsupervised Deep Embedding for Clustering Analysis`, Junyuan Xie, Ross Girshick,
    Ali Farhadi (2016)
[3] `Cluster Ensembles - A Knowledge Reuse Framework for Combining Multiple Partitions`,
    Alexander Strehl, Joydeep Ghosh (2002)
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from .evaluation import predict_proba

__all__ = ["clustering_accuracy", "normalized_mutual_info", "cluster_assignments", "clustering_metrics"]

Labels = Union[torch.Tensor, np.ndarray, Sequence[int]]
AVERAGE_METHODS = ("arithmetic", "geometric", "min", "max")


def _as_labels(values: Labels, name: str) -> np.ndarray:
    """A 1-D, non-empty integer numpy array, or a TypeError/ValueError naming the problem."""
    if torch.is_tensor(values):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if array.dtype.kind == "f":
        if np.isnan(array).any():
            raise ValueError(f"{name} contains NaN: labels must be integers")
        raise TypeError(f"{name} must hold integer labels, got dtype {array.dtype}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer labels, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {array.shape}")
    return array


def _pair(pred: Labels, true: Labels) -> tuple[np.ndarray, np.ndarray]:
    pred, true = _as_labels(pred, "pred"), _as_labels(true, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same length, got {pred.shape[0]} and {true.shape[0]}")
    return pred, true


def clustering_accuracy(pred: Labels, true: Labels) -> float:
    """ACC: the fraction of examples whose cluster maps to their class under the best
    one-to-one map of clusters to classes (module docstring)."""
    pred, true = _pair(pred, true)
    counts = contingency_matrix(pred, true)  # clusters x classes
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / pred.shape[0])


def normalized_mutual_info(pred: Labels, true: Labels, average_method: str = "arithmetic") -> float:
    """NMI of the clustering ``pred`` and the classes ``true``, normalised by the
    ``average_method`` mean of their entropies (module docstring)."""
    if average_method not in AVERAGE_METHODS:
        raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")
    pred, true = _pair(pred, true)
    return float(normalized_mutual_info_score(true, pred, average_method=average_method))


@torch.no_grad()
def cluster_assignments(
    guide: Callable,
    x: torch.Tensor,
    label_site: str = "y",
    num_particles: int = 1,
    batch_size: int = 1000,
) -> torch.Tensor:
    """The cluster of each row of ``x``: the argmax of the guide's classifier averaged
    over ``num_particles`` samples (:func:`pyrodgm.evaluation.predict_proba`), computed
    ``batch_size`` rows at a time; an ``int64`` tensor ``[N]``."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunks = [
        predict_proba(guide, x[start : start + batch_size], num_particles=num_particles, label_site=label_site).argmax(-1)
        for start in range(0, x.shape[0], batch_size)
    ]
    if not chunks:
        raise ValueError("x is empty: no rows to cluster")
    return torch.cat(chunks)


def clustering_metrics(
    model: Callable,
    guide: Callable,
    data,
    *,
    label_site: str = "y",
    num_particles: int = 1,
    batch_size: int = 1000,
) -> dict[str, float]:
    """``{"cluster_acc": ACC, "nmi": NMI}`` of the guide's clusters on ``data`` (a
    :class:`~pyrodgm.data.ImageData`): a recipe's ``metrics(model, guide, data)`` hook.
    ``model`` is unused (the hook's signature); the guide is used in whatever mode it is
    in (the training loop's validation puts it in eval mode)."""
    pred = cluster_assignments(guide, data.flat(), label_site=label_site, num_particles=num_particles, batch_size=batch_size)
    return {"cluster_acc": clustering_accuracy(pred, data.y), "nmi": normalized_mutual_info(pred, data.y)}
