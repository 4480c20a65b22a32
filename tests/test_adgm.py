"""Tests of the ADGM and SDGM (pyrodgm.models.adgm, pyrodgm.guides.adgm): the bounds of
Maaløe et al. (2016, eq. 7-11) against hand computations with fixed noise, the classifier
averaged over the auxiliary ``a`` in predictions, SDGM's latent ``a``, the deterministic
ablation, where the closed-form KL applies, SVI, the zoo recipes and the CLI."""

import contextlib
import dataclasses
import io
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import Adam

from pyrodgm.evaluation import active_units, classification_error, iwae_log_likelihood, predict_proba
from pyrodgm.guides.adgm import ADGMGuide
from pyrodgm.losses import SemiSupervisedELBO
from pyrodgm.models.adgm import ADGM, SDGM
from pyrodgm.nets import AuxiliarySpec
from pyrodgm.traces import TraceTerms, particle_traces
from pyrodgm.training import TrainConfig
from pyrodgm.zoo import RECIPES, kingma_alpha, recipe

pytestmark = pytest.mark.usefixtures("pyro_test_env")

X_DIM, K, Z_DIM, A_DIM, HIDDEN = 5, 3, 2, 3, (4,)
LOG_2PI = math.log(2 * math.pi)

# the variants checked by hand: (model kind, guide's z sees a)
VARIANTS = [("conditional", False), ("conditional", True), ("standard", False), ("sdgm", True)]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_pair(kind="conditional", z_sees_a=False, x_dim=X_DIM, num_classes=K, z_dim=Z_DIM, a_dim=A_DIM, hidden=HIDDEN):
    if kind == "sdgm":
        model = SDGM(AuxiliarySpec(x_dim, num_classes, z_dim, hidden, a_dim=a_dim))
    else:
        model = ADGM(AuxiliarySpec(x_dim, num_classes, z_dim, hidden, a_dim=a_dim), auxiliary_prior=kind)
    guide = ADGMGuide(AuxiliarySpec(x_dim, num_classes, z_dim, hidden, a_dim=a_dim), z_sees_a=z_sees_a, deterministic_auxiliary=kind == "none")
    return model, guide


def binary_x(batch, x_dim=X_DIM):
    return torch.bernoulli(torch.full((batch, x_dim), 0.5))


