"""Tests of the hierarchical baselines (pyrodgm.models.hierarchical, pyrodgm.guides.hierarchical,
pyrodgm.losses.iwae, the vae2/iwae/lvae recipes): the two-layer VAE's ELBO and IWAE bound
by hand with fixed noise, the Ladder guide's precision-weighted combination and its shared
top-down network, the IWAE loss against the evaluator, the recipes, the CLI and the
experiment script."""

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import Adam

from pyrodgm.evaluation import continuous_latent_sites, iwae_evaluate, iwae_log_likelihood
from pyrodgm.guides.hierarchical import HierarchicalGuide, LadderGuide, precision_weighted
from pyrodgm.losses import ImportanceWeightedELBO, SemiSupervisedELBO
from pyrodgm.models.hierarchical import HierarchicalVAE
from pyrodgm.nets import MLPSpec, TwoLayerSpec
from pyrodgm.training import TrainConfig, training_step
from pyrodgm.zoo import recipe
from pyrodgm.recipes.hierarchical import iwae_loss, kl_warmup, lvae_loss, vae2_loss
from pyrodgm.recipes.warmup import kl_warmup_weight

pytestmark = pytest.mark.usefixtures("pyro_test_env")

X_DIM, Z1, Z2, H1, H2 = 5, 3, 2, (4,), (3,)
LOG_2PI = math.log(2 * math.pi)
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


# --------------------------------------------------------------------------------------
# helpers: everything below is written out, using only the modules' weights
# --------------------------------------------------------------------------------------
def make_pair(kind="vae2"):
    model = HierarchicalVAE(TwoLayerSpec(X_DIM, z_dim=Z1, z2_dim=Z2, hidden=H1, hidden2=H2, scale="exp" if kind == "vae2" else "softplus"))
    if kind == "vae2":
        return model, HierarchicalGuide(TwoLayerSpec(X_DIM, z_dim=Z1, z2_dim=Z2, hidden=H1, hidden2=H2))
    return model, LadderGuide(model)


def binary_x(batch):
    return torch.bernoulli(torch.full((batch, X_DIM), 0.5))


def linear(layer, h):
    return h @ layer.weight.T + layer.bias


def mlp(net, h):
    """``tanh(W h + b)`` through each hidden layer of a pyrodgm MLP (no batch norm)."""
    for block in net.hidden_layers:
        h = torch.tanh(linear(block[0], h))
    return h


def normal_params(head, h):
    scale = linear(head.scale_layer, h)
    return linear(head.loc_layer, h), scale.exp() if head.scale_fn == "exp" else F.softplus(scale)


def gaussian_mlp(gm, h):
    return normal_params(gm.head, mlp(gm.net, h))


