r"""Evaluation for any model/guide pair whose sample sites all lie in ``pyro.plate("data",
...)``: a per-datapoint value has no room for a global latent (one draw shared by the
batch), which is refused with a message naming the site, and each enumerated guide site
must be local to the data plate alone, on an enumeration dim of its own.

* :func:`iwae_log_likelihood`: the importance-weighted estimate of :math:`\log p(x)` per
  datapoint (Burda et al. 2016),

  .. math:: \log \hat p(x) = \log \frac1k \sum_{j=1}^k \sum_y
            \frac{p(x, y, z_j^{(y)})}{q(z_j^{(y)}|x, y)},

  computed by tracing the guide and replaying the model (:mod:`pyro.poutine`), with the
  guide's enumerated discrete sites summed exactly, in chunks of particles so that
  ``k = 5000`` fits in memory, and a stable log-mean-exp.  Pyro's own
  ``vectorized_importance_weights`` and ``Importance`` sum over the data plate, and
  ``RenyiELBO`` mishandles enumerated guides; this evaluator keeps a particle dim and a
  per-datapoint value instead.
* :func:`importance_diagnostics`: the Pareto :math:`\hat k` of PSIS (Vehtari et al. 2024,
  through ArviZ) and the effective sample size of the importance weights, to report
  beside every IWAE number (:math:`\hat k > 0.7`: the estimate is unreliable).
* :func:`predict_proba` / :func:`classification_error`: the guide's classifier averaged over
  Monte Carlo samples of whatever it samples before the label (Maaløe et al. 2016).
* :func:`active_units`: the number of latent units whose posterior mean varies across the
  data (Burda et al. 2016, ``Cov_x E_q[u] > 0.01``).

References

[1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)
[2] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew Gelman,
    Yuling Yao, Jonah Gabry (2024)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from pyro import poutine

from .traces import (
    TraceTerms,
    _categorical_logits,
    guess_plate_nesting,
    guide_trace,
    particle_traces,
    site_distribution,
)

__all__ = [
    "IWAEResult",
    "active_units",
    "continuous_latent_sites",
    "classification_error",
    "importance_diagnostics",
    "importance_log_weights",
    "iwae_log_likelihood",
    "iwae_evaluate",
    "iwae_seconds_estimate",
    "posterior_mean",
    "predict_proba",
]


def _check_particles(num_particles: int, chunk_size: int) -> None:
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _chunks(total: int, size: int) -> Iterator[int]:
    for start in range(0, total, size):
        yield min(size, total - start)


@torch.no_grad()
def importance_log_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int,
    chunk_size: int = 500,
    max_plate_nesting: Optional[int] = None,
    **kwargs,
) -> torch.Tensor:
    """``log p(x, z_j) - log q(z_j|x)`` with enumerated sites summed exactly, for
    ``j = 1..num_particles`` and every datapoint: a ``(num_particles, batch)`` tensor.

    :param int chunk_size: particles traced at once (memory grows with it).
    :param max_plate_nesting: plate dims of the model; guessed if omitted.
    """
    _check_particles(num_particles, chunk_size)
    nesting = guess_plate_nesting(model, guide, args, kwargs) if max_plate_nesting is None else max_plate_nesting
    chunks = []
    for size in _chunks(num_particles, chunk_size):
        model_trace, guide_trace_ = particle_traces(model, guide, args, kwargs, size, nesting)
        chunks.append(TraceTerms(model_trace, guide_trace_, nesting).importance_log_weights())
    return torch.cat(chunks, dim=0)


def iwae_log_likelihood(model: Callable, guide: Callable, *args, num_particles: int, chunk_size: int = 500, **kwargs) -> torch.Tensor:
    r"""The IWAE estimate of :math:`\log p(x)` for each datapoint (a ``(batch,)`` tensor),
    a lower bound in expectation that tightens as ``num_particles`` grows."""
    log_weights = importance_log_weights(model, guide, *args, num_particles=num_particles, chunk_size=chunk_size, **kwargs)
    return log_weights.logsumexp(0) - math.log(num_particles)


def importance_diagnostics(log_weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """PSIS Pareto ``k-hat`` (ArviZ's :func:`arviz.psislw`) and the importance-sampling
    effective sample size ``1 / sum(w_norm^2)`` of the smoothed weights, per datapoint.
    ``k-hat`` is ``inf`` where the tail fit has too few particles (k of about 20 or less),
    and ``0`` where all weights are equal.

    :param log_weights: ``(num_particles, batch)``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    lw = log_weights.detach().double().cpu().numpy().T  # (batch, particles): samples last
    with warnings.catch_warnings():
        # ArviZ warns when k-hat is large; the value itself is what we report.
        warnings.simplefilter("ignore", UserWarning)
        smoothed, khat = arviz.psislw(lw.copy())
    ess = 1.0 / np.exp(2 * smoothed).sum(axis=-1)
    khat = np.asarray(khat, dtype=float)
    # ArviZ finds no tail to fit when all weights are equal (a perfect proposal) and says
    # inf; the weights are then bounded, k-hat = 0.  With too few particles (about 20 or
    # fewer) the tail fit is impossible and inf is kept: the diagnostic is unavailable.
    khat[np.ptp(lw, axis=-1) == 0] = 0.0
    return khat, ess


@dataclass
class IWAEResult:
    """Per-datapoint IWAE estimates with their diagnostics."""

    log_likelihood: torch.Tensor
    pareto_k: np.ndarray
    ess: np.ndarray
    num_particles: int

    def summary(self) -> dict:
        """Mean log-likelihood and the diagnostics, as JSON-ready numbers."""
        k, ess = self.pareto_k, self.ess
        return {
            "iwae_log_likelihood": _finite(self.log_likelihood.mean()),
            "iwae_k": self.num_particles,
            "num_examples": int(self.log_likelihood.numel()),
            # k-hat is inf when too few particles reach the tail fit; JSON gets null then
            "pareto_k_mean": _finite(k.mean()),
            "pareto_k_max": _finite(k.max()),
            "pareto_k_frac_above_0.7": float((k > 0.7).mean()),
            "ess_mean": _finite(ess.mean()),
            "ess_min": _finite(ess.min()),
        }


def _finite(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def iwae_evaluate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int,
    batch_size: int = 100,
    chunk_size: int = 500,
    progress: bool = False,
) -> IWAEResult:
    """:func:`iwae_log_likelihood` and :func:`importance_diagnostics` over a whole data set
    ``x``, ``batch_size`` examples at a time."""
    from tqdm.auto import tqdm

    values, khats, esss = [], [], []
    starts = range(0, x.shape[0], batch_size)
    for start in tqdm(starts, desc=f"IWAE k={num_particles}", disable=not progress):
        batch = x[start : start + batch_size]
        lw = importance_log_weights(model, guide, batch, num_particles=num_particles, chunk_size=chunk_size)
        values.append(lw.logsumexp(0) - math.log(num_particles))
        khat, ess = importance_diagnostics(lw)
        khats.append(khat)
        esss.append(ess)
    return IWAEResult(torch.cat(values), np.concatenate(khats), np.concatenate(esss), num_particles)


def iwae_seconds_estimate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int,
    batch_size: int = 100,
    chunk_size: int = 500,
    probe_particles: int = 50,
) -> float:
    """About how many seconds :func:`iwae_evaluate` will take on ``x``: one probe chunk
    (the first batch, at most ``probe_particles`` particles) is timed after a one-particle
    warm-up and scaled by images x particles.  The probe's fixed costs make it err long."""
    import time

    _check_particles(num_particles, chunk_size)
    rows, particles = min(batch_size, x.shape[0]), min(num_particles, chunk_size, probe_particles)
    importance_log_weights(model, guide, x[:1], num_particles=1)  # lazy set-up, kept out of the timing
    start = time.perf_counter()
    importance_log_weights(model, guide, x[:rows], num_particles=particles, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    return seconds * (x.shape[0] / rows) * (num_particles / particles)


@torch.no_grad()
def predict_proba(
    guide: Callable,
    x: torch.Tensor,
    *args,
    num_particles: int = 1,
    label_site: str = "y",
    max_plate_nesting: Optional[int] = None,
    **kwargs,
) -> torch.Tensor:
    """The classifier ``E_q[q(y|..., x)]``: the guide's distribution at ``label_site``,
    averaged over ``num_particles`` vectorised samples of everything the guide draws
    before it.  The guide stops at the label site (:func:`~pyro.poutine.escape`).
    Returns ``(batch, num_classes)`` probabilities."""
    nesting = 1 if max_plate_nesting is None else max_plate_nesting
    with poutine.block():
        fn = site_distribution(guide, (x,) + args, kwargs, label_site, num_particles, nesting, role="guide")
    probs = _categorical_logits(fn).softmax(-1)
    return probs.reshape(-1, x.shape[0], probs.shape[-1]).mean(0)


def classification_error(
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    num_particles: int = 1,
    batch_size: int = 1000,
    label_site: str = "y",
) -> float:
    """The fraction of ``x`` whose averaged classifier's argmax differs from ``y``."""
    wrong = 0
    for start in range(0, x.shape[0], batch_size):
        probs = predict_proba(guide, x[start : start + batch_size], num_particles=num_particles, label_site=label_site)
        wrong += int((probs.argmax(-1).cpu() != y[start : start + batch_size].cpu()).sum())
    return wrong / x.shape[0]


@torch.no_grad()
def posterior_mean(guide: Callable, x: torch.Tensor, site: str, num_particles: int = 1) -> torch.Tensor:
    """``E_q[u|x]`` of the guide's site ``site`` for each datapoint, ``(batch, dim)``: the
    site's mean, summed exactly over enumerated labels it depends on and averaged over
    ``num_particles`` samples of anything else upstream."""
    nesting = guess_plate_nesting(None, guide, (x,), {})
    trace = guide_trace(guide, (x,), {}, num_particles, nesting)
    if site not in trace.nodes:
        raise ValueError(f"the guide has no sample site '{site}'")
    mean = trace.nodes[site]["fn"].mean
    log_q = [s["unscaled_log_prob"] for s in trace.nodes.values() if s["type"] == "sample" and s["infer"].get("_enumerate_dim") is not None]
    if log_q:
        mean = sum(log_q).exp().unsqueeze(-1) * mean
    mean = mean.reshape((1,) * max(0, 3 - mean.dim()) + tuple(mean.shape))
    if mean.dim() > 3:
        mean = mean.sum(dim=tuple(range(mean.dim() - 3)))
    return mean.mean(-3)


def active_units(
    guide: Callable,
    x: torch.Tensor,
    site: str,
    threshold: float = 0.01,
    num_particles: int = 1,
    batch_size: int = 1000,
) -> tuple[int, torch.Tensor]:
    """The number of active units of latent ``site`` (Burda et al. 2016): units whose
    posterior mean has variance above ``threshold`` across ``x``.  Returns the count and
    the per-unit variances.  A variance across the data needs at least two inputs."""
    if x.shape[0] < 2:
        raise ValueError(f"active units need the posterior means of at least 2 inputs (their variance across the data), got {x.shape[0]}")
    means = torch.cat(
        [posterior_mean(guide, x[start : start + batch_size], site, num_particles) for start in range(0, x.shape[0], batch_size)]
    )
    variances = means.var(dim=0)
    return int((variances > threshold).sum()), variances


def continuous_latent_sites(guide: Callable, x: torch.Tensor) -> list[str]:
    """The guide's latent sites that are neither enumerated nor observed, in order."""
    nesting = guess_plate_nesting(None, guide, (x,), {})
    trace = guide_trace(guide, (x,), {}, 1, nesting)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and site["infer"].get("_enumerate_dim") is None
    ]
