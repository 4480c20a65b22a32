"""Pictures of what a model has learnt: sample grids (class-conditional for models with a
label), 2-D latent manifolds as in Kingma & Welling (2014, Fig. 4) and Kingma et al. (2014,
Fig. 1), and training curves.  Images come from the mean of the model's ``x`` site, read
off a :func:`~pyro.poutine.trace` of the model with its latents fixed by
:func:`~pyro.poutine.condition`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from pyro import poutine

__all__ = ["mean_images", "save_samples", "save_manifold", "plot_history", "embed_2d", "save_embedding"]


@torch.no_grad()
def mean_images(model: Callable, *, site: str = "x", condition: Optional[dict] = None, **kwargs) -> torch.Tensor:
    """The mean of the model's site ``site`` (pixel probabilities or intensities), with the
    sites in ``condition`` fixed, for a model called with ``kwargs``."""
    fn = poutine.condition(model, data=condition or {})
    trace = poutine.trace(poutine.block(fn, hide_types=["param"])).get_trace(**kwargs)
    if site not in trace.nodes:
        raise ValueError(f"the model has no site '{site}'")
    return trace.nodes[site]["fn"].mean


def _save_grid(images: torch.Tensor, image_shape: Sequence[int], path: Path, nrow: int) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.reshape(-1, *image_shape).clamp(0, 1).cpu(), path, nrow=nrow, padding=1, pad_value=1.0)


def save_samples(model: Callable, path: str | Path, image_shape: Sequence[int], num_classes: Optional[int] = None, per_row: int = 10) -> None:
    """A grid of samples' means: one row per class for class-conditional models (the
    label observed, ``z`` from the prior), else ``per_row**2`` unconditional samples."""
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
    _save_grid(images, image_shape, Path(path), nrow=per_row)


def latent_grid(steps: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``steps x steps`` points of a 2-D latent spread by the inverse Gaussian CDF over
    (0.05, 0.95), the remaining ``dim - 2`` coordinates zero (Kingma & Welling 2014)."""
    quantiles = torch.linspace(0.05, 0.95, steps, device=device, dtype=dtype)
    values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
    first, second = torch.meshgrid(values, values, indexing="ij")
    z = torch.zeros(steps * steps, dim, device=device, dtype=dtype)
    z[:, 0], z[:, 1] = first.flatten(), second.flatten()
    return z


def save_manifold(
    model: Callable,
    path: str | Path,
    image_shape: Sequence[int],
    latent_dim: int,
    site: str = "z",
    label: Optional[int] = None,
    steps: int = 20,
) -> None:
    """The learnt manifold over the first two coordinates of latent ``site`` (exact for a
    2-D latent); for class-conditional models the label is fixed to ``label``."""
    buffer = next(model.buffers())
    z = latent_grid(steps, latent_dim, buffer.device, buffer.dtype)
    kwargs = {"batch_size": z.shape[0]} if label is None else {"y": torch.full((z.shape[0],), label, device=z.device)}
    model.eval()
    images = mean_images(model, condition={site: z}, **kwargs)
    _save_grid(images, image_shape, Path(path), nrow=steps)


def plot_history(history: Sequence[dict], path: str | Path, keys: Sequence[str] = ("valid_error",)) -> None:
    """Curves of ``keys`` against the epoch, as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    epochs = [record["epoch"] for record in history]
    for axis, key in zip(axes[0], keys):
        axis.plot(epochs, [record.get(key, float("nan")) for record in history])
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_test_curve(
    history: Sequence[dict], path: str | Path, reference: Optional[dict] = None, key: str = "test_error"
) -> None:
    """The test error recorded after every epoch (``--track-test``) against the epoch and
    against the training seconds, as a PNG; ``reference`` (``{"label": ..., "points":
    [(epoch, error), ...]}``) is drawn on the epoch axis, e.g. a paper's published curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in history if r.get(key) is not None]
    if not records:
        raise ValueError(f"the history has no '{key}': train with track_test (--track-test) to record it")
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(9, 3.4))
    errors = [100 * r[key] for r in records]
    by_epoch.plot([r["epoch"] for r in records], errors, marker=".", label="this run")
    if reference:
        epochs, values = zip(*reference["points"])
        by_epoch.plot(epochs, [100 * v for v in values], "o--", label=reference["label"])
        by_epoch.legend(fontsize=7)
    by_time.plot([r["train_seconds"] for r in records], errors, marker=".")
    for axis, label in ((by_epoch, "epoch"), (by_time, "training seconds")):
        axis.set_xlabel(label)
        axis.set_ylabel(f"{key.replace('_', ' ')} (%)")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
