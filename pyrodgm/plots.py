"""Pictures of what a model has learnt: sample grids (class-conditional for models with a
label, one row per class, labelled), 2-D latent manifolds as in Kingma & Welling (2014,
Fig. 4) and Kingma et al. (2014, Fig. 1) over the two directions along which the
encoder's posterior means vary most, and training curves.  Images come from the mean of
the model's ``x`` site, read off a :func:`~pyro.poutine.trace` of the model with its
latents fixed by :func:`~pyro.poutine.condition`; grids are laid out by torchvision's
:func:`~torchvision.utils.make_grid` and drawn by matplotlib at a readable size (every
image at least :data:`MIN_IMAGE_PIXELS` pixels high, nearest-neighbour)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from pyro import poutine

__all__ = [
    "MIN_IMAGE_PIXELS",
    "LatentDirections",
    "mean_images",
    "save_grid",
    "save_samples",
    "latent_directions",
    "latent_grid",
    "save_manifold",
    "plot_history",
    "LOSS_KEY",
    "learning_curve_panels",
    "plot_learning_curve",
    "plot_test_curve",
    "plot_test_curves",
    "embed_2d",
    "save_embedding",
]

#: The least height (and width) in pixels of one image of a saved grid: 8x8 digits are
#: drawn 5 times larger, 28x28 MNIST digits twice.
MIN_IMAGE_PIXELS = 40
_DPI = 100


@torch.no_grad()
def mean_images(model: Callable, *, site: str = "x", condition: Optional[dict] = None, **kwargs) -> torch.Tensor:
    """The mean of the model's site ``site`` (pixel probabilities or intensities), with the
    sites in ``condition`` fixed, for a model called with ``kwargs``."""
    fn = poutine.condition(model, data=condition or {})
    trace = poutine.trace(poutine.block(fn, hide_types=["param"])).get_trace(**kwargs)
    if site not in trace.nodes:
        raise ValueError(f"the model has no site '{site}'")
    return trace.nodes[site]["fn"].mean


def save_grid(
    images: torch.Tensor,
    image_shape: Sequence[int],
    path: str | Path,
    nrow: int,
    *,
    row_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    xlabel: Optional[str] = None,
    ylabel: Optional[str] = None,
    min_pixels: int = MIN_IMAGE_PIXELS,
) -> tuple[int, int]:
    """A PNG of ``images`` (``[n, C*H*W]`` or ``[n, C, H, W]``, values in [0, 1]) laid out
    ``nrow`` to a row by :func:`torchvision.utils.make_grid` and drawn by matplotlib,
    each image magnified by a whole factor (nearest neighbour) to at least ``min_pixels``
    pixels; ``row_labels`` are written left of the rows.  Returns the PNG's (width, height)."""
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    image_shape = tuple(int(s) for s in image_shape)
    tiles = images.detach().reshape(-1, *image_shape).clamp(0, 1).float().cpu()
    grid = make_grid(tiles, nrow=nrow, padding=1, pad_value=1.0)  # [3, H, W]: one channel is repeated
    rows = math.ceil(tiles.shape[0] / nrow)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    zoom = max(1, math.ceil(min_pixels / min(image_shape[-2:])))
    height, width = grid.shape[1] * zoom, grid.shape[2] * zoom
    text = 16  # pixels of a line of 10-point text at 100 dpi, with some room
    left = 6 + (8 * max(map(len, row_labels)) + 8 if row_labels else 0) + (text + 4 if ylabel else 0)
    top, bottom, right = (text + 10 if title else 6), (text + 6 if xlabel else 6), 6
    size_px = (width + left + right, height + top + bottom)
    fig = Figure(figsize=(size_px[0] / _DPI, size_px[1] / _DPI), dpi=_DPI)
    axis = fig.add_axes((left / size_px[0], bottom / size_px[1], width / size_px[0], height / size_px[1]))
    axis.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="auto")
    axis.set_axis_off()
    for row, label in enumerate(row_labels or ()):  # the row's centre, in the grid's pixels
        axis.text(-1.5, row * (image_shape[-2] + 1) + image_shape[-2] / 2 + 0.5, label, ha="right", va="center", fontsize=10)
    if title:
        fig.text(0.5, 1 - 4 / size_px[1], title, ha="center", va="top", fontsize=10)
    if xlabel:
        fig.text((left + width / 2) / size_px[0], 3 / size_px[1], xlabel, ha="center", va="bottom", fontsize=9)
    if ylabel:
        fig.text(3 / size_px[0], (bottom + height / 2) / size_px[1], ylabel, ha="left", va="center", rotation=90, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return size_px


def save_samples(
    model: Callable, path: str | Path, image_shape: Sequence[int], num_classes: Optional[int] = None, per_row: int = 10
) -> torch.Tensor:
    """A grid of samples' means (:func:`save_grid`): one row per class for class-conditional
    models (the label observed, ``z`` from the prior; each row labelled ``y=k``), else
    ``per_row**2`` unconditional samples.  Returns the images."""
    model_was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if num_classes:
            device = next(model.buffers()).device
            labels = torch.arange(num_classes, device=device).repeat_interleave(per_row)
            images = mean_images(model, y=labels)
        else:
            images = mean_images(model, batch_size=per_row * per_row)
    finally:
        if model_was_training:
            model.train()
    row_labels = [f"y={k}" for k in range(num_classes)] if num_classes else None
    save_grid(images, image_shape, path, nrow=per_row, row_labels=row_labels)
    return images


@dataclass
class LatentDirections:
    """The plane a manifold sweeps: ``center + s * scales[0] * axes[0] + t * scales[1] *
    axes[1]`` for standard-normal quantiles ``s, t``.

    :ivar center: ``[d]``; :ivar axes: ``[2, d]``, orthonormal rows; :ivar scales: ``[2]``.
    :ivar explained: the share of the posterior means' variance along each axis (``None``
        for a 2-D latent, swept directly over its prior).
    """

    center: torch.Tensor
    axes: torch.Tensor
    scales: torch.Tensor
    explained: Optional[tuple[float, float]] = None

    @classmethod
    def prior(cls, dim: int = 2) -> "LatentDirections":
        """The first two coordinates of a standard-normal latent (exact for ``dim`` 2)."""
        return cls(torch.zeros(dim), torch.eye(2, dim), torch.ones(2))

    def axis_label(self, index: int) -> str:
        if self.explained is None:
            return f"z[{index}], 5% to 95% of the prior"
        return f"PC {index + 1} ({100 * self.explained[index]:.0f}% of the variance), 5% to 95%"


@torch.no_grad()
def latent_directions(
    guide: Callable, x: torch.Tensor, site: str = "z", batch_size: int = 1000, num_particles: int = 1, seed: int = 0
) -> LatentDirections:
    """The two directions along which the guide's posterior means of ``site`` vary most
    over the images ``x``: scikit-learn's PCA of ``E_q[site|x]``
    (:func:`~pyrodgm.evaluation.posterior_mean`), centred on their mean, each axis scaled by
    the standard deviation of the means along it.  A 2-D latent gives its own coordinates
    over the prior (:meth:`LatentDirections.prior`), exactly."""
    from sklearn.decomposition import PCA

    from .evaluation import posterior_mean

    if x.shape[0] < 3:
        raise ValueError(f"the principal directions need at least 3 images, got {x.shape[0]}")
    was_training = getattr(guide, "training", False)
    if hasattr(guide, "eval"):
        guide.eval()
    try:
        means = torch.cat(
            [posterior_mean(guide, x[i : i + batch_size], site, num_particles) for i in range(0, x.shape[0], batch_size)]
        )
    finally:
        if was_training:
            guide.train()
    if means.dim() != 2 or means.shape[1] < 2:
        raise ValueError(f"a 2-D manifold needs a latent of at least 2 units; '{site}' has shape {tuple(means.shape[1:])}")
    if means.shape[1] == 2:
        return LatentDirections.prior(2)
    pca = PCA(n_components=2, random_state=seed).fit(means.double().cpu().numpy())
    as_tensor = lambda array: torch.as_tensor(array, dtype=torch.float32)  # noqa: E731
    return LatentDirections(
        center=as_tensor(pca.mean_),
        axes=as_tensor(pca.components_),
        scales=as_tensor(pca.explained_variance_).sqrt(),
        explained=tuple(float(v) for v in pca.explained_variance_ratio_),
    )


def latent_grid(
    steps: int, dim: int, device: torch.device, dtype: torch.dtype, directions: Optional[LatentDirections] = None
) -> torch.Tensor:
    """``steps x steps`` latent points (row-major: the first direction down the rows, the
    second across), the standard-normal quantiles 0.05..0.95 along each of ``directions``
    (Kingma & Welling 2014); without ``directions`` a 2-D latent's own coordinates."""
    if directions is None:
        if dim != 2:
            raise ValueError(
                f"a {dim}-D latent needs the directions to sweep: pass directions=latent_directions(guide, x, site) "
                "(the first two units of a larger latent may not vary at all)"
            )
        directions = LatentDirections.prior(2)
    if directions.center.shape != (dim,):
        raise ValueError(f"the directions are {directions.center.shape[0]}-D, the latent {dim}-D")
    quantiles = torch.linspace(0.05, 0.95, steps, dtype=torch.float64)
    values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles).to(device, dtype)
    first, second = torch.meshgrid(values, values, indexing="ij")
    center, axes, scales = (t.to(device, dtype) for t in (directions.center, directions.axes, directions.scales))
    steps_along = torch.stack([first.flatten(), second.flatten()], dim=-1) * scales  # [steps^2, 2]
    return center + steps_along @ axes


