"""Tests of pyrodgm.losses: the semi-supervised ELBO against hand computations, Pyro's
TraceEnum_ELBO, SVI, and the WeightedSum / ClassifierCrossEntropy combinators."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam

from pyrodgm.evaluation import predict_proba
from pyrodgm.guides import M2Guide, VAEGuide
from pyrodgm.losses import ClassifierCrossEntropy, Weighted, WeightedSum
from pyrodgm.losses import ImportanceWeightedELBO, SemiSupervisedELBO
from pyrodgm.modeling import registered_once
from pyrodgm.models import M2, VAE
from pyrodgm.nets import MLPSpec
from pyrodgm.traces import TraceTerms, particle_traces

pytestmark = pytest.mark.usefixtures("pyro_test_env")

X_DIM, K, Z_DIM, HIDDEN = 3, 2, 2, (4,)
LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def tiny_m2(x_dim=X_DIM, num_classes=K, z_dim=Z_DIM, hidden=HIDDEN):
    return M2(MLPSpec(x_dim, num_classes, z_dim, hidden)), M2Guide(MLPSpec(x_dim, num_classes, z_dim, hidden))


def binary_x(batch, x_dim=X_DIM):
    return torch.bernoulli(torch.full((batch, x_dim), 0.5))


def hand_labelled_integrand(model, guide, x, y_onehot, eps, analytic_kl):
    """``log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)`` (or ``... - KL``) with
    ``z = mu + sigma * eps``; eps ``(particles, batch, z_dim)``; returns ``(particles, batch)``.
    Densities written out by hand from the nets' outputs."""
    num_classes = y_onehot.shape[-1]
    loc, scale = guide.encoder_head(guide.encoder(torch.cat([x, y_onehot], -1)))
    z = loc + scale * eps
    logits = model.likelihood(model.decoder(torch.cat([z, y_onehot.expand(z.shape[:-1] + (num_classes,))], -1)))
    log_px = (x * logits - F.softplus(logits)).sum(-1)  # Bernoulli(logits) log-likelihood
    log_py = -math.log(num_classes)  # uniform prior
    if analytic_kl:
        kl = (-torch.log(scale) + 0.5 * (scale**2 + loc**2) - 0.5).sum(-1)  # KL(N(m,s^2) || N(0,1))
        return log_px + log_py - kl
    log_pz = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
    log_qz = (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI).sum(-1)
    return log_px + log_py + log_pz - log_qz


def classifier_log_q(guide, x):
    logits = guide.classifier_head(guide.classifier(x))
    return logits - logits.logsumexp(-1, keepdim=True)


def hand_unlabelled_elbo(model, guide, x, eps, analytic_kl):
    """``sum_b -U(x_b)`` with eps ``(K, particles, batch, z_dim)``, particles averaged."""
    num_classes = eps.shape[0]
    log_q = classifier_log_q(guide, x)
    total = 0.0
    for k in range(num_classes):
        y_onehot = F.one_hot(torch.full((x.shape[0],), k), num_classes).to(x.dtype)
        integrand = hand_labelled_integrand(model, guide, x, y_onehot, eps[k], analytic_kl).mean(0)
        total = total + log_q[:, k].exp() * integrand
    entropy = -(log_q.exp() * log_q).sum(-1)
    return (total + entropy).sum()


def hand_labelled_elbo(model, guide, x, y, eps, analytic_kl, num_classes=K):
    """``sum_b -L(x_b, y_b)`` with eps ``(particles, batch, z_dim)``, particles averaged."""
    y_onehot = F.one_hot(y, num_classes).to(x.dtype)
    return hand_labelled_integrand(model, guide, x, y_onehot, eps, analytic_kl).mean(0).sum()


def param_grads():
    return {name: (None if p.grad is None else p.grad.clone()) for name, p in pyro.get_param_store().named_parameters()}


def zero_grads():
    for _, p in pyro.get_param_store().named_parameters():
        p.grad = None


# --------------------------------------------------------------------------------------
# 1. the enumerated M2 ELBO against a hand computation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("analytic_kl", [False, True])
@pytest.mark.parametrize("z_dim", [1, 2])
def test_unlabelled_elbo_matches_hand_computation(analytic_kl, z_dim):
    model, guide = tiny_m2(z_dim=z_dim)
    x = binary_x(3)
    loss_fn = SemiSupervisedELBO(analytic_kl=analytic_kl, max_plate_nesting=1)
    pyro.set_rng_seed(123)
    loss = loss_fn.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(123)
    eps = torch.randn(K, 1, 3, z_dim)  # (enum, particles, batch, z_dim), drawn once in the guide
    expected = -hand_unlabelled_elbo(model, guide, x, eps, analytic_kl)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-12)
    assert loss.requires_grad
    assert torch.allclose(loss_fn.last_components["unlabelled_elbo"], -expected)
    assert set(loss_fn.last_components) == {"unlabelled_elbo"}


@pytest.mark.parametrize("analytic_kl", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 2.5])
def test_labelled_elbo_matches_hand_computation(analytic_kl, alpha):
    model, guide = tiny_m2()
    x, y = binary_x(3), torch.tensor([1, 0, 1])
    loss_fn = SemiSupervisedELBO(alpha=alpha, analytic_kl=analytic_kl, max_plate_nesting=1)
    pyro.set_rng_seed(7)
    loss = loss_fn.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(7)
    eps = torch.randn(1, 3, Z_DIM)
    elbo = hand_labelled_elbo(model, guide, x, y, eps, analytic_kl)
    nll = -classifier_log_q(guide, x).gather(-1, y.unsqueeze(-1)).sum()
    assert torch.allclose(loss, -elbo + alpha * nll, rtol=1e-12, atol=1e-12)
    assert torch.allclose(loss_fn.last_components["labelled_elbo"], elbo)
    if alpha:
        assert torch.allclose(loss_fn.last_components["classification"], nll)
    else:
        assert "classification" not in loss_fn.last_components


