"""Tests of the max-margin DGMs (Li, Zhu & Zhang 2016): the hinge loss with loss-augmented
prediction (eq. 4-5), the hat loss (eq. 13) and the label-balance term (eq. 15) against
hand computations; the hinge gradient reaching the recognition model; the composition of
eq. 16; MMVA / Conv-MMVA and their nets; supervised batches; the Pegasos SVM; the recipes
and the experiment script."""

import json
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyrodgm.data import SemiSupervisedBatches, semi_supervised_split
from pyrodgm.guides.mmva import SMALL_IMAGE_LAYERS, ConvMMVAGuide, MMVAGuide, conv_mmva_layers
from pyrodgm.losses import (
    HatLoss, HingeLoss, LabelBalanceLoss, MarginClassifier, SemiSupervisedELBO, WithoutLabels, max_margin_objective,
)
from pyrodgm.losses.margin import (
    hat_loss, label_balance, loss_augmented_prediction, margin_error, margin_predict, margin_scores, multiclass_hinge,
)
from pyrodgm.models.mmva import MMVA, ConvMMVA
from pyrodgm.nets import (
    CONV_MMVA_LAYERS, ConvMMVASpec, MLPSpec, PoolingConvEncoder, Unpool, UnpoolingConvDecoder, conv_layers_fit,
)
from pyrodgm.svm import fit_linear_svm, guide_features, svm_error, svm_predict
from pyrodgm.training import TrainConfig, train, training_step
from pyrodgm.zoo import recipe

pytestmark = pytest.mark.usefixtures("pyro_test_env")

X_DIM, K = 6, 3


def brute_force_hinge(scores, labels, cost):
    """max over y of cost [y != y_n] + s_y - s_{y_n}, by a loop."""
    rows = []
    for s, label in zip(scores.tolist(), labels.tolist()):
        rows.append(max(cost * (y != label) + s[y] - s[label] for y in range(len(s))))
    return torch.tensor(rows)


def small_mmva(hidden=(4, 5)):
    return MMVA(MLPSpec(X_DIM, z_dim=2, hidden=hidden)), MMVAGuide(MLPSpec(X_DIM, K, 2, hidden))


def data(n=8):
    x = torch.bernoulli(torch.full((n, X_DIM), 0.5))
    y = torch.arange(n) % K
    return x, y


def guide_scores(guide, x):
    """The scores computed by hand from the guide's modules."""
    layers = guide.encoder.forward_features(x)
    features = torch.cat(layers, -1)
    return guide.classifier.linear.weight @ features.T + guide.classifier.linear.bias[:, None]


# --------------------------------------------------------------------------------------
# pure functions against hand computations
# --------------------------------------------------------------------------------------
def test_multiclass_hinge_by_hand():
    scores = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [2.0, 1.5, 0.0]])
    labels = torch.tensor([0, 2, 0])
    # row 0: augmented [1, 3, 1.5] -> y~ = 1, 3 - 1 = 2; row 1: [1, 1, 3] -> y~ = 2, 0;
    # row 2: [2, 2.5, 1] -> y~ = 1, 2.5 - 2 = 0.5
    assert torch.equal(loss_augmented_prediction(scores, labels), torch.tensor([1, 2, 1]))
    assert torch.allclose(multiclass_hinge(scores, labels), torch.tensor([2.0, 0.0, 0.5]))
    # cost 3 (the authors' MMVA ell): row 0 -> 5 - 1 = 4, row 1 -> 3 - 3 = 0, row 2 -> 4.5 - 2
    assert torch.allclose(multiclass_hinge(scores, labels, cost=3.0), torch.tensor([4.0, 0.0, 2.5]))


@pytest.mark.parametrize("cost", [0.5, 1.0, 3.0])
def test_multiclass_hinge_matches_brute_force_and_its_subgradient(cost):
    scores = torch.randn(20, 4, requires_grad=True)
    labels = torch.randint(0, 4, (20,))
    value = multiclass_hinge(scores, labels, cost)
    assert torch.allclose(value, brute_force_hinge(scores.detach(), labels, cost))
    assert bool((value >= 0).all())
    value.sum().backward()
    y_tilde = loss_augmented_prediction(scores, labels, cost)
    expected = torch.nn.functional.one_hot(y_tilde, 4) - torch.nn.functional.one_hot(labels, 4)  # f(y~) - f(y_n)
    assert torch.allclose(scores.grad, expected.to(scores.dtype))


