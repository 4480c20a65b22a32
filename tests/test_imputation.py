"""Tests of missing-data imputation (pyrodgm.imputation; Li et al., Sec. 4.2.3): the masks'
shapes and statistics, the iteration against a hand computation with a deterministic
guide, observed pixels left exactly untouched for every kind of model, the MSE over missing
pixels by hand, Fig. 5's strip, bad input, and the ``pyrodgm impute`` command."""

import contextlib
import io
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from PIL import Image

from pyrodgm.guides import M2Guide, VAEGuide
from pyrodgm.guides.mmcva import ConvMMCVAGuide
from pyrodgm.imputation import (
    evaluate_imputation,
    impute,
    make_mask,
    mask_name,
    missing_mse,
    rand_drop_mask,
    rect_mask,
    save_imputation_strip,
)
from pyrodgm.models import M2, VAE
from pyrodgm.models.mmcva import ConvMMCVA, ConvMMCVASpec
from pyrodgm.nets import MLPSpec
from pyrodgm.plots import MIN_IMAGE_PIXELS

pytestmark = pytest.mark.usefixtures("pyro_test_env")

D = 16
A = torch.linspace(-1.0, 1.0, 2 * D).reshape(2, D)  # guide: z = A x (a delta)
W = torch.linspace(-2.0, 1.5, 2 * D).reshape(D, 2)  # model: x ~ Bernoulli(sigmoid(W z))


def delta_model(x=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ W.to(z).T).to_event(1), obs=x)


def delta_guide(x=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Delta(x @ A.to(x).T, event_dim=1))


