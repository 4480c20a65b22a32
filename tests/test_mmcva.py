"""Tests of Conv-MMCVA (pyrodgm.models.mmcva, pyrodgm.guides.mmcva, pyrodgm.recipes.mmcva; Li et
al., Sec. 3.3): the point-estimate label is the max-margin classifier's argmax, the bounds of
eq. 8 and eq. 10 against hand computations, no generative gradient into the classifier,
the networks on 8x8, 28x28 and 32x32 images, the eq. 16 weights of the recipe, one
training step on digits, and the classification error read from the label site."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import Adam
from torch.distributions import kl_divergence

from pyrodgm.data import load_dataset
from pyrodgm.evaluation import classification_error, iwae_log_likelihood, predict_proba
from pyrodgm.guides.mmcva import ArgmaxOneHotCategorical, ConvMMCVAGuide
from pyrodgm.losses import SemiSupervisedELBO, WeightedSum
from pyrodgm.losses.margin import margin_error
from pyrodgm.models.mmcva import ConvMMCVA, ConvMMCVASpec
from pyrodgm.training import TrainConfig
from pyrodgm.zoo import defaults, recipe

pytestmark = pytest.mark.usefixtures("pyro_test_env")

IMAGE, K, Z = (1, 8, 8), 4, 3


def make_pair(image=IMAGE, num_classes=K, z_dim=Z):
    spec = ConvMMCVASpec(image, num_classes, z_dim, (4, 4), classifier_channels=(4, 6, 6), encoder_channels=(4, 4, 4))
    return ConvMMCVA(spec), ConvMMCVAGuide(spec)


def binary(n, d=64):
    return torch.rand(n, d).bernoulli()


def normal_log_prob(value, loc, scale):
    return (-0.5 * ((value - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def bernoulli_log_prob(x, logits):
    return (x * logits - F.softplus(logits)).sum(-1)


# --------------------------------------------------------------------------------------
# the point-estimate distribution
# --------------------------------------------------------------------------------------
def test_argmax_distribution_is_a_delta_at_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    d = ArgmaxOneHotCategorical(logits=logits)
    mode = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(d.sample(), mode) and torch.equal(d.rsample((5,)), mode.expand(5, 2, 3))
    assert d.has_rsample and torch.equal(d.mean, mode) and torch.equal(d.entropy(), torch.zeros(2))
    other = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert d.log_prob(mode).tolist() == [0.0, 0.0]
    assert d.log_prob(other).tolist() == [-math.inf, 0.0]
    expanded = d.expand((4, 2))
    assert type(expanded) is ArgmaxOneHotCategorical and torch.equal(expanded.sample(), mode.expand(4, 2, 3))
    # KL(delta || p) = -log p(y_hat): log 3 against a uniform prior, not the categoricals' KL
    prior = dist.OneHotCategorical(logits=torch.zeros(3)).expand((2,))
    assert torch.allclose(kl_divergence(d, prior), torch.full((2,), math.log(3)))
    assert torch.allclose(F.softmax(predict_logits(d), -1), logits.softmax(-1))


def predict_logits(d):
    from pyrodgm.traces import _categorical_logits

    return _categorical_logits(d)


def test_rsample_carries_no_gradient_to_the_logits():
    logits = torch.randn(3, 4, requires_grad=True)
    value = ArgmaxOneHotCategorical(logits=logits).rsample()
    assert not value.requires_grad


# --------------------------------------------------------------------------------------
# the guide and the bounds
# --------------------------------------------------------------------------------------
def test_the_point_estimate_label_is_the_classifiers_argmax():
    model, guide = make_pair()
    guide.eval()
    x = binary(9)
    trace = poutine.trace(guide).get_trace(x)
    scores = trace.nodes["scores"]["value"]
    assert torch.allclose(scores, guide.classifier(x))
    assert torch.allclose(trace.nodes["features"]["value"], guide.classifier.features(x))
    assert torch.equal(trace.nodes["y"]["value"], F.one_hot(scores.argmax(-1), K).to(x.dtype))
    assert isinstance(trace.nodes["y"]["fn"], ArgmaxOneHotCategorical)
    # the auxiliary feature/score sites raise no model/guide mismatch warning (warnings are errors)
    SemiSupervisedELBO(max_plate_nesting=1).loss(model, guide, x)


def _hand_elbo(model, guide, x, y_one_hot, z):
    loc, scale = guide.encoder(x, y_one_hot)
    logits = model.decoder(z, y_one_hot)
    return (
        bernoulli_log_prob(x, logits)
        + math.log(1 / K)
        + normal_log_prob(z, torch.zeros(Z), torch.ones(Z))
        - normal_log_prob(z, loc, scale)
    )


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_unlabelled_bound_is_eq_10_at_the_predicted_label(analytic_kl):
    model, guide = make_pair()
    model.eval(), guide.eval()  # batch-norm statistics fixed, no dropout: the same nets in both runs
    x = binary(6)
    loss = SemiSupervisedELBO(analytic_kl=analytic_kl, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    value = loss.differentiable_loss(model, guide, x, y=torch.full((6,), -1))
    pyro.set_rng_seed(3)
    trace = poutine.trace(guide).get_trace(x)
    y_hat = F.one_hot(guide.classifier(x).argmax(-1), K).to(x.dtype)
    z = trace.nodes["z"]["value"]
    hand = _hand_elbo(model, guide, x, y_hat, z)
    if analytic_kl:  # the z term in closed form, the y term -KL(delta || p(y)) = log p(y_hat)
        loc, scale = guide.encoder(x, y_hat)
        kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).sum(-1)
        hand = bernoulli_log_prob(x, model.decoder(z, y_hat)) + math.log(1 / K) - kl
    assert torch.allclose(value, -hand.sum(), rtol=1e-10)


def test_labelled_bound_is_eq_8_at_the_given_label():
    model, guide = make_pair()
    model.eval(), guide.eval()
    x = binary(5)
    y = (guide.classifier(x).argmax(-1) + 1) % K  # never the prediction: the given label is used
    loss = SemiSupervisedELBO(analytic_kl=False, max_plate_nesting=1)
    pyro.set_rng_seed(4)
    value = loss.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(4)
    z = poutine.trace(guide).get_trace(x, y).nodes["z"]["value"]
    hand = _hand_elbo(model, guide, x, F.one_hot(y, K).to(x.dtype), z)
    assert torch.allclose(value, -hand.sum(), rtol=1e-10)


def test_the_generative_loss_does_not_train_the_classifier():
    model, guide = make_pair()
    x, y = binary(8), torch.tensor([0, 1, 2, 3, -1, -1, -1, -1])
    SemiSupervisedELBO(max_plate_nesting=1).differentiable_loss(model, guide, x, y=y).backward()
    assert all(p.grad is None or not p.grad.any() for p in guide.classifier.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.encoder.parameters())


@pytest.mark.parametrize("image", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 7, 9)])
def test_nets_fit_any_image_size_and_leading_dims(image):
    model, guide = make_pair(image)
    d = image[0] * image[1] * image[2]
    x = binary(3, d)
    y = F.one_hot(torch.tensor([0, 1, 3]), K).double()
    z = torch.randn(2, 3, Z)  # particles x batch
    assert model.decoder(z, y).shape == (2, 3, d)
    loc, scale = guide.encoder(x, y.expand(2, 3, K))
    assert loc.shape == scale.shape == (2, 3, Z) and (scale > 0).all()
    assert guide.classifier(x).shape == (3, K)
    assert iwae_log_likelihood(model, guide, x, num_particles=3).shape == (3,)


def test_paper_architecture_on_mnist_shapes():
    spec = ConvMMCVASpec((1, 28, 28))
    model, guide = ConvMMCVA(spec), ConvMMCVAGuide(spec)
    assert [b["conv"].conv.out_channels for b in guide.classifier.convs] == [32, 64, 64, 128, 128]
    assert [b["conv"].conv.in_channels for b in guide.encoder.convs] == [1 + 10, 32 + 10, 32 + 10, 64 + 10, 64 + 10]
    assert guide.classifier.out_features == 128 and model.decoder.start_shape == (64, 7, 7)


# --------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------
def test_recipe_builds_eq_16_with_the_papers_weights():
    config = TrainConfig.for_model(**{**defaults("conv-mmcva", "mnist"), "model": "conv-mmcva", "dataset": "mnist"})
    assert (config.params.mmcva_alpha, config.params.alpha_u, config.params.alpha_b) == (0.1, 0.3, 1e-3)
    assert (config.batch_size, config.labelled_per_batch, config.params.z_dim) == (600, 100, 100)
    loss = recipe("conv-mmcva").loss(config, num_data=49900, num_labels=100)
    assert isinstance(loss, WeightedSum) and set(loss.terms) == {"generative", "hinge", "hat", "balance"}
    assert loss.terms["generative"].loss.alpha == 0.0  # no cross-entropy: the classifier is max-margin
    assert loss.terms["hinge"].weight == pytest.approx(0.1) and loss.terms["hinge"].loss.C == pytest.approx(6.0)
    assert loss.terms["hat"].weight == pytest.approx(0.1 * 0.3 * 600 / 500)
    assert loss.terms["balance"].weight == pytest.approx(0.1 * 1e-3 * 600)
    assert loss.terms["hinge"].loss.sigma == pytest.approx((2e-4 * 600) ** -0.5)


@pytest.mark.parametrize("labelled", [0, 600])
def test_recipe_needs_labelled_and_unlabelled_rows(labelled):
    config = TrainConfig.for_model(model="conv-mmcva", dataset="mnist", batch_size=600, labelled_per_batch=labelled)
    with pytest.raises(ValueError, match="labelled_per_batch"):
        recipe("conv-mmcva").loss(config, 100, 100)


def test_recipe_rejects_a_gaussian_likelihood():
    config = TrainConfig.for_model(model="conv-mmcva", dataset="digits", likelihood="gaussian", binarize=False)
    with pytest.raises(ValueError, match="Bernoulli"):
        recipe("conv-mmcva").build(config, 64, 10)


def test_trains_one_step_on_digits_and_error_is_the_classifiers_argmax():
    data = load_dataset("digits", train=True)
    x = data.flat()[:60].double().bernoulli()
    y = torch.where(torch.arange(60) < 20, data.y[:60], -1)
    config = TrainConfig.for_model(**{**defaults("conv-mmcva", "digits"), "model": "conv-mmcva", "dataset": "digits",
                            "batch_size": 60, "labelled_per_batch": 20})  # fmt: skip
    model, guide = recipe("conv-mmcva").create(config, 64, 10)
    loss = recipe("conv-mmcva").loss(config, num_data=1000, num_labels=100)
    before = {k: v.detach().clone() for k, v in guide.classifier.state_dict().items()}
    value = SVI(model, guide, Adam({"lr": 1e-3}), loss).step(x, y=y)
    assert math.isfinite(value)
    for name in ("generative.labelled_elbo", "generative.unlabelled_elbo", "hinge.hinge", "hat.hat", "balance.balance"):
        assert torch.isfinite(loss.last_components[name])
    after = guide.classifier.state_dict()
    assert not torch.equal(before["scores.linear.weight"], after["scores.linear.weight"])  # the margin terms train it
    model.eval(), guide.eval()
    scores_argmax = guide.classifier(x).argmax(-1)
    assert torch.equal(predict_proba(guide, x).argmax(-1), scores_argmax)
    assert classification_error(guide, x, data.y[:60]) == pytest.approx(margin_error(guide, x, data.y[:60]))


# --------------------------------------------------------------------------------------
# the authors' straight-through gradient from the bound into the classifier
# --------------------------------------------------------------------------------------
def _grads(module):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def _loss_and_grads(loss, model, guide, x, y, seed=5):
    pyro.set_rng_seed(seed)
    for p in [*model.parameters(), *guide.parameters()]:
        p.grad = None
    value = loss.differentiable_loss(model, guide, x, y=y)
    value.backward()
    return value.detach(), _grads(guide.classifier), _grads(guide.encoder) + _grads(model)


def _hand_straight_through(model, guide, x, y, scale, seed=5):
    """``scale * d/dtheta sum_nk g_nk softmax(F(x_n))_k`` with ``g = dL_G/dy`` at the one-hot
    labels (given, else the argmax), by autograd on the bound written out: the authors'
    ``grad_one_hot_y`` and ``cla_loss_gen``.  The noise of z is read from the guide's runs
    in the loss's order (labelled rows, then unlabelled)."""
    labelled = y >= 0
    pyro.set_rng_seed(seed)
    z_l = poutine.trace(guide).get_trace(x[labelled], y[labelled]).nodes["z"]["value"]
    z_u = poutine.trace(guide).get_trace(x[~labelled]).nodes["z"]["value"]
    scores = guide.classifier(x)
    y_one_hot = torch.where(labelled[:, None], F.one_hot(y.clamp(min=0), K), F.one_hot(scores.argmax(-1), K))
    y_leaf = y_one_hot.to(x.dtype).requires_grad_()
    z = torch.empty(x.shape[0], Z, dtype=x.dtype)
    z[labelled], z[~labelled] = z_l, z_u
    loc, sd = guide.encoder(x, y_one_hot.to(x.dtype))
    eps = ((z - loc) / sd).detach()
    loc, sd = guide.encoder(x, y_leaf)
    z_of_y = loc + sd * eps  # the reparameterised z depends on y too
    bound = _hand_elbo_at(model, guide, x, y_leaf, z_of_y, loc, sd).sum()
    (g,) = torch.autograd.grad(-bound, y_leaf)
    surrogate = (g.detach() * scores.softmax(-1)).sum()
    return [scale * d for d in torch.autograd.grad(surrogate, list(guide.classifier.parameters()), allow_unused=True, materialize_grads=True)]


