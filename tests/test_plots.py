"""pyrodgm.plots: manifolds over the directions the posterior means vary along, grids drawn
at a readable size with their rows labelled, and the learning curve's panels."""

import pytest
import torch
from PIL import Image

from pyrodgm.guides import VAEGuide
from pyrodgm.models import VAE
from pyrodgm.nets import MLPSpec
from pyrodgm.plots import (
    MIN_IMAGE_PIXELS, LatentDirections, latent_directions, latent_grid, learning_curve_panels, plot_learning_curve,
    plot_test_curve, plot_test_curves, save_grid, save_manifold, save_samples,
)

pytestmark = pytest.mark.usefixtures("clean_param_store", "single_thread")

Z_DIM = 6


def png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.convert("L").copy()


def vae_with_two_dead_units():
    """A VAE whose first two latent units do nothing: the decoder ignores them and the
    encoder's posterior means of them are 0 for every image (inactive units, as most of
    a 50-unit latent are after training)."""
    torch.manual_seed(0)
    spec = MLPSpec(64, z_dim=Z_DIM, hidden=(16,))
    model, guide = VAE(spec), VAEGuide(spec)
    with torch.no_grad():
        model.decoder.hidden_layers[0][0].weight[:, :2] = 0.0
        guide.head.loc_layer.weight[:2] = 0.0
        guide.head.loc_layer.bias[:2] = 0.0
        guide.head.loc_layer.weight.mul_(10.0)  # posterior means that spread as a trained encoder's do
    x = torch.bernoulli(torch.full((200, 64), 0.3))
    return model, guide, x


def spread(images):
    """The mean absolute difference of the images from their average."""
    return (images - images.mean(0)).abs().mean().item()


def test_the_manifold_sweeps_the_directions_the_posterior_means_vary_along(tmp_path):
    model, guide, x = vae_with_two_dead_units()
    directions = latent_directions(guide, x, "z")
    assert directions.axes.shape == (2, Z_DIM) and directions.axes[:, :2].abs().max() < 1e-5  # not the dead units
    assert torch.allclose(directions.axes @ directions.axes.T, torch.eye(2), atol=1e-5)
    assert 0 < directions.explained[1] <= directions.explained[0] < 1 and (directions.scales > 0).all()
    images = save_manifold(model, tmp_path / "m.png", (1, 8, 8), Z_DIM, steps=5, directions=directions)
    assert images.shape == (25, 64) and spread(images) > 0.01
    # what the first two units give: one image repeated
    first_two = save_manifold(model, tmp_path / "old.png", (1, 8, 8), Z_DIM, steps=5, directions=LatentDirections.prior(Z_DIM))
    assert torch.allclose(first_two, first_two[:1].expand_as(first_two), atol=1e-6)


def test_the_grid_is_centred_on_the_posterior_means_and_spans_their_spread():
    _, guide, x = vae_with_two_dead_units()
    directions = latent_directions(guide, x, "z")
    z = latent_grid(3, Z_DIM, torch.device("cpu"), torch.float32, directions)
    assert torch.allclose(z[4], directions.center, atol=1e-6)  # the middle point of 3 x 3
    along = (z - directions.center) @ directions.axes.T / directions.scales  # in standard deviations
    q95 = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.95))
    assert torch.allclose(along[:, 0].reshape(3, 3)[:, 0], torch.stack([-q95, torch.tensor(0.0), q95]), atol=1e-5)


def test_a_2d_latent_is_swept_directly_over_its_prior():
    guide = VAEGuide(MLPSpec(64, z_dim=2, hidden=(16,)))
    directions = latent_directions(guide, torch.bernoulli(torch.full((20, 64), 0.5)), "z")
    assert directions.explained is None
    z = latent_grid(4, 2, torch.device("cpu"), torch.float32, directions)
    values = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 4, dtype=torch.float64)).float()
    assert torch.equal(z, torch.cartesian_prod(values, values))
    assert torch.equal(latent_grid(4, 2, torch.device("cpu"), torch.float32), z)


def test_a_larger_latent_without_directions_is_refused():
    with pytest.raises(ValueError, match=r"a 6-D latent needs the directions to sweep: pass directions=latent_directions"):
        latent_grid(5, 6, torch.device("cpu"), torch.float32)


def test_sample_grids_are_drawn_at_a_readable_size_with_a_label_per_class(tmp_path):
    from pyrodgm.models import M2

    model = M2(MLPSpec(64, 10, 4, (16,)))
    save_samples(model, tmp_path / "samples.png", (1, 8, 8), num_classes=10)
    image = png(tmp_path / "samples.png")
    # 10 x 10 digits of 8x8 pixels were a 91 x 91 PNG: each is now at least MIN_IMAGE_PIXELS high and wide
    assert image.width >= 10 * MIN_IMAGE_PIXELS and image.height >= 10 * MIN_IMAGE_PIXELS
    unlabelled = tmp_path / "plain.png"
    save_grid(torch.rand(100, 64), (1, 8, 8), unlabelled, nrow=10)
    plain = png(unlabelled)
    margin = image.width - plain.width  # the labels' column, left of the rows
    assert margin > 10 and plain.height == image.height
    labels = image.crop((0, 0, margin, image.height))
    assert labels.getextrema()[0] < 128  # dark text on the white margin


