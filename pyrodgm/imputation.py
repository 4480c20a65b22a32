r"""Missing-data imputation through a model's recognition and generative networks, for any
(model, guide) pair whose model has an ``x`` site (Li, Zhu, Zhang, Sec. 4.2.3; the
procedure of Rezende et al. 2014, Sec. 5.2).

Given images with some pixels missing, the missing values are initialised uniformly in
[0, 1] and then, for ``T`` iterations:

1. the guide samples every latent variable from the current image (``q(z|x)``; for M2
   the label too);
2. the model, its latents fixed to those samples (:func:`pyro.poutine.replay`), gives the
   mean of ``p(x|z, ...)``: the reconstruction;
3. the missing pixels are replaced by the reconstruction's, the observed ones kept
   exactly, and the result is the next round's input.

Masks are boolean with ``True`` marking a *missing* pixel: :func:`rand_drop_mask`
(Rand-Drop(p): each pixel missing independently with probability ``p``) and
:func:`rect_mask` (Rect(k x k): a ``k x k`` square missing, at the centre of the image as
in the paper, or at a random position).  :func:`missing_mse` is Table 4's error (mean
squared error over the missing pixels), :func:`evaluate_imputation` adds Table 5's
classification error of the imputed images, and :func:`save_imputation_strip` draws
Fig. 5 (true image, perturbed image, then the iterations).

References

[1] `Max-Margin Deep Generative Models for (Semi-)Supervised Learning`, Chongxuan Li,
    Jun Zhu, Bo Zhang (2018), Sec. 4.2.3, Tables 4-5, Fig. 5
[2] `Stochastic Backpropagation and Approximate Inference in Deep Generative Models`,
    Danilo J. Rezende, Shakir Mohamed, Daan Wierstra (2014), Sec. 5.2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pyro
import torch
from pyro import poutine

__all__ = [
    "MASKS",
    "Imputation",
    "evaluate_imputation",
    "impute",
    "impute_checkpoint",
    "make_mask",
    "mask_name",
    "missing_mse",
    "rand_drop_mask",
    "reconstruct",
    "rect_mask",
    "save_imputation_strip",
]

#: The mask kinds of the paper (Sec. 4.2.3), by their CLI names.
MASKS = ("rand-drop", "rect")


def rand_drop_mask(shape: Sequence[int], p: float, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Rand-Drop(p): a boolean mask of ``shape`` whose entries are ``True`` (missing)
    independently with probability ``p``.

    :raises ValueError: if ``p`` is not in [0, 1].
    """
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"the drop probability p must lie in [0, 1], got {p!r}")
    mask = torch.rand(tuple(shape), generator=generator) < p
    return mask if device is None else mask.to(device)


