"""
Input checks with clear error messages.

Every public entry point of :mod:`pyrodgm` that receives user data calls one
of these functions first, so that a bad argument fails immediately with a
message naming the argument and the problem, instead of crashing deep inside
torch or Pyro (or, worse, silently producing NaN losses).

Conventions:

* wrong Python type or tensor dtype -> :class:`TypeError`;
* wrong shape, non-finite values, out-of-range values, inconsistent sizes ->
  :class:`ValueError`.

Unlabelled examples carry the label :data:`UNLABELLED` (``-1``), following
scikit-learn's semi-supervised convention
(:class:`sklearn.semi_supervised.SelfTrainingClassifier`).
"""

from __future__ import annotations

import torch

__all__ = [
    "UNLABELLED",
    "check_features",
    "check_labels",
    "check_split_sizes",
]

#: Label value meaning "this example has no label".
UNLABELLED: int = -1

# How many offending values to quote in an error message.
_MAX_SHOWN = 5


def _check_tensor(value: object, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_int(value: object, name: str) -> None:
    # bool is a subclass of int but is never a meaningful size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _format_values(values: torch.Tensor) -> str:
    values = values.flatten().tolist()
    shown = ", ".join(str(v) for v in values[:_MAX_SHOWN])
    if len(values) > _MAX_SHOWN:
        shown += f", ... ({len(values)} distinct values)"
    return shown


def check_features(
    x: torch.Tensor,
    name: str = "x",
    event_shape: tuple[int, ...] | None = None,
    unit_interval: bool = False,
) -> None:
    """
    Check a batch of features (e.g. images) of shape ``[N, *event_shape]``.

    :param torch.Tensor x: the features; must be a floating-point tensor with
        at least two dimensions, a non-empty batch dimension and only finite
        values.
    :param str name: argument name used in error messages.
    :param tuple event_shape: if given, the required trailing shape
        ``x.shape[1:]``.
    :param bool unit_interval: if true, require every value to lie in
        ``[0, 1]`` (needed by Bernoulli likelihoods and binarisation).
    :raises TypeError: if ``x`` is not a floating-point tensor.
    :raises ValueError: on a wrong shape, empty batch, NaN/inf values, or
        values outside ``[0, 1]`` when ``unit_interval`` is set.
    """
    _check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions [batch, *event_shape], "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: batch dimension has size 0 (shape {tuple(x.shape)})")
    if event_shape is not None:
        expected = tuple(int(d) for d in event_shape)
        if tuple(x.shape[1:]) != expected:  # not the row count: a loss may have split the batch
            raise ValueError(
                f"{name} must have rows of shape {expected} (a tensor [N, {', '.join(map(str, expected))}]), "
                f"got rows of shape {tuple(x.shape[1:])}"
            )
    if x.numel() == 0:
        raise ValueError(f"{name} has an empty event shape: got shape {tuple(x.shape)}")
    if unit_interval:  # one pass: NaN fails both comparisons, an infinity one of them
        lo, hi = (float(v) for v in torch.aminmax(x))
        if 0.0 <= lo and hi <= 1.0:
            return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        num_nan = int(torch.isnan(x).sum())
        num_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name} must contain only finite values, found {num_nan} NaN and {num_inf} inf values"
        )
    if unit_interval:  # finite, so lo/hi (from aminmax above) are out of [0, 1]
        raise ValueError(
            f"{name} must lie in [0, 1] (e.g. pixel intensities for a Bernoulli "
            f"likelihood), found min={lo:g}, max={hi:g}"
        )


def check_labels(
    y: torch.Tensor,
    num_classes: int,
    batch_size: int | None = None,
    allow_unlabelled: bool = True,
    name: str = "y",
) -> None:
    """
    Check a vector of class labels.

    :param torch.Tensor y: labels, a 1-D tensor of any integer dtype (bool and
        floating dtypes are rejected).
    :param int num_classes: number of classes; valid labels are
        ``0, ..., num_classes - 1``.
    :param int batch_size: if given, the required length of ``y``.
    :param bool allow_unlabelled: whether :data:`UNLABELLED` (``-1``) is
        accepted as "no label".
    :param str name: argument name used in error messages.
    :raises TypeError: if ``y`` is not an integer tensor.
    :raises ValueError: on a wrong shape or length, or a label out of range.
    """
    _check_tensor(y, name)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.int64), got {y.dtype}")
    _check_int(num_classes, "num_classes")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of labels, got shape {tuple(y.shape)}")
    if batch_size is not None and y.shape[0] != batch_size:
        raise ValueError(
            f"{name} has {y.shape[0]} labels but the batch has {batch_size} examples"
        )
    if y.numel() == 0:
        return
    invalid = (y < 0) | (y >= num_classes)
    if allow_unlabelled:
        invalid &= y != UNLABELLED
    if bool(invalid.any()):
        bad = torch.unique(y[invalid]).cpu()
        allowed = f"[0, {num_classes})"
        if allow_unlabelled:
            allowed += f" or {UNLABELLED} (unlabelled)"
        elif bool((bad == UNLABELLED).any()):
            allowed += " (unlabelled examples are not allowed here)"
        raise ValueError(
            f"{name} contains {int(invalid.sum())} label(s) out of range: found "
            f"{_format_values(bad)}; allowed values are {allowed}"
        )


def check_split_sizes(num_labels: int, num_classes: int, num_available: int) -> None:
    """
    Check the sizes of a class-balanced labelled subset.

    :param int num_labels: total number of labelled examples requested; must be
        positive and divisible by ``num_classes``.
    :param int num_classes: number of classes.
    :param int num_available: number of training examples the labels are
        drawn from.
    :raises TypeError: if an argument is not an int.
    :raises ValueError: on an empty labelled set, an unbalanced request, or
        more labels than available examples.
    """
    _check_int(num_labels, "num_labels")
    _check_int(num_classes, "num_classes")
    _check_int(num_available, "num_available")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if num_labels <= 0:
        raise ValueError(
            f"num_labels must be positive, got {num_labels}: empty labelled set "
            "(semi-supervised training needs at least one label per class)"
        )
    if num_labels % num_classes != 0:
        raise ValueError(
            f"num_labels={num_labels} is not divisible by num_classes={num_classes}: "
            "a class-balanced split needs the same number of labels for every class"
        )
    if num_labels > num_available:
        raise ValueError(
            f"num_labels={num_labels} is more labels than data: only "
            f"{num_available} training examples are available"
        )