def test_hat_loss_by_hand():
    scores = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.3, -1.0], [5.0, 0.0, 0.0]])
    # prediction as label: 1 - (top - second) clipped at 0
    assert torch.allclose(hat_loss(scores), torch.tensor([0.0, 0.7, 0.0]))
    assert torch.allclose(hat_loss(scores, cost=2.0), torch.tensor([1.0, 1.7, 0.0]))
    assert torch.allclose(hat_loss(scores), multiclass_hinge(scores, scores.argmax(-1)))


def test_label_balance_by_hand_and_its_gradient():
    unlabelled = torch.tensor([[2.0, 1.0], [0.0, 3.0], [4.0, 0.0]], requires_grad=True)
    labelled = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    # predictions [0, 1, 0]: per class mean of selected scores [6/3, 3/3] = [2, 1];
    # labelled: [1/2, 2/2] = [0.5, 1]; gap [1.5, 0], norm 1.5
    value = label_balance(unlabelled, labelled, labels)
    assert value.item() == pytest.approx(1.5)
    value.backward()
    unit = torch.tensor([1.0, 0.0])  # gap / |gap|; the indicators carry no gradient
    assert torch.allclose(unlabelled.grad, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]) * unit / 3)
    assert torch.allclose(labelled.grad, -torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * unit / 2)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: multiclass_hinge(torch.zeros(3), torch.zeros(3, dtype=torch.long)), ValueError),
        (lambda: multiclass_hinge(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)), ValueError),
        (lambda: multiclass_hinge(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)), TypeError),
        (lambda: multiclass_hinge(torch.zeros(3, 2), torch.zeros(3)), TypeError),
        (lambda: multiclass_hinge(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)), ValueError),
        (lambda: multiclass_hinge(torch.zeros(3, 2), torch.tensor([0, 2, 1])), ValueError),
        (lambda: multiclass_hinge(torch.zeros(3, 2), torch.tensor([0, -1, 1])), ValueError),
        (lambda: multiclass_hinge(torch.tensor([[0.0, float("nan")]]), torch.tensor([0])), ValueError),
        (lambda: multiclass_hinge(torch.zeros(1, 2), torch.tensor([0]), cost=0.0), ValueError),
        (lambda: label_balance(torch.zeros(0, 2), torch.zeros(1, 2), torch.tensor([0])), ValueError),
        (lambda: label_balance(torch.zeros(2, 3), torch.zeros(1, 2), torch.tensor([0])), ValueError),
    ],
)
def test_pure_functions_reject_bad_input(call, error):
    with pytest.raises(error):
        call()


# --------------------------------------------------------------------------------------
# the loss classes on a guide
# --------------------------------------------------------------------------------------
def test_guide_records_features_of_both_layers_and_scores():
    _, guide = small_mmva()
    x, _ = data()
    trace = pyro.poutine.trace(guide).get_trace(x)
    layers = guide.encoder.forward_features(x)
    assert torch.allclose(trace.nodes["features"]["value"], torch.cat(layers, -1))  # 4 + 5 units
    assert trace.nodes["features"]["value"].shape == (8, 9)
    assert torch.allclose(trace.nodes["scores"]["value"], guide_scores(guide, x).T)
    assert torch.allclose(margin_scores(guide, x), guide_scores(guide, x).T)
    assert torch.equal(margin_predict(guide, x), guide_scores(guide, x).T.argmax(-1))


@pytest.mark.parametrize("sigma, num_data", [(None, None), (2.0, None), (2.0, 40)])
def test_hinge_loss_by_hand(sigma, num_data):
    model, guide = small_mmva()
    x, y = data()
    labels = torch.where(torch.arange(8) < 5, y, -1)  # three unlabelled rows do not count
    loss = HingeLoss(C=15.0, sigma=sigma, num_data=num_data, cost=3.0)
    scores = guide_scores(guide, x).T.detach()
    expected = 15.0 * brute_force_hinge(scores[:5], y[:5], 3.0).sum()
    if sigma is not None:
        weight = 1.0 if num_data is None else 5 / num_data
        expected = expected + weight * 0.5 * guide.classifier.linear.weight.detach().pow(2).sum() / sigma**2
    assert loss.loss(model, guide, x, y=labels) == pytest.approx(float(expected))
    assert loss.last_components["hinge"].item() == pytest.approx(float(brute_force_hinge(scores[:5], y[:5], 3.0).sum()))