def save_manifold(
    model: Callable,
    path: str | Path,
    image_shape: Sequence[int],
    latent_dim: int,
    site: str = "z",
    label: Optional[int] = None,
    steps: int = 20,
    directions: Optional[LatentDirections] = None,
) -> torch.Tensor:
    """The learnt manifold over the plane of ``directions`` (:func:`latent_directions`;
    a 2-D latent needs none and is swept over its prior), a ``steps x steps`` grid drawn by
    :func:`save_grid`; for class-conditional models the label is fixed to ``label`` (the
    title).  Returns the images, ``[steps * steps, ...]``."""
    buffer = next(model.buffers())
    z = latent_grid(steps, latent_dim, buffer.device, buffer.dtype, directions)
    kwargs = {"batch_size": z.shape[0]} if label is None else {"y": torch.full((z.shape[0],), label, device=z.device)}
    model.eval()
    images = mean_images(model, condition={site: z}, **kwargs)
    directions = directions or LatentDirections.prior(2)
    save_grid(
        images, image_shape, path, nrow=steps, title=None if label is None else f"y={label}",
        ylabel=directions.axis_label(0), xlabel=directions.axis_label(1),
    )
    return images


def plot_history(history: Sequence[dict], path: str | Path, keys: Sequence[str | Sequence[str]] = ("valid_error",)) -> None:
    """Curves of ``keys`` against the epoch, as a PNG (matplotlib, no display needed): a
    panel per entry of ``keys``; an entry that is a tuple of keys draws them together, with
    a legend (those no record holds are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for entry in keys:
        group = (entry,) if isinstance(entry, str) else tuple(entry)
        present = [k for k in group if any(record.get(k) is not None for record in history)]
        panels.append(present or group[:1])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    epochs = [record["epoch"] for record in history]
    for axis, group in zip(axes[0], panels):
        for key in group:
            values = [float("nan") if record.get(key) is None else record[key] for record in history]
            axis.plot(epochs, values, marker="." if len(epochs) < 50 else None, label=key)
        axis.set_xlabel("epoch")
        axis.set_ylabel(group[0] if len(group) == 1 else group[0].split("_", 1)[-1])
        if len(group) > 1:
            axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: The training loss a run records every epoch (:func:`pyrodgm.training.train`).
LOSS_KEY = "train_loss_per_example"


def learning_curve_panels(history: Sequence[dict]) -> list[tuple[str, ...]]:
    """What :func:`plot_learning_curve` draws: the training loss, then the validation error
    (the validation ELBO for a run without a classifier) with its test counterpart when the
    run tracked the test set (``--track-test``)."""
    recorded = {key for record in history for key, value in record.items() if value is not None}
    metric = "error" if recorded & {"valid_error", "test_error"} else "elbo"
    panels = [(LOSS_KEY,), tuple(k for k in (f"valid_{metric}", f"test_{metric}") if k in recorded)]
    return [panel for panel in panels if panel]


def plot_learning_curve(history: Sequence[dict], path: str | Path) -> None:
    """A run's learning curve (:func:`learning_curve_panels`, drawn by :func:`plot_history`)."""
    if not history:
        raise ValueError("the history is empty: no epoch has been trained")
    plot_history(history, path, keys=learning_curve_panels(history))