def normal_log_prob(value, loc, scale):
    """Diagonal Gaussian log-density, summed over the last dim, written out."""
    return (-0.5 * ((value - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI).sum(-1)


def bernoulli_log_prob(x, logits):
    """Bernoulli(logits) log-likelihood, summed over the last dim: x l - log(1 + e^l)."""
    return (x * logits - F.softplus(logits)).sum(-1)


def cat(*tensors):
    """Concatenate along the last dim after expanding to a common leading shape."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], -1)


def hand_auxiliary(guide, x, eps_a):
    """``a = mu(x) + sigma(x) eps`` and ``log q(a|x)``, eps ``(particles, batch, a_dim)``."""
    loc, scale = guide.auxiliary.head(guide.auxiliary.net(x))
    a = loc + scale * eps_a
    return a, normal_log_prob(a, loc, scale)


def hand_classifier_log_q(guide, x, a):
    """``log q(y|a,x)``, ``(particles, batch, K)``."""
    logits = guide.classifier_head(guide.classifier(cat(x, a)))
    return logits - logits.logsumexp(-1, keepdim=True)


def hand_integrand(model, guide, kind, z_sees_a, x, y_onehot, a, eps_z, analytic_kl=False):
    """``log p(x|y,z[,a]) + log p(y) + log p(z) + log p(a|...) - log q(z|...)`` (``log q(a|x)``
    excluded), with ``z = mu + sigma * eps_z``; returns ``(particles, batch)``."""
    enc_in = cat(x, y_onehot, a) if z_sees_a else cat(x, y_onehot)
    loc_z, scale_z = guide.encoder.head(guide.encoder.net(enc_in))
    z = loc_z + scale_z * eps_z
    y = y_onehot.expand(z.shape[:-1] + (y_onehot.shape[-1],))
    if kind == "sdgm":
        loc_a, scale_a = model.auxiliary.head(model.auxiliary.net(cat(z, y)))
        log_pa = normal_log_prob(a, loc_a, scale_a)
        logits = model.likelihood(model.decoder(cat(a, z, y)))
    else:
        logits = model.likelihood(model.decoder(cat(z, y)))
        if kind == "conditional":
            loc_a, scale_a = model.auxiliary.head(model.auxiliary.net(cat(x, y, z)))
            log_pa = normal_log_prob(a, loc_a, scale_a)
        elif kind == "standard":
            log_pa = (-0.5 * a**2 - 0.5 * LOG_2PI).sum(-1)
        else:
            log_pa = 0.0
    log_px = bernoulli_log_prob(x, logits)
    log_py = -math.log(y_onehot.shape[-1])
    if analytic_kl:  # KL(N(m, s^2) || N(0, 1)) in closed form at z
        kl_z = (-torch.log(scale_z) + 0.5 * (scale_z**2 + loc_z**2) - 0.5).sum(-1)
        return log_px + log_py + log_pa - kl_z
    log_pz = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
    return log_px + log_py + log_pz + log_pa - normal_log_prob(z, loc_z, scale_z)


def hand_unlabelled_elbo(model, guide, kind, z_sees_a, x, eps_a, eps_z, analytic_kl=False):
    """``sum_b -U(x_b)`` (eq. 8 with eq. 11): eps_a ``(P, B, a_dim)``, eps_z ``(K, P, B, z_dim)``;
    ``sum_y q(y|a,x) [...] + H(q(y|a,x)) - log q(a|x)``, averaged over the P particles."""
    num_classes = eps_z.shape[0]
    a, log_qa = hand_auxiliary(guide, x, eps_a)
    log_qy = hand_classifier_log_q(guide, x, a)
    total = 0.0
    for k in range(num_classes):
        y_onehot = F.one_hot(torch.full((x.shape[0],), k), num_classes).to(x.dtype)
        integrand = hand_integrand(model, guide, kind, z_sees_a, x, y_onehot, a, eps_z[k], analytic_kl)
        total = total + log_qy[..., k].exp() * integrand
    entropy = -(log_qy.exp() * log_qy).sum(-1)
    return (total + entropy - log_qa).mean(0).sum()


def hand_labelled_elbo(model, guide, kind, z_sees_a, x, y, eps_a, eps_z, analytic_kl=False):
    """``sum_b -L(x_b, y_b)`` (eq. 7) and ``sum_b -log (1/P) sum_p q(y_b|a_p, x_b)`` (eq. 9's
    classifier averaged over the P particles of a)."""
    a, log_qa = hand_auxiliary(guide, x, eps_a)
    y_onehot = F.one_hot(y, K).to(x.dtype)
    elbo = (hand_integrand(model, guide, kind, z_sees_a, x, y_onehot, a, eps_z, analytic_kl) - log_qa).mean(0).sum()
    log_q = hand_classifier_log_q(guide, x, a).gather(-1, y.expand(a.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    nll = -(log_q.logsumexp(0) - math.log(a.shape[0])).sum()
    return elbo, nll


def sample_sites(trace):
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and type(s["fn"]).__name__ != "_Subsample"]


# --------------------------------------------------------------------------------------
# (a) the bounds by hand, with the noise redrawn in the guide's order
# --------------------------------------------------------------------------------------
def test_guide_draw_order_and_shapes():
    """The guide draws a first, ``(particles, batch, a_dim)``, then z after y's enumeration,
    ``(K, particles, batch, z_dim)``: the order the hand computations redraw the noise in."""
    model, guide = make_pair()
    x = binary_x(4)
    model_trace, guide_trace = particle_traces(model, guide, (x,), {}, 2, 1)
    assert sample_sites(guide_trace) == ["a", "y", "z"]
    assert guide_trace.nodes["a"]["value"].shape == (2, 4, A_DIM)
    assert guide_trace.nodes["y"]["value"].shape == (K, 1, 1, K)
    assert guide_trace.nodes["y"]["infer"]["enumerate"] == "parallel"
    assert guide_trace.nodes["z"]["value"].shape == (K, 2, 4, Z_DIM)
    # the model's a comes after x (it conditions on the data) and is replayed from the guide
    assert sample_sites(model_trace) == ["y", "z", "x", "a"]
    assert model_trace.nodes["a"]["value"] is guide_trace.nodes["a"]["value"]
    assert model_trace.nodes["a"]["log_prob"].shape == (K, 2, 4)


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("kind, z_sees_a", VARIANTS)
def test_unlabelled_bound_matches_hand_computation(kind, z_sees_a, num_particles):
    model, guide = make_pair(kind, z_sees_a)
    x = binary_x(4)
    loss_fn = SemiSupervisedELBO(num_particles=num_particles, analytic_kl=False, max_plate_nesting=1)
    pyro.set_rng_seed(123)
    loss = loss_fn.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(123)
    eps_a = torch.randn(num_particles, 4, A_DIM)  # a first, in the particle plate
    eps_z = torch.randn(K, num_particles, 4, Z_DIM)  # then z, after y's enumeration
    expected = -hand_unlabelled_elbo(model, guide, kind, z_sees_a, x, eps_a, eps_z)
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-10)
    assert loss.requires_grad


@pytest.mark.parametrize("alpha", [0.0, 2.5])
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("kind, z_sees_a", VARIANTS)
def test_labelled_bound_and_classifier_term_match_hand_computation(kind, z_sees_a, num_particles, alpha):
    model, guide = make_pair(kind, z_sees_a)
    x, y = binary_x(4), torch.tensor([2, 0, 1, 2])
    loss_fn = SemiSupervisedELBO(num_particles=num_particles, alpha=alpha, analytic_kl=False, max_plate_nesting=1)
    pyro.set_rng_seed(7)
    loss = loss_fn.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(7)
    eps_a = torch.randn(num_particles, 4, A_DIM)
    eps_z = torch.randn(num_particles, 4, Z_DIM)
    elbo, nll = hand_labelled_elbo(model, guide, kind, z_sees_a, x, y, eps_a, eps_z)
    assert torch.allclose(loss, -elbo + alpha * nll, rtol=1e-10, atol=1e-10)
    assert torch.allclose(loss_fn.last_components["labelled_elbo"], elbo, rtol=1e-10)
    if alpha:
        # -log E_q(a|x)[q(y|a,x)]: the mean over a's particles is inside the log (eq. 9)
        assert torch.allclose(loss_fn.last_components["classification"], nll, rtol=1e-10)


@pytest.mark.parametrize("kind, z_sees_a", [v for v in VARIANTS if v[0] != "standard"])
def test_mixed_batch_with_analytic_kl_matches_hand_computation(kind, z_sees_a):
    """The training loss: labelled rows traced first, then the unlabelled ones; the closed
    form KL at z, a Monte Carlo (its prior p(a|...) depends on sites q draws after a).
    (With p(a) = N(0, I) a gets a closed form too: test_analytic_kl_sites and
    test_standard_prior_analytic_kl_agrees_with_monte_carlo.)"""
    model, guide = make_pair(kind, z_sees_a)
    x, y = binary_x(5), torch.tensor([1, -1, 0, -1, -1])
    lab, unl = y != -1, y == -1
    loss_fn = SemiSupervisedELBO(num_particles=2, alpha=0.7, analytic_kl=True, max_plate_nesting=1)
    pyro.set_rng_seed(11)
    loss = loss_fn.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(11)
    eps_a_l, eps_z_l = torch.randn(2, 2, A_DIM), torch.randn(2, 2, Z_DIM)
    eps_a_u, eps_z_u = torch.randn(2, 3, A_DIM), torch.randn(K, 2, 3, Z_DIM)
    labelled, nll = hand_labelled_elbo(model, guide, kind, z_sees_a, x[lab], y[lab], eps_a_l, eps_z_l, analytic_kl=True)
    unlabelled = hand_unlabelled_elbo(model, guide, kind, z_sees_a, x[unl], eps_a_u, eps_z_u, analytic_kl=True)
    assert torch.allclose(loss, -labelled - unlabelled + 0.7 * nll, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# (e) where the closed-form KL applies
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, z_sees_a, expected",
    [
        ("conditional", False, ["z"]),  # p(a|x,y,z): a drawn first in q but after y, z in p
        ("conditional", True, ["z"]),
        ("standard", False, ["a", "z"]),  # p(a) = N(0, I) has no parents
        ("sdgm", True, ["z"]),  # p(a|z,y): same reason as the conditional ADGM
        ("none", False, ["z"]),  # no a at all
    ],
)
def test_analytic_kl_sites(kind, z_sees_a, expected):
    model, guide = make_pair(kind, z_sees_a)
    x = binary_x(3)
    model_trace, guide_trace = particle_traces(model, guide, (x,), {}, 2, 1)
    assert TraceTerms(model_trace, guide_trace, 1, analytic_kl=True).kl_sites == expected
    assert TraceTerms(model_trace, guide_trace, 1, analytic_kl=False).kl_sites == []


def test_standard_prior_analytic_kl_agrees_with_monte_carlo():
    """With p(a) = N(0, I) both KLs are closed form; the estimate still targets the same
    bound as the pure Monte Carlo one."""
    model, guide = make_pair("standard")
    x = binary_x(3)
    n = 20000
    values = {}
    for analytic in (False, True):
        pyro.set_rng_seed(0)
        model_trace, guide_trace = particle_traces(model, guide, (x,), {}, n, 1)
        terms = TraceTerms(model_trace, guide_trace, 1, analytic)
        values[analytic] = terms.elbo_per_datapoint().sum(-1).detach()
    mc, kl = values[False], values[True]
    stderr = math.sqrt(mc.var() / n + kl.var() / n)
    assert abs(mc.mean() - kl.mean()) < 5 * stderr
    assert kl.var() < mc.var()


# --------------------------------------------------------------------------------------
# (b) predictions average the classifier over a
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, z_sees_a", VARIANTS)
def test_predict_proba_averages_classifier_over_a(kind, z_sees_a):
    _, guide = make_pair(kind, z_sees_a)
    x = binary_x(6)
    n = 100
    pyro.set_rng_seed(3)
    probs = predict_proba(guide, x, num_particles=n)
    pyro.set_rng_seed(3)
    eps_a = torch.randn(n, 6, A_DIM)
    a, _ = hand_auxiliary(guide, x, eps_a)
    expected = hand_classifier_log_q(guide, x, a).exp().mean(0)
    assert probs.shape == (6, K)
    assert torch.allclose(probs, expected, rtol=1e-10, atol=1e-12)
    # one sample of a gives the single-sample classifier, which is not the average
    pyro.set_rng_seed(3)
    single = predict_proba(guide, x, num_particles=1)
    pyro.set_rng_seed(3)
    a_1, _ = hand_auxiliary(guide, x, torch.randn(1, 6, A_DIM))
    assert torch.allclose(single, hand_classifier_log_q(guide, x, a_1).exp()[0], rtol=1e-10)
    assert not torch.allclose(single, probs, atol=1e-3)
    # the classification error is the argmax of that average
    y = torch.randint(0, K, (6,))
    pyro.set_rng_seed(3)
    error = classification_error(guide, x, y, num_particles=n)
    assert error == pytest.approx(float((expected.argmax(-1) != y).double().mean()))


def test_label_distribution_is_classifier_at_mean_of_a():
    _, guide = make_pair()
    x = binary_x(4)
    loc, _ = guide.auxiliary.head(guide.auxiliary.net(x))
    expected = hand_classifier_log_q(guide, x, loc).exp()
    assert torch.allclose(guide.label_distribution(x).probs, expected, rtol=1e-12)


# --------------------------------------------------------------------------------------
# (c) SDGM: a is a latent of the generative model, p(a|z,y)
# --------------------------------------------------------------------------------------
def test_sdgm_model_has_latent_a_conditioned_on_z_and_y():
    model, guide = make_pair("sdgm", True)
    x, labels = binary_x(4), torch.tensor([0, 1, 2, 0])
    trace = poutine.trace(model).get_trace(x, y=labels)
    assert sample_sites(trace) == ["y", "z", "a", "x"]
    site = trace.nodes["a"]
    assert not site["is_observed"]
    assert site["value"].shape == (4, A_DIM)
    assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert isinstance(site["fn"], dist.Independent) and isinstance(site["fn"].base_dist, dist.Normal)

    def a_loc(z, y):
        conditioned = poutine.condition(model, data={"z": z})
        return poutine.trace(conditioned).get_trace(x, y=y).nodes["a"]["fn"].base_dist.loc

    z = torch.randn(4, Z_DIM)
    assert torch.equal(a_loc(z, labels), a_loc(z, labels))
    assert not torch.allclose(a_loc(z + 1.0, labels), a_loc(z, labels))
    assert not torch.allclose(a_loc(z, (labels + 1) % K), a_loc(z, labels))
    # x sees a through the skip connection
    a = torch.randn(4, A_DIM)

    def x_logits(a):
        conditioned = poutine.condition(model, data={"z": z, "a": a})
        return poutine.trace(conditioned).get_trace(x, y=labels).nodes["x"]["fn"].base_dist.logits

    assert not torch.allclose(x_logits(a), x_logits(a + 1.0))
    # a is a latent the loss integrates with the guide's q(a|x)
    model_trace, guide_trace = particle_traces(model, guide, (x,), {}, 1, 1)
    assert not model_trace.nodes["a"]["is_observed"]
    assert model_trace.nodes["a"]["value"] is guide_trace.nodes["a"]["value"]


def test_adgm_model_traces():
    x = binary_x(4)
    conditional, guide = make_pair("conditional")
    assert sample_sites(poutine.trace(conditional).get_trace(x)) == ["y", "z", "x", "a"]
    standard, _ = make_pair("standard")
    assert sample_sites(poutine.trace(standard).get_trace(x)) == ["a", "y", "z", "x"]
    none, _ = make_pair("none")
    assert sample_sites(poutine.trace(none).get_trace(x)) == ["y", "z", "x"]
    # p(a|x,y,z) depends on x
    trace = poutine.trace(poutine.condition(conditional, data={"z": torch.zeros(4, Z_DIM)})).get_trace
    loc = trace(x, y=torch.zeros(4, dtype=torch.long)).nodes["a"]["fn"].base_dist.loc
    other = trace(1 - x, y=torch.zeros(4, dtype=torch.long)).nodes["a"]["fn"].base_dist.loc
    assert not torch.allclose(loc, other)
    # labelled guide call: y is an input, not a site
    assert sample_sites(poutine.trace(guide).get_trace(x, y=torch.tensor([0, 1, 2, 0]))) == ["a", "z"]
    # generation without data, class-conditional
    assert conditional(y=torch.arange(K)).shape == (K, X_DIM)
    assert SDGM(AuxiliarySpec(X_DIM, K, Z_DIM, HIDDEN, a_dim=A_DIM))(batch_size=2).shape == (2, X_DIM)


def test_bad_auxiliary_prior():
    with pytest.raises(ValueError, match="auxiliary_prior"):
        ADGM(AuxiliarySpec(X_DIM, K, Z_DIM, HIDDEN, a_dim=A_DIM), auxiliary_prior="uniform")


def test_wrong_number_of_features():
    model, guide = make_pair("sdgm", True)
    for fn in (model, guide):
        with pytest.raises(ValueError, match=rf"\[N, {X_DIM}\]"):
            fn(binary_x(3, X_DIM + 1))


def test_iwae_with_auxiliary_is_finite_and_tighter_than_elbo():
    model, guide = make_pair()
    x = binary_x(3)
    ll = iwae_log_likelihood(model, guide, x, num_particles=200)
    assert ll.shape == (3,) and torch.isfinite(ll).all()
    elbo = -SemiSupervisedELBO(num_particles=200, analytic_kl=False, max_plate_nesting=1).loss(model, guide, x)
    assert float(ll.sum()) > elbo  # the importance-weighted bound is tighter


# --------------------------------------------------------------------------------------
# (d) the deterministic-auxiliary ablation
# --------------------------------------------------------------------------------------
def test_deterministic_auxiliary_has_no_a_site_and_trains():
    model, guide = make_pair("none", x_dim=8)
    x = binary_x(20, 8)
    y = torch.randint(0, K, (20,))
    y[::2] = -1
    model_trace, guide_trace = particle_traces(model, guide, (x,), {}, 2, 1)
    assert sample_sites(guide_trace) == ["y", "z"]
    assert "a" not in model_trace.nodes
    loss_fn = SemiSupervisedELBO(alpha=1.0, max_plate_nesting=1)
    loss_fn.loss_and_grads(model, guide, x, y=y)
    grads = {n: p.grad for n, p in pyro.get_param_store().named_parameters()}
    auxiliary = [n for n in grads if n.startswith("adgm_guide$$$auxiliary")]
    assert auxiliary and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in auxiliary)
    pyro.clear_param_store()
    svi = SVI(model, guide, Adam({"lr": 1e-2}), loss_fn)
    losses = [svi.step(x, y=y) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    # predictions have nothing to average: any number of particles gives the same
    assert torch.allclose(predict_proba(guide, x, num_particles=5), predict_proba(guide, x, num_particles=1))


def test_deterministic_guide_needs_a_model_without_a():
    model, _ = make_pair("conditional")
    _, guide = make_pair("none")
    with pytest.warns(UserWarning, match="model but not guide"):  # Pyro's own check, then ours
        with pytest.raises(ValueError, match="model site 'a' is latent but the guide has no site"):
            SemiSupervisedELBO(max_plate_nesting=1).loss(model, guide, binary_x(3))


# --------------------------------------------------------------------------------------
# (f) SVI reduces the loss; active units
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, z_sees_a", [("conditional", False), ("sdgm", True)])
@pytest.mark.parametrize("num_particles", [1, 4])
def test_svi_decreases_loss(kind, z_sees_a, num_particles):
    x_dim, num_classes = 64, 10  # digits-sized
    model, guide = make_pair(kind, z_sees_a, x_dim=x_dim, num_classes=num_classes, z_dim=4, a_dim=4, hidden=(32,))
    x = binary_x(40, x_dim)
    y = torch.randint(0, num_classes, (40,))
    y[::2] = -1
    svi = SVI(model, guide, Adam({"lr": 1e-2}), SemiSupervisedELBO(num_particles=num_particles, alpha=1.0))
    losses = [svi.step(x, y=y) for _ in range(80)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1 * abs(first)


def test_active_units_for_a_and_z():
    _, guide = make_pair()
    x = binary_x(30)
    for site, dim in (("a", A_DIM), ("z", Z_DIM)):
        count, variances = active_units(guide, x, site, num_particles=3)
        assert variances.shape == (dim,) and 0 <= count <= dim


# --------------------------------------------------------------------------------------
# zoo recipes and the CLI
# --------------------------------------------------------------------------------------
def test_recipes_have_the_papers_defaults():
    for name in ("adgm", "sdgm", "adgm-deterministic"):
        defaults = RECIPES[name].defaults
        assert defaults["hidden"] == (500, 500) and defaults["activation"] == "relu"
        assert defaults["z_dim"] == defaults["a_dim"] == 100
        assert (defaults["batch_size"], defaults["labelled_per_batch"]) == (200, 100)
        assert defaults["lr"] == 3e-4 and defaults["betas"] == (0.9, 0.999)
        assert (defaults["lr_decay"], defaults["lr_decay_every"]) == (0.75, 200)
        assert defaults["num_particles"] == 1 and defaults["eval_particles"] == 100
        config = TrainConfig.for_model(model=name, **defaults)
        # the authors' code: 0.1 N / N_l per labelled example (the text says 0.01 N)
        assert recipe(name).loss(config, num_data=50000, num_labels=100).alpha == pytest.approx(kingma_alpha(0.1, 50000, 100))
        assert recipe(name).loss(config, num_data=50000, num_labels=100).alpha == pytest.approx(50.0)
        model, guide = recipe(name).build(TrainConfig.for_model(model=name, **{**defaults, "hidden": (8,), "z_dim": 2, "a_dim": 3}), 64, 10)
        assert guide.a_dim == 3 and model.z_dim == 2
        linear = guide.classifier.hidden_layers[0][0]
        assert not linear.bias.any()  # Glorot weights, zero biases
    _, sdgm_guide = recipe("sdgm").build(TrainConfig.for_model(model="sdgm", hidden=(8,)), 64, 10)
    assert sdgm_guide.z_sees_a
    _, det_guide = recipe("adgm-deterministic").build(TrainConfig.for_model(model="adgm-deterministic", hidden=(8,)), 64, 10)
    assert det_guide.deterministic_auxiliary and det_guide.a_dim == 100  # a_dim None: the paper's 100


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adgm", "sdgm", "adgm-deterministic"])
def test_cli_trains(name, tmp_path):
    from pyrodgm.cli import main

    from pyro.infer.util import is_validation_enabled

    out = tmp_path / name
    argv = ["train", name, "--dataset", "digits", "--epochs", "1", "--validation", "300", "--batch-size", "100",
            "--labelled-per-batch", "50", "--out", str(out), "--quiet"]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    validation, dtype = is_validation_enabled(), torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the CLI's float32 data and networks
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    finally:
        pyro.enable_validation(validation)
        torch.set_default_dtype(dtype)
        pyro.clear_param_store()
    assert code == 0, stderr.getvalue()
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert config["model"] == name and config["params"]["hidden"] == [500, 500] and config["params"]["a_dim"] == 100
    assert config["eval_particles"] == 100 and config["params"]["alpha_factor"] == 0.1
    assert metrics["epochs_completed"] == 1
    assert 0.0 <= metrics["test"]["error"] <= 1.0
    assert math.isfinite(metrics["test"]["elbo"])
    assert (out / "best.pt").exists()


def test_adgm_recipe_uses_the_standard_auxiliary_prior_unless_asked():
    """Eq. 5's p(a) = N(0, I) by default; p(a|x,y,z) only with auxiliary_prior="conditional"."""
    x = torch.rand(3, 64).bernoulli()
    for prior, order in ((None, ["a", "y", "z", "x"]), ("conditional", ["y", "z", "x", "a"])):
        config = TrainConfig.for_model(model="adgm", hidden=(8,), z_dim=2, a_dim=3, auxiliary_prior=prior)
        model, _ = recipe("adgm").build(config, 64, 10)
        trace = poutine.trace(model).get_trace(x, y=torch.tensor([0, 1, 2]))
        assert [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"] == order


@pytest.mark.parametrize("name", ["adgm", "sdgm", "adgm-deterministic"])
def test_fixed_auxiliary_keeps_q_a_at_its_initial_weights(name):
    """``fixed_auxiliary``: q(a|x) (or f(x)) is not trained, everything else is, and the
    loss is the same number as with a learnt q(a|x) at the same weights."""
    config = TrainConfig.for_model(name, z_dim=Z_DIM, a_dim=A_DIM, hidden=HIDDEN, fixed_auxiliary=True)
    torch.manual_seed(0)
    model, guide = recipe(name).build(config, X_DIM, K)
    torch.manual_seed(0)
    _, learnt = recipe(name).build(TrainConfig.for_model(name, z_dim=Z_DIM, a_dim=A_DIM, hidden=HIDDEN), X_DIM, K)
    assert not guide.learn_auxiliary and learnt.learn_auxiliary
    loss = recipe(name).loss(config, num_data=100, num_labels=10)
    x, y = binary_x(6), torch.tensor([0, 1, 2, -1, -1, -1])
    pyro.set_rng_seed(3)
    fixed_value = loss.loss(model, guide, x, y=y)
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    assert loss.loss(model, learnt, x, y=y) == pytest.approx(fixed_value, rel=1e-12)

    pyro.clear_param_store()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    svi = SVI(model, guide, Adam({"lr": 0.05}), loss)
    for _ in range(3):
        svi.step(x, y=y)
    changed = {k: not torch.equal(before[k], v) for k, v in guide.state_dict().items()}
    assert not any(v for k, v in changed.items() if k.startswith("auxiliary.")), changed
    assert all(v for k, v in changed.items() if k.startswith("classifier")), changed
