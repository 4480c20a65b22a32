"""Tests of CaGeM (pyrodgm.models.cagem, pyrodgm.guides.cagem, pyrodgm.losses.cagem,
pyrodgm.recipes.cagem): the ELBO of Sec. 3.1 and the model's classifier p(y|x) of Sec. 4 against
hand computations with fixed noise, App. B's gradient restriction parameter by parameter,
the batch-norm statistics, the KL warm-up, CaGeM-0 and bad inputs."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from pyro.optim import Adam

from pyrodgm.guides.cagem import CaGeMGuide
from pyrodgm.losses import SemiSupervisedELBO, WeightedSum
from pyrodgm.losses.cagem import (
    FrozenBatchNormStats,
    ModelClassifierCrossEntropy,
    cagem_objective,
    model_label_log_prob,
    module_params,
)
from pyrodgm.models.cagem import CaGeM, CaGeMSpec
from pyrodgm.training import TrainConfig, train
from pyrodgm.zoo import recipe
from pyrodgm.recipes.cagem import build_cagem, cagem_loss, cagem_warmup, cluster_error
from pyrodgm.recipes.warmup import kl_warmup_weight

pytestmark = pytest.mark.usefixtures("pyro_test_env")

X_DIM, K, Z1, Z2 = 5, 3, 2, 3
LOG_2PI = math.log(2 * math.pi)


def make_pair(batch_norm=False, skip=True, scale="exp"):
    spec = CaGeMSpec(X_DIM, K, Z1, (6,), z2_dim=Z2, hidden2=(4,), batch_norm=batch_norm, scale=scale)
    return CaGeM(spec), CaGeMGuide(spec, skip=skip)


def binary_x(batch):
    return torch.bernoulli(torch.full((batch, X_DIM), 0.5))


def normal_log_prob(value, loc, scale):
    return (-0.5 * ((value - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI).sum(-1)


def standard_kl(loc, scale):
    return (0.5 * (loc**2 + scale**2) - torch.log(scale) - 0.5).sum(-1)


def cat(*tensors):
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], -1)


def hand_pieces(model, guide, x, particles, skip=True):
    """Everything the bound needs, with the noise drawn in the guide's order: z1 ``[P, B]``,
    then z2 for every cluster ``[K, P, B]``."""
    batch = x.shape[0]
    loc1, scale1 = guide.z1_encoder(x)
    z1 = loc1 + scale1 * torch.randn(particles, batch, Z1)
    log_q_z1 = normal_log_prob(z1, loc1, scale1)  # [P, B]
    log_q_y = guide.classifier_head(guide.classifier(cat(x, z1))).log_softmax(-1).permute(2, 0, 1)  # [K, P, B]
    eye = torch.eye(K).reshape(K, 1, 1, K)
    z2_in = (x, eye, z1) if skip else (eye, z1)
    loc2, scale2 = guide.z2_encoder(*z2_in)  # [K, P, B, Z2]
    z2 = loc2 + scale2 * torch.randn(K, particles, batch, Z2)
    log_p_y_all = model.cluster_prior(z2).log_softmax(-1)  # [K(y'), P, B, K(y)]
    return dict(z1=z1, log_q_z1=log_q_z1, log_q_y=log_q_y, eye=eye, z2=z2, loc2=loc2, scale2=scale2, log_p_y_all=log_p_y_all)


def hand_elbo(model, guide, x, particles, weight=1.0, skip=True):
    """Sec. 3.1: E_q(z1|x) sum_y q(y|z1,x) E_q(z2|x,y,z1)[log p(x,y,z1,z2) - log q(y,z1,z2|x)],
    the KL at z2 in closed form, the latents' terms weighted by ``weight``."""
    h = hand_pieces(model, guide, x, particles, skip)
    log_p_y = torch.diagonal(h["log_p_y_all"], dim1=0, dim2=-1).permute(2, 0, 1)  # [K, P, B]: log p(y=k | z2_k)
    loc_p, scale_p = model.z1_prior(h["eye"], h["z2"])
    log_p_z1 = normal_log_prob(h["z1"], loc_p, scale_p)  # [K, P, B]
    logits = model.likelihood(model.decoder(cat(h["z1"], h["eye"])))
    log_px = (x * logits - F.softplus(logits)).sum(-1)  # [K, P, B]
    kl_z2 = standard_kl(h["loc2"], h["scale2"])
    bound = log_px + weight * (log_p_z1 - h["log_q_z1"] + log_p_y - h["log_q_y"] - kl_z2)
    return (h["log_q_y"].exp() * bound).sum(0).mean(0).sum()


