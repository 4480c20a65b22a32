"""Tests of the models and guides (pyrodgm.models, pyrodgm.guides) and the pictures drawn
from them (pyrodgm.plots): trace structure, class-conditional generation, freezing M1
inside M1+M2, input errors and PNG sizes."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from PIL import Image
from pyro import poutine
from pyro.infer import SVI
from pyro.optim import Adam

from pyrodgm.guides import M1M2Guide, M2Guide, VAEGuide
from pyrodgm.losses import SemiSupervisedELBO
from pyrodgm.models import M1M2, M2, VAE
from pyrodgm.nets import MLPSpec
from pyrodgm.plots import MIN_IMAGE_PIXELS, mean_images, save_manifold, save_samples

pytestmark = pytest.mark.usefixtures("pyro_test_env")

X_DIM, K, Z_DIM, HIDDEN = 12, 3, 2, (8,)
Z1_DIM = 4

# Pyro warns (per frozen parameter, per step) when pyro.module() meets parameters with
# requires_grad=False in a module in training mode: see test_frozen_m1m2_svi_emits_no_warnings.


def binary_x(n, x_dim=X_DIM):
    return torch.rand(n, x_dim).bernoulli()


def partly_labelled(n, num_classes=K):
    """Labels with the first half observed and the rest -1 (unlabelled)."""
    y = torch.randint(num_classes, (n,))
    y[n // 2 :] = -1
    return y


def make_m2(x_dim=X_DIM, num_classes=K, likelihood="bernoulli"):
    return (
        M2(MLPSpec(x_dim, num_classes, Z_DIM, HIDDEN), likelihood=likelihood),
        M2Guide(MLPSpec(x_dim, num_classes, Z_DIM, HIDDEN)),
    )


def make_m1m2(freeze_m1, batch_norm=False):
    m1 = VAE(MLPSpec(X_DIM, z_dim=Z1_DIM, hidden=HIDDEN, batch_norm=batch_norm))
    m1_guide = VAEGuide(MLPSpec(X_DIM, z_dim=Z1_DIM, hidden=HIDDEN, batch_norm=batch_norm))
    m2 = M2(MLPSpec(Z1_DIM, K, Z_DIM, HIDDEN), likelihood="gaussian")
    m2_guide = M2Guide(MLPSpec(Z1_DIM, K, Z_DIM, HIDDEN))
    return M1M2(m1, m2, freeze_m1=freeze_m1), M1M2Guide(m1_guide, m2_guide, freeze_m1=freeze_m1)


def sample_sites(trace):
    """Names of the sample sites, plates excluded, in order."""
    return [name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_plate(site)]


def site_is_plate(site):
    return type(site["fn"]).__name__ == "_Subsample"


def in_data_plate(site, size):
    frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
    return len(frames) == 1 and frames[0].size == size


# --------------------------------------------------------------------------------------
# trace structure
# --------------------------------------------------------------------------------------
def test_m2_model_trace_labelled():
    model, _ = make_m2()
    x, y = binary_x(5), torch.tensor([0, 1, 2, 0, 1])
    trace = poutine.trace(model).get_trace(x, y=y)
    assert sample_sites(trace) == ["y", "z", "x"]
    for name in ("y", "z", "x"):
        assert in_data_plate(trace.nodes[name], 5), name
    assert isinstance(trace.nodes["y"]["fn"], dist.OneHotCategorical)
    assert trace.nodes["y"]["is_observed"]
    assert torch.equal(trace.nodes["y"]["value"], torch.nn.functional.one_hot(y, K).to(x.dtype))
    assert not trace.nodes["z"]["is_observed"]
    assert trace.nodes["z"]["value"].shape == (5, Z_DIM)
    assert trace.nodes["x"]["is_observed"]
    assert trace.nodes["x"]["value"] is x
    assert trace.nodes["x"]["fn"].event_shape == (X_DIM,)


def test_m2_model_trace_unlabelled_and_generative():
    model, _ = make_m2()
    trace = poutine.trace(model).get_trace(binary_x(4))
    assert sample_sites(trace) == ["y", "z", "x"]
    assert not trace.nodes["y"]["is_observed"]
    assert trace.nodes["y"]["value"].shape == (4, K)
    # with no data at all the model generates batch_size examples
    trace = poutine.trace(model).get_trace(batch_size=6)
    assert not trace.nodes["x"]["is_observed"]
    assert trace.nodes["x"]["value"].shape == (6, X_DIM)
    assert in_data_plate(trace.nodes["x"], 6)


def test_m2_guide_trace():
    _, guide = make_m2()
    x = binary_x(5)
    trace = poutine.trace(guide).get_trace(x)
    assert sample_sites(trace) == ["y", "z"]
    assert trace.nodes["y"]["infer"].get("enumerate") == "parallel"
    assert isinstance(trace.nodes["y"]["fn"], dist.OneHotCategorical)
    assert in_data_plate(trace.nodes["y"], 5) and in_data_plate(trace.nodes["z"], 5)
    assert trace.nodes["z"]["value"].shape == (5, Z_DIM)
    # labelled data: y is an input, not a site (Pyro's semi-supervised VAE idiom)
    trace = poutine.trace(guide).get_trace(x, y=torch.tensor([0, 1, 2, 0, 1]))
    assert sample_sites(trace) == ["z"]


def test_vae_model_and_guide_traces():
    spec = MLPSpec(X_DIM, z_dim=Z_DIM, hidden=HIDDEN)
    model, guide = VAE(spec), VAEGuide(spec)
    x = binary_x(3)
    model_trace = poutine.trace(model).get_trace(x)
    guide_trace = poutine.trace(guide).get_trace(x)
    assert sample_sites(model_trace) == ["z", "x"]
    assert sample_sites(guide_trace) == ["z"]
    assert model_trace.nodes["x"]["is_observed"] and not model_trace.nodes["z"]["is_observed"]
    for trace in (model_trace, guide_trace):
        assert in_data_plate(trace.nodes["z"], 3)
    assert guide_trace.nodes["z"]["value"].shape == (3, Z_DIM)


def test_m1m2_model_and_guide_traces():
    model, guide = make_m1m2(freeze_m1=False)
    x = binary_x(4)
    model_trace = poutine.trace(model).get_trace(x)
    assert sample_sites(model_trace) == ["y", "z2", "z1", "x"]
    assert not model_trace.nodes["z1"]["is_observed"]  # M2's "x" is a latent here
    assert model_trace.nodes["z1"]["value"].shape == (4, Z1_DIM)
    assert model_trace.nodes["z2"]["value"].shape == (4, Z_DIM)
    assert model_trace.nodes["x"]["is_observed"]
    for name in ("y", "z2", "z1", "x"):
        assert in_data_plate(model_trace.nodes[name], 4), name
    guide_trace = poutine.trace(guide).get_trace(x)
    assert sample_sites(guide_trace) == ["z1", "y", "z2"]
    assert guide_trace.nodes["y"]["infer"].get("enumerate") == "parallel"
    assert guide_trace.nodes["z1"]["value"].shape == (4, Z1_DIM)


def test_models_run_in_float32():
    model, guide = make_m2()
    model, guide = model.float(), guide.float()
    x = binary_x(3).float()
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    assert guide_trace.nodes["z"]["value"].dtype == torch.float32
    model_trace.compute_log_prob()
    assert {model_trace.nodes[name]["log_prob"].dtype for name in ("y", "z", "x")} == {torch.float32}


# --------------------------------------------------------------------------------------
# class-conditional generation
# --------------------------------------------------------------------------------------
def test_m2_class_conditional_generation():
    model, _ = make_m2()
    labels = torch.arange(K).repeat_interleave(4)
    x = model(y=labels)
    assert x.shape == (len(labels), X_DIM)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    images = mean_images(model, y=labels)
    assert images.shape == (len(labels), X_DIM)
    assert images.min() >= 0 and images.max() <= 1


def test_m2_mean_images_conditioned_on_z():
    model, _ = make_m2()
    labels = torch.arange(K).repeat_interleave(2)
    z = torch.randn(len(labels), Z_DIM)
    first = mean_images(model, condition={"z": z}, y=labels)
    second = mean_images(model, condition={"z": z}, y=labels)
    assert torch.equal(first, second)
    other_labels = mean_images(model, condition={"z": z}, y=(labels + 1) % K)
    assert not torch.allclose(first, other_labels)
    other_z = mean_images(model, condition={"z": z + 1.0}, y=labels)
    assert not torch.allclose(first, other_z)
    # unconditioned z is drawn from the prior: two calls differ
    assert not torch.equal(mean_images(model, y=labels), mean_images(model, y=labels))


def test_mean_images_unknown_site():
    model, _ = make_m2()
    with pytest.raises(ValueError, match="no site 'pixels'"):
        mean_images(model, site="pixels", y=torch.tensor([0]))


# --------------------------------------------------------------------------------------
# M1+M2: freezing M1
# --------------------------------------------------------------------------------------
def m1_state(model, guide):
    return {
        **{"model." + k: v.clone() for k, v in model.m1.state_dict().items()},
        **{"guide." + k: v.clone() for k, v in guide.m1_guide.state_dict().items()},
    }


def m2_parameters(model, guide):
    return {
        **{"model." + k: v.detach().clone() for k, v in model.m2.named_parameters()},
        **{"guide." + k: v.detach().clone() for k, v in guide.m2_guide.named_parameters()},
    }


def svi_steps(model, guide, steps=3):
    x = binary_x(16)
    y = partly_labelled(16)
    svi = SVI(model, guide, Adam({"lr": 0.01}), SemiSupervisedELBO(alpha=1.0))
    model.train(), guide.train()
    losses = [svi.step(x, y=y) for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_m1m2_frozen_m1_is_not_trained():
    model, guide = make_m1m2(freeze_m1=True, batch_norm=True)
    m1_before, m2_before = m1_state(model, guide), m2_parameters(model, guide)
    assert any("running_mean" in k for k in m1_before)  # batch-norm statistics are checked too
    svi_steps(model, guide)
    m1_after, m2_after = m1_state(model, guide), m2_parameters(model, guide)
    for name, value in m1_before.items():
        assert torch.equal(value, m1_after[name]), name
    for name, value in m2_before.items():
        assert not torch.equal(value, m2_after[name]), name
    # nothing of M1 reached the optimiser through the param store
    names = list(pyro.get_param_store())
    assert any(name.startswith("m1m2.m2$$$") for name in names)
    assert any(name.startswith("m1m2_guide.m2_guide$$$") for name in names)
    assert not any(name.startswith(("m1m2.m1$$$", "m1m2_guide.m1_guide$$$")) for name in names)


def test_m1m2_end_to_end_trains_m1():
    model, guide = make_m1m2(freeze_m1=False, batch_norm=True)
    m1_before, m2_before = m1_state(model, guide), m2_parameters(model, guide)
    svi_steps(model, guide)
    m1_after, m2_after = m1_state(model, guide), m2_parameters(model, guide)
    for name, value in m1_before.items():
        if name.endswith("num_batches_tracked"):
            assert m1_after[name] > value, name
        elif name.endswith(("z_loc", "z_scale")):  # the prior's constant buffers
            assert torch.equal(value, m1_after[name]), name
        else:  # weights and batch-norm statistics
            assert not torch.equal(value, m1_after[name]), name
    for name, value in m2_before.items():
        assert not torch.equal(value, m2_after[name]), name


def test_frozen_m1m2_svi_emits_no_warnings():
    model, guide = make_m1m2(freeze_m1=True)
    svi_steps(model, guide, steps=1)


def test_m1m2_frozen_m1_stays_in_eval_mode():
    model, guide = make_m1m2(freeze_m1=True, batch_norm=True)
    model.train(), guide.train()
    assert model.training and model.m2.training and guide.m2_guide.training
    assert not any(m.training for m in model.m1.modules())
    assert not any(m.training for m in guide.m1_guide.modules())
    assert not any(p.requires_grad for p in model.m1.parameters())
    assert not any(p.requires_grad for p in guide.m1_guide.parameters())
    # end to end: M1 follows .train()/.eval()
    model, guide = make_m1m2(freeze_m1=False, batch_norm=True)
    model.eval(), guide.eval()
    model.train(), guide.train()
    assert all(m.training for m in model.m1.modules())
    assert all(m.training for m in guide.m1_guide.modules())


def test_m1m2_rejects_mismatched_stack():
    spec = MLPSpec(X_DIM, z_dim=Z1_DIM, hidden=HIDDEN)
    m1, m1_guide = VAE(spec), VAEGuide(spec)
    with pytest.raises(ValueError, match="latent has 4"):
        M1M2(m1, M2(MLPSpec(Z1_DIM + 1, K, Z_DIM, HIDDEN), likelihood="gaussian"))
    with pytest.raises(ValueError, match="gaussian"):
        M1M2(m1, M2(MLPSpec(Z1_DIM, K, Z_DIM, HIDDEN), likelihood="bernoulli"))
    with pytest.raises(ValueError, match="latent has 4"):
        M1M2Guide(m1_guide, M2Guide(MLPSpec(Z1_DIM + 1, K, Z_DIM, HIDDEN)))


# --------------------------------------------------------------------------------------
# input errors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["m2", "m2_guide", "vae", "vae_guide", "m1m2", "m1m2_guide"])
def test_wrong_number_of_features(which):
    m2, m2_guide = make_m2()
    m1m2, m1m2_guide = make_m1m2(freeze_m1=False)
    spec = MLPSpec(X_DIM, z_dim=Z_DIM, hidden=HIDDEN)
    fn = {
        "m2": m2,
        "m2_guide": m2_guide,
        "vae": VAE(spec),
        "vae_guide": VAEGuide(spec),
        "m1m2": m1m2,
        "m1m2_guide": m1m2_guide,
    }[which]
    with pytest.raises(ValueError, match=rf"rows of shape \({X_DIM},\).*\[N, {X_DIM}\].*got rows of shape \({X_DIM - 1},\)"):
        fn(binary_x(5, X_DIM - 1))
    with pytest.raises(ValueError, match=rf"\[N, {X_DIM}\]"):
        fn(binary_x(5)[:, :, None])  # 3-d input


@pytest.mark.parametrize("which", ["m2", "m2_guide", "vae", "vae_guide"])
def test_integer_features(which):
    m2, m2_guide = make_m2()
    fn = {"m2": m2, "m2_guide": m2_guide, "vae": VAE(MLPSpec(X_DIM, z_dim=Z_DIM, hidden=HIDDEN)), "vae_guide": VAEGuide(MLPSpec(X_DIM, z_dim=Z_DIM, hidden=HIDDEN))}[which]
    with pytest.raises(TypeError, match="floating-point"):
        fn(binary_x(5).long())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["m2", "m2_guide", "m1m2_guide"])
def test_non_finite_features(which, bad):
    from pyro.infer.util import is_validation_enabled

    assert is_validation_enabled()
    m2, m2_guide = make_m2()
    _, m1m2_guide = make_m1m2(freeze_m1=False)
    fn = {"m2": m2, "m2_guide": m2_guide, "m1m2_guide": m1m2_guide}[which]
    x = binary_x(5)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="1 NaN" if bad != bad else "1 inf"):
        fn(x)


def test_pyro_validation_is_on_by_default():
    import subprocess
    import sys

    code = "from pyro.infer.util import is_validation_enabled; import pyrodgm.models; print(is_validation_enabled())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_bernoulli_model_rejects_values_outside_unit_interval():
    model, _ = make_m2()
    x = binary_x(4)
    x[0, 0] = 2.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(x)
    gaussian, _ = make_m2(likelihood="gaussian")
    gaussian(x)  # a Gaussian likelihood models any real value


@pytest.mark.parametrize("labels", [[0, 1, 3, 0], [0, -1, 1, 2]])
def test_labels_out_of_range(labels):
    model, guide = make_m2()
    x, y = binary_x(4), torch.tensor(labels)
    with pytest.raises(ValueError, match="out of range"):
        model(x, y=y)
    with pytest.raises(ValueError, match="out of range"):
        guide(x, y=y)


def test_no_data_and_no_batch_size():
    model, _ = make_m2()
    with pytest.raises(ValueError, match="batch_size"):
        model()


# --------------------------------------------------------------------------------------
# PNG grids
# --------------------------------------------------------------------------------------
def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_save_samples_class_conditional(tmp_path):
    model, _ = make_m2(x_dim=64, num_classes=10)
    model.train()
    path = tmp_path / "sub" / "samples.png"
    save_samples(model, path, (1, 8, 8), num_classes=10)
    # 10 rows (one per class) of 10 8x8 digits, each drawn at least MIN_IMAGE_PIXELS large
    width, height = png_size(path)
    assert width >= 10 * MIN_IMAGE_PIXELS and height >= 10 * MIN_IMAGE_PIXELS
    assert model.training  # restored after drawing in eval mode


def test_save_samples_unconditional(tmp_path):
    model = VAE(MLPSpec(64, z_dim=Z_DIM, hidden=HIDDEN))
    save_samples(model, tmp_path / "vae.png", (1, 8, 8), per_row=6)
    assert min(png_size(tmp_path / "vae.png")) >= 6 * MIN_IMAGE_PIXELS


def test_save_manifold(tmp_path):
    model, _ = make_m2(x_dim=64, num_classes=10)
    images = save_manifold(model, tmp_path / "manifold.png", (1, 8, 8), Z_DIM, label=3, steps=5)
    assert images.shape == (25, 64) and min(png_size(tmp_path / "manifold.png")) >= 5 * MIN_IMAGE_PIXELS
    vae = VAE(MLPSpec(64, z_dim=Z_DIM, hidden=HIDDEN))
    save_manifold(vae, tmp_path / "vae_manifold.png", (1, 8, 8), Z_DIM, steps=7)
    assert min(png_size(tmp_path / "vae_manifold.png")) >= 7 * MIN_IMAGE_PIXELS


def test_data_of_another_dtype_than_the_model_is_named():
    """float64 data into a float32 model used to fail deep in torch ("mat1 and mat2 must have
    the same dtype")."""
    model, guide = make_m2()
    model.float(), guide.float()
    x = torch.bernoulli(torch.full((5, X_DIM), 0.5, dtype=torch.float64))
    for program in (model, guide):
        with pytest.raises(TypeError, match=r"x is torch.float64 but the model's parameters are torch.float32: convert"):
            program(x)


def test_a_bernoulli_model_names_pixels_that_are_not_binary():
    """Grey pixels into a Bernoulli likelihood used to give Pyro's support error with a dump
    of the tensor."""
    model, guide = make_m2()
    x = torch.bernoulli(torch.full((5, X_DIM), 0.5))
    x[2, 3] = 0.25
    with pytest.raises(ValueError, match=r"x must be binary \(0 or 1\) for a Bernoulli likelihood, but 1 values are not \(e\.g\. 0\.25\): binarise"):
        model(x)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"must contain only finite values, found 1 NaN"):
        model(x)
    x[2, 3] = 0.25
    gaussian, _ = make_m2(likelihood="gaussian")
    gaussian(x)  # grey values are a Gaussian likelihood's data
    guide(x)  # and a guide's
    with pyro.validation_enabled(False):  # the user's choice: no checks at all
        model(x)