def binary(n, d=D):
    return torch.rand(n, d).bernoulli()


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.2, 0.6, 1.0])
def test_rand_drop_mask_statistics(p):
    mask = rand_drop_mask((200, 500), p, torch.Generator().manual_seed(1))
    assert mask.shape == (200, 500) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - p) < 0.01  # 100,000 Bernoulli(p): sd <= 0.0016
    again = rand_drop_mask((200, 500), p, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5"])
def test_rand_drop_mask_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rand_drop_mask((3, 4), p)


@pytest.mark.parametrize("shape,k", [((1, 28, 28), 12), ((1, 8, 8), 3), ((3, 5, 6), 2), ((1, 8, 8), 8)])
def test_rect_mask_at_the_centre(shape, k):
    c, h, w = shape
    mask = rect_mask(shape, k, num_images=2)
    expected = torch.zeros(shape, dtype=torch.bool)
    top, left = (h - k) // 2, (w - k) // 2
    expected[:, top : top + k, left : left + k] = True
    assert mask.shape == (2, c * h * w) and mask.dtype == torch.bool
    assert torch.equal(mask[0], expected.flatten()) and torch.equal(mask[1], expected.flatten())


def test_rect_mask_at_random_positions_is_a_square_inside_the_image():
    shape, k = (2, 9, 7), 4
    mask = rect_mask(shape, k, torch.Generator().manual_seed(0), num_images=300, position="random")
    images = mask.reshape(300, *shape)
    corners = set()
    for image in images:
        assert torch.equal(image[0], image[1])  # every channel
        rows, cols = image[0].any(1).nonzero().flatten(), image[0].any(0).nonzero().flatten()
        assert len(rows) == k and len(cols) == k and rows[-1] - rows[0] == k - 1 and cols[-1] - cols[0] == k - 1
        assert int(image[0].sum()) == k * k
        corners.add((int(rows[0]), int(cols[0])))
    assert corners == {(r, c) for r in range(9 - k + 1) for c in range(7 - k + 1)}  # uniform over all 24


@pytest.mark.parametrize("k", [0, 9, 2.5, True])
def test_rect_mask_rejects_bad_sizes(k):
    with pytest.raises(ValueError, match="k must be an integer"):
        rect_mask((1, 8, 8), k)


def test_make_mask_and_names():
    assert make_mask("rect", 3, (1, 8, 8), k=2).sum() == 3 * 4
    assert make_mask("rand-drop", 3, (1, 8, 8), p=1.0).all()
    assert mask_name("rand-drop", p=0.6) == "Rand-Drop (0.6)" and mask_name("rect", k=12) == "Rect (12 x 12)"
    with pytest.raises(ValueError, match="unknown mask"):
        make_mask("blob", 3, (1, 8, 8))
    with pytest.raises(ValueError, match="needs p"):
        make_mask("rand-drop", 3, (1, 8, 8))
    with pytest.raises(ValueError, match="position"):
        rect_mask((1, 8, 8), 2, position="corner")


# --------------------------------------------------------------------------------------
# the iteration
# --------------------------------------------------------------------------------------
def test_impute_follows_the_hand_computed_chain():
    x, mask = binary(5), rand_drop_mask((5, D), 0.5, torch.Generator().manual_seed(3))
    result = impute(delta_model, delta_guide, x, mask, iterations=4, generator=torch.Generator().manual_seed(7))
    noise = torch.rand(5, D, generator=torch.Generator().manual_seed(7))
    current = torch.where(mask, noise, x)
    assert torch.equal(result.images[0], current)
    for t in range(1, 5):
        current = torch.where(mask, torch.sigmoid((current @ A.double().T) @ W.double().T), x)  # guide, then model mean
        assert torch.allclose(result.images[t], current, rtol=1e-12, atol=0)
    assert result.images.shape == (5, 5, D) and torch.equal(result.final, result.images[-1])


def _pairs():
    vae, m2 = MLPSpec(D, z_dim=2, hidden=(8,)), MLPSpec(D, 3, 2, (8,))
    conv = ConvMMCVASpec((1, 4, 4), 3, 2, (4, 4), classifier_channels=(4, 4, 4), encoder_channels=(4, 4, 4))
    return {
        "vae": (VAE(vae), VAEGuide(vae)),
        "m2": (M2(m2), M2Guide(m2)),
        "conv-mmcva": (ConvMMCVA(conv), ConvMMCVAGuide(conv)),
    }


@pytest.mark.parametrize("name", ["vae", "m2", "conv-mmcva"])
def test_observed_pixels_stay_exactly_untouched(name):
    model, guide = _pairs()[name]
    model.train(), guide.train()
    x = binary(6)
    mask = rect_mask((1, 4, 4), 2, torch.Generator().manual_seed(0), num_images=6, position="random")
    result = impute(model, guide, x, mask, iterations=3)
    for images in result.images:
        assert torch.equal(images[~mask], x[~mask])
        assert ((images[mask] >= 0) & (images[mask] <= 1)).all()
    assert not torch.equal(result.images[1][mask], result.images[0][mask])  # missing pixels do change
    assert model.training and guide.training  # the modes are given back


def test_missing_mse_by_hand():
    x = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.5]])
    imputed = torch.tensor([[0.5, 1.0, 0.0], [0.75, 0.0, 0.5]])
    mask = torch.tensor([[True, False, True], [True, False, False]])
    assert missing_mse(imputed, x, mask) == pytest.approx((0.25 + 1.0 + 0.0625) / 3)
    per_step = missing_mse(torch.stack([x, imputed]), x, mask)
    assert torch.allclose(per_step, torch.tensor([0.0, (0.25 + 1.0 + 0.0625) / 3]))
    with pytest.raises(ValueError, match="no pixel"):
        missing_mse(imputed, x, torch.zeros_like(mask))


def test_evaluate_imputation_reports_tables_4_and_5():
    model, guide = _pairs()["m2"]
    x, y = binary(7), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    mask = rand_drop_mask((7, D), 0.4, torch.Generator().manual_seed(2))
    pyro.set_rng_seed(4)
    report = evaluate_imputation(model, guide, x, y, mask, iterations=3, batch_size=3, generator=torch.Generator().manual_seed(5), keep=2)
    pyro.set_rng_seed(4)
    generator = torch.Generator().manual_seed(5)
    chains = [impute(model, guide, x[i : i + 3], mask[i : i + 3], 3, generator).images for i in (0, 3, 6)]
    images = torch.cat(chains, dim=1)
    assert report["mse"] == pytest.approx(missing_mse(images[-1], x, mask), rel=1e-12)
    assert report["mse_per_iteration"] == pytest.approx(missing_mse(images, x, mask).tolist(), rel=1e-12)
    assert torch.equal(report["chains"], images[:, :2])
    assert report["missing_fraction"] == pytest.approx(mask.float().mean().item())
    for key in ("error", "error_perturbed", "error_clean"):
        assert report[key] in {i / 7 for i in range(8)}
    assert "error" not in evaluate_imputation(model, guide, x, None, mask, iterations=1)