@pytest.mark.parametrize("particles", [1, 3])
@pytest.mark.parametrize("skip", [True, False])
def test_elbo_matches_hand_computation(particles, skip):
    model, guide = make_pair(skip=skip)
    x = binary_x(7)
    loss = SemiSupervisedELBO(num_particles=particles, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    ours = -loss.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(3)
    assert torch.allclose(ours, hand_elbo(model, guide, x, particles, skip=skip), rtol=0, atol=1e-10)
    pyro.set_rng_seed(4)  # other noise, other value
    assert not torch.allclose(ours, hand_elbo(model, guide, x, particles, skip=skip), rtol=0, atol=1e-6)


def test_warmup_weights_every_latent_term_and_objective_uses_unlabelled_rows_only():
    model, guide = make_pair()
    x = binary_x(6)
    labels = torch.tensor([0, -1, 2, -1, -1, 1])
    objective = cagem_objective(alpha=0.0, num_particles=2, latent_weights={"z1": 0.3, "y": 0.3, "z2": 0.3})
    pyro.set_rng_seed(5)
    ours = -objective.differentiable_loss(model, guide, x, y=labels)
    pyro.set_rng_seed(5)
    assert torch.allclose(ours, hand_elbo(model, guide, x[labels == -1], 2, weight=0.3), rtol=0, atol=1e-10)


def hand_model_classifier(model, guide, x, labels, particles):
    """-sum_l log mean_P sum_y' q(y'|z1,x) p(y_l | z2_y')."""
    h = hand_pieces(model, guide, x, particles)
    log_p = h["log_p_y_all"].gather(-1, labels.expand(K, particles, -1).unsqueeze(-1)).squeeze(-1)  # [K, P, B]
    mixture = (h["log_q_y"] + log_p).logsumexp(0)  # [P, B]
    return -(mixture.logsumexp(0) - math.log(particles)).sum()


@pytest.mark.parametrize("particles", [1, 4])
def test_model_classifier_cross_entropy_matches_hand_computation(particles):
    model, guide = make_pair()
    x = binary_x(6)
    labels = torch.tensor([0, -1, 2, 1, -1, 2])
    pyro.set_rng_seed(9)
    ours = ModelClassifierCrossEntropy(num_particles=particles, max_plate_nesting=1).differentiable_loss(model, guide, x, y=labels)
    pyro.set_rng_seed(9)
    keep = labels >= 0
    assert torch.allclose(ours, hand_model_classifier(model, guide, x[keep], labels[keep], particles), rtol=0, atol=1e-10)


def test_model_label_log_prob_is_a_distribution_over_clusters():
    model, guide = make_pair(batch_norm=True)
    log_p = model_label_log_prob(model, guide, (binary_x(5),), {}, num_particles=3)
    assert log_p.shape == (5, K)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(5))


def _is_label_param(name: str) -> bool:
    return name.startswith(("cagem$$$cluster_prior.", "cagem_guide$$$classifier.", "cagem_guide$$$classifier_head."))


@pytest.mark.parametrize("terms", [("q_classifier",), ("p_classifier",), ("q_classifier", "p_classifier")])
def test_cross_entropies_train_only_the_parameters_into_y(terms):
    model, guide = make_pair(batch_norm=True)
    objective = cagem_objective(alpha=2.5, num_particles=2)
    loss = WeightedSum(**{name: objective.terms[name] for name in terms})
    x, labels = binary_x(8), torch.tensor([0, 1, 2, 0, -1, -1, 1, -1])
    loss.loss_and_grads(model, guide, x, y=labels)
    store = pyro.get_param_store()
    reached = {"cagem$$$cluster_prior."} if "p_classifier" in terms else set()
    reached |= {"cagem_guide$$$classifier.", "cagem_guide$$$classifier_head."}
    for name in store.keys():
        grad = store.get_param(name).unconstrained().grad
        if name.startswith(tuple(reached)):
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or not grad.abs().sum(), name
    checked = [n for n in store.keys() if _is_label_param(n)]
    # phi_y: 6 tensors, theta_y: 6 (BN layers included); H_q alone runs the guide up to y
    # and never the model, so theta_y is not even registered
    assert len(checked) == (12 if "p_classifier" in terms else 6)


def test_full_objective_step_through_svi_updates_every_parameter():
    model, guide = make_pair(batch_norm=True)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), cagem_objective(alpha=2.0))
    x, labels = binary_x(8), torch.tensor([0, 1, 2, -1, -1, -1, -1, -1])
    svi.step(x, y=labels)
    before = {n: p.detach().clone() for n, p in pyro.get_param_store().items()}
    svi.step(x, y=labels)
    changed = [n for n, p in pyro.get_param_store().items() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before) and len(before) > 20


