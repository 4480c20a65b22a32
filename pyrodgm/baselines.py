"""The classical baseline every semi-supervised run is measured against.

scikit-learn's ``LabelSpreading`` with a k-NN kernel (10 neighbours) on 50 PCA components,
fitted transductively on the images a pyrodgm run trains on (its unlabelled set, the
labelled images included, with every label but the labelled subset hidden), then
predicting the test set.  On MNIST with 100 labels it reaches about 10% test error in a few
seconds (``experiments/baselines.py`` records it beside SelfTrainingClassifier and a
labelled-only classifier); a deep generative model that does not beat it is not yet worth
its training time.  :func:`run_baseline` computes it on exactly a run's split and pixels,
which ``pyrodgm train`` prints beside the run's test error.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.semi_supervised import LabelSpreading

from .data import load_dataset, semi_supervised_split
from .validation import UNLABELLED

if TYPE_CHECKING:
    from .training import TrainConfig

__all__ = ["NEIGHBOURS", "PCA_COMPONENTS", "label_spreading", "predict_with_label_mass", "run_baseline"]

#: Components of the PCA the baseline sees.
PCA_COMPONENTS = 50
#: Neighbours of LabelSpreading's k-NN kernel.
NEIGHBOURS = 10


def label_spreading(seed: int = 0, components: int = PCA_COMPONENTS) -> Pipeline:
    """``PCA(components)`` then ``LabelSpreading(kernel="knn", n_neighbors=10)``, unfitted;
    ``fit(X, y)`` takes ``-1`` for an unlabelled row (the PCA ignores the labels)."""
    return Pipeline([
        ("pca", PCA(components, random_state=seed)),
        ("label_spreading", LabelSpreading(kernel="knn", n_neighbors=NEIGHBOURS, n_jobs=1)),
    ])


def predict_with_label_mass(classifier, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Predicted classes, and how many rows had no class probability at all.

    LabelSpreading's k-NN kernel gives a row whose neighbours received no label mass
    all-zero weights, which scikit-learn divides by zero (a RuntimeWarning) into NaN
    probabilities; its ``predict`` then answers the first class.  That answer is kept (the
    baseline as scikit-learn gives it) and such rows are counted."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
        probabilities = classifier.predict_proba(x)
    unreached = np.isnan(probabilities).any(axis=1)
    return classifier.classes_[np.argmax(probabilities, axis=1)], int(unreached.sum())


def run_baseline(config: "TrainConfig") -> dict:
    """:func:`label_spreading` on the split of a run with ``config`` (its data set, labels,
    validation size and seed), on the pixels the run sees (binarised once, as it evaluates,
    when it binarises), scored on its test set.

    :raises ValueError: for a run without labels (nothing to spread)."""
    from .training import evaluation_data, load_test_data

    if config.labels < 1:
        raise ValueError("the LabelSpreading baseline needs labelled images: the run has --labels 0")
    train = load_dataset(config.dataset, root=config.root, train=True, download=config.download)
    split = semi_supervised_split(train.y, config.labels, train.num_classes, config.num_validation, config.seed)
    y_fit = torch.full((len(split.unlabelled),), UNLABELLED, dtype=torch.int64)
    y_fit[torch.searchsorted(split.unlabelled, split.labelled)] = train.y[split.labelled]
    x_fit = evaluation_data(train.subset(split.unlabelled), config).flat().numpy()
    test = load_test_data(config)
    started = time.perf_counter()
    classifier = label_spreading(config.seed).fit(x_fit, y_fit.numpy())
    predicted, unreached = predict_with_label_mass(classifier, test.flat().numpy())
    return {
        "method": f"LabelSpreading(kernel='knn', n_neighbors={NEIGHBOURS}) on {PCA_COMPONENTS} PCA components",
        "pixels": "binarised" if config.binarize else "grey",
        "test_error": float(np.mean(predicted != test.y.numpy())),
        "test_without_label_mass": unreached,
        "seconds": time.perf_counter() - started,
    }