@pytest.mark.parametrize("analytic_kl", [False, True])
def test_mixed_batch_is_sum_of_labelled_and_unlabelled_parts(analytic_kl):
    model, guide = tiny_m2()
    x = binary_x(5)
    y = torch.tensor([1, -1, 0, -1, -1])
    lab, unl = y != -1, y == -1
    alpha = 0.7
    loss_fn = SemiSupervisedELBO(alpha=alpha, analytic_kl=analytic_kl, max_plate_nesting=1)
    pyro.set_rng_seed(11)
    loss = loss_fn.differentiable_loss(model, guide, x, y=y)
    # the labelled rows are traced first, then the unlabelled ones
    pyro.set_rng_seed(11)
    eps_l = torch.randn(1, 2, Z_DIM)
    eps_u = torch.randn(K, 1, 3, Z_DIM)
    labelled = hand_labelled_elbo(model, guide, x[lab], y[lab], eps_l, analytic_kl)
    unlabelled = hand_unlabelled_elbo(model, guide, x[unl], eps_u, analytic_kl)
    nll = -classifier_log_q(guide, x[lab]).gather(-1, y[lab].unsqueeze(-1)).sum()
    assert torch.allclose(loss, -labelled - unlabelled + alpha * nll, rtol=1e-12, atol=1e-12)
    comps = loss_fn.last_components
    assert torch.allclose(comps["labelled_elbo"], labelled)
    assert torch.allclose(comps["unlabelled_elbo"], unlabelled)
    assert torch.allclose(comps["classification"], nll)
    # and the same as the two parts computed by separate calls with the same noise
    pyro.set_rng_seed(11)
    part_l = loss_fn.differentiable_loss(model, guide, x[lab], y=y[lab])
    part_u = loss_fn.differentiable_loss(model, guide, x[unl])
    assert torch.allclose(loss, part_l + part_u, rtol=1e-12, atol=1e-12)


def test_plate_nesting_guess_draws_no_random_numbers():
    model, guide = tiny_m2()
    x, y = binary_x(4), torch.tensor([1, -1, 0, -1])
    pyro.set_rng_seed(4)
    guessed = SemiSupervisedELBO().loss(model, guide, x, y=y)
    pyro.set_rng_seed(4)
    given = SemiSupervisedELBO(max_plate_nesting=1).loss(model, guide, x, y=y)
    assert guessed == given


def test_all_unlabelled_labels_equal_no_labels():
    model, guide = tiny_m2()
    x = binary_x(4)
    loss_fn = SemiSupervisedELBO(max_plate_nesting=1)
    pyro.set_rng_seed(3)
    with_labels = loss_fn.loss(model, guide, x, y=torch.full((4,), -1))
    pyro.set_rng_seed(3)
    without = loss_fn.loss(model, guide, x)
    assert with_labels == without


# --------------------------------------------------------------------------------------
# 2. agreement with Pyro's TraceEnum_ELBO
# --------------------------------------------------------------------------------------
def test_matches_trace_enum_elbo_loss_and_grads():
    model, guide = tiny_m2()
    x = binary_x(3)
    pyro.set_rng_seed(5)
    ours = SemiSupervisedELBO(analytic_kl=False, max_plate_nesting=1).loss_and_grads(model, guide, x)
    ours_grads = param_grads()
    zero_grads()
    pyro.set_rng_seed(5)
    theirs = TraceEnum_ELBO(max_plate_nesting=1).loss_and_grads(model, guide, x)
    theirs_grads = param_grads()
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert set(ours_grads) == set(theirs_grads)
    assert len(ours_grads) == len(list(model.parameters())) + len(list(guide.parameters()))
    for name, grad in ours_grads.items():
        assert grad is not None and theirs_grads[name] is not None, name
        assert torch.allclose(grad, theirs_grads[name], rtol=1e-10, atol=1e-12), name
    # the gradient reaches the classifier (through the enumeration weights q(y|x))
    assert any(g.abs().sum() > 0 for n, g in ours_grads.items() if n.startswith("m2_guide$$$classifier"))


# --------------------------------------------------------------------------------------
# 3. analytic KL
# --------------------------------------------------------------------------------------
def _per_particle_elbo(model, guide, x, num_particles, analytic_kl):
    model_trace, guide_trace = particle_traces(model, guide, (x,), {}, num_particles, 1)
    terms = TraceTerms(model_trace, guide_trace, 1, analytic_kl)
    return terms, terms.elbo_per_datapoint().sum(-1).detach()


def test_analytic_kl_agrees_with_monte_carlo():
    model, guide = tiny_m2()
    x = binary_x(3)
    n = 20000
    pyro.set_rng_seed(0)
    mc_terms, mc = _per_particle_elbo(model, guide, x, n, analytic_kl=False)
    pyro.set_rng_seed(1)
    kl_terms, kl = _per_particle_elbo(model, guide, x, n, analytic_kl=True)
    assert mc_terms.kl_sites == [] and kl_terms.kl_sites == ["z"]
    # the per-particle values average to the ELBO of the trace pair
    assert torch.allclose(mc.mean(), mc_terms.elbo().detach(), rtol=1e-10)
    assert torch.allclose(kl.mean(), kl_terms.elbo().detach(), rtol=1e-10)
    # both estimate the same ELBO: difference within 5 standard errors
    stderr = math.sqrt(mc.var() / n + kl.var() / n)
    assert abs(mc.mean() - kl.mean()) < 5 * stderr
    # the closed form removes the variance of log p(z) - log q(z)
    assert kl.var() < 0.9 * mc.var()
    # and the loss object agrees with the trace-level estimate
    pyro.set_rng_seed(2)
    loss = SemiSupervisedELBO(num_particles=n, analytic_kl=True, max_plate_nesting=1).loss(model, guide, x)
    assert abs(-loss - kl.mean()) < 5 * math.sqrt(kl.var() / n) + 5 * stderr