@pytest.mark.parametrize("make", [lambda: small_mmva(), lambda: (None, ConvMMVAGuide(ConvMMVASpec((1, 8, 8), K, 2, SMALL_IMAGE_LAYERS, hidden=6)))])
def test_hinge_gradient_reaches_every_recognition_parameter(make):
    model, guide = make()
    x = torch.bernoulli(torch.full((12, guide.x_dim), 0.5))
    y = torch.arange(12) % K
    HingeLoss(C=1.0).loss_and_grads(model, guide, x, y=y)
    for name, param in list(guide.encoder.named_parameters()) + list(guide.classifier.named_parameters()):
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name
    for name, param in guide.head.named_parameters():  # q(z|x)'s head is not on the hinge's path
        assert param.grad is None or not bool(param.grad.abs().sum() > 0), name


def test_hat_and_balance_losses_on_a_guide_match_the_pure_functions():
    model, guide = small_mmva()
    x, y = data()
    labels = torch.where(torch.arange(8) < 4, y, -1)
    scores = guide_scores(guide, x).T.detach()
    assert HatLoss().loss(model, guide, x, y=labels) == pytest.approx(float(hat_loss(scores[4:]).sum()))
    assert HatLoss().loss(model, guide, x) == pytest.approx(float(hat_loss(scores).sum()))  # no labels: every row
    assert HatLoss().loss(model, guide, x, y=y) == 0.0  # no unlabelled row
    expected = label_balance(scores[4:], scores[:4], y[:4])
    assert LabelBalanceLoss().loss(model, guide, x, y=labels) == pytest.approx(float(expected))
    assert LabelBalanceLoss().loss(model, guide, x, y=y) == 0.0


def test_max_margin_objective_composes_eq_16():
    model, guide = small_mmva()
    x, y = data()
    labels = torch.where(torch.arange(8) < 4, y, -1)
    loss = max_margin_objective(WithoutLabels(SemiSupervisedELBO()), alpha=0.1, alpha_u=3.0, alpha_b=1e-3, C=2.0, sigma=1.0)
    assert {name: term.weight for name, term in loss.terms.items()} == pytest.approx(
        {"generative": 1.0, "hinge": 0.1, "hat": 0.3, "balance": 1e-4}
    )
    assert loss.terms["hinge"].loss.C == 2.0 and loss.terms["hinge"].loss.sigma == 1.0
    value = loss.loss(model, guide, x, y=labels)
    parts = loss.last_components
    expected = parts["generative"] + 0.1 * parts["hinge"] + 0.3 * parts["hat"] + 1e-4 * parts["balance"]
    assert value == pytest.approx(float(expected))
    scores = guide_scores(guide, x).T.detach()
    assert parts["hat"].item() == pytest.approx(float(hat_loss(scores[4:]).sum()))
    supervised = max_margin_objective(WithoutLabels(SemiSupervisedELBO()), C=15.0)
    assert set(supervised.terms) == {"generative", "hinge"}  # eq. 5: zero-weight terms are left out
    assert supervised.terms["hinge"].weight == 1.0


def test_svi_step_trains_mmva_with_labels_withheld_from_the_vae_bound():
    model, guide = small_mmva()
    x, y = data()
    loss = max_margin_objective(WithoutLabels(SemiSupervisedELBO(max_plate_nesting=1)), C=15.0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss)
    for _ in range(3):
        assert torch.isfinite(torch.tensor(svi.step(x, y=y)))
    assert 0.0 <= margin_error(guide, x, y) <= 1.0


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m, g, x, y: HingeLoss().loss(m, g, x), ValueError),  # no labels
        (lambda m, g, x, y: HingeLoss().loss(m, g, x, y=torch.full_like(y, -1)), ValueError),  # empty labelled set
        (lambda m, g, x, y: HingeLoss().loss(m, g, x, y=y[:3]), ValueError),  # wrong shape
        (lambda m, g, x, y: HingeLoss().loss(m, g, x, y=y.float()), TypeError),
        (lambda m, g, x, y: HingeLoss().loss(m, g, x, y=y + K), ValueError),  # out of range
        (lambda m, g, x, y: HingeLoss().loss(m, g, x, y=y - 2), ValueError),  # below -1
        (lambda m, g, x, y: HingeLoss(score_site="nope", feature_site="nope").loss(m, g, x, y=y), ValueError),
        (lambda m, g, x, y: LabelBalanceLoss().loss(m, g, x, y=torch.full_like(y, -1)), ValueError),
        (lambda m, g, x, y: HingeLoss(C=-1.0), ValueError),
        (lambda m, g, x, y: HingeLoss(sigma=0.0), ValueError),
        (lambda m, g, x, y: HingeLoss(num_data=0), ValueError),
        (lambda m, g, x, y: HatLoss(cost=0.0), ValueError),
        (lambda m, g, x, y: max_margin_objective(SemiSupervisedELBO(), alpha=-1.0), ValueError),
        (lambda m, g, x, y: max_margin_objective(lambda *a: 0.0), TypeError),
        (lambda m, g, x, y: WithoutLabels("elbo"), TypeError),
    ],
)
def test_losses_reject_bad_input(call, error):
    model, guide = small_mmva()
    x, y = data()
    with pytest.raises(error):
        call(model, guide, x, y)


