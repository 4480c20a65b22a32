"""Tests of pyrodgm.losses.metric: the k-NN assignment against a brute-force loop, the
lifted structured loss against a hand computation, the loss classes against direct
computations from the guide's networks, gradients through SVI and WeightedSum, errors."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import Adam
from torch import nn

from pyrodgm.losses import AssignmentLoss, AuxiliaryTaskLoss, LiftedStructuredLoss, SemiSupervisedELBO, Weighted, WeightedSum
from pyrodgm.losses.metric import knn_assignment, knn_votes, lifted_structured, pairwise_distances

pytestmark = pytest.mark.usefixtures("pyro_test_env")

X_DIM, F_DIM, K = 4, 3, 3


# --------------------------------------------------------------------------------------
# a tiny model/guide whose guide records a features site
# --------------------------------------------------------------------------------------
class FeatureGuide(nn.Module):
    """features = Linear(x); y ~ Cat(softmax(Linear(features))), enumerated."""

    def __init__(self, relaxed: bool = False):
        super().__init__()
        self.net = nn.Linear(X_DIM, F_DIM)
        self.cls = nn.Linear(F_DIM, K)
        self.relaxed = relaxed

    def forward(self, x, y=None):
        pyro.module("fg", self)
        with pyro.plate("data", x.shape[0]):
            f = self.net(x)
            # marked auxiliary: a guide-only site Pyro's model/guide check must not look
            # for in the model (the ELBO traces this guide too)
            with poutine.infer_config(config_fn=lambda msg: {"is_auxiliary": True}):
                pyro.deterministic("features", f, event_dim=1)
            if self.relaxed:
                pyro.sample("y", dist.RelaxedOneHotCategorical(torch.tensor(0.5), logits=self.cls(f)))
            else:
                pyro.sample("y", dist.OneHotCategorical(logits=self.cls(f)), infer={"enumerate": "parallel"})


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(K, X_DIM)

    def forward(self, x, y=None):
        pyro.module("model", self)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(K)))
            pyro.sample("x", dist.Normal(self.loc(y), 1.0).to_event(1), obs=x)


def batch(num_labelled=6, num_unlabelled=5):
    x = torch.randn(num_labelled + num_unlabelled, X_DIM)
    labels = torch.cat([torch.arange(num_labelled) % K, torch.full((num_unlabelled,), -1)])
    perm = torch.randperm(labels.shape[0])
    return x[perm], labels[perm]


# --------------------------------------------------------------------------------------
# brute-force references
# --------------------------------------------------------------------------------------
def brute_force_knn(unlabelled, labelled, labels, k, num_classes, weighting="distance"):
    assigned, all_votes = [], []
    for u in unlabelled.tolist():
        dists = [math.dist(u, l) for l in labelled.tolist()]
        nearest = sorted(range(len(dists)), key=lambda i: dists[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(labels[i])] += 1.0 / dists[i] if weighting == "distance" else 1.0
        all_votes.append(votes)
        assigned.append(max(range(num_classes), key=lambda j: votes[j]))
    return torch.tensor(assigned), torch.tensor(all_votes)


def hand_lifted(points, labels, margin):
    """J_ij and the loss written out over unordered positive pairs, plain Python."""
    n = len(points)
    d = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
    total, num_pos = 0.0, 0
    for i, j in itertools.combinations(range(n), 2):
        if labels[i] != labels[j]:
            continue
        s = sum(math.exp(margin - d[i][k]) for k in range(n) if labels[k] != labels[i])
        s += sum(math.exp(margin - d[j][l]) for l in range(n) if labels[l] != labels[j])
        total += max(0.0, math.log(s) + d[i][j]) ** 2
        num_pos += 1
    return total / (2 * num_pos)


# --------------------------------------------------------------------------------------
# tensor functions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["distance", "uniform"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_matches_brute_force(k, weighting):
    unlabelled, labelled = torch.randn(20, 4), torch.randn(9, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    expected, votes = brute_force_knn(unlabelled, labelled, labels, k, 4, weighting)
    assert torch.allclose(knn_votes(unlabelled, labelled, labels, k, 4, weighting), votes)
    assert torch.equal(knn_assignment(unlabelled, labelled, labels, k, 4, weighting), expected)


def test_knn_distance_weighting_differs_from_majority():
    # two far neighbours of class 1 outvote one very close neighbour of class 0 only
    # in a majority vote; 1/distance weighting picks class 0
    labelled = torch.tensor([[0.1, 0.0], [3.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    u = torch.zeros(1, 2)
    assert knn_assignment(u, labelled, labels, 3, 2, "distance").item() == 0
    assert knn_assignment(u, labelled, labels, 3, 2, "uniform").item() == 1


def test_knn_exact_match_wins():
    labelled = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    labels = torch.tensor([2, 1, 1])
    votes = knn_votes(torch.zeros(1, 2), labelled, labels, 3, 3)
    assert torch.equal(votes, torch.tensor([[0.0, 0.0, 1.0]]))


def test_knn_is_detached():
    unlabelled = torch.randn(4, 3, requires_grad=True)
    assert not knn_votes(unlabelled, torch.randn(3, 3), torch.tensor([0, 1, 0]), 2, 2).requires_grad


def test_lifted_matches_hand_computation():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.5], [0.2, 2.0], [1.5, 1.5], [-1.0, 0.3], [0.4, -0.7]])
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    for margin in (0.5, 1.0, 2.0):
        expected = hand_lifted(points.tolist(), labels.tolist(), margin)
        assert lifted_structured(points, labels, margin).item() == pytest.approx(expected, rel=1e-12)


def test_lifted_hinge_can_be_inactive():
    # well separated classes, small margin: every J_ij < 0
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    assert lifted_structured(points, torch.tensor([0, 0, 1, 1]), 0.5).item() == 0.0
    assert lifted_structured(points, torch.tensor([0, 1, 0, 1]), 0.5).item() > 0.0


def test_lifted_degenerate_batches_are_zero():
    points = torch.randn(4, 2, requires_grad=True)
    assert lifted_structured(points, torch.tensor([0, 1, 2, 3]), 1.0).item() == 0.0  # no positive pair
    assert lifted_structured(points, torch.tensor([1, 1, 1, 1]), 1.0).item() == 0.0  # no negative pair


def test_lifted_gradient_finite_for_coincident_points():
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    lifted_structured(points, torch.tensor([0, 0, 1, 1]), 2.0).backward()
    assert torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0


def test_pairwise_distances():
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    assert torch.allclose(pairwise_distances(a, b), torch.cdist(a, b))
    assert torch.equal(pairwise_distances(a, a).diagonal(), torch.zeros(5))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: knn_assignment(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), 3, 2), ValueError, "only 2 labelled"),
        (lambda: knn_assignment(torch.randn(2, 3), torch.randn(0, 3), torch.tensor([], dtype=torch.long), 1, 2), ValueError, "empty"),
        (lambda: knn_assignment(torch.randn(2, 4), torch.randn(2, 3), torch.tensor([0, 1]), 1, 2), ValueError, "feature dim 3"),
        (lambda: knn_assignment(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 2]), 1, 2), ValueError, "out of range"),
        (lambda: knn_assignment(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.0, 1.0]), 1, 2), TypeError, "integer"),
        (lambda: knn_assignment(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), 0, 2), ValueError, "k must be"),
        (lambda: knn_assignment(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), 1, 2, "cosine"), ValueError, "weighting"),
        (lambda: knn_assignment(torch.full((2, 3), float("nan")), torch.randn(2, 3), torch.tensor([0, 1]), 1, 2), ValueError, "NaN"),
        (lambda: lifted_structured(torch.randn(3), torch.tensor([0, 1, 0]), 1.0), ValueError, "shape"),
        (lambda: lifted_structured(torch.randn(3, 2), torch.tensor([0, 1]), 1.0), ValueError, r"shape \[3\]"),
        (lambda: lifted_structured(torch.randn(3, 2), torch.tensor([0, -1, 0]), 1.0), ValueError, ">= 0"),
        (lambda: lifted_structured(torch.randn(3, 2), torch.tensor([0, 1, 0]), -1.0), ValueError, "margin"),
        (lambda: lifted_structured(torch.tensor([[0.0, float("nan")]] * 3), torch.tensor([0, 1, 0]), 1.0), ValueError, "NaN"),
        (lambda: lifted_structured(torch.randn(0, 2), torch.tensor([], dtype=torch.long), 1.0), ValueError, "empty"),
        (lambda: lifted_structured(torch.ones(3, 2, dtype=torch.long), torch.tensor([0, 1, 0]), 1.0), TypeError, "floating"),
    ],
)
def test_tensor_function_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------
# loss classes against direct computations
# --------------------------------------------------------------------------------------
def direct_features(guide, x):
    f = guide.net(x)
    return f, F.log_softmax(guide.cls(f), -1)


@pytest.mark.parametrize("relaxed", [False, True])
@pytest.mark.parametrize("include_labelled", [False, True])
def test_assignment_loss_value(relaxed, include_labelled):
    model, guide = Model(), FeatureGuide(relaxed)
    x, labels = batch()
    loss = AssignmentLoss(k=2, include_labelled=include_labelled)
    f, log_q = direct_features(guide, x)
    lab, unl = labels >= 0, labels < 0
    assigned, _ = brute_force_knn(f[unl].detach(), f[lab].detach(), labels[lab], 2, K)
    expected = -log_q[unl].gather(-1, assigned.unsqueeze(-1)).sum()
    if include_labelled:
        expected = expected - log_q[lab].gather(-1, labels[lab].unsqueeze(-1)).sum()
    assert loss.loss(model, guide, x, y=labels) == pytest.approx(expected.item(), rel=1e-12)
    mean = AssignmentLoss(k=2, include_labelled=include_labelled, reduction="mean")
    rows = labels.shape[0] if include_labelled else int(unl.sum())
    assert mean.loss(model, guide, x, y=labels) == pytest.approx(expected.item() / rows, rel=1e-12)


@pytest.mark.parametrize("k", [None, 2])
def test_lifted_loss_value(k):
    model, guide = Model(), FeatureGuide()
    x, labels = batch()
    f, _ = direct_features(guide, x)
    lab = labels >= 0
    if k is None:
        rows_f, rows_y = f[lab], labels[lab]
    else:
        rows_y = labels.clone()
        rows_y[~lab], _ = brute_force_knn(f[~lab].detach(), f[lab].detach(), labels[lab], k, K)
        rows_f = f
    expected = hand_lifted(rows_f.tolist(), rows_y.tolist(), 2.0)
    loss = LiftedStructuredLoss(margin=2.0, k=k, reduction="mean")
    assert loss.loss(model, guide, x, y=labels) == pytest.approx(expected, rel=1e-12)
    summed = LiftedStructuredLoss(margin=2.0, k=k)
    assert summed.loss(model, guide, x, y=labels) == pytest.approx(expected * rows_y.shape[0], rel=1e-12)


@pytest.mark.parametrize("include_labelled", [False, True])
def test_auxiliary_task_loss_is_the_weighted_sum_of_both(include_labelled):
    model, guide = Model(), FeatureGuide()
    x, labels = batch()
    combined = AuxiliaryTaskLoss(k=2, margin=1.5, assignment_weight=0.7, metric_weight=3.0, include_labelled=include_labelled)
    separate = WeightedSum(
        assignment=(0.7, AssignmentLoss(k=2, include_labelled=include_labelled)),
        metric=(3.0, LiftedStructuredLoss(margin=1.5, k=2)),
    )
    grads = []
    for loss in (combined, separate):
        for p in guide.parameters():
            p.grad = None
        value = loss.loss_and_grads(model, guide, x, y=labels)
        grads.append((value, [p.grad.clone() for p in guide.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert all(torch.allclose(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    assert set(combined.last_components) == {"assignment", "metric"}


def test_particles_of_a_deterministic_feature_agree():
    model, guide = Model(), FeatureGuide()
    x, labels = batch()
    one = AssignmentLoss(k=2).loss(model, guide, x, y=labels)
    assert AssignmentLoss(k=2, num_particles=4).loss(model, guide, x, y=labels) == pytest.approx(one, rel=1e-12)


def test_all_labelled_batch_has_zero_assignment_loss():
    model, guide = Model(), FeatureGuide()
    x, labels = batch(num_unlabelled=0)
    assert AssignmentLoss(k=2).loss(model, guide, x, y=labels) == 0.0


# --------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------
def grads_of(loss, model, guide, x, labels):
    pyro.clear_param_store()
    for p in guide.parameters():
        p.grad = None
    loss.loss_and_grads(model, guide, x, y=labels)
    return {name: (p.grad is not None and p.grad.abs().sum().item() > 0) for name, p in guide.named_parameters()}


def test_assignment_gradient_reaches_classifier_and_features():
    model, guide = Model(), FeatureGuide()
    x, labels = batch()
    got = grads_of(AssignmentLoss(k=2), model, guide, x, labels)
    assert got == {"net.weight": True, "net.bias": True, "cls.weight": True, "cls.bias": True}


def test_lifted_gradient_reaches_features_only():
    model, guide = Model(), FeatureGuide()
    x, labels = batch()
    got = grads_of(LiftedStructuredLoss(margin=5.0), model, guide, x, labels)
    assert got == {"net.weight": True, "net.bias": True, "cls.weight": False, "cls.bias": False}


def test_weighted_params_restriction_sees_the_parameters():
    model, guide = Model(), FeatureGuide()
    x, labels = batch()
    loss = WeightedSum(assign=Weighted(AssignmentLoss(k=2), 1.0, params=lambda name: name.startswith("fg$$$cls")))
    got = grads_of(loss, model, guide, x, labels)
    assert got == {"net.weight": False, "net.bias": False, "cls.weight": True, "cls.bias": True}


def test_svi_with_auxiliary_losses_trains_the_features():
    model, guide = Model(), FeatureGuide()
    x, labels = batch(num_labelled=9, num_unlabelled=6)
    loss = WeightedSum(elbo=SemiSupervisedELBO(), assign=AssignmentLoss(k=3), metric=(1.0, LiftedStructuredLoss(margin=2.0)))
    svi = SVI(model, guide, Adam({"lr": 0.05}), loss)
    metric = LiftedStructuredLoss(margin=2.0)
    before = metric.loss(model, guide, x, y=labels)
    start = guide.net.weight.detach().clone()
    for _ in range(30):
        svi.step(x, y=labels)
    assert not torch.equal(start, guide.net.weight)
    assert set(loss.last_components) >= {"elbo", "assign", "metric", "assign.assignment", "metric.metric"}
    assert metric.loss(model, guide, x, y=labels) < before


def test_svi_sees_the_parameters_of_an_auxiliary_loss_alone():
    model, guide = Model(), FeatureGuide()
    x, labels = batch()
    start = [p.detach().clone() for p in guide.parameters()]
    SVI(model, guide, Adam({"lr": 0.1}), AuxiliaryTaskLoss(k=2, margin=5.0)).step(x, y=labels)
    assert all(not torch.equal(a, b) for a, b in zip(start, guide.parameters()))


# --------------------------------------------------------------------------------------
# errors of the loss classes
# --------------------------------------------------------------------------------------
class NoFeatureGuide(FeatureGuide):
    def forward(self, x, y=None):
        pyro.module("fg", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.OneHotCategorical(logits=self.cls(self.net(x))), infer={"enumerate": "parallel"})


class NaNFeatureGuide(FeatureGuide):
    def forward(self, x, y=None):
        pyro.module("fg", self)
        with pyro.plate("data", x.shape[0]):
            f = self.net(x)
            pyro.deterministic("features", torch.where(x[:, :1] > 0, float("nan"), f), event_dim=1)
            pyro.sample("y", dist.OneHotCategorical(logits=self.cls(f)), infer={"enumerate": "parallel"})


def test_loss_errors():
    model, guide = Model(), FeatureGuide()
    x, labels = batch(num_labelled=4)
    with pytest.raises(ValueError, match="empty labelled set"):
        AssignmentLoss(k=1).loss(model, guide, x, y=torch.full_like(labels, -1))
    with pytest.raises(ValueError, match="empty labelled set"):
        LiftedStructuredLoss().loss(model, guide, x, y=torch.full_like(labels, -1))
    with pytest.raises(ValueError, match="only 4 labelled rows"):
        AssignmentLoss(k=5).loss(model, guide, x, y=labels)
    with pytest.raises(ValueError, match="needs labels"):
        AssignmentLoss(k=1).loss(model, guide, x)
    with pytest.raises(ValueError, match=r"shape \[9\]"):
        AssignmentLoss(k=1).loss(model, guide, x, y=labels[:-1])
    with pytest.raises(ValueError, match="out of range"):
        AssignmentLoss(k=1).loss(model, guide, x, y=torch.where(labels == 0, 7, labels))
    with pytest.raises(ValueError, match="no site 'features' before its label site 'y'"):
        AssignmentLoss(k=1).loss(model, NoFeatureGuide(), x, y=labels)
    with pytest.raises(ValueError, match="no site 'feats'"):
        LiftedStructuredLoss(feature_site="feats").loss(model, guide, x, y=labels)
    with pytest.raises(ValueError, match="NaN"):
        AssignmentLoss(k=1).loss(model, NaNFeatureGuide(), x, y=labels)
    with pytest.raises(ValueError, match="NaN"):
        LiftedStructuredLoss().loss(model, NaNFeatureGuide(), x, y=labels)
    with pytest.raises(ValueError, match="reduction"):
        AssignmentLoss(reduction="max")
    with pytest.raises(ValueError, match="margin"):
        LiftedStructuredLoss(margin=float("inf"))
    with pytest.raises(TypeError, match="k must be an int"):
        LiftedStructuredLoss(k=2.0)