def _two_latent_model(x):
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(0.0, 1.0))
        z1 = pyro.sample("z1", dist.Normal(z2, 1.0))
        pyro.sample("x", dist.Normal(z1, 0.5), obs=x)


def _guide_z1_first(x):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.5 * x, 0.8))
        pyro.sample("z2", dist.Normal(0.3 * z1, 0.9))


def _guide_z2_first(x):
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(0.2 * x, 0.9))
        pyro.sample("z1", dist.Normal(0.5 * x + z2, 0.8))


@pytest.mark.parametrize(
    "guide, analytic_kl, expected",
    [
        (_guide_z1_first, True, ["z2"]),  # p(z1|z2) depends on z2, drawn after z1 in q
        (_guide_z2_first, True, ["z2", "z1"]),
        (_guide_z1_first, ["z1", "z2"], ["z2"]),  # named sites are still checked
        (_guide_z2_first, ["z1"], ["z1"]),
        (_guide_z2_first, False, []),
    ],
)
def test_analytic_kl_only_where_sound(guide, analytic_kl, expected):
    x = torch.randn(4)
    model_trace, guide_trace = particle_traces(_two_latent_model, guide, (x,), {}, 2, 1)
    terms = TraceTerms(model_trace, guide_trace, 1, analytic_kl)
    assert terms.kl_sites == expected


def test_a_kl_registered_later_is_used():
    """Whether a closed form exists is remembered per pair of types, and forgotten when
    torch.distributions.kl.register_kl adds one."""
    from torch.distributions import kl as torch_kl

    from pyrodgm.traces import _has_kl

    class Q(torch.distributions.Distribution):
        pass

    class P(torch.distributions.Distribution):
        pass

    q, p = Q(torch.Size([2]), validate_args=False), P(torch.Size([2]), validate_args=False)
    assert not _has_kl(q, p)
    registry = dict(torch_kl._KL_REGISTRY)
    try:
        torch_kl.register_kl(Q, P)(lambda q, p: torch.zeros(q.batch_shape))
        assert _has_kl(q, p)
    finally:
        torch_kl._KL_REGISTRY.clear()
        torch_kl._KL_REGISTRY.update(registry)
        torch_kl._KL_MEMOIZE.clear()
    assert not _has_kl(q, p)


def test_unsound_order_elbo_is_unbiased():
    """With the guide drawing z1 before z2 the analytic-KL ELBO (KL only at z2) still
    equals the pure Monte Carlo one: closed form at z2 given z1 ~ q."""
    x = torch.tensor([0.3, -1.2, 2.0])

    def exact_elbo():
        # E_q[log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1) - log q(z2|z1)], all Gaussian
        m1, s1 = 0.5 * x, 0.8
        # z2 = 0.3 z1 + 0.9 e  -> E[z2] = 0.3 m1, E[z2^2] = 0.09 (m1^2 + s1^2) + 0.81
        ez1, ez1sq = m1, m1**2 + s1**2
        ez2sq = 0.09 * ez1sq + 0.81  # E[z2] = 0.3 m1 does not enter
        ez1z2 = 0.3 * ez1sq
        log_px = -0.5 * (x**2 - 2 * x * ez1 + ez1sq) / 0.25 - math.log(0.5) - 0.5 * LOG_2PI
        log_pz1 = -0.5 * (ez1sq - 2 * ez1z2 + ez2sq) - 0.5 * LOG_2PI
        log_pz2 = -0.5 * ez2sq - 0.5 * LOG_2PI
        ent_q1 = 0.5 + math.log(s1) + 0.5 * LOG_2PI
        ent_q2 = 0.5 + math.log(0.9) + 0.5 * LOG_2PI
        return (log_px + log_pz1 + log_pz2 + ent_q1 + ent_q2).sum()

    n = 40000
    pyro.set_rng_seed(0)
    terms, values = _per_particle_elbo(_two_latent_model, _guide_z1_first, x, n, analytic_kl=True)
    assert terms.kl_sites == ["z2"]
    assert abs(values.mean() - exact_elbo()) < 5 * math.sqrt(values.var() / n)


# --------------------------------------------------------------------------------------
# 4. SVI
# --------------------------------------------------------------------------------------
def test_svi_decreases_loss():
    x_dim, num_classes = 64, 10  # digits-sized
    spec = MLPSpec(x_dim, num_classes, 8, (32,))
    model, guide = M2(spec), M2Guide(spec)
    x = binary_x(40, x_dim)
    y = torch.randint(0, num_classes, (40,))
    y[::2] = -1
    svi = SVI(model, guide, Adam({"lr": 1e-2}), SemiSupervisedELBO(alpha=1.0))
    losses = [svi.step(x, y=y) for _ in range(100)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1 * abs(first)


def _separable_problem(n=20):
    y = torch.arange(n) % 2
    x = torch.bernoulli(torch.full((n, 6), 0.5))
    x[y == 0, :3] = 1.0
    x[y == 0, 3:] = 0.0
    x[y == 1, :3] = 0.0
    x[y == 1, 3:] = 1.0
    return x, y


def test_classifier_gradient_responds_to_alpha():
    """M2's classifier enters a fully labelled batch only through alpha's term."""
    model, guide = tiny_m2(x_dim=6)
    x, y = _separable_problem()
    SemiSupervisedELBO(alpha=0.0).loss_and_grads(model, guide, x, y=y)
    grads = param_grads()
    classifier = [n for n in grads if n.startswith("m2_guide$$$classifier")]
    assert classifier
    assert all(grads[n] is None or not grads[n].any() for n in classifier)
    zero_grads()
    SemiSupervisedELBO(alpha=1.0).loss_and_grads(model, guide, x, y=y)
    grads = param_grads()
    assert all(grads[n] is not None and grads[n].any() for n in classifier)


def test_large_alpha_fits_labelled_rows():
    model, guide = tiny_m2(x_dim=6, hidden=(8,))
    x, y = _separable_problem()
    loss_fn = SemiSupervisedELBO(alpha=50.0)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), loss_fn)
    svi.step(x, y=y)
    first_nll = float(loss_fn.last_components["classification"])
    for _ in range(100):
        svi.step(x, y=y)
    last_nll = float(loss_fn.last_components["classification"])
    assert last_nll < 0.2 * first_nll
    probs = predict_proba(guide, x)
    assert torch.equal(probs.argmax(-1), y)