def _hand_elbo_at(model, guide, x, y_one_hot, z, loc, scale):
    logits = model.decoder(z, y_one_hot)
    return bernoulli_log_prob(x, logits) + math.log(1 / K) + normal_log_prob(z, torch.zeros(Z), torch.ones(Z)) - normal_log_prob(z, loc, scale)


def test_straight_through_adds_scale_times_the_bounds_gradient_through_the_softmax():
    from pyrodgm.losses import StraightThroughELBO

    model, guide = make_pair()
    model.eval(), guide.eval()  # no dropout, fixed batch-norm: every run of the nets is the same function
    x, y = binary(8), torch.tensor([0, 1, 2, 3, -1, -1, -1, -1])
    elbo = SemiSupervisedELBO(analytic_kl=False, max_plate_nesting=1)
    value_0, classifier_0, others_0 = _loss_and_grads(StraightThroughELBO(elbo, 0.0), model, guide, x, y)
    assert all(not g.any() for g in classifier_0)  # scale 0: no gradient into the classifier, as before
    scale = 0.25
    value_s, classifier_s, others_s = _loss_and_grads(StraightThroughELBO(elbo, scale), model, guide, x, y)
    assert torch.equal(value_s, value_0)  # the same number: only the classifier's gradient changes
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(others_s, others_0))
    hand = _hand_straight_through(model, guide, x, y, scale)
    assert any(h.abs().sum() > 0 for h in hand)
    for got, want in zip(classifier_s, hand):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)