def normal_log_prob(value, loc, scale):
    return (-0.5 * ((value - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI).sum(-1)


def standard_log_prob(value):
    return (-0.5 * value**2 - 0.5 * LOG_2PI).sum(-1)


def kl_normal(loc_q, scale_q, loc_p, scale_p):
    """``KL(N(q) || N(p))`` summed over the last dim, in closed form."""
    return (torch.log(scale_p / scale_q) + (scale_q**2 + (loc_q - loc_p) ** 2) / (2 * scale_p**2) - 0.5).sum(-1)


def hand_terms(model, guide, x, eps_first, eps_second):
    """Per-site pieces of ``log p(x, z1, z2) - log q(z1, z2 | x)`` with the guide's noise
    (in the order the guide draws), each ``(particles, batch)``; plus the closed-form KLs
    the ELBO may use."""
    if isinstance(guide, HierarchicalGuide):
        loc1, scale1 = gaussian_mlp(guide.q_z1, x)
        z1 = loc1 + scale1 * eps_first
        loc2, scale2 = gaussian_mlp(guide.q_z2, z1)
        z2 = loc2 + scale2 * eps_second
    else:
        d1 = mlp(guide.up1, x)
        loc2, scale2 = normal_params(guide.head2, mlp(guide.up2, d1))
        z2 = loc2 + scale2 * eps_first
        hat_loc1, hat_scale1 = normal_params(guide.head1, d1)
        p_loc, p_scale = gaussian_mlp(model.top_down, z2)
        precision = hat_scale1**-2 + p_scale**-2
        scale1 = precision**-0.5
        loc1 = (hat_loc1 * hat_scale1**-2 + p_loc * p_scale**-2) / precision
        z1 = loc1 + scale1 * eps_second
    p_loc1, p_scale1 = gaussian_mlp(model.top_down, z2)
    logits = linear(model.likelihood.logits_layer, mlp(model.decoder, z1))
    return {
        "log_px": (x * logits - F.softplus(logits)).sum(-1),
        "log_pz1": normal_log_prob(z1, p_loc1, p_scale1),
        "log_pz2": standard_log_prob(z2),
        "log_qz1": normal_log_prob(z1, loc1, scale1),
        "log_qz2": normal_log_prob(z2, loc2, scale2),
        "kl_z1": kl_normal(loc1, scale1, p_loc1, p_scale1),
        "kl_z2": kl_normal(loc2, scale2, torch.zeros_like(loc2), torch.ones_like(scale2)),
    }


def hand_log_weights(terms):
    return terms["log_px"] + terms["log_pz1"] + terms["log_pz2"] - terms["log_qz1"] - terms["log_qz2"]


def noise(seed, particles, batch, first_dim, second_dim):
    """The standard normals Pyro's rsample draws after ``pyro.set_rng_seed(seed)``."""
    pyro.set_rng_seed(seed)
    return torch.randn(particles, batch, first_dim), torch.randn(particles, batch, second_dim)


def dims(kind):
    return (Z1, Z2) if kind == "vae2" else (Z2, Z1)  # the guide's sampling order


# --------------------------------------------------------------------------------------
# the bounds by hand
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vae2", "lvae"])
@pytest.mark.parametrize("particles", [1, 3])
def test_elbo_without_analytic_kl_by_hand(kind, particles):
    model, guide = make_pair(kind)
    x = binary_x(4)
    eps = noise(7, particles, 4, *dims(kind))
    expected = hand_log_weights(hand_terms(model, guide, x, *eps)).mean(0).sum()
    pyro.set_rng_seed(7)
    elbo = SemiSupervisedELBO(num_particles=particles, analytic_kl=False, max_plate_nesting=1)
    got = -elbo.differentiable_loss(model, guide, x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    pyro.set_rng_seed(8)  # other noise, other value
    assert not torch.allclose(-elbo.differentiable_loss(model, guide, x), expected)


def test_vae2_elbo_with_analytic_kl_uses_it_at_z2_only():
    """q(z1|x) is drawn before z2 in the guide but after it in the model: the KL at z1 is
    not closed form (p(z1|z2) depends on the later z2); at z2 it is."""
    model, guide = make_pair("vae2")
    x = binary_x(4)
    eps = noise(3, 2, 4, Z1, Z2)
    t = hand_terms(model, guide, x, *eps)
    expected = (t["log_px"] + t["log_pz1"] - t["log_qz1"] - t["kl_z2"]).mean(0).sum()
    pyro.set_rng_seed(3)
    got = -SemiSupervisedELBO(num_particles=2, max_plate_nesting=1).differentiable_loss(model, guide, x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)


def test_lvae_elbo_with_analytic_kl_at_both_layers():
    """The Ladder guide draws z2 then z1, as the model does: both KLs are closed form,
    KL(q(z1|x,z2) || p(z1|z2)) at the sampled z2."""
    model, guide = make_pair("lvae")
    x = binary_x(4)
    eps = noise(3, 2, 4, Z2, Z1)
    t = hand_terms(model, guide, x, *eps)
    expected = (t["log_px"] - t["kl_z1"] - t["kl_z2"]).mean(0).sum()
    pyro.set_rng_seed(3)
    got = -SemiSupervisedELBO(num_particles=2, max_plate_nesting=1).differentiable_loss(model, guide, x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["vae2", "lvae"])
def test_iwae_bound_by_hand(kind):
    model, guide = make_pair(kind)
    x = binary_x(4)
    eps = noise(11, 5, 4, *dims(kind))
    log_w = hand_log_weights(hand_terms(model, guide, x, *eps))
    expected = (log_w.logsumexp(0) - math.log(5)).sum()
    pyro.set_rng_seed(11)
    loss = ImportanceWeightedELBO(num_particles=5, max_plate_nesting=1)
    assert torch.allclose(-loss.differentiable_loss(model, guide, x), expected, rtol=0, atol=1e-10)
    assert torch.allclose(loss.last_components["iwae_bound"], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_iwae_bound_with_warmup_tempers_the_latent_part_of_each_weight(beta):
    model, guide = make_pair("vae2")
    x = binary_x(4)
    t = hand_terms(model, guide, x, *noise(5, 3, 4, Z1, Z2))
    log_w = t["log_px"] + beta * (t["log_pz1"] + t["log_pz2"] - t["log_qz1"] - t["log_qz2"])
    pyro.set_rng_seed(5)
    loss = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1, latent_weights={"z1": beta, "z2": beta})
    got = -loss.differentiable_loss(model, guide, x)
    assert torch.allclose(got, (log_w.logsumexp(0) - math.log(3)).sum(), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------
# the Ladder guide
# --------------------------------------------------------------------------------------
def test_precision_weighted_numbers():
    loc, scale = precision_weighted(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(1.0))
    # precisions 1/4 + 1 = 5/4, variance 4/5, mean (1/4 - 1) * 4/5 = -3/5
    assert torch.allclose(loc, torch.tensor(-0.6), atol=1e-15)
    assert torch.allclose(scale, torch.tensor(0.8).sqrt(), atol=1e-15)


def test_precision_weighted_is_the_normalised_product_of_gaussians():
    loc_a, scale_a = torch.randn(3), torch.rand(3) + 0.2
    loc_b, scale_b = torch.randn(3), torch.rand(3) + 0.2
    loc, scale = precision_weighted(loc_a, scale_a, loc_b, scale_b)
    grid = torch.linspace(-4, 4, 9).unsqueeze(-1)
    log_product = torch.distributions.Normal(loc_a, scale_a).log_prob(grid) + torch.distributions.Normal(loc_b, scale_b).log_prob(grid)
    difference = log_product - torch.distributions.Normal(loc, scale).log_prob(grid)
    assert torch.allclose(difference, difference[:1].expand_as(difference), atol=1e-10)  # constant in z


def test_ladder_guide_combines_bottom_up_and_top_down_at_z1():
    model, guide = make_pair("lvae")
    x = binary_x(6)
    trace = poutine.trace(guide).get_trace(x)
    z2 = trace.nodes["z2"]["value"]
    d1 = mlp(guide.up1, x)
    hat_loc, hat_scale = normal_params(guide.head1, d1)
    p_loc, p_scale = gaussian_mlp(model.top_down, z2)
    fn = trace.nodes["z1"]["fn"].base_dist
    expected_var = 1 / (1 / hat_scale**2 + 1 / p_scale**2)
    assert torch.allclose(fn.scale**2, expected_var, atol=1e-12)
    assert torch.allclose(fn.loc, expected_var * (hat_loc / hat_scale**2 + p_loc / p_scale**2), atol=1e-12)
    assert [n for n in trace.nodes if n in ("z1", "z2")] == ["z2", "z1"]  # top-down


def test_ladder_guide_shares_the_models_top_down_parameters():
    model, guide = make_pair("lvae")
    x = binary_x(6)
    with poutine.trace(param_only=True) as capture:
        guide(x)
    names = set(capture.trace.nodes)
    assert any(n.startswith("vae2$$$top_down.") for n in names) and any(n.startswith("lvae_guide$$$up1.") for n in names)
    assert not any(k.startswith("model") or "top_down" in k for k in guide.state_dict())
    # q(z1|x, z2), so the sample z1, depends on the model's top-down weights
    z1 = poutine.trace(guide).get_trace(x).nodes["z1"]["value"]
    grad = torch.autograd.grad(z1.sum(), model.top_down.head.loc_layer.weight)[0]
    assert grad.abs().sum() > 0
    # one SVI step moves one set of top-down parameters (the model's), seen by both
    before = model.top_down.head.loc_layer.weight.detach().clone()
    SVI(model, guide, Adam({"lr": 0.1}), SemiSupervisedELBO(max_plate_nesting=1)).step(x)
    assert not torch.equal(before, model.top_down.head.loc_layer.weight)
    assert pyro.get_param_store()["vae2$$$top_down.head.loc_layer.weight"] is model.top_down.head.loc_layer.weight


# --------------------------------------------------------------------------------------
# the IWAE loss
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vae2", "lvae"])
def test_iwae_loss_equals_the_evaluators_estimate(kind):
    model, guide = make_pair(kind)
    x = binary_x(5)
    pyro.set_rng_seed(4)
    loss = ImportanceWeightedELBO(num_particles=9).differentiable_loss(model, guide, x)
    pyro.set_rng_seed(4)
    estimate = iwae_log_likelihood(model, guide, x, num_particles=9)
    assert torch.allclose(loss, -estimate.sum(), rtol=0, atol=1e-10)


def test_iwae_loss_sums_enumerated_labels_as_the_evaluator_does():
    from pyrodgm.guides import M2Guide
    from pyrodgm.models import M2

    spec = MLPSpec(X_DIM, 3, 2, (4,))
    model, guide = M2(spec), M2Guide(spec)
    x = binary_x(5)
    pyro.set_rng_seed(2)
    loss = ImportanceWeightedELBO(num_particles=6).differentiable_loss(model, guide, x)
    pyro.set_rng_seed(2)
    assert torch.allclose(loss, -iwae_log_likelihood(model, guide, x, num_particles=6).sum(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["vae2", "lvae"])
def test_one_sample_iwae_is_the_elbo_without_analytic_kl(kind):
    model, guide = make_pair(kind)
    x = binary_x(5)
    pyro.set_rng_seed(9)
    iwae = ImportanceWeightedELBO(num_particles=1).differentiable_loss(model, guide, x)
    pyro.set_rng_seed(9)
    elbo = SemiSupervisedELBO(analytic_kl=False).differentiable_loss(model, guide, x)
    assert torch.allclose(iwae, elbo, rtol=0, atol=1e-10)


def test_iwae_bound_is_tighter_than_the_elbo_on_average():
    model, guide = make_pair("vae2")
    x = binary_x(8)
    with torch.no_grad():
        iwae = sum(ImportanceWeightedELBO(num_particles=50).loss(model, guide, x) for _ in range(20))
        elbo = sum(SemiSupervisedELBO(num_particles=50, analytic_kl=False).loss(model, guide, x) for _ in range(20))
    assert iwae < elbo  # losses: minus the bounds


def test_iwae_gradients_reach_every_parameter_and_svi_trains():
    model, guide = make_pair("vae2")
    x = binary_x(20)
    loss = ImportanceWeightedELBO(num_particles=5, max_plate_nesting=1)
    value = loss.differentiable_loss(model, guide, x)
    params = list(model.parameters()) + list(guide.parameters())
    grads = torch.autograd.grad(value, params)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    svi = SVI(model, guide, Adam({"lr": 0.02}), loss)
    pyro.set_rng_seed(0)
    first = sum(svi.step(x) for _ in range(5)) / 5
    for _ in range(100):
        svi.step(x)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        last = sum(loss.loss(model, guide, x) for _ in range(5)) / 5
    assert last < first


# --------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------
def tiny_config(model, **kwargs):
    from pyrodgm.zoo import defaults

    values = {**defaults(model, "digits"), "z_dim": 4, "top_z_dim": 2, "hidden": (8,), "top_hidden": (6,), **kwargs}
    return TrainConfig.for_model(model=model, dataset="digits", out="unused", **values)


@pytest.mark.parametrize("name", ["vae2", "iwae", "lvae"])
def test_recipes_train_one_step_on_digits(name):
    from pyrodgm.data import load_dataset

    data = load_dataset("digits", train=True)
    x = data.flat()[:16].bernoulli().to(torch.get_default_dtype())
    config = tiny_config(name, iw_samples=4 if name == "iwae" else 1)
    recipe_ = recipe(name)
    assert recipe_.label_site is None
    model, guide = recipe_.create(config, data.num_features, data.num_classes)
    loss = recipe_.loss(config, num_data=1000, num_labels=0)
    if recipe_.schedule is not None:
        recipe_.schedule(config, 0, model, guide, loss)
    before = [p.detach().clone() for p in list(model.parameters()) + list(guide.parameters())]
    value = training_step(model, guide, loss, Adam({"lr": 1e-3}), (x, None))
    after = list(model.parameters()) + list(guide.parameters())
    assert math.isfinite(value)
    assert all(not torch.equal(a, b) for a, b in zip(before, after) if b.requires_grad)


def test_recipe_defaults_follow_the_papers():
    vae2, iwae, lvae = (recipe(n).defaults for n in ("vae2", "iwae", "lvae"))
    assert (vae2["z_dim"], vae2["top_z_dim"], vae2["hidden"], vae2["top_hidden"], vae2["activation"]) == (100, 50, (200, 200), (100, 100), "tanh")
    assert iwae["iw_samples"] == 50 and vae2["iw_samples"] == 1
    assert lvae["kl_warmup_epochs"] == 200 and lvae["batch_size"] == 256
    assert isinstance(iwae_loss(tiny_config("iwae"), 1, 0), ImportanceWeightedELBO)
    assert iwae_loss(tiny_config("iwae", iw_samples=1), 1, 0).num_particles == 1  # IW = 1
    assert isinstance(lvae_loss(tiny_config("lvae", iw_samples=10, kl_warmup_epochs=0), 1, 0), ImportanceWeightedELBO)


def test_kl_warmup_schedule_and_its_effect():
    assert [kl_warmup_weight(e, 200) for e in (0, 50, 200, 500)] == [0.0, 0.25, 1.0, 1.0]
    assert kl_warmup_weight(3, 0) == 1.0
    config = tiny_config("lvae", kl_warmup_epochs=4)
    model, guide = recipe("lvae").build(config, X_DIM, 10)
    loss = lvae_loss(config, 1, 0)
    kl_warmup(config, 2, model, guide, loss)
    assert loss.latent_weights == {"z1": 0.5, "z2": 0.5}
    # with weight 0 the loss is the reconstruction term alone
    model.eval(), guide.eval()  # batch norm: the same statistics in both runs
    kl_warmup(config, 0, model, guide, loss)
    x = binary_x(3)
    pyro.set_rng_seed(1)
    value = loss.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    assert torch.allclose(value, -model_trace.nodes["x"]["fn"].log_prob(x).sum(), rtol=0, atol=1e-10)


def test_bad_input_errors():
    model, guide = make_pair("vae2")
    with pytest.raises(ValueError, match="z_dim"):
        HierarchicalVAE(TwoLayerSpec(X_DIM, z_dim=0))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, X_DIM + 1))
    with pytest.raises(ValueError, match="NaN"):
        guide(torch.full((2, X_DIM), float("nan")))
    with pytest.raises(ValueError, match="no label"):
        model(binary_x(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no label"):
        guide(binary_x(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="HierarchicalVAE"):
        LadderGuide(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_particles"):
        ImportanceWeightedELBO(num_particles=0)
    with pytest.raises(ValueError, match="iwae"):
        vae2_loss(tiny_config("vae2", iw_samples=5), 1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        lvae_loss(tiny_config("lvae", kl_warmup_epochs=-1), 1, 0)


# --------------------------------------------------------------------------------------
# evaluation, CLI, experiment
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vae2", "lvae"])
def test_chunked_iwae_evaluation_with_diagnostics(kind):
    model, guide = make_pair(kind)
    model.eval(), guide.eval()
    x = binary_x(7)
    result = iwae_evaluate(model, guide, x, num_particles=40, batch_size=3, chunk_size=15)
    summary = result.summary()
    assert result.log_likelihood.shape == (7,) and summary["iwae_k"] == 40
    assert math.isfinite(summary["iwae_log_likelihood"]) and summary["ess_mean"] >= 1
    assert continuous_latent_sites(guide, x[:2]) == (["z1", "z2"] if kind == "vae2" else ["z2", "z1"])


@pytest.mark.slow
def test_cli_trains_and_evaluates_the_hierarchical_models(tmp_path):
    from pyrodgm.cli import main

    torch.set_default_dtype(torch.float32)  # the CLI's float32 data and networks (the fixture restores it)
    for name, extra in (("iwae", ["--iw-samples", "3"]), ("lvae", ["--kl-warmup-epochs", "2"])):
        out = tmp_path / name
        args = ["train", name, "--dataset", "digits", "--epochs", "1", "--out", str(out), "--quiet", "--no-samples",
                "--z-dim", "6", "--top-z-dim", "3", "--hidden", "16", "--top-hidden", "8", *extra]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["evaluate", str(out / "best.pt"), "--iwae-k", "30", "--chunk-size", "7", "--limit", "12", "--quiet"]) == 0
        report = json.loads(buffer.getvalue())
        assert report["model"] == name and report["iwae_k"] == 30 and report["num_examples"] == 12
        assert math.isfinite(report["iwae_log_likelihood"]) and set(report["active_units"]) == {"z1", "z2"}
        assert "test_error" not in report


@pytest.mark.slow
@pytest.mark.parametrize("model_name, iw_samples, name, target", [("iwae", 1, "iwae_l2_iw1", -85.33), ("lvae", 2, "lvae_l2_iw2", None)])
def test_experiment_script_runs_and_writes_results(model_name, iw_samples, name, target, tmp_path):
    args = [sys.executable, str(EXPERIMENTS / "hierarchical_mnist.py"), "--model", model_name, "--dataset", "digits",
            "--validation", "300", "--device", "cpu", "--epochs", "1", "--iw-samples", str(iw_samples), "--iwae-k", "20",
            "--test-images", "10", "--threads", "1", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--quiet"]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    (result_file,) = (tmp_path / "results").glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["epochs_completed"] == 1 and result["wall_seconds"] > 0
    assert result["test"]["iwae_k"] == 20 and result["test"]["num_examples"] == 10
    assert math.isfinite(result["test"]["log_likelihood"]) and result["experiment"] == name
    assert result["paper"].get("log_likelihood") == target and result["paper"]["source"]