def rect_mask(
    image_shape: Sequence[int],
    k: int,
    generator: Optional[torch.Generator] = None,
    num_images: int = 1,
    position: str = "center",
    device=None,
) -> torch.Tensor:
    """Rect(k x k): flat masks ``[num_images, C*H*W]`` with a ``k x k`` square missing in
    every channel.  ``position="center"`` puts it at the centre of the image (the paper's
    setting, Sec. 4.2.3; the top-left corner is ``((H - k) // 2, (W - k) // 2)``);
    ``"random"`` draws its top-left corner uniformly per image with ``generator``.

    :raises ValueError: if ``k`` is not a positive integer at most ``min(H, W)``, or on an
        unknown ``position``.
    """
    c, h, w = _image_shape(image_shape)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > min(h, w):
        raise ValueError(f"the square side k must be an integer in [1, {min(h, w)}] for images {h}x{w}, got {k!r}")
    if position not in ("center", "random"):
        raise ValueError(f"position must be 'center' or 'random', got {position!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if position == "center":
        top = torch.full((num_images,), (h - k) // 2)
        left = torch.full((num_images,), (w - k) // 2)
    else:
        top = torch.randint(0, h - k + 1, (num_images,), generator=generator)
        left = torch.randint(0, w - k + 1, (num_images,), generator=generator)
    rows, cols = torch.arange(h), torch.arange(w)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + k)  # [n, h]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + k)  # [n, w]
    square = in_rows[:, :, None] & in_cols[:, None, :]
    return square[:, None].expand(num_images, c, h, w).reshape(num_images, c * h * w).to(device)


def make_mask(
    kind: str,
    num_images: int,
    image_shape: Sequence[int],
    p: Optional[float] = None,
    k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    position: str = "center",
) -> torch.Tensor:
    """``[num_images, C*H*W]`` masks of ``kind`` (``"rand-drop"`` with ``p`` or ``"rect"``
    with ``k``)."""
    if kind == "rand-drop":
        if p is None:
            raise ValueError("the rand-drop mask needs p, the probability that a pixel is missing")
        return rand_drop_mask((num_images, math.prod(_image_shape(image_shape))), p, generator)
    if kind == "rect":
        if k is None:
            raise ValueError("the rect mask needs k, the side of the missing square")
        return rect_mask(image_shape, k, generator, num_images=num_images, position=position)
    raise ValueError(f"unknown mask {kind!r}; choose one of {', '.join(MASKS)}")


def mask_name(kind: str, p: Optional[float] = None, k: Optional[int] = None) -> str:
    """The paper's name of a mask: ``Rand-Drop (0.6)``, ``Rect (12 x 12)``."""
    return f"Rand-Drop ({p:g})" if kind == "rand-drop" else f"Rect ({k} x {k})"


@dataclass
class Imputation:
    """The images of every iteration: ``images[0]`` is the perturbed input (missing pixels
    uniform noise), ``images[t]`` the result of iteration ``t``; ``[T + 1, N, D]``."""

    images: torch.Tensor
    mask: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        """The imputed images after the last iteration, ``[N, D]``."""
        return self.images[-1]


def _check_inputs(x: torch.Tensor, mask: torch.Tensor, iterations: int) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"x must be a float tensor [batch, features], got {getattr(x, 'shape', type(x))}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or infinite values")
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise TypeError(f"the mask must be a boolean tensor (True = missing), got {getattr(mask, 'dtype', type(mask))}")
    try:
        mask = mask.to(x.device).expand_as(x)
    except RuntimeError:
        raise ValueError(f"the mask's shape {tuple(mask.shape)} does not match x's {tuple(x.shape)}") from None
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    return mask


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: torch.Tensor, site: str = "x") -> torch.Tensor:
    """One step of the chain: the guide's latents sampled from ``x``, then the mean of the
    model's ``site`` with those latents (the model replays the guide's trace)."""
    guide_trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x)
    # x is fed to the model only for models whose priors read it (the ADGM's p(a|x,y,z)); a
    # grey-level imputed image is no Bernoulli sample, so validation is off here.
    with pyro.validation_enabled(False):
        model_trace = poutine.trace(poutine.replay(poutine.block(model, hide_types=["param"]), trace=guide_trace)).get_trace(x)
    if site not in model_trace.nodes:
        raise ValueError(f"the model has no site '{site}' to reconstruct the image from")
    return model_trace.nodes[site]["fn"].mean.reshape(x.shape)