# --------------------------------------------------------------------------------------
# 5. vectorised particles
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("analytic_kl", [False, True])
def test_num_particles_is_mean_of_single_particle_elbos(analytic_kl):
    """With N vectorised particles the ELBO is the mean over particles of the
    single-particle integrand, each evaluated at its own noise eps[:, n]."""
    model, guide = tiny_m2()
    x = binary_x(3)
    n = 4
    pyro.set_rng_seed(17)
    loss = SemiSupervisedELBO(num_particles=n, analytic_kl=analytic_kl, max_plate_nesting=1).loss(model, guide, x)
    pyro.set_rng_seed(17)
    eps = torch.randn(K, n, 3, Z_DIM)
    with torch.no_grad():
        singles = torch.stack([hand_unlabelled_elbo(model, guide, x, eps[:, i : i + 1], analytic_kl) for i in range(n)])
    assert loss == pytest.approx(-singles.mean().item(), rel=1e-12)
    if not analytic_kl:
        assert singles.std() > 1e-3  # the particles differ: this is not a trivial mean


def test_variance_shrinks_with_particles():
    model, guide = tiny_m2()
    x = binary_x(3)
    loss_1 = SemiSupervisedELBO(num_particles=1, analytic_kl=False, max_plate_nesting=1)
    loss_16 = SemiSupervisedELBO(num_particles=16, analytic_kl=False, max_plate_nesting=1)
    with torch.no_grad():
        v1 = torch.tensor([loss_1.loss(model, guide, x) for _ in range(300)])
        v16 = torch.tensor([loss_16.loss(model, guide, x) for _ in range(300)])
    ratio = float(v1.var() / v16.var())
    # 1/N scaling: ratio ~ 16; with 300 draws each the ratio's log has sd ~ 0.12
    assert 10 < ratio < 26
    assert abs(float(v1.mean() - v16.mean())) < 5 * math.sqrt(v1.var() / 300 + v16.var() / 300)


# --------------------------------------------------------------------------------------
# 6. WeightedSum
# --------------------------------------------------------------------------------------
def test_weighted_sum_value_is_weighted_sum_of_terms():
    model, guide = tiny_m2()
    x, y = binary_x(4), torch.tensor([0, -1, 1, -1])
    elbo = SemiSupervisedELBO(alpha=0.3, analytic_kl=False, max_plate_nesting=1)
    ce = ClassifierCrossEntropy(max_plate_nesting=1)
    total = WeightedSum(elbo=elbo, ce=(2.5, ce), ce_half=Weighted(ce, 0.5, params=lambda n: True))
    pyro.set_rng_seed(9)
    value = total.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(9)  # the terms draw their noise in order
    a = elbo.differentiable_loss(model, guide, x, y=y)
    b = ce.differentiable_loss(model, guide, x, y=y)
    c = ce.differentiable_loss(model, guide, x, y=y)
    assert torch.allclose(value, a + 2.5 * b + 0.5 * c, rtol=1e-12)
    assert torch.allclose(total.last_components["elbo"], a)
    assert torch.allclose(total.last_components["ce"], b)
    assert torch.allclose(total.last_components["elbo.labelled_elbo"], elbo.last_components["labelled_elbo"])
    pyro.set_rng_seed(9)
    assert total.loss_and_grads(model, guide, x, y=y) == pytest.approx(value.item(), rel=1e-12)


def test_weighted_params_restricts_gradient():
    model, guide = tiny_m2()
    x, y = binary_x(4), torch.tensor([0, -1, 1, 1])

    def is_classifier(name):
        return name.startswith("m2_guide$$$classifier")

    elbo = SemiSupervisedELBO(analytic_kl=False, max_plate_nesting=1)
    ce = ClassifierCrossEntropy(max_plate_nesting=1)
    pyro.set_rng_seed(21)
    base_value = WeightedSum(elbo=elbo).loss_and_grads(model, guide, x, y=y)
    base = param_grads()
    zero_grads()
    pyro.set_rng_seed(21)
    value = WeightedSum(elbo=elbo, ce=Weighted(ce, 4.0, params=is_classifier)).loss_and_grads(model, guide, x, y=y)
    restricted = param_grads()
    zero_grads()
    # the restricted term's gradient, alone, on the classifier
    pyro.set_rng_seed(21)
    elbo.differentiable_loss(model, guide, x, y=y)  # same noise as above
    ce_value = ce.differentiable_loss(model, guide, x, y=y)
    classifier_params = {n: p for n, p in pyro.get_param_store().named_parameters() if is_classifier(n)}
    ce_grads = dict(zip(classifier_params, torch.autograd.grad(4.0 * ce_value, list(classifier_params.values()))))

    assert value == pytest.approx(base_value + 4.0 * ce_value.item(), rel=1e-12)
    assert set(base) == set(restricted) and classifier_params
    for name in base:
        if is_classifier(name):
            assert not torch.allclose(restricted[name], base[name]), name
            assert torch.allclose(restricted[name], base[name] + ce_grads[name], rtol=1e-10, atol=1e-12), name
        else:
            assert torch.equal(restricted[name], base[name]), name


