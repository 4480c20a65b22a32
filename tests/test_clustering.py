"""Tests of pyrodgm.clustering: ACC against hand-worked and brute-force values (square and
rectangular contingency tables), NMI against a hand computation and scikit-learn, the
guide-based assignments and the recipe metrics hook, and bad input."""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from pyrodgm.clustering import cluster_assignments, clustering_accuracy, clustering_metrics, normalized_mutual_info
from pyrodgm.data import ImageData

pytestmark = pytest.mark.usefixtures("pyro_test_env")


def brute_force_acc(pred, true):
    """max over injective maps of clusters to classes (or of classes to clusters)."""
    clusters, classes = sorted(set(pred)), sorted(set(true))
    best = 0
    if len(clusters) <= len(classes):
        for image in itertools.permutations(classes, len(clusters)):
            mapping = dict(zip(clusters, image))
            best = max(best, sum(mapping[p] == t for p, t in zip(pred, true)))
    else:
        for image in itertools.permutations(clusters, len(classes)):
            mapping = dict(zip(image, classes))
            best = max(best, sum(mapping.get(p) == t for p, t in zip(pred, true)))
    return best / len(pred)


def hand_nmi(pred, true, mean):
    n = len(pred)
    def entropy(labels):
        return -sum(c / n * math.log(c / n) for c in (labels.count(v) for v in set(labels)))
    joint = {}
    for p, t in zip(pred, true):
        joint[p, t] = joint.get((p, t), 0) + 1
    mi = sum(c / n * math.log(c * n / (pred.count(p) * true.count(t))) for (p, t), c in joint.items())
    return mi / mean(entropy(pred), entropy(true))


# --------------------------------------------------------------------------------------
# ACC
# --------------------------------------------------------------------------------------
def test_permuted_labels_are_perfect():
    true = torch.tensor([0, 1, 2, 2, 1, 0, 3, 3])
    pred = torch.tensor([2, 0, 3, 3, 0, 2, 1, 1])  # a relabelling of true
    assert clustering_accuracy(pred, true) == 1.0
    assert normalized_mutual_info(pred, true) == pytest.approx(1.0)


def test_hand_worked_confusion_matrix():
    # clusters x classes: c0 = {t0: 1, t1: 3}, c1 = {t0: 2, t2: 1}, c2 = {t2: 2}
    # best map c0 -> 1, c1 -> 0, c2 -> 2: 3 + 2 + 2 = 7 of 9
    true = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [1, 1, 0, 0, 0, 0, 2, 2, 1]
    assert clustering_accuracy(pred, true) == pytest.approx(7 / 9)


def test_more_clusters_than_classes():
    # c0 -> 0 (2), then c2 -> 1 (2); c1 and c3 are left unmatched
    assert clustering_accuracy([0, 0, 1, 2, 2, 3], [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)


def test_fewer_clusters_than_classes():
    assert clustering_accuracy([5, 5, 5, 5, 5, 5], [0, 0, 1, 1, 2, 2]) == pytest.approx(2 / 6)


@pytest.mark.parametrize("num_clusters, num_classes", [(3, 3), (4, 2), (2, 4)])
def test_acc_matches_brute_force(num_clusters, num_classes):
    rng = np.random.default_rng(num_clusters * 10 + num_classes)
    for _ in range(5):
        pred = rng.integers(0, num_clusters, 30).tolist()
        true = rng.integers(0, num_classes, 30).tolist()
        assert clustering_accuracy(pred, true) == pytest.approx(brute_force_acc(pred, true))


# --------------------------------------------------------------------------------------
# NMI
# --------------------------------------------------------------------------------------
def test_nmi_against_hand_computation_and_sklearn():
    rng = np.random.default_rng(0)
    pred, true = rng.integers(0, 4, 40).tolist(), rng.integers(0, 3, 40).tolist()
    arithmetic = hand_nmi(pred, true, lambda a, b: (a + b) / 2)
    geometric = hand_nmi(pred, true, lambda a, b: math.sqrt(a * b))
    assert normalized_mutual_info(pred, true) == pytest.approx(arithmetic, rel=1e-10)
    assert normalized_mutual_info(pred, true, "geometric") == pytest.approx(geometric, rel=1e-10)
    assert normalized_mutual_info(pred, true) == pytest.approx(normalized_mutual_info_score(true, pred))


def test_independent_clustering_has_zero_nmi():
    # every cluster holds the classes in the same proportions
    assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------
# guide-based assignments and the metrics hook
# --------------------------------------------------------------------------------------
class LinearClassifierGuide(nn.Module):
    def __init__(self, x_dim, num_classes):
        super().__init__()
        self.cls = nn.Linear(x_dim, num_classes)

    def forward(self, x, y=None):
        pyro.module("clf", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.OneHotCategorical(logits=self.cls(x)), infer={"enumerate": "parallel"})


def test_cluster_assignments_and_metrics_hook():
    x = torch.rand(25, 1, 2, 2)
    y = torch.randint(0, 3, (25,))
    data = ImageData(x, y, 3, "synthetic")
    guide = LinearClassifierGuide(4, 3)
    expected = guide.cls(data.flat()).argmax(-1)
    got = cluster_assignments(guide, data.flat(), batch_size=7)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    metrics = clustering_metrics(None, guide, data)
    assert metrics == {
        "cluster_acc": pytest.approx(brute_force_acc(expected.tolist(), y.tolist())),
        "nmi": pytest.approx(normalized_mutual_info_score(y.numpy(), expected.numpy())),
    }


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, true, error, match",
    [
        ([0, 1, 1], [0, 1], ValueError, "same length"),
        ([], [], ValueError, "empty"),
        ([[0, 1], [1, 0]], [[0, 1], [1, 0]], ValueError, "1-D"),
        ([0.0, float("nan")], [0, 1], ValueError, "NaN"),
        ([0.0, 1.0], [0, 1], TypeError, "integer"),
        (torch.tensor([True, False]), [0, 1], TypeError, "integer"),
        (["a", "b"], [0, 1], TypeError, "integer"),
    ],
)
def test_bad_input(pred, true, error, match):
    with pytest.raises(error, match=match):
        clustering_accuracy(pred, true)
    with pytest.raises(error, match=match):
        normalized_mutual_info(pred, true)


def test_bad_options():
    with pytest.raises(ValueError, match="average_method"):
        normalized_mutual_info([0, 1], [0, 1], "median")
    with pytest.raises(ValueError, match="batch_size"):
        cluster_assignments(LinearClassifierGuide(4, 3), torch.rand(3, 4), batch_size=0)