@torch.no_grad()
def impute(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    mask: torch.Tensor,
    iterations: int = 100,
    generator: Optional[torch.Generator] = None,
    site: str = "x",
) -> Imputation:
    """Iterative imputation (module docstring): ``iterations`` rounds of
    guide -> model -> replace the missing pixels.  Observed pixels (``mask`` False) are
    copied from ``x`` unchanged in every iteration; missing ones start uniform in [0, 1]
    (drawn with ``generator``).  The model and guide run in eval mode (batch-norm
    statistics, no dropout) and get their previous mode back afterwards; the latents are
    sampled with Pyro's global random state.

    :param x: ``[N, D]`` images (the values at missing pixels are ignored).
    :param mask: boolean, ``True`` = missing; shape ``[N, D]`` or broadcastable to it.
    :returns: :class:`Imputation` with all ``iterations + 1`` images.
    """
    mask = _check_inputs(x, mask, iterations)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    current = torch.where(mask, noise, x)
    images = [current]
    modes = [(net, net.training) for net in (model, guide) if hasattr(net, "training")]
    for net, _ in modes:
        net.eval()
    try:
        for _ in range(iterations):
            current = torch.where(mask, reconstruct(model, guide, current, site).to(x.dtype), x)
            images.append(current)
    finally:
        for net, mode in modes:
            net.train(mode)
    return Imputation(torch.stack(images), mask)