def _running_stats(*modules):
    return [t.clone() for m in modules for name, t in m.named_buffers() if "running" in name or "num_batches" in name]


def test_cross_entropy_passes_leave_batch_norm_statistics_alone():
    model, guide = make_pair(batch_norm=True)
    x, labels = binary_x(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = _running_stats(model, guide)
    objective = cagem_objective(alpha=1.0, num_particles=2)
    for name in ("q_classifier", "p_classifier"):
        objective.terms[name].loss.differentiable_loss(model, guide, x, y=labels)
    assert all(torch.equal(a, b) for a, b in zip(before, _running_stats(model, guide)))
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][0] == 0.1  # restored
    objective.terms["elbo"].loss.differentiable_loss(model, guide, x)  # unlabelled inference collects them
    assert not all(torch.equal(a, b) for a, b in zip(before, _running_stats(model, guide)))


def test_warmup_schedule_values_and_hook():
    assert [kl_warmup_weight(e, 100) for e in (0, 1, 50, 99, 100, 500)] == [0.0, 0.01, 0.5, 0.99, 1.0, 1.0]
    assert kl_warmup_weight(0, 0) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        kl_warmup_weight(3, -1)
    config = TrainConfig.for_model(model="cagem", kl_warmup_epochs=4, labels=100)
    for num_labels in (100, 0):
        loss = cagem_loss(config, num_data=1000, num_labels=num_labels)
        cagem_warmup(config, 2, None, None, loss)
        assert loss.terms["elbo"].loss.latent_weights == {"z1": 0.5, "y": 0.5, "z2": 0.5}
    assert loss.terms.keys() == {"elbo"}  # CaGeM-0: the ELBO alone
    labelled = cagem_loss(config, num_data=1000, num_labels=100)
    assert labelled.terms["q_classifier"].weight == labelled.terms["p_classifier"].weight == pytest.approx(0.1 * 1000 / 100)
    with pytest.raises(TypeError, match="cagem_loss"):
        cagem_warmup(config, 0, None, None, ModelClassifierCrossEntropy())


def test_cluster_error_maps_clusters_to_majority_classes():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cluster_error(torch.tensor([4, 4, 0, 0, 0, 0]), labels) == pytest.approx(2 / 6)
    assert cluster_error(torch.tensor([2, 2, 0, 0, 1, 1]), labels) == 0.0


def test_cagem_zero_trains_without_labels(tmp_path):
    torch.set_default_dtype(torch.float32)  # the data's dtype; the fixture restores the previous default
    config = TrainConfig.for_model(
        model="cagem", dataset="digits", labels=0, num_clusters=4, epochs=1, validation=300, batch_size=300,
        hidden=(16,), top_hidden=(8,), z_dim=4, top_z_dim=2, eval_particles=1, out=str(tmp_path), samples=False,
    )
    metrics = train(config, progress=False)
    assert metrics["epochs_completed"] == 1
    test = metrics["test"]
    assert "error" not in test and "p_error" not in test  # K = 4 is not the 10 classes
    assert 0 <= test["cluster_error"] <= 1 and math.isfinite(test["elbo"])
    assert recipe("cagem").classifier_site(config) is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        CaGeM(CaGeMSpec(X_DIM, 1))
    with pytest.raises(ValueError, match="z_dim"):
        CaGeM(CaGeMSpec(X_DIM, z_dim=0))
    with pytest.raises(ValueError, match="number of classes"):
        build_cagem(TrainConfig.for_model(model="cagem", labels=100, num_clusters=5), X_DIM, 10)
    model, guide = make_pair()
    x = binary_x(4)
    ce = ModelClassifierCrossEntropy(max_plate_nesting=1)
    with pytest.raises(ValueError, match="needs labels"):
        ce.differentiable_loss(model, guide, x)
    with pytest.raises(ValueError, match="empty labelled set"):
        ce.differentiable_loss(model, guide, x, y=torch.full((4,), -1))
    with pytest.raises(ValueError, match="out of range"):
        ce.differentiable_loss(model, guide, x, y=torch.tensor([0, 1, 3, -1]))
    with pytest.raises(ValueError, match="shape"):
        ce.differentiable_loss(model, guide, x, y=torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        ce.differentiable_loss(model, guide, x, y=torch.tensor([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(TypeError, match="wraps"):
        FrozenBatchNormStats(lambda: 0)
    with pytest.raises(ValueError, match="non-negative"):
        cagem_objective(alpha=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        module_params("cagem")
    with pytest.raises(ValueError, match="shape"):
        SemiSupervisedELBO(max_plate_nesting=1).differentiable_loss(model, guide, binary_x(3)[:, :2])