def plot_test_curve(
    history: Sequence[dict], path: str | Path, reference: Optional[dict] = None, key: str = "test_error",
    baseline: Optional[tuple[str, float]] = None,
) -> None:
    """The test error recorded after every epoch (``--track-test``) against the epoch and
    against the training seconds, as a PNG; ``reference`` (``{"label": ..., "points":
    [(epoch, error), ...]}``) is drawn on the epoch axis, e.g. a paper's published curve,
    and ``baseline`` (``(label, error)``, e.g. LabelSpreading's on the run's split) as a
    horizontal line on both axes."""
    plot_test_curves({"this run": history}, path, reference=reference, key=key, baseline=baseline)


def plot_test_curves(
    runs: Mapping[str, Sequence[dict]], path: str | Path, reference: Optional[dict] = None,
    key: str = "test_error", baseline: Optional[tuple[str, float]] = None,
) -> None:
    """Several runs' test curves on one figure (:func:`plot_test_curve`'s two panels, a
    line per run, labelled by its key in ``runs``), to compare options or seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no runs to plot")
    records = {label: _tracked_records(history, key, label) for label, history in runs.items()}
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(9, 3.4))
    last_second = max(r["train_seconds"] for rows in records.values() for r in rows)
    unit, per = ("minutes", 60.0) if last_second > 3600 else ("seconds", 1.0)  # long runs: readable ticks
    for label, rows in records.items():
        errors = [100 * r[key] for r in rows]
        by_epoch.plot([r["epoch"] for r in rows], errors, marker=".", label=label)
        by_time.plot([r["train_seconds"] / per for r in rows], errors, marker=".", label=label)
    if reference:
        epochs, values = zip(*reference["points"])
        by_epoch.plot(epochs, [100 * v for v in values], "o--", label=reference["label"])
    if baseline:
        for axis in (by_epoch, by_time):
            axis.axhline(100 * baseline[1], color="grey", linestyle=":", label=f"{baseline[0]} {100 * baseline[1]:.2f}%")
    for axis, label in ((by_epoch, "epoch"), (by_time, f"training {unit}")):
        axis.set_xlabel(label)
        axis.set_ylabel(f"{key.replace('_', ' ')} (%)")
        axis.grid(alpha=0.3)
    if len(by_epoch.lines) > 1:
        by_epoch.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tracked_records(history: Sequence[dict], key: str, label: str) -> list[dict]:
    """The epochs of ``history`` that recorded ``key``; an error naming the run if none did."""
    records = [r for r in history if r.get(key) is not None]
    if not records:
        raise ValueError(f"the history of {label!r} has no '{key}': train with track_test (--track-test) to record it")
    return records


def embed_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """``features`` (``[n, d]``) projected to 2-D by scikit-learn's PCA or t-SNE."""
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    if features.dim() != 2 or features.shape[0] < 3:
        raise ValueError(f"features must have shape [n >= 3, d], got {tuple(features.shape)}")
    values = features.detach().cpu().double().numpy()
    if method == "pca":
        from sklearn.decomposition import PCA

        points = PCA(n_components=2, random_state=seed).fit_transform(values)
    else:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (values.shape[0] - 1) / 3)
        points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(values)
    return torch.from_numpy(points)


def save_embedding(
    features: torch.Tensor, labels: torch.Tensor, path: str | Path, method: str = "pca", title: str = "", seed: int = 0
) -> torch.Tensor:
    """A scatter plot of ``features`` embedded in 2-D (:func:`embed_2d`), coloured by
    ``labels`` (CaGeM Fig. 3's z2 PCA, the GMVAE's t-SNE of features).  Returns the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = embed_2d(features, method, seed)
    fig, axis = plt.subplots(figsize=(5, 5))
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=4)
    axis.legend(*scatter.legend_elements(), loc="best", fontsize=7, markerscale=0.8)
    axis.set_title(title or method.upper())
    axis.set_xticks([]), axis.set_yticks([])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return points