def test_strip_has_one_row_per_example_and_a_column_per_step(tmp_path):
    x, mask = binary(3), rect_mask((1, 4, 4), 2, num_images=3)
    result = impute(delta_model, delta_guide, x, mask, iterations=5)
    path = save_imputation_strip(result.images, x, (1, 4, 4), tmp_path / "strip.png", columns=3)
    with Image.open(path) as image:
        width, height = image.size
    zoom = math.ceil(MIN_IMAGE_PIXELS / 4)  # 4x4 images magnified to a readable size
    # true, perturbed, 3 steps; padding 1; a 6-pixel margin each side, an x label below
    assert (width, height) == ((5 * 5 + 1) * zoom + 12, (3 * 5 + 1) * zoom + 12 + 16)


def test_impute_rejects_bad_input():
    x = binary(2)
    mask = torch.zeros(2, D, dtype=torch.bool)
    with pytest.raises(TypeError, match="boolean"):
        impute(delta_model, delta_guide, x, mask.float(), 1)
    with pytest.raises(ValueError, match="shape"):
        impute(delta_model, delta_guide, x, torch.zeros(3, D, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="iterations"):
        impute(delta_model, delta_guide, x, mask, 0)
    with pytest.raises(ValueError, match="NaN"):
        impute(delta_model, delta_guide, torch.full((2, D), float("nan")), mask, 1)
    with pytest.raises(ValueError, match="float tensor"):
        impute(delta_model, delta_guide, x[0], mask[0], 1)
    with pytest.raises(ValueError, match="no site 'image'"):
        impute(delta_model, delta_guide, x, mask, 1, site="image")


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------
def _main(argv):
    from pyrodgm.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny M2 trained for one epoch on digits."""
    out = tmp_path_factory.mktemp("impute") / "m2"
    torch.set_default_dtype(torch.float32)
    code, _, stderr = _main(
        ["train", "m2", "--dataset", "digits", "--labels", "100", "--validation", "300", "--epochs", "1", "--batch-size", "100",
         "--labelled-per-batch", "50", "--hidden", "16", "--z-dim", "4", "--eval-particles", "1", "--no-samples", "--quiet",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0, stderr
    return out / "best.pt"


@pytest.fixture
def float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def test_cli_impute_writes_json_and_strip(checkpoint, tmp_path, float32):
    output = tmp_path / "impute.json"
    argv = ["impute", str(checkpoint), "--mask", "rect", "--k", "4", "--iterations", "3", "--limit", "40",
            "--out", str(tmp_path), "--output", str(output)]  # fmt: skip
    code, stdout, stderr = _main(argv)
    assert code == 0, stderr
    report = json.loads(output.read_text())
    assert report == json.loads(stdout)
    assert report["mask"] == "Rect (4 x 4)" and report["num_examples"] == 40 and report["iterations"] == 3
    assert report["missing_fraction"] == 16 / 64 and len(report["mse_per_iteration"]) == 4
    assert 0 <= report["mse"] <= 1 and 0 <= report["error"] <= 1 and report["model"] == "m2"
    with Image.open(report["strip"]) as strip:
        zoom = math.ceil(MIN_IMAGE_PIXELS / 8)  # 10 rows of 8x8 digits; columns: true, perturbed, 3 steps
        assert strip.size == ((5 * 9 + 1) * zoom + 12, (10 * 9 + 1) * zoom + 12 + 16)
    code, stdout, _ = _main(argv[:-4] + ["--seed", "0"])
    assert code == 0 and json.loads(stdout)["mse"] == report["mse"]  # seeded: reproducible


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mask", "rand-drop", "--p", "1.5"], r"\[0, 1\]"),
        (["--mask", "rect", "--k", "9"], "k must be an integer in \\[1, 8\\]"),
        (["--mask", "rect"], "takes --k"),
        (["--mask", "rand-drop", "--p", "0.5", "--k", "3"], "takes --p"),
    ],
)
def test_cli_impute_rejects_bad_masks(checkpoint, flags, message, float32):
    code, _, stderr = _main(["impute", str(checkpoint), *flags, "--iterations", "1", "--limit", "5"])
    assert code == 2
    assert "pyrodgm impute: error:" in stderr
    import re

    assert re.search(message, stderr)


# --------------------------------------------------------------------------------------
# the experiment script (listed in test_experiments.NOT_TRAINING_SCRIPTS: its JSON holds
# MSEs per mask, not one test error)
# --------------------------------------------------------------------------------------
def _run_script(tmp_path, *flags):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "imputation_mnist.py"
    args = [sys.executable, str(script), "--dataset", "digits", "--validation", "300", "--device", "cpu", "--threads", "1",
            "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--quiet", "--iterations", "2",
            "--limit", "30", "--rand-drop", "0.5", "--rect", "3", *flags]  # fmt: skip
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600, capture_output=True)
    (result_file,) = (tmp_path / "results").glob("*.json")
    return json.loads(result_file.read_text())


@pytest.mark.slow
def test_imputation_script_trains_and_writes_tables_4_and_5(tmp_path):
    result = _run_script(tmp_path, "--epochs", "1", "--model", "conv-mmcva")
    assert result["experiment"] == "imputation_conv-mmcva" and result["epochs_completed"] == 1
    test = result["test"]
    assert set(test["mse"]) == {"Rand-Drop (0.5)", "Rect (3 x 3)"} and all(0 <= v <= 1 for v in test["mse"].values())
    assert all(0 <= v <= 1 for v in test["classification_error"].values()) and test["num_examples"] == 30
    assert all(len(curve) == 3 for curve in test["mse_per_iteration"].values())
    for strip in test["strips"].values():
        with Image.open(strip) as image:
            zoom = math.ceil(MIN_IMAGE_PIXELS / 8)
            assert image.size == ((4 * 9 + 1) * zoom + 12, (10 * 9 + 1) * zoom + 12 + 16)
    assert result["paper"]["table_4_mse"]["Conv-MMVA"]["Rect (12 x 12)"] == 0.1090
    assert "--model conv-mmcva" in result["command_fields"]["source"]


@pytest.mark.slow
def test_imputation_script_on_a_given_checkpoint(tmp_path, checkpoint):
    result = _run_script(tmp_path, "--checkpoint", str(checkpoint))
    assert result["model"] == "m2" and result["checkpoint"] == str(checkpoint)
    assert result["epochs_completed"] == 1 and set(result["test"]["mse"]) == {"Rand-Drop (0.5)", "Rect (3 x 3)"}


def test_imputation_errors_of_a_margin_classifier():
    """MMVA has no label site: the errors of imputed, perturbed and clean images come from
    the guide's margin classifier (the same numbers as margin_error), not left out."""
    from pyrodgm.guides import MMVAGuide
    from pyrodgm.losses.margin import margin_error
    from pyrodgm.imputation import classifier_error_fn
    from pyrodgm.models import MMVA

    torch.manual_seed(0)
    model, guide = MMVA(MLPSpec(6, z_dim=2, hidden=(5, 4))), MMVAGuide(MLPSpec(6, 3, 2, (5, 4)))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    y = torch.arange(8) % 3
    mask = torch.zeros(8, 6, dtype=torch.bool)
    mask[:, :2] = True
    assert classifier_error_fn(None, guide) is not None
    report = evaluate_imputation(model, guide, x, y, mask, iterations=2, label_site=None, error_fn=classifier_error_fn(None, guide))
    assert report["error_clean"] == margin_error(guide, x, y)
    assert {"error", "error_perturbed"} <= set(report)