def test_weighted_sum_rejects_bad_terms():
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum()
    with pytest.raises(TypeError, match="term 'bad'"):
        WeightedSum(bad=TraceEnum_ELBO())


# --------------------------------------------------------------------------------------
# 7. ClassifierCrossEntropy
# --------------------------------------------------------------------------------------
def test_classifier_cross_entropy_by_hand():
    model, guide = tiny_m2(num_classes=3)
    x = binary_x(5)
    y = torch.tensor([2, -1, 0, 1, -1])
    loss_fn = ClassifierCrossEntropy()
    value = loss_fn.differentiable_loss(model, guide, x, y=y)
    lab = y != -1
    logits = guide.classifier_head(guide.classifier(x[lab]))
    expected = -torch.log_softmax(logits, -1)[torch.arange(3), y[lab]].sum()
    assert torch.allclose(value, expected, rtol=1e-12)
    assert torch.allclose(loss_fn.last_components["classification"], expected)
    with pytest.raises(ValueError, match="empty labelled set"):
        loss_fn.loss(model, guide, x, y=torch.full((5,), -1))
    with pytest.raises(ValueError, match="needs labels"):
        loss_fn.loss(model, guide, x)
    with pytest.raises(ValueError, match="label 3 is out of range for site 'y' with 3 classes"):
        loss_fn.loss(model, guide, x, y=torch.tensor([3, -1, 0, 1, -1]))


def test_classifier_cross_entropy_runs_only_the_guide_up_to_its_label():
    """Nothing after q(y|x) can change -log q(y|x): the model never runs and the guide
    stops at the label (its z site is never sampled), yet SVI steps the classifier."""
    model, guide = tiny_m2(num_classes=3)

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not run")

    x, y = binary_x(5), torch.tensor([2, -1, 0, 1, -1])
    with poutine.trace() as tracer:
        ClassifierCrossEntropy(max_plate_nesting=1).differentiable_loss(no_model, guide, x, y=y)
    sampled = [name for name, site in tracer.trace.nodes.items() if site["type"] == "sample"]
    assert "z" not in sampled
    before = guide.classifier_head.logits_layer.weight.detach().clone()
    SVI(no_model, guide, Adam({"lr": 0.1}), ClassifierCrossEntropy(max_plate_nesting=1)).step(x, y=y)
    assert not torch.equal(guide.classifier_head.logits_layer.weight.detach(), before)


def test_classifier_cross_entropy_rejects_a_non_reparameterized_latent_before_the_label():
    """Its gradient through such a latent would need a score-function term it does not have."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(0.3))  # neither reparameterized nor enumerated
            pyro.sample("y", dist.Categorical(logits=torch.stack([b, 1 - b], -1)))

    with pytest.raises(ValueError, match="'b'.*neither \\(fully\\) reparameterizable nor enumerated"):
        ClassifierCrossEntropy(max_plate_nesting=1).loss(None, guide, binary_x(3), y=torch.tensor([0, 1, -1]))


# --------------------------------------------------------------------------------------
# the fast paths: parameters registered once a loss, log-densities only where used
# --------------------------------------------------------------------------------------
def _param_sites(trace):
    return [name for name, site in trace.nodes.items() if site["type"] == "param"]


def test_parameters_are_registered_once_per_loss_evaluation():
    """The labelled and unlabelled runs send each parameter through the handlers once,
    so SVI (and WeightedSum's restriction) sees every parameter exactly once."""
    model, guide = tiny_m2()
    x, y = binary_x(4), torch.tensor([1, -1, 0, -1])
    with poutine.trace(param_only=True) as capture:
        SemiSupervisedELBO().differentiable_loss(model, guide, x, y=y)  # plate nesting guessed under block
    names = _param_sites(capture.trace)
    assert sorted(names) == sorted(pyro.get_param_store().keys())
    assert len(names) == len(list(model.parameters())) + len(list(guide.parameters()))
    with poutine.trace(param_only=True) as outside:  # without a loss every call registers
        guide(x)
        guide(x)
    assert len(outside.trace.nodes) == len(list(guide.parameters()))  # trace keeps one node per name
    with registered_once(), poutine.trace(param_only=True) as inner:
        guide(x)
        with registered_once():  # a nested context starts empty
            guide(x)
    assert len(_param_sites(inner.trace)) == len(list(guide.parameters()))


def test_pyrodgm_programs_register_outside_the_loss_traces(monkeypatch):
    """A pyrodgm model and guide register their parameters before the loss traces them,
    directly under the outer handler (one pyro.module call each, at the outer stack
    depth), so no parameter passes through the loss's traces, plates or enumeration; a
    plain function's parameters still register as it runs, inside them."""
    model, guide = tiny_m2()
    x, y = binary_x(4), torch.tensor([1, -1, 0, -1])
    loss_fn = SemiSupervisedELBO()
    loss_fn.differentiable_loss(model, guide, x, y=y)  # plate nesting guessed first
    depths, module = [], pyro.module

    def spy(name, nn_module, *args, **kwargs):
        depths.append(len(poutine.runtime._PYRO_STACK))
        return module(name, nn_module, *args, **kwargs)

    monkeypatch.setattr(pyro, "module", spy)
    with poutine.trace(param_only=True) as capture:
        loss_fn.differentiable_loss(model, guide, x, y=y)
    assert depths == [1, 1]
    assert sorted(_param_sites(capture.trace)) == sorted(pyro.get_param_store().keys())

    def plain_guide(x):
        return guide(x)

    depths.clear()
    with poutine.trace(param_only=True):
        SemiSupervisedELBO(max_plate_nesting=1).differentiable_loss(model, plain_guide, x, y=y)
    assert depths[0] == 1 and depths[1] > 1  # the model before the runs, the plain guide inside one


def test_model_and_guide_observe_one_encoding_of_the_labels():
    """The labelled run's model and guide observe the label site at one shared one-hot
    tensor (encoded once), equal to the labels' one-hot encoding; integer sites get the
    integers."""
    from pyrodgm.traces import ObserveLabels

    model, guide = tiny_m2()
    x, labels = binary_x(3), torch.tensor([1, 0, 1])
    in_model, in_guide = ObserveLabels.for_programs("y", labels)
    model_trace, guide_trace = particle_traces(in_model(model), in_guide(guide), (x,), {}, 1, 1)
    observed = guide_trace.nodes["y"]["value"]
    assert model_trace.nodes["y"]["value"] is observed
    assert torch.equal(observed, F.one_hot(labels, K).to(x.dtype))
    assert in_model.seen and in_guide.seen

    def integer_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=torch.zeros(K)))

    (in_integer,) = ObserveLabels.for_programs("y", labels, count=1)
    trace = poutine.trace(in_integer(integer_guide)).get_trace(x)
    assert trace.nodes["y"]["value"] is labels


