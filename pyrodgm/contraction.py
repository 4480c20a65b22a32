r"""The general ELBO estimators, for the guide structures pyrodgm's fast path does not cover.

:class:`~pyrodgm.traces.TraceTerms` sums a guide's enumerated sites by weighing every term
with their joint guide probability, which is exact when every enumerated site has an
enumeration dim of its own, is enumerated exhaustively, and every term that depends on one
lies in all their plates (M2, the ADGM, CaGeM: one label per datapoint).  Every other
structure goes through Pyro's own machinery, on the same traces, so the number is the one
Pyro computes:

* :func:`dice_elbo`: :class:`~pyro.infer.util.Dice` contraction, as
  :class:`~pyro.infer.TraceEnum_ELBO` computes it: :func:`pyro.markov` chains whose
  enumeration dims are recycled, enumerated sites in different plates (a global enumerated
  site beside per-datapoint ones), nested plates, ``num_samples`` (sampled) enumeration,
  and score-function terms for discrete guide sites that are not enumerated.
* :func:`tracegraph_elbo`: :class:`~pyro.infer.TraceGraph_ELBO`'s surrogate, with the
  baselines a guide asks for (``infer={"baseline": {...}}``) and provenance-tracked
  downstream costs, for guides without enumerated sites.

Guide sites that are observed (a labelled batch's label, observed in the guide too) are no
latent variables: they enter neither estimator, as they enter no term of the fast path.

References

[1] `DiCE: The Infinitely Differentiable Monte-Carlo Estimator`, Jakob Foerster, Gregory
    Farquhar, Maruan Al-Shedivat, Tim Rocktäschel, Eric P. Xing, Shimon Whiteson (2018)
[2] `Gradient Estimation Using Stochastic Computation Graphs`, John Schulman, Nicolas
    Heess, Theophane Weber, Pieter Abbeel (2015)
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Optional

import pyro.distributions as dist
import torch
from pyro.distributions.distribution import Distribution
from pyro.infer.tracegraph_elbo import _compute_elbo as _tracegraph_surrogate
from pyro.infer.util import Dice, is_validation_enabled
from pyro.ops import packed
from pyro.ops.provenance import get_provenance
from pyro.poutine.trace_struct import Trace
from pyro.util import check_traceenum_requirements

__all__ = [
    "base_distribution",
    "baseline_sites",
    "dice_elbo",
    "has_score_function",
    "is_enumerated_site",
    "is_latent_site",
    "score_function_sites",
    "tracegraph_elbo",
]


def is_latent_site(site) -> bool:
    """A sample site that is not observed."""
    return site["type"] == "sample" and not site["is_observed"]


def is_enumerated_site(site) -> bool:
    """A site that :class:`~pyro.poutine.enum_messenger.EnumMessenger` enumerated."""
    return site["infer"].get("_enumerate_dim") is not None


def base_distribution(fn: dist.Distribution) -> dist.Distribution:
    """``fn`` without the Independent / Masked / Expanded wrappers Pyro puts around it, nor
    the wrappers of pyrodgm's that mark themselves ``wraps_base_dist``."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)) or getattr(
        fn, "wraps_base_dist", False
    ):
        fn = fn.base_dist
    return fn


def has_score_function(fn: dist.Distribution) -> bool:
    """Whether the gradient of samples of ``fn`` needs a score-function term: it has no
    reparameterised sampler, or only a partial one (its ``score_parts`` are its own, as
    the rejection samplers' are, :class:`~pyro.distributions.Rejector`)."""
    return not fn.has_rsample or type(base_distribution(fn)).score_parts is not Distribution.score_parts


def score_function_sites(guide_trace: Trace) -> list[str]:
    """The latent guide sites that are not enumerated and not (fully) reparameterised:
    their gradient needs the score-function estimator."""
    return [
        name
        for name, site in guide_trace.nodes.items()
        if is_latent_site(site) and not is_enumerated_site(site) and has_score_function(site["fn"])
    ]


def baseline_sites(guide_trace: Trace) -> list[str]:
    """The score-function guide sites that ask for a baseline (``infer={"baseline": ...}``)."""
    return [name for name in score_function_sites(guide_trace) if guide_trace.nodes[name]["infer"].get("baseline")]


def _latent_guide_trace(guide_trace: Trace) -> Trace:
    """A shallow copy of ``guide_trace`` without its observed sample sites."""
    latent = guide_trace.copy()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"]:
            latent.remove_node(name)
    return latent


def _ordinal(trace: Trace, site) -> frozenset:
    return frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)