def test_straight_through_reaches_the_classifier_from_labelled_rows_too():
    from pyrodgm.losses import StraightThroughELBO

    model, guide = make_pair()
    model.eval(), guide.eval()
    x, y = binary(4), torch.tensor([0, 1, 2, 3])
    elbo = SemiSupervisedELBO(analytic_kl=False, max_plate_nesting=1)
    _, classifier, _ = _loss_and_grads(StraightThroughELBO(elbo, 0.5), model, guide, x, y)
    for got, want in zip(classifier, _hand_straight_through_labelled(model, guide, x, y, 0.5)):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)


def _hand_straight_through_labelled(model, guide, x, y, scale, seed=5):
    pyro.set_rng_seed(seed)
    z = poutine.trace(guide).get_trace(x, y).nodes["z"]["value"]
    y_leaf = F.one_hot(y, K).to(x.dtype).requires_grad_()
    loc, sd = guide.encoder(x, y_leaf.detach())
    eps = ((z - loc) / sd).detach()
    loc, sd = guide.encoder(x, y_leaf)
    z_of_y = loc + sd * eps
    (g,) = torch.autograd.grad(-_hand_elbo_at(model, guide, x, y_leaf, z_of_y, loc, sd).sum(), y_leaf)
    surrogate = (g * guide.classifier(x).softmax(-1)).sum()
    return [scale * d for d in torch.autograd.grad(surrogate, list(guide.classifier.parameters()), allow_unused=True, materialize_grads=True)]


def test_recipe_adds_the_straight_through_gradient_only_when_asked():
    from pyrodgm.losses import StraightThroughELBO

    base = {**defaults("conv-mmcva", "mnist"), "model": "conv-mmcva", "dataset": "mnist"}
    plain = recipe("conv-mmcva").loss(TrainConfig.for_model(**base), num_data=49900, num_labels=100)
    assert isinstance(plain.terms["generative"].loss, SemiSupervisedELBO)
    config = TrainConfig.for_model(**base, straight_through=3e-4)
    wrapped = recipe("conv-mmcva").loss(config, num_data=49900, num_labels=100).terms["generative"].loss
    assert isinstance(wrapped, StraightThroughELBO) and wrapped.scale == 3e-4
    with pytest.raises(ValueError, match="scale"):
        StraightThroughELBO(SemiSupervisedELBO(), -1.0)
