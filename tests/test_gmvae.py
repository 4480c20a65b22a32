"""The semi-supervised GMVAE (Arias Figueroa & Rivera 2019) and the label modes of
:mod:`pyrodgm.labels`: the temperature schedule, the bound by hand, the relaxed samples, the
recipe, and a tiny run of the clustering experiment."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from pyrodgm.guides import M2Guide
from pyrodgm.guides.gmvae import GMVAEGuide
from pyrodgm.labels import LabelPrior, RelaxedLabel, StraightThroughLabel, label_distribution
from pyrodgm.losses import SemiSupervisedELBO, WeightedSum
from pyrodgm.models import M2
from pyrodgm.models.gmvae import MSE_SCALE, ConvFeatures, ConvImageDecoder, GMVAE, GMVAESpec, conv_geometry
from pyrodgm.nets import MLPSpec
from pyrodgm.traces import TraceTerms, particle_traces
from pyrodgm.training import TrainConfig
from pyrodgm.zoo import defaults, recipe
from pyrodgm.recipes.gmvae import build_gmvae, gmvae_loss, gmvae_schedule, gumbel_temperature

pytestmark = pytest.mark.usefixtures("pyro_test_env")

SHAPE, K, Z, FEAT = (1, 8, 8), 3, 2, 4
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def make_pair(label_mode="enumerate", likelihood="gaussian"):
    model = GMVAE(GMVAESpec(SHAPE, K, Z, FEAT), likelihood=likelihood)
    guide = GMVAEGuide(GMVAESpec(SHAPE, K, Z, FEAT), label_mode=label_mode, temperature=0.7)
    return model, guide


def images(n, binary=False):
    x = torch.rand(n, math.prod(SHAPE))
    return x.bernoulli() if binary else x


# --------------------------------------------------------------------------------------
# temperature schedule
# --------------------------------------------------------------------------------------
def test_gumbel_temperature_exponential_from_one_to_half_over_fifty_epochs():
    assert gumbel_temperature(0) == 1.0
    assert gumbel_temperature(25) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    assert gumbel_temperature(50) == pytest.approx(0.5, rel=1e-12)
    assert gumbel_temperature(199) == pytest.approx(0.5, rel=1e-12)
    # the authors' rate: tau_0 exp(-r e) with r = log(2) / 50
    for epoch in (1, 7, 33):
        assert gumbel_temperature(epoch) == pytest.approx(math.exp(-math.log(2) / 50 * epoch), rel=1e-12)


def test_gumbel_temperature_linear_and_edge_cases():
    assert gumbel_temperature(25, decay="linear") == pytest.approx(0.75)
    assert gumbel_temperature(10, 2.0, 1.0, 20, "linear") == pytest.approx(1.5)
    assert gumbel_temperature(0, anneal_epochs=0) == 0.5
    for bad in (dict(epoch=-1), dict(epoch=1.5), dict(epoch=0, minimum=0.0), dict(epoch=0, initial=0.4),
                dict(epoch=0, anneal_epochs=-1), dict(epoch=0, decay="cosine")):
        with pytest.raises(ValueError):
            gumbel_temperature(**bad)


def test_schedule_sets_the_guide_temperature():
    config = TrainConfig.for_model(**{**defaults("gmvae", "digits"), "model": "gmvae", "epochs": 3})
    model, guide = build_gmvae(config, 64, 10)
    assert guide.temperature == pytest.approx(gumbel_temperature(2))
    gmvae_schedule(config, 0, model, guide, None)
    assert guide.temperature == 1.0
    gmvae_schedule(config, 80, model, guide, None)
    assert guide.temperature == pytest.approx(0.5)


# --------------------------------------------------------------------------------------
# the bound of eq. 7 by hand
# --------------------------------------------------------------------------------------
def _normal_kl(loc, scale, prior_loc, prior_scale):
    return (prior_scale.log() - scale.log() + (scale**2 + (loc - prior_loc) ** 2) / (2 * prior_scale**2) - 0.5).sum(-1)


def test_gmvae_elbo_by_hand_in_enumerate_mode():
    model, guide = make_pair("enumerate")
    x, w_g, w_c, particles = images(5), 2.0, 3.0, 2
    loss = SemiSupervisedELBO(num_particles=particles, max_plate_nesting=1, latent_weights={"z": w_g, "y": w_c})
    pyro.set_rng_seed(3)
    ours = loss.differentiable_loss(model, guide, x)

    pyro.set_rng_seed(3)
    features = guide.features(x)
    log_q = guide.classifier_head(guide.classifier(features)).log_softmax(-1)  # [B, K]
    eye = torch.eye(K).reshape(K, 1, 1, K)
    loc, scale = guide.encoder(features, eye)  # [K, 1, B, Z]
    z = loc + scale * torch.randn((K, particles, x.shape[0], Z))
    mean = torch.sigmoid(model.decoder(z))
    log_px = (-((x - mean) ** 2) - 0.5 * math.log(math.pi)).sum(-1)  # N(mean, 1/2)
    prior_loc, prior_scale = model.prior(eye)
    kl_z = _normal_kl(loc, scale, prior_loc, prior_scale)  # [K, 1, B]
    per_class = (log_px - w_g * kl_z).mean(1)  # [K, B]
    kl_y = (log_q.exp() * (log_q + math.log(K))).sum(-1)
    elbo = (log_q.exp().T * per_class).sum(0) - w_c * kl_y
    assert torch.allclose(ours, -elbo.sum(), rtol=1e-10, atol=0)
    # with other noise the value differs: the agreement is no coincidence
    pyro.set_rng_seed(4)
    assert not torch.allclose(loss.differentiable_loss(model, guide, x), ours)


def test_mse_likelihood_is_squared_error_plus_constant():
    model, _ = make_pair()
    out, x = torch.randn(3, 64), images(3)
    log_p = model.observation(out).log_prob(x)
    assert MSE_SCALE == pytest.approx(math.sqrt(0.5))
    expected = -((x - torch.sigmoid(out)) ** 2).sum(-1) - 32 * math.log(math.pi)
    assert torch.allclose(log_p, expected, rtol=1e-12)


# --------------------------------------------------------------------------------------
# relaxed labels
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, cls", [("relaxed", RelaxedLabel), ("straight-through", StraightThroughLabel)])
def test_relaxed_labels_are_reparameterised_samples_with_gradients_into_the_classifier(mode, cls):
    model, guide = make_pair(mode)
    trace = poutine.trace(guide).get_trace(images(6))
    site = trace.nodes["y"]
    assert isinstance(site["fn"], cls) and site["fn"].has_rsample and "enumerate" not in site["infer"]
    y = site["value"]
    assert y.shape == (6, K) and torch.allclose(y.sum(-1), torch.ones(6))
    if mode == "straight-through":
        assert set(y.unique().tolist()) <= {0.0, 1.0}  # hard in the forward pass
    else:
        assert ((y > 0) & (y < 1)).all()
    assert site["fn"].temperature.item() == pytest.approx(0.7)
    weights = guide.classifier_head.logits_layer.weight
    (grad_y,) = torch.autograd.grad((y * torch.arange(K)).sum(), weights, retain_graph=True)
    (grad_z,) = torch.autograd.grad(trace.nodes["z"]["value"].sum(), weights)
    assert grad_y.abs().sum() > 0 and grad_z.abs().sum() > 0


@pytest.mark.parametrize("mode", ["relaxed", "straight-through"])
def test_relaxed_y_term_is_the_weighted_categorical_kl(mode):
    model, guide = make_pair(mode)
    x = images(4)
    model_trace, guide_trace = particle_traces(model, guide, (x,), {}, 1, 1)
    terms = TraceTerms(model_trace, guide_trace, 1, analytic_kl=True)
    assert set(terms.kl_sites) == {"y", "z"}
    log_q = guide.classifier_head(guide.classifier(guide.features(x))).log_softmax(-1)
    expected = (log_q.exp() * (log_q + math.log(K))).sum(-1)
    (y_term,) = [t.value for t in terms.terms if t.name == "y"]
    assert torch.allclose(-y_term.reshape(-1), expected, rtol=1e-12)
    # and ScaleLatents weighs it by w_C through the loss
    loss = SemiSupervisedELBO(max_plate_nesting=1, latent_weights={"y": 3.0})
    pyro.set_rng_seed(1)
    weighted = loss.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(1)
    plain = SemiSupervisedELBO(max_plate_nesting=1).differentiable_loss(model, guide, x)
    assert torch.allclose(weighted - plain, 2.0 * expected.sum(), rtol=1e-6)


def test_registered_kl_and_label_prior():
    logits_q, logits_p = torch.randn(4, 3), torch.randn(3)
    for cls in (RelaxedLabel, StraightThroughLabel):
        q = cls(torch.tensor(0.5), logits=logits_q)
        expected = kl_divergence(dist.Categorical(logits=logits_q), dist.Categorical(logits=logits_p))
        assert torch.allclose(kl_divergence(q, dist.OneHotCategorical(logits=logits_p)), expected, rtol=1e-12)
        assert torch.allclose(kl_divergence(q, LabelPrior(logits=logits_p)), expected, rtol=1e-12)
    with pytest.raises(NotImplementedError):  # only this module's classes: plain Gumbel-softmax untouched
        kl_divergence(dist.RelaxedOneHotCategorical(torch.tensor(0.5), logits=logits_q), dist.OneHotCategorical(logits=logits_p))
    prior, plain = LabelPrior(logits=logits_p), dist.OneHotCategorical(logits=logits_p)
    one_hot = torch.eye(3)
    assert torch.allclose(prior.log_prob(one_hot), plain.log_prob(one_hot), rtol=1e-12)
    soft = torch.tensor([0.2, 0.3, 0.5])
    assert torch.allclose(prior.log_prob(soft), (soft * logits_p.log_softmax(-1)).sum())
    with pytest.raises(ValueError):
        prior.log_prob(torch.tensor([0.5, 0.6, 0.1]))  # off the simplex


def test_relaxed_log_prob_is_finite_at_an_observed_one_hot_label():
    q = RelaxedLabel(torch.tensor(0.5), logits=torch.randn(2, 3))
    assert torch.isfinite(q.log_prob(torch.eye(3)[:2])).all()
    soft = q.rsample()
    reference = dist.RelaxedOneHotCategorical(torch.tensor(0.5), logits=q.logits).log_prob(soft)
    assert torch.allclose(q.log_prob(soft), reference, rtol=1e-8)


@pytest.mark.parametrize("mode", ["relaxed", "straight-through"])
def test_m2_relaxed_trains_a_step(mode):
    spec = MLPSpec(20, 3, 2, (8,))
    model, guide = M2(spec), M2Guide(spec, label_mode=mode, temperature=0.6)
    x = torch.rand(10, 20).bernoulli()
    y = torch.tensor([0, 1, 2, -1, -1, -1, -1, -1, -1, -1])
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), SemiSupervisedELBO(alpha=2.0, max_plate_nesting=1))
    svi.step(x, y=y)  # creates the parameters
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    loss = svi.step(x, y=y)
    assert math.isfinite(loss)
    after = pyro.get_param_store()
    assert any(not torch.equal(before[name], after[name]) for name in before if "classifier" in name)
    assert isinstance(poutine.trace(guide).get_trace(x).nodes["y"]["fn"], (RelaxedLabel, StraightThroughLabel))


def test_m2_default_is_unchanged_enumeration():
    guide = M2Guide(MLPSpec(20, 3, 2, (8,)))
    assert guide.label_mode == "enumerate" and guide.temperature == 1.0
    site = poutine.trace(guide).get_trace(torch.rand(4, 20)).nodes["y"]
    assert type(site["fn"]) is dist.OneHotCategorical and site["infer"]["enumerate"] == "parallel"
    assert set(guide.state_dict()) == set(M2Guide(MLPSpec(20, 3, 2, (8,)), label_mode="relaxed").state_dict())


@pytest.mark.parametrize("bad", ["gumbel", "", None])
def test_bad_label_mode_errors(bad):
    with pytest.raises(ValueError, match="label_mode"):
        M2Guide(MLPSpec(20, 3, 2, (8,)), label_mode=bad)
    with pytest.raises(ValueError, match="label_mode"):
        GMVAEGuide(GMVAESpec(SHAPE, K, Z, FEAT), label_mode=bad)
    guide = M2Guide(MLPSpec(20, 3, 2, (8,)))
    with pytest.raises(ValueError, match="label_mode"):
        guide.label_mode = bad
    with pytest.raises(ValueError, match="label_mode"):
        label_distribution(torch.zeros(3), bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_errors(bad):
    with pytest.raises(ValueError, match="temperature"):
        GMVAEGuide(GMVAESpec(SHAPE, K, Z, FEAT), temperature=bad)
    guide = M2Guide(MLPSpec(20, 3, 2, (8,)))
    with pytest.raises(ValueError, match="temperature"):
        guide.temperature = bad


# --------------------------------------------------------------------------------------
# model, guide, networks
# --------------------------------------------------------------------------------------
def test_guide_records_the_features_site_in_the_data_plate():
    _, guide = make_pair("relaxed")
    x = images(5)
    trace = poutine.trace(guide).get_trace(x)
    site = trace.nodes["features"]
    assert site["infer"].get("_deterministic") and site["infer"].get("is_auxiliary")
    assert site["value"].shape == (5, FEAT)
    assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert torch.allclose(site["value"], guide.features(x))
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"] == ["features", "y", "z"]


def test_model_trace_and_class_conditional_generation():
    model, _ = make_pair(likelihood="bernoulli")
    trace = poutine.trace(model).get_trace(images(4, binary=True), y=torch.tensor([0, 1, 2, 0]))
    assert isinstance(trace.nodes["y"]["fn"], LabelPrior) and trace.nodes["y"]["is_observed"]
    assert trace.nodes["z"]["value"].shape == (4, Z) and trace.nodes["x"]["is_observed"]
    generated = poutine.trace(model).get_trace(batch_size=6).nodes["x"]["value"]
    assert generated.shape == (6, 64) and set(generated.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="likelihood"):
        GMVAE(GMVAESpec(SHAPE, K, Z, FEAT), likelihood="poisson")


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_conv_networks_reach_a_vector_and_return_the_image_size(shape):
    encoder, decoder = ConvFeatures(shape, 7), ConvImageDecoder(5, shape, 7)
    x = torch.rand(2, math.prod(shape))
    assert encoder(x).shape == (2, 7)
    assert decoder(torch.randn(3, 2, 5)).shape == (3, 2, math.prod(shape))


def test_conv_geometry_errors():
    with pytest.raises(ValueError, match="geometry"):
        conv_geometry((1, 9, 9))
    with pytest.raises(ValueError, match="1x1"):
        conv_geometry((1, 8, 8), ((4,), (3, 3), (1, 1)))
    with pytest.raises(ValueError, match="one kernel"):
        conv_geometry((1, 8, 8), ((4,), (3,), (1,)))


# --------------------------------------------------------------------------------------
# recipe
# --------------------------------------------------------------------------------------
def test_recipe_presets_per_dataset():
    mnist, fashion, clustering = defaults("gmvae", "mnist"), defaults("gmvae", "fashion-mnist"), defaults("gmvae-clustering", "mnist")
    assert (mnist["feature_dim"], mnist["z_dim"], mnist["knn"], mnist["w_metric"], mnist["metric_margin"]) == (100, 100, 5, 1.0, 2.0)
    assert (fashion["feature_dim"], fashion["z_dim"], fashion["knn"], fashion["w_metric"], fashion["metric_margin"]) == (200, 50, 3, 0.1, 1.0)
    assert mnist["label_mode"] == "relaxed" and mnist["likelihood"] == "gaussian" and not mnist["binarize"]
    assert (clustering["labels"], clustering["batch_size"], clustering["z_dim"], clustering["w_gaussian"]) == (0, 64, 150, 5.0)
    assert defaults("gmvae-clustering", "fashion-mnist")["z_dim"] == 50
    assert defaults("gmvae", "digits")["lr"] == 3e-3  # the global digits preset still applies
    assert recipe("gmvae").labels_optional and recipe("gmvae").metrics is not None


def test_recipe_loss_terms():
    config = TrainConfig.for_model(**{**defaults("gmvae", "digits"), "model": "gmvae", "w_metric": 0.3})
    loss = gmvae_loss(config, num_data=1000, num_labels=100)
    assert isinstance(loss, WeightedSum) and set(loss.terms) == {"elbo", "assignment", "metric"}
    assert loss.terms["metric"].weight == 0.3 and loss.terms["metric"].loss.k == config.params.knn
    assert loss.terms["assignment"].loss.include_labelled
    elbo = loss.terms["elbo"].loss.inner
    assert elbo.latent_weights == {"z": config.params.w_gaussian, "y": config.params.w_categorical}
    unsupervised = gmvae_loss(config, num_data=1000, num_labels=0)
    assert set(unsupervised.terms) == {"elbo"}


def test_recipe_loss_trains_on_a_semi_supervised_batch():
    config = TrainConfig.for_model(**{**defaults("gmvae", "digits"), "model": "gmvae", "knn": 2, "z_dim": 3, "feature_dim": 5})
    model, guide = build_gmvae(config, 64, 10)
    x, y = images(12), torch.tensor([0, 1, 2, 3, 4, 5] + [-1] * 6)
    loss = gmvae_loss(config, num_data=100, num_labels=6)
    value = loss.differentiable_loss(model, guide, x, y=y)
    value.backward()
    assert torch.isfinite(value) and set(loss.last_components) >= {"elbo", "assignment", "metric"}
    assert guide.features.convs[0].weight.grad.abs().sum() > 0


def test_cli_flags_reach_the_config():
    from pyrodgm.cli import _train_config, build_parser

    args = build_parser().parse_args(
        ["train", "gmvae", "--dataset", "fashion-mnist", "--label-mode", "straight-through", "--knn", "4",
         "--w-metric", "0.2", "--temperature-min", "0.3", "--feature-dim", "16"]
    )
    config = _train_config(args)
    assert (config.params.label_mode, config.params.knn, config.params.w_metric, config.params.temperature_min, config.params.feature_dim) == ("straight-through", 4, 0.2, 0.3, 16)
    assert config.params.z_dim == 50  # the Fashion-MNIST preset


@pytest.mark.slow
def test_clustering_experiment_runs_and_writes_results(tmp_path):
    args = [sys.executable, str(EXPERIMENTS / "gmvae_clustering.py"), "--dataset", "digits", "--validation", "300",
            "--device", "cpu", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--quiet",
            "--epochs", "1", "--threads", "1", "--embedding", "pca"]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    (result_file,) = (tmp_path / "results").glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["epochs_completed"] == 1
    assert 0.0 <= result["test"]["cluster_acc"] <= 1.0 and 0.0 <= result["test"]["nmi"] <= 1.0
    assert result["paper"]["cluster_acc"] == pytest.approx(0.9246)
    assert (tmp_path / "results" / result_file.with_suffix(".png").name).exists()


# --------------------------------------------------------------------------------------
# the authors' code's networks and k-NN vote (issue 15)
# --------------------------------------------------------------------------------------
AUTHORS_NETWORKS = dict(z_prior="standard", z_encoder="linear", classifier_layers=0, activation="relu", decoder_head="dense")


def authors_pair(label_mode="relaxed", **overrides):
    spec = GMVAESpec(SHAPE, K, Z, FEAT, **{**AUTHORS_NETWORKS, **overrides})
    return GMVAE(spec), GMVAEGuide(spec, label_mode=label_mode, temperature=0.7)


def test_standard_prior_is_unit_normal_and_the_decoder_reads_the_label():
    model, _ = authors_pair()
    z = torch.randn(4, Z)
    trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(images(4), y=torch.tensor([0, 1, 2, 0]))
    expected = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(trace.nodes["z"]["fn"].log_prob(z), expected)
    assert model.prior is None and "z_loc" in dict(model.named_buffers())
    model.eval()
    one, two = torch.eye(K)[[0] * 4], torch.eye(K)[[1] * 4]
    assert not torch.allclose(model.decoder(z, one), model.decoder(z, two))
    with pytest.raises(ValueError, match="reads a label"):
        model.decoder(z)
    mixture, _ = make_pair()
    assert mixture.decoder.label_linear is None and "z_loc" not in dict(mixture.named_buffers())


def test_standard_prior_decoder_is_a_sum_of_linear_maps_of_z_and_y():
    """``f(z, y)`` starts from ``W_z z + W_y y`` (the authors' ``dense(z) + dense(y)``):
    the first map is affine in ``y`` for a fixed ``z``."""
    model, _ = authors_pair()
    decoder = model.decoder
    z, a, b = torch.randn(5, Z), torch.softmax(torch.randn(5, K), -1), torch.softmax(torch.randn(5, K), -1)
    captured = []
    handle = decoder.deconvs.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].flatten(1)))
    decoder(z, a), decoder(z, b), decoder(z, 0.5 * (a + b))
    handle.remove()
    assert torch.allclose(captured[2], 0.5 * (captured[0] + captured[1]), atol=1e-6)
    assert torch.allclose(captured[0], decoder.linear(z) + decoder.label_linear(a), atol=1e-6)


def test_linear_z_encoder_reads_the_features_alone():
    _, guide = authors_pair()
    x = images(6)
    features = guide.features(x)
    z_given = {}
    for label in (0, 1):
        trace = poutine.trace(guide).get_trace(x, y=torch.full((6,), label))
        z_given[label] = trace.nodes["z"]["fn"]
    loc = guide.encoder.loc_layer(features)
    scale = guide.encoder.scale_layer(features).exp()
    for fn in z_given.values():
        assert torch.allclose(fn.base_dist.loc, loc, atol=1e-6) and torch.allclose(fn.base_dist.scale, scale, atol=1e-6)
    _, paper = make_pair("relaxed")
    paper_locs = [poutine.trace(paper).get_trace(x, y=torch.full((6,), label)).nodes["z"]["fn"].base_dist.loc for label in (0, 1)]
    assert not torch.allclose(*paper_locs)


def test_classifier_without_hidden_layers_has_logits_linear_in_the_features():
    _, guide = authors_pair()
    x = images(5)
    features = guide.features(x)
    head = guide.classifier_head.logits_layer
    logits = guide.label_distribution(x).logits
    assert torch.allclose(logits, (features @ head.weight.T + head.bias).log_softmax(-1), atol=1e-6)
    _, paper = make_pair("relaxed")
    assert len(paper.classifier.hidden_layers) == 1 and len(guide.classifier.hidden_layers) == 0


def test_relu_features_are_non_negative_and_leaky_ones_are_not():
    x = images(20)
    _, relu = authors_pair()
    _, leaky = make_pair("relaxed")
    assert relu.features(x).min() >= 0 and leaky.features(x).min() < 0
    assert isinstance(relu.features.convs[2], torch.nn.ReLU) and isinstance(leaky.features.convs[2], torch.nn.LeakyReLU)


def test_dense_decoder_head_is_an_affine_map_of_a_rectified_image():
    model, _ = authors_pair()
    decoder = model.decoder
    assert isinstance(decoder.deconvs[-1], torch.nn.ReLU) and isinstance(decoder.deconvs[-2], torch.nn.BatchNorm2d)
    z, y = torch.randn(4, Z), torch.eye(K)[[0, 1, 2, 0]]
    rectified = []
    handle = decoder.deconvs.register_forward_hook(lambda module, inputs, out: rectified.append(out.flatten(1)))
    out = decoder(z, y)
    handle.remove()
    assert rectified[0].min() >= 0
    assert torch.allclose(out, rectified[0] @ decoder.dense.weight.T + decoder.dense.bias, atol=1e-6)
    paper, _ = make_pair()
    assert isinstance(paper.decoder.deconvs[-1], torch.nn.ConvTranspose2d) and isinstance(paper.decoder.dense, torch.nn.Identity)


@pytest.mark.parametrize("bad", [dict(z_prior="gaussian"), dict(z_encoder="conv"), dict(decoder_head="sigmoid"), dict(classifier_layers=-1)])
def test_bad_network_options_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GMVAESpec(SHAPE, K, Z, FEAT, **bad)


def _majority_assignment(features, labels, k):
    """The authors' ``assign_labels_semisupervised``: a majority vote of the k nearest
    labelled rows, ties to the smallest class."""
    labelled = labels >= 0
    distances = torch.cdist(features[~labelled], features[labelled])
    nearest = labels[labelled][distances.topk(k, largest=False).indices]
    votes = torch.nn.functional.one_hot(nearest, K).sum(-2)
    targets = labels.clone()
    targets[~labelled] = votes.argmax(-1)
    return targets


def _distance_assignment(features, labels, k):
    labelled = labels >= 0
    distances = torch.cdist(features[~labelled], features[labelled])
    nearest, index = distances.topk(k, largest=False)
    votes = torch.zeros(int((~labelled).sum()), K).scatter_add_(-1, labels[labelled][index], nearest.reciprocal())
    targets = labels.clone()
    targets[~labelled] = votes.argmax(-1)
    return targets


@pytest.mark.parametrize("weighting", ["uniform", "distance"])
def test_knn_weighting_decides_the_recipes_assignment_loss(weighting):
    """The recipe's ``L_A`` is ``-sum log q(y = t|x_hat)`` with ``t`` the true labels of the
    labelled rows and the (majority or 1/distance) k-NN vote of the unlabelled ones."""
    torch.manual_seed(3)
    config = TrainConfig.for_model(**{**defaults("gmvae", "digits"), "model": "gmvae", "knn": 3, "z_dim": Z, "feature_dim": FEAT, "knn_weighting": weighting})
    model, guide = build_gmvae(config, 64, K)
    x, y = images(40), torch.tensor([0, 1, 2] * 2 + [-1] * 34)
    term = gmvae_loss(config, num_data=100, num_labels=6).terms["assignment"]
    assert term.loss.weighting == weighting
    features = guide.features(x).detach()
    log_q = guide.label_distribution(x).logits.detach()
    majority, weighted = _majority_assignment(features, y, 3), _distance_assignment(features, y, 3)
    assert not torch.equal(majority, weighted)  # the batch tells the two votes apart
    targets = majority if weighting == "uniform" else weighted
    expected = -log_q.gather(-1, targets.unsqueeze(-1)).sum()
    assert torch.allclose(term.loss.differentiable_loss(model, guide, x, y=y), expected, atol=1e-4)


def test_authors_code_options_reach_the_networks_and_train_a_step():
    from pyrodgm.cli import _train_config, build_parser

    args = build_parser().parse_args(
        ["train", "gmvae", "--dataset", "digits", "--knn-weighting", "uniform", "--z-prior", "standard", "--z-encoder", "linear",
         "--classifier-layers", "0", "--conv-activation", "relu", "--decoder-head", "dense", "--feature-dim", "6", "--z-dim", "3", "--knn", "2"]
    )
    config = _train_config(args)
    model, guide = build_gmvae(config, 64, 10)
    assert (guide.spec.z_prior, guide.spec.z_encoder, guide.spec.classifier_layers, guide.spec.activation, guide.spec.decoder_head) == (
        "standard", "linear", 0, "relu", "dense")
    loss = gmvae_loss(config, num_data=100, num_labels=6)
    assert loss.terms["metric"].loss.weighting == "uniform"
    x, y = images(12), torch.tensor([0, 1, 2, 3, 4, 5] + [-1] * 6)
    value = loss.differentiable_loss(model, guide, x, y=y)
    value.backward()
    assert torch.isfinite(value) and model.decoder.label_linear.weight.grad.abs().sum() > 0
    assert guide.encoder.loc_layer.weight.grad.abs().sum() > 0


def test_cross_entropy_likelihood_is_the_binary_cross_entropy_of_grey_pixels():
    """The authors' ``bce`` reconstruction: ``-log p(x|z) = -sum [x log s + (1 - x) log(1 - s)]``
    with ``s = sigmoid(f(z))`` and ``x`` grey, which a Bernoulli likelihood refuses."""
    model, _ = make_pair(likelihood="cross-entropy")
    x, z = images(4), torch.randn(4, Z)
    trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x, y=torch.tensor([0, 1, 2, 0]))
    s = torch.sigmoid(model.decoder(z))
    expected = (x * s.log() + (1 - x) * (1 - s).log()).sum(-1)
    assert torch.allclose(trace.nodes["x"]["fn"].log_prob(x), expected, atol=1e-4)
    bernoulli, _ = make_pair(likelihood="bernoulli")
    with pytest.raises(ValueError):
        bernoulli(x, y=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError):
        model(x + 1.0, y=torch.tensor([0, 1, 2, 0]))  # still [0, 1] intensities
    config = TrainConfig.for_model(**{**defaults("gmvae", "digits"), "model": "gmvae", "likelihood": "cross-entropy"})
    assert not config.binarize and build_gmvae(config, 64, 10)[0].likelihood_kind == "cross-entropy"


def test_tensorflow_batch_norm_keeps_a_hundredth_of_each_batch_and_eps_1e3():
    config = TrainConfig.for_model(**{**defaults("gmvae", "digits"), "model": "gmvae", "z_dim": Z, "feature_dim": FEAT, "batch_norm": "tensorflow"})
    model, guide = build_gmvae(config, 64, K)
    layers = [m for m in (*model.modules(), *guide.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    assert layers and all((m.momentum, m.eps) == (0.01, 1e-3) for m in layers)
    first = guide.features.convs[1]
    x = images(16)
    pre = guide.features.convs[0](x.reshape(16, *SHAPE))
    guide.features(x)
    assert torch.allclose(first.running_mean, 0.01 * pre.mean((0, 2, 3)), atol=1e-6)
    plain, _ = build_gmvae(TrainConfig.for_model(**{**defaults("gmvae", "digits"), "model": "gmvae", "z_dim": Z, "feature_dim": FEAT}), 64, K)
    assert all((m.momentum, m.eps) == (0.1, 1e-5) for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_xavier_weight_init_is_glorot_uniform_with_zero_biases_and_default_is_untouched():
    values = {**defaults("gmvae", "digits"), "model": "gmvae", "z_dim": Z, "feature_dim": FEAT}
    torch.manual_seed(0)
    model, guide = build_gmvae(TrainConfig.for_model(**values, init="xavier"), 64, K)
    layers = [m for m in (*model.modules(), *guide.modules()) if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for layer in layers:
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
        assert layer.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) and not layer.bias.any()
    torch.manual_seed(0)
    default = build_gmvae(TrainConfig.for_model(**values), 64, K)
    torch.manual_seed(0)
    spec = GMVAESpec(SHAPE, K, Z, FEAT)
    reference = GMVAE(spec), GMVAEGuide(spec, label_mode="relaxed")
    for built, plain in zip(default, reference):
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), plain.state_dict().values()))