def _annotate_model_enum_dims(model_trace: Trace, plate_nesting: int) -> None:
    """Give each model site that was not replayed from the guide (an observed one) the ids
    of the enumeration dims its log-density has, as :class:`~pyro.infer.TraceEnum_ELBO`'s
    :class:`~pyro.poutine.enum_messenger.EnumMessenger` around the model does: each dim's
    id is that of the latest site before it in the model whose value or parameters
    carried that dim (pyrodgm does not run the model under enumeration, the fast path
    needs no ids)."""
    current: dict[int, int] = {}
    first_enum_dim = -(plate_nesting + 2)  # left of the plates and the particles
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        dim_to_id = site["infer"].get("_dim_to_id")
        if dim_to_id is not None:
            current.update(dim_to_id)
            continue
        shape = site["log_prob"].shape if "log_prob" in site else site["fn"].batch_shape
        dims = [dim for dim in range(-len(shape), first_enum_dim + 1) if shape[dim] > 1]
        unknown = [dim for dim in dims if dim not in current]
        if unknown:
            raise ValueError(
                f"model site '{name}' has a batch dim of size > 1 at dim(s) {unknown}, left of the plates, where no "
                "enumerated guide site put one: enclose it in a pyro.plate or .to_event(...) it"
            )
        site["infer"] = {**site["infer"], "_dim_to_id": {dim: current[dim] for dim in dims}}


def dice_elbo(
    model_trace: Trace, guide_trace: Trace, kl_terms: dict[str, torch.Tensor], num_particles: int, plate_nesting: int
) -> torch.Tensor:
    """The ELBO of a trace pair as :class:`~pyro.infer.TraceEnum_ELBO` computes it for
    guide-side enumeration (its ``_compute_dice_elbo`` without model enumeration, which
    pyrodgm does not do): every cost weighed by the :class:`~pyro.infer.util.Dice`
    factors of the guide sites in its plates, enumerated ones contracted exactly.

    :param kl_terms: site name -> ``-KL(q || p)`` (scaled and masked), replacing that
        site's pair of log-densities, laid out like the site's batch shape.
    :param num_particles: the size of the vectorised particle plate (1: none), which the
        contraction sums over.
    :param plate_nesting: the program's plate dims (the particles' excluded).
    """
    if is_validation_enabled():
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # Pyro's own warning text, not an error
            check_traceenum_requirements(model_trace, guide_trace)
    guide_trace.compute_score_parts()
    model_trace.compute_log_prob(lambda name, site: name not in kl_terms)
    _annotate_model_enum_dims(model_trace, plate_nesting)
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    latent = _latent_guide_trace(guide_trace)
    ordering = {
        name: _ordinal(trace, site)
        for trace, sites in ((model_trace, model_trace.nodes), (guide_trace, latent.nodes))
        for name, site in sites.items()
        if site["type"] == "sample"
    }
    costs: dict[frozenset, list[torch.Tensor]] = defaultdict(list)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in kl_terms:
            costs[ordering[name]].append(packed.pack(kl_terms[name], site["infer"]["_dim_to_symbol"]))
        else:
            costs[ordering[name]].append(site["packed"]["log_prob"])
    for name, site in latent.nodes.items():
        if site["type"] == "sample" and name not in kl_terms:
            costs[ordering[name]].append(packed.neg(site["packed"]["log_prob"]))
    elbo = Dice(latent, ordering).compute_expectation(costs)
    return elbo / num_particles


def tracegraph_elbo(model_trace: Trace, guide_trace: Trace, num_particles: int) -> torch.Tensor:
    """The ELBO of a trace pair as :class:`~pyro.infer.TraceGraph_ELBO` computes it, as
    one differentiable tensor: its value is the ELBO, its gradient the TraceGraph
    surrogate's (score-function terms on provenance-tracked downstream costs, minus the
    baselines the guide asks for) plus the baselines' own squared-error loss.  The traces
    must have been recorded under :class:`~pyro.infer.tracegraph_elbo.TrackNonReparam`."""
    latent = _latent_guide_trace(guide_trace)
    enumerated = [name for name, site in latent.nodes.items() if site["type"] == "sample" and is_enumerated_site(site)]
    if enumerated:
        raise NotImplementedError(
            f"guide sites {baseline_sites(latent)} ask for baselines, and sites {enumerated} are enumerated: baselines are "
            "TraceGraph_ELBO's, which does not enumerate; drop the baselines (the score-function terms are then computed "
            "as TraceEnum_ELBO computes them) or the enumeration"
        )
    untracked = [name for name in score_function_sites(latent) if not get_provenance(latent.nodes[name]["value"])]
    if untracked:
        raise ValueError(
            f"guide sites {untracked} ask for baselines but were not traced with provenance: the loss decides that on its "
            "first call, from one trial run of the guide; a guide whose baseline sites change between calls needs a new loss"
        )
    model_trace.compute_log_prob()
    latent.compute_score_parts()
    elbo, surrogate_loss = _tracegraph_surrogate(model_trace, latent)
    surrogate_elbo = -surrogate_loss / num_particles
    return (elbo / num_particles).detach() + (surrogate_elbo - surrogate_elbo.detach())