def test_scores_from_features_through_the_guides_classifier_and_prior_needs_one():
    classifier = MarginClassifier(3, K)

    class FeatureGuide(torch.nn.Module):  # features only: scored by its MarginClassifier
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, x):
            pyro.module("feature_guide", self)
            with pyro.plate("data", x.shape[0]):
                pyro.deterministic("features", x[:, :3], event_dim=1)

    x, y = data()
    expected = brute_force_hinge(classifier(x[:, :3]).detach(), y, 1.0).sum()
    assert HingeLoss().loss(None, FeatureGuide(), x, y=y) == pytest.approx(float(expected))

    def plain_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.deterministic("scores", x[:, :K], event_dim=1)

    assert HingeLoss().loss(None, plain_guide, x, y=y) == pytest.approx(float(brute_force_hinge(x[:, :K], y, 1.0).sum()))
    with pytest.raises(ValueError, match="MarginClassifier"):
        HingeLoss(sigma=1.0).loss(None, plain_guide, x, y=y)


# --------------------------------------------------------------------------------------
# nets, models
# --------------------------------------------------------------------------------------
def test_unpool_puts_values_in_the_top_left_corner():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[[[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]]])
    assert torch.equal(Unpool(2)(x), expected)


def test_conv_mmva_nets_have_the_papers_shapes():
    encoder = PoolingConvEncoder((1, 28, 28))
    assert encoder.feature_shape == (64, 5, 5) and encoder.out_features == 500  # 28-24-12-12-10-5-5-5
    decoder = UnpoolingConvDecoder(50, (1, 28, 28))
    assert decoder(torch.zeros(2, 3, 50)).shape == (2, 3, 784)
    assert conv_layers_fit((1, 28, 28), CONV_MMVA_LAYERS) and not conv_layers_fit((1, 8, 8), CONV_MMVA_LAYERS)
    assert conv_mmva_layers((1, 8, 8)) == SMALL_IMAGE_LAYERS and conv_mmva_layers((1, 28, 28)) == CONV_MMVA_LAYERS
    with pytest.raises(ValueError):
        PoolingConvEncoder((1, 8, 8))  # the paper's layers do not fit 8x8
    with pytest.raises(ValueError):
        PoolingConvEncoder((1, 8, 8), layers=[(4, 2, 1, "same")])  # even kernel, same padding


def test_conv_mmva_model_and_guide_trace_and_reject_labels():
    spec = ConvMMVASpec((1, 8, 8), K, 2, SMALL_IMAGE_LAYERS, hidden=6)
    model, guide = ConvMMVA(spec), ConvMMVAGuide(spec)
    x = torch.bernoulli(torch.full((4, 64), 0.5))
    elbo = SemiSupervisedELBO(max_plate_nesting=1).loss(model, guide, x)
    assert elbo > 0
    trace = pyro.poutine.trace(model).get_trace(x)
    assert set(trace.stochastic_nodes) | set(trace.observation_nodes) == {"data", "z", "x"}  # no label site
    with pytest.raises(ValueError, match="no label site"):
        model(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="Bernoulli"):
        ConvMMVA(ConvMMVASpec((1, 8, 8), layers=SMALL_IMAGE_LAYERS), likelihood="gaussian")


# --------------------------------------------------------------------------------------
# supervised data, SVM
# --------------------------------------------------------------------------------------
def test_full_labels_split_and_supervised_batches():
    y = torch.tensor([0] * 7 + [1] * 5 + [2] * 8)  # unbalanced: every label is still used
    split = semi_supervised_split(y, 15, 3, num_validation=5, seed=0)
    assert torch.equal(split.labelled, split.unlabelled) and len(split.labelled) == 15
    assert set(split.labelled.tolist()).isdisjoint(split.validation.tolist())
    x = torch.rand(20, 4)
    batches = SemiSupervisedBatches(x[split.labelled], y[split.labelled], x[split.unlabelled], batch_size=5, labelled_per_batch=5)
    seen = []
    for xb, yb in batches:
        assert xb.shape == (5, 4) and bool((yb >= 0).all())
        seen += [int(torch.nonzero((x == row).all(-1))[0]) for row in xb]
    assert len(batches) == 3 and sorted(seen) == split.labelled.tolist()  # each example once an epoch
    with pytest.raises(ValueError, match="must be smaller than"):
        SemiSupervisedBatches(x, y, x, batch_size=5, labelled_per_batch=6)
    with pytest.raises(ValueError, match="unless every example is labelled"):  # a labelled subset: semi-supervised
        SemiSupervisedBatches(x[:10], y[:10], x, batch_size=5, labelled_per_batch=5)