def test_rows_and_labels_must_agree(tmp_path):
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        save_grid(torch.rand(4, 64), (1, 8, 8), tmp_path / "g.png", nrow=2, row_labels=["a", "b", "c"])


def test_the_learning_curve_shows_the_loss_the_validation_error_and_a_tracked_test_error(tmp_path):
    history = [{"epoch": e, "train_loss_per_example": 50.0 / e, "valid_elbo": -40.0, "valid_error": 0.5 / e} for e in (1, 2, 3)]
    assert learning_curve_panels(history) == [("train_loss_per_example",), ("valid_error",)]
    tracked = [{**record, "test_error": record["valid_error"] + 0.01, "test_elbo": -41.0} for record in history]
    assert learning_curve_panels(tracked) == [("train_loss_per_example",), ("valid_error", "test_error")]
    unsupervised = [{"epoch": 1, "train_loss_per_example": 50.0, "valid_elbo": -40.0}]
    assert learning_curve_panels(unsupervised) == [("train_loss_per_example",), ("valid_elbo",)]
    plot_learning_curve(tracked, tmp_path / "curve.png")
    assert png(tmp_path / "curve.png").width > 500
    with pytest.raises(ValueError, match="the history is empty"):
        plot_learning_curve([], tmp_path / "empty.png")


@pytest.mark.parametrize("last_second, unit, scale", [(1800.0, "seconds", 1.0), (7200.0, "minutes", 60.0)])
def test_the_test_curve_reads_training_time_in_minutes_once_a_run_passes_an_hour(tmp_path, drawn_figures, last_second, unit, scale):
    history = [{"epoch": 1, "train_seconds": last_second / 2, "test_error": 0.2},
               {"epoch": 2, "train_seconds": last_second, "test_error": 0.1}]
    plot_test_curve(history, tmp_path / "curve.png")
    by_epoch, by_time = drawn_figures[0].axes
    assert by_time.get_xlabel() == f"training {unit}"
    assert list(by_time.lines[0].get_xdata()) == [last_second / 2 / scale, last_second / scale]
    assert list(by_time.lines[0].get_ydata()) == [20.0, 10.0]


def test_test_curves_draw_a_line_per_run_the_reference_and_the_baseline_on_both_axes(tmp_path, drawn_figures):
    runs = {"prior": [{"epoch": 1, "train_seconds": 60.0, "test_error": 0.3}, {"epoch": 2, "train_seconds": 120.0, "test_error": 0.2}],
            "no prior": [{"epoch": 1, "train_seconds": 50.0, "test_error": 0.25, "valid_error": 0.2},
                         {"epoch": 2, "train_seconds": 100.0, "test_error": None}, {"epoch": 3, "train_seconds": 150.0, "test_error": 0.15}]}
    reference = {"label": "authors", "points": [(1, 0.4), (3, 0.1)]}
    plot_test_curves(runs, tmp_path / "curves.png", reference=reference, baseline=("LabelSpreading", 0.0964))
    by_epoch, by_time = drawn_figures[0].axes
    lines = {line.get_label(): line for line in by_epoch.lines}
    assert list(lines) == ["prior", "no prior", "authors", "LabelSpreading 9.64%"]
    assert list(lines["no prior"].get_xdata()) == [1, 3]  # the epoch without a test error is left out
    assert list(lines["no prior"].get_ydata()) == [25.0, 15.0]
    assert list(lines["authors"].get_ydata()) == [40.0, 10.0]
    assert list(lines["LabelSpreading 9.64%"].get_ydata()) == [9.64, 9.64]
    assert [line.get_label() for line in by_time.lines] == ["prior", "no prior", "LabelSpreading 9.64%"]
    assert list(by_time.lines[1].get_xdata()) == [50.0, 150.0]
    assert [text.get_text() for text in by_epoch.get_legend().get_texts()] == list(lines)


def test_test_curves_refuse_a_run_without_a_tracked_test_error_naming_it(tmp_path):
    untracked = [{"epoch": 1, "train_seconds": 10.0, "valid_error": 0.2}]
    with pytest.raises(ValueError, match="'seed 1' has no 'test_error'.*--track-test"):
        plot_test_curves({"seed 0": [{"epoch": 1, "train_seconds": 10.0, "test_error": 0.2}], "seed 1": untracked}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="no runs"):
        plot_test_curves({}, tmp_path / "c.png")