def missing_mse(imputed: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean squared error over the missing pixels (Table 4): ``sum(mask * (imputed - x)^2)
    / sum(mask)``.  ``imputed`` may have leading dims (e.g. iterations); then one value per
    leading index is returned as a tensor."""
    mask = mask.expand_as(x)
    if not bool(mask.any()):
        raise ValueError("the mask marks no pixel as missing: the MSE over missing pixels is undefined")
    squared = (imputed - x).pow(2) * mask
    value = squared.sum(dim=(-2, -1)) / mask.sum()
    return float(value) if value.dim() == 0 else value


def evaluate_imputation(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    mask: torch.Tensor,
    iterations: int = 100,
    label_site: Optional[str] = "y",
    batch_size: int = 1000,
    generator: Optional[torch.Generator] = None,
    keep: int = 0,
    error_fn: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
) -> dict:
    """Impute ``x`` batch by batch and measure Tables 4-5: the MSE over missing pixels after
    the last iteration (and after every iteration, ``mse_per_iteration``), and, when the
    model classifies and ``y`` is given, the classification error of the imputed images, of
    the perturbed input (the first image, missing pixels noise; the paper's "CNN" column
    classifies incomplete data) and of the clean images.

    :param label_site: the guide's classifier site (its error by
        :func:`~pyrodgm.evaluation.classification_error`), unless ``error_fn`` is given.
    :param error_fn: ``(images, labels) -> error`` for models that classify otherwise
        (MMVA's margin classifier: :func:`classifier_error_fn`).
    :param keep: also return the first ``keep`` images' full chains under ``"chains"``
        (``[T + 1, keep, D]``), for :func:`save_imputation_strip`.
    """
    if error_fn is None and label_site:
        error_fn = classifier_error_fn(label_site, guide)

    mask = _check_inputs(x, mask, iterations)
    finals, starts, squared = [], [], torch.zeros(iterations + 1, dtype=torch.float64)
    chains = None
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        result = impute(model, guide, x[rows], mask[rows], iterations, generator)
        squared += ((result.images - x[rows]).pow(2) * mask[rows]).sum(dim=(-2, -1)).double().cpu()
        finals.append(result.final)
        starts.append(result.images[0])
        if chains is None and keep:
            chains = result.images[:, :keep]
    missing = int(mask.sum())
    if missing == 0:
        raise ValueError("the mask marks no pixel as missing: the MSE over missing pixels is undefined")
    per_iteration = (squared / missing).tolist()
    report = {
        "num_examples": int(x.shape[0]),
        "iterations": iterations,
        "missing_fraction": missing / mask.numel(),
        "mse": per_iteration[-1],
        "mse_per_iteration": per_iteration,
    }
    if error_fn is not None and y is not None:
        imputed, perturbed = torch.cat(finals), torch.cat(starts)
        for key, images in (("error", imputed), ("error_perturbed", perturbed), ("error_clean", x)):
            report[key] = error_fn(images, y)
    if keep:
        report["chains"] = chains
    return report


def classifier_error_fn(label_site: Optional[str], guide: Callable) -> Optional[Callable[[torch.Tensor, torch.Tensor], float]]:
    """How a trained pair classifies images, as ``(images, labels) -> error``: the guide's
    label site, else a margin classifier the guide records scores with (MMVA), else
    ``None``."""
    from .evaluation import classification_error
    from .losses.margin import find_margin_classifier, margin_error

    if label_site:
        return lambda images, labels: classification_error(guide, images, labels, label_site=label_site)
    if find_margin_classifier(guide) is not None:
        return lambda images, labels: margin_error(guide, images, labels)
    return None


def save_imputation_strip(
    chain: torch.Tensor,
    x: torch.Tensor,
    image_shape: Sequence[int],
    path: str | Path,
    columns: int = 20,
) -> Path:
    """Fig. 5: one row per example: the true image, the perturbed image, then the
    imputations of the first ``columns`` iterations (fewer if the chain is shorter), drawn
    at a readable size (:func:`~pyrodgm.plots.save_grid`).

    :param chain: ``[T + 1, N, D]`` (:attr:`Imputation.images`); ``x``: ``[N, D]``.
    """
    from .plots import save_grid

    steps = chain[1 : columns + 1]
    rows = torch.cat([x[None], chain[:1], steps]).transpose(0, 1)  # [N, 2 + steps, D]
    path = Path(path)
    xlabel = f"true, perturbed, iterations 1-{steps.shape[0]}"
    save_grid(rows.reshape(-1, rows.shape[-1]), _image_shape(image_shape), path, nrow=rows.shape[1], xlabel=xlabel)
    return path


def _image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return shape


def impute_checkpoint(
    checkpoint: str | Path,
    mask: str,
    p: Optional[float] = None,
    k: Optional[int] = None,
    iterations: int = 100,
    limit: Optional[int] = None,
    out: Optional[str | Path] = None,
    position: str = "center",
    seed: int = 0,
    device: str = "cpu",
    root: Optional[str] = None,
    batch_size: int = 1000,
    strip_rows: int = 10,
    strip_columns: int = 20,
) -> dict:
    """Tables 4-5 and Fig. 5 for a trained checkpoint: its test images (the first
    ``limit``) with ``mask`` applied (seeded by ``seed``), imputed for ``iterations``
    rounds; the MSE over missing pixels, the classification errors (for models with a
    classifier) and, when ``out`` is given, the strip ``out/imputation_<mask>.png``."""
    import time

    from .data import IMAGE_SHAPES
    from .training import build_from_checkpoint, device_description, load_test_data

    config, recipe_, model, guide, state = build_from_checkpoint(checkpoint, device)
    test = load_test_data(config, device, root=root, limit=limit)
    x, image_shape = test.flat(), IMAGE_SHAPES[config.dataset]
    generator = torch.Generator().manual_seed(seed)
    masks = make_mask(mask, x.shape[0], image_shape, p=p, k=k, generator=generator, position=position).to(x.device)
    pyro.set_rng_seed(seed)
    started = time.perf_counter()
    keep = min(strip_rows, x.shape[0]) if out else 0
    result = evaluate_imputation(
        model, guide, x, test.y, masks, iterations, recipe_.label_site, batch_size, generator, keep=keep,
        error_fn=classifier_error_fn(recipe_.label_site, guide),
    )
    chains = result.pop("chains", None)
    report = {
        "checkpoint": str(checkpoint),
        "model": config.model,
        "dataset": config.dataset,
        "epoch": state["epoch"],
        "mask": mask_name(mask, p, k),
        "position": position if mask == "rect" else None,
        "seed": seed,
        "device": device_description(torch.device(device)),
        "seconds": time.perf_counter() - started,
        **result,
    }
    if out:
        name = f"imputation_{mask}_{p:g}.png" if mask == "rand-drop" else f"imputation_{mask}_{k}.png"
        report["strip"] = str(save_imputation_strip(chains, x[:keep], image_shape, Path(out) / name, strip_columns))
    return report