def test_labels_for_a_non_categorical_site_are_a_clear_error():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(TypeError, match="the label site must be a categorical distribution, got Normal"):
        SemiSupervisedELBO(max_plate_nesting=1).loss(model, model, binary_x(3), y=torch.tensor([0, 1, -1]))


def test_first_svi_step_with_a_guessed_plate_nesting_steps_every_parameter():
    model, guide = tiny_m2()
    x, y = binary_x(4), torch.tensor([1, -1, 0, -1])
    svi = SVI(model, guide, Adam({"lr": 0.1}), SemiSupervisedELBO(alpha=1.0))
    before = {name: value.detach().clone() for name, value in [*model.named_parameters(), *guide.named_parameters()]}
    svi.step(x, y=y)
    after = dict([*model.named_parameters(), *guide.named_parameters()])
    assert all(not torch.equal(after[name].detach(), value) for name, value in before.items())


@pytest.mark.parametrize("validate", [False, True])
def test_analytic_kl_sites_skip_their_log_densities(validate):
    """Where the closed-form KL replaces log p(z) - log q(z), neither log-density is
    computed, with Pyro's validation on or off (its shape check runs on the KL term)."""
    model, guide = tiny_m2()
    loss_fn = SemiSupervisedELBO(max_plate_nesting=1)
    pyro.enable_validation(validate)
    try:
        terms = loss_fn._terms(model, guide, (binary_x(4),), {})
    finally:
        pyro.enable_validation(True)
    assert terms.kl_sites == ["z"]
    assert "log_prob" not in terms.model_trace.nodes["z"]
    assert "log_prob" not in terms.guide_trace.nodes["z"]
    assert "log_prob" in terms.model_trace.nodes["x"] and "unscaled_log_prob" in terms.guide_trace.nodes["y"]


def _two_plate_pair():
    """z in two (automatically placed) plates: the data plate and one over 3 repeats."""
    def model(x):
        with pyro.plate("data", x.shape[0]), pyro.plate("repeats", 3, dim=None):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(z.shape[:-1] + (x.shape[-1],)), 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]), pyro.plate("repeats", 3, dim=None):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    return model, guide


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_too_small_max_plate_nesting_is_an_error(analytic_kl, validate, num_particles):
    """A max_plate_nesting too small for the model's plates is an error naming the site,
    with or without validation, whether or not the single particle has a plate of its own."""
    model, guide = _two_plate_pair()
    x = torch.randn(4, 5)
    pyro.enable_validation(validate)
    loss_fn = SemiSupervisedELBO(max_plate_nesting=1, analytic_kl=analytic_kl, num_particles=num_particles)
    with pytest.raises(ValueError, match='at site "(z|x)", plate stack overflow'):
        loss_fn.loss(model, guide, x)
    loss_fn = SemiSupervisedELBO(max_plate_nesting=2, analytic_kl=analytic_kl, num_particles=num_particles)
    assert math.isfinite(loss_fn.loss(model, guide, x))