def test_linear_svm_separates_separable_data_and_rejects_bad_input():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(90, 2, generator=generator) * 0.3 + torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]]).repeat(30, 1)
    labels = torch.arange(3).repeat(30)
    svm = fit_linear_svm(features, labels, C=10.0)
    assert svm.alpha == pytest.approx(1.0 / (10.0 * 90))  # Pegasos's lambda = 1 / (C N)
    assert svm_error(svm, features, labels) == 0.0
    assert torch.equal(svm_predict(svm, features), labels)
    with pytest.raises(ValueError):
        fit_linear_svm(features, labels.float(), C=1.0)
    with pytest.raises(ValueError):
        fit_linear_svm(features, labels, C=0.0)
    with pytest.raises(ValueError):
        fit_linear_svm(features[:, 0], labels)


def test_guide_features_reads_the_feature_site():
    _, guide = small_mmva()
    x, _ = data()
    assert torch.allclose(guide_features(guide, x, batch_size=3), torch.cat(guide.encoder.forward_features(x), -1).detach())


# --------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mmva", "conv-mmva", "va-pegasos", "conv-va-pegasos"])
def test_recipe_trains_one_step_on_digits(name):
    from pyrodgm.data import load_dataset

    train_data = load_dataset("digits")
    small = {"hidden": (20, 20)} if name in ("mmva", "va-pegasos") else {}  # the conv models' layers are the paper's
    config = TrainConfig.paper(name, z_dim=4, **small)
    recipe_ = recipe(name)
    model, guide = recipe_.create(config, train_data.num_features, train_data.num_classes)
    loss = recipe_.loss(config, num_data=1200, num_labels=1200 if recipe_.supervised else 0)
    x = torch.bernoulli(train_data.flat()[:32]).to(torch.get_default_dtype())
    y = train_data.y[:32] if recipe_.supervised else None
    value = training_step(model, guide, loss, pyro.optim.Adam({"lr": 1e-3}), (x, y))
    assert torch.isfinite(torch.tensor(value))
    if recipe_.supervised:
        assert set(loss.terms) == {"generative", "hinge"} and loss.terms["hinge"].loss.C == config.params.margin_C
        subset = train_data.subset(torch.arange(50))
        subset.x = subset.x.to(torch.get_default_dtype())
        assert 0.0 <= recipe_.metrics(model, guide, subset)["error"] <= 1.0


def test_mmva_trains_an_epoch_with_every_label(tmp_path):
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the training loop's float32 data and networks
    try:
        _train_mmva_epoch(tmp_path)
    finally:
        torch.set_default_dtype(dtype)


def _train_mmva_epoch(tmp_path):
    config = TrainConfig.for_model(
        model="mmva", dataset="digits", epochs=1, hidden=(20, 20), z_dim=4, batch_size=100, labels=100,
        labelled_per_batch=10, out=str(tmp_path), samples=False, lr=3e-3,
    )
    metrics = train(config, progress=False)
    assert config.labels == 1200 and config.labelled_per_batch == 100  # supervised: every non-validation label
    assert metrics["config"]["labels"] == 1200
    assert 0.0 <= metrics["best_validation"]["error"] <= 1.0 and 0.0 <= metrics["test"]["error"] <= 1.0


@pytest.mark.slow
def test_experiment_script_fits_pegasos_on_vae_features(tmp_path):
    script = Path(__file__).resolve().parents[1] / "experiments" / "mmva_mnist.py"
    args = [sys.executable, str(script), "--dataset", "digits", "--validation", "300", "--device", "cpu", "--epochs", "1",
            "--model", "va-pegasos", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--quiet",
            "--threads", "1"]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    result = json.loads((tmp_path / "results" / "va_pegasos_full_labels_digits_seed0.json").read_text())
    assert result["test"]["error"] == result["svm_test_error"] and 0.0 <= result["svm_test_error"] < 0.9
    assert result["paper"]["test_error"] == 0.0104