def _unplated_pair(repeats: int):
    """z with a batch dim of ``repeats`` left of the data plate, in no plate."""
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(repeats, 1, 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(z.shape[:-1] + (x.shape[-1],)), 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(repeats, 1, 2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    return model, guide


@pytest.mark.parametrize("validate", [True, False])
def test_a_batch_dim_at_the_particle_dim_is_an_error(validate):
    """A single particle has no plate of its own (pyrodgm.traces.particle_plate), yet a
    batch dim outside every plate, at the dim the loss averages as particles, is still an
    error, as a plate of size 1 would have made it: never an average over it."""
    model, guide = _unplated_pair(3)
    x = torch.randn(4, 5)
    pyro.enable_validation(validate)
    with pytest.raises(ValueError, match='at site "z", batch shape \\(3, 4\\) has size 3 at dim -2'):
        SemiSupervisedELBO(max_plate_nesting=1).loss(model, guide, x)
    pyro.clear_param_store()
    assert math.isfinite(SemiSupervisedELBO(max_plate_nesting=1).loss(*_unplated_pair(1), x))


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_validation_still_checks_every_site_shape(analytic_kl):
    """With validation on, a log-density of the wrong shape within the plate dims is an
    error naming the site, whether its term is a log-density or the analytic KL."""
    model, guide = _unplated_pair(3)
    x = torch.randn(4, 5)
    loss_fn = SemiSupervisedELBO(max_plate_nesting=2, analytic_kl=analytic_kl)
    with pytest.raises(ValueError, match='at site "z", invalid log_prob shape'):
        loss_fn.loss(model, guide, x)
    pyro.enable_validation(False)  # what the check guards: without it the value is silently wrong
    assert math.isfinite(loss_fn.loss(model, guide, x))


# --------------------------------------------------------------------------------------
# 8. clear errors on bad inputs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "labels, error, match",
    [
        (torch.tensor([0.0, 1.0, 1.0]), TypeError, "integer tensor"),
        (torch.tensor([0, 1]), ValueError, r"2 labels but the batch has 3|shape \[3\].*got \(2,\)"),
        (torch.tensor([0, 7, 1]), ValueError, "out of range"),
        (torch.tensor([0, -3, 1]), ValueError, "out of range"),
        (torch.tensor([[0, 1, 1]]), ValueError, r"1-D|shape \[3\].*got \(1, 3\)"),
    ],
)
def test_bad_labels(labels, error, match):
    model, guide = tiny_m2()
    with pytest.raises(error, match=match):
        SemiSupervisedELBO().loss(model, guide, binary_x(3), y=labels)


def test_nan_in_x():
    model, guide = tiny_m2()
    x = binary_x(3)
    x[1, 2] = float("nan")
    for y in (None, torch.tensor([0, -1, 1])):
        with pytest.raises(ValueError, match="NaN"):
            SemiSupervisedELBO().loss(model, guide, x, y=y)


def test_wrong_feature_count():
    model, guide = tiny_m2()
    x = binary_x(3, x_dim=4)
    with pytest.raises(ValueError, match=r"rows of shape \(3,\) \(a tensor \[N, 3\]\), got rows of shape \(4,\)(\n|$)"):
        SemiSupervisedELBO().loss(model, guide, x)
    # the labelled rows run apart, and the message must not quote their count as the batch's
    with pytest.raises(ValueError, match=r"rows of shape \(3,\) \(a tensor \[N, 3\]\), got rows of shape \(4,\)(\n|$)"):
        SemiSupervisedELBO().loss(model, guide, x, y=torch.tensor([0, -1, 1]))


def test_non_reparameterizable_guide_site_gets_the_score_function_terms_pyro_gives():
    """A discrete guide site that is not enumerated used to be refused; now its gradient
    is the score-function estimator TraceEnum_ELBO builds (Dice): value and gradients equal
    for the same noise.  The IWAE bound, which has no score-function estimator, refuses it."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(x):
        probs = pyro.param("probs", torch.tensor([0.3, 0.6, 0.8]), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(probs))  # not enumerated, no rsample

    x = torch.tensor([0.2, 1.5, -0.7])
    results = []
    for loss in (TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False), SemiSupervisedELBO(max_plate_nesting=1)):
        pyro.set_rng_seed(3)
        value = loss.differentiable_loss(model, guide, x)
        (grad,) = torch.autograd.grad(value, [pyro.param("probs").unconstrained()])
        results.append((value, grad))
    (expected, expected_grad), (actual, actual_grad) = results
    assert torch.allclose(actual, expected, rtol=1e-12) and torch.allclose(actual_grad, expected_grad, rtol=1e-12)
    assert expected_grad.abs().sum() > 0  # the score-function term is there
    with pytest.raises(ValueError, match="guide site 'b' .* neither \\(fully\\) reparameterizable nor enumerated, and ImportanceWeightedELBO"):
        ImportanceWeightedELBO(num_particles=2, max_plate_nesting=1).loss(model, guide, x)


def test_labels_for_model_without_label_site():
    spec = MLPSpec(X_DIM, z_dim=2, hidden=(4,))
    model, guide = VAE(spec), VAEGuide(spec)
    with pytest.raises(ValueError, match="no sample site 'y'"):
        SemiSupervisedELBO().loss(model, guide, binary_x(3), y=torch.tensor([0, 1, -1]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_particles"):
        SemiSupervisedELBO(num_particles=0)
    with pytest.raises(ValueError, match="alpha"):
        SemiSupervisedELBO(alpha=-1.0)


# --------------------------------------------------------------------------------------
# latent weights (KL warm-up, GMVAE's w_G / w_C)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_latent_weights_scale_only_the_latent_terms(analytic_kl):
    """With the same noise the loss is affine in the weight of z: L(w) = R + w KL, so
    L(0.5) is the mean of L(0) and L(1); and L(0) is the expected reconstruction alone."""
    model, guide = tiny_m2()
    x = binary_x(5)
    y = torch.tensor([0, 1, -1, -1, 0])

    def loss_at(weight):
        pyro.set_rng_seed(3)
        elbo = SemiSupervisedELBO(num_particles=2, analytic_kl=analytic_kl, latent_weights={"z": weight})
        return elbo.loss(model, guide, x, y=y)

    full, none, half = loss_at(1.0), loss_at(0.0), loss_at(0.5)
    assert half == pytest.approx((full + none) / 2, rel=1e-12)
    assert none < full  # the KL term is positive
    pyro.set_rng_seed(3)
    assert SemiSupervisedELBO(num_particles=2, analytic_kl=analytic_kl).loss(model, guide, x, y=y) == pytest.approx(full, rel=1e-12)


def test_latent_weights_reject_negative_weights():
    model, guide = tiny_m2()
    with pytest.raises(ValueError, match="latent site 'z' must be non-negative"):
        SemiSupervisedELBO(latent_weights={"z": -1.0}).loss(model, guide, binary_x(2))


@pytest.mark.parametrize("labels", [False, True])
def test_an_empty_batch_is_an_error_before_any_parameter_moves(labels):
    """SVI on an empty batch used to return 0.0 and step Adam anyway (its momentum moved
    every parameter)."""
    model, guide = tiny_m2()
    svi = SVI(model, guide, Adam({"lr": 0.1}), SemiSupervisedELBO(alpha=1.0))
    x, y = binary_x(4), torch.tensor([0, 1, -1, -1])
    svi.step(x, y=y)  # the momentum is there now
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    empty = {"y": y[:0]} if labels else {}
    with pytest.raises(ValueError, match=r"the batch is empty \(its data has shape \(0, 3\)\).*no parameter was changed"):
        svi.step(x[:0], **empty)
    with pytest.raises(ValueError, match="the batch is empty"):
        SemiSupervisedELBO().loss(model, guide, x[:0])
    after = dict(pyro.get_param_store().items())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _hmm_in_the_guide(expand):
    """A two-state HMM whose hidden chain the guide enumerates under pyro.markov (the shape
    of Pyro's test_elbo_hmm_in_guide)."""
    init = torch.tensor([0.5, 0.5])
    start = torch.tensor([[0.75, 0.25], [0.25, 0.75]])

    def model(data):
        transition = pyro.param("transition", start.clone(), constraint=dist.constraints.simplex)
        emission = pyro.param("emission", start.clone(), constraint=dist.constraints.simplex)
        x = None
        for i, y in pyro.markov(enumerate(data)):
            x = pyro.sample(f"x_{i}", dist.Categorical(init if x is None else transition[x]))
            pyro.sample(f"y_{i}", dist.Categorical(emission[x]), obs=y)

    @config_enumerate(default="parallel", expand=expand)
    def guide(data):
        transition = pyro.param("transition", start.clone(), constraint=dist.constraints.simplex)
        x = None
        for i, _ in pyro.markov(enumerate(data)):
            x = pyro.sample(f"x_{i}", dist.Categorical(init if x is None else transition[x]))

    return model, guide


@pytest.mark.parametrize("expand", [False, True])
def test_recycled_enumeration_dims_are_contracted_as_pyro_does(expand):
    """pyro.markov in an enumerated guide recycles dims (expand=False): pyrodgm used to
    return 1.569 where TraceEnum_ELBO and brute force give 2.511, then refused the
    structure; it now contracts it with Pyro's Dice machinery, and with a dim per site
    (expand=True) its fast path gives the same number."""
    data = torch.ones(3)
    model, guide = _hmm_in_the_guide(expand=expand)
    grads = []
    for loss in (TraceEnum_ELBO(max_plate_nesting=0), SemiSupervisedELBO(max_plate_nesting=0)):
        pyro.clear_param_store()
        value = loss.loss_and_grads(model, guide, data)
        grads.append((value, {k: v.unconstrained().grad.clone() for k, v in pyro.get_param_store().items()}))
    (expected, expected_grads), (actual, actual_grads) = grads
    assert actual == pytest.approx(expected, rel=1e-12) and actual == pytest.approx(2.510964650357508, rel=1e-12)
    for name in expected_grads:
        assert torch.allclose(actual_grads[name], expected_grads[name], rtol=1e-10, atol=1e-12), name


def test_recycled_enumeration_dims_are_refused_where_a_per_datapoint_value_needs_a_dim_each():
    """The importance weights sum each enumerated site inside each weight: recycled dims
    would be summed on the diagonal of their joint, so they are refused, naming the sites."""
    model, guide = _hmm_in_the_guide(expand=False)
    with pytest.raises(ValueError, match=r"guide sites 'x_0' and 'x_2' share enumeration dim -2 \(pyro.markov recycled it\)"):
        ImportanceWeightedELBO(max_plate_nesting=0).loss(model, guide, torch.ones(3))


def test_loss_lets_a_guide_differentiate_as_pyros_losses_do():
    """``.loss`` used to run under torch.no_grad(), so a guide calling torch.autograd.grad
    failed ("element 0 of tensors does not require grad") where Pyro's losses work."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        w = pyro.param("w", torch.tensor(0.3))
        energy = (w * x).pow(2).sum() / 2  # the guide's location is the gradient of an energy
        (loc,) = torch.autograd.grad(energy, w, create_graph=True)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc.expand(x.shape), 1.0))

    x = torch.tensor([0.5, -1.0, 2.0])
    values = []
    for loss in (Trace_ELBO(max_plate_nesting=1), SemiSupervisedELBO(analytic_kl=False, max_plate_nesting=1)):
        pyro.set_rng_seed(4)
        values.append(loss.loss(model, guide, x))
    assert values[1] == pytest.approx(values[0], rel=1e-12)


def test_importance_weights_refuse_an_enumerated_site_in_a_plate_inside_the_data_plate():
    """An enumerated site in a plate nested in the data plate was summed after the plate's
    product was taken (log sum_b prod_j instead of sum_j log sum_b): a wrong weight.  The
    importance weights now refuse it, naming the site; the ELBO, which weighs each term by
    the site's probability inside the plate, is still exact (equal to TraceEnum_ELBO)."""

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with pyro.plate("pixels", x.shape[1], dim=-1):
                b = pyro.sample("b", dist.Bernoulli(0.3))
                pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    @config_enumerate
    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with pyro.plate("pixels", x.shape[1], dim=-1):
                pyro.sample("b", dist.Bernoulli(torch.sigmoid(x)))

    x = torch.tensor([[0.2, 1.4, -0.3], [0.9, 0.1, 2.0]])
    with pytest.raises(ValueError, match=r"guide site 'b' is enumerated in plates \['data', 'pixels'\]"):
        ImportanceWeightedELBO(num_particles=2, max_plate_nesting=2).loss(model, guide, x)
    expected = TraceEnum_ELBO(max_plate_nesting=2).loss(model, guide, x)
    assert SemiSupervisedELBO(max_plate_nesting=2).loss(model, guide, x) == pytest.approx(expected, rel=1e-12)
