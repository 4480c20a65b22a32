"""Trace machinery shared by every loss and by the importance-weighted evaluator.

One function, :func:`particle_traces`, runs a guide with vectorised particles and parallel
enumeration of its discrete sites, replays the model against it, and returns the two
:class:`~pyro.poutine.Trace` objects.  :func:`log_weight_terms` turns the pair into
per-site log-density terms laid out as ``(enum dims..., particles, plate dims...)``
(broadcastable: a single particle runs without a particle plate, so its dim is 1 or
absent, :func:`particle_plate`), and :class:`TraceTerms` reduces them either to an ELBO
(enumerated sites summed exactly with their guide probabilities, or, for the structures
where that is not exact, contracted by Pyro's own estimators: :mod:`pyrodgm.contraction`)
or to per-datapoint importance log-weights.  Labels of a semi-supervised batch enter
through :class:`ObserveLabels`, a messenger that observes the label site with the right encoding (integer or one-hot) for its distribution.

All data-dependent sites must sit in ``pyro.plate("data", ...)``; sites outside it are
*global* and are only allowed where no per-datapoint value is asked for.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import NonlocalExit
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape
from torch.distributions import kl_divergence
from torch.distributions.kl import _KL_REGISTRY

from .contraction import (
    base_distribution, baseline_sites, dice_elbo, is_enumerated_site, is_latent_site, score_function_sites, tracegraph_elbo,
)
from .modeling import one_hot_rows, registered_once
from .validation import UNLABELLED

DATA_PLATE = "data"
PARTICLE_PLATE = "num_particles_vectorized"

__all__ = [
    "DATA_PLATE",
    "PARTICLE_PLATE",
    "LabelledRows",
    "MaskLabels",
    "MaskRows",
    "ObserveLabels",
    "ScaleLatents",
    "TraceTerms",
    "check_parallel_enumeration",
    "check_plate_nesting",
    "enumeration_problem",
    "fast_path_problem",
    "encode_labels",
    "guess_plate_nesting",
    "plate_nesting_of",
    "trial_traces",
    "label_log_prob",
    "label_range_error",
    "log_weight_terms",
    "particle_plate",
    "particle_traces",
    "site_distribution",
]


# --------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------
def _is_one_hot(fn: dist.Distribution) -> bool:
    return isinstance(
        base_distribution(fn),
        (dist.OneHotCategorical, dist.RelaxedOneHotCategorical, dist.RelaxedOneHotCategoricalStraightThrough),
    )


def encode_labels(labels: torch.Tensor, fn: dist.Distribution, cache: Optional[dict] = None) -> torch.Tensor:
    """Integer labels in the encoding ``fn`` samples: one-hot for (relaxed) one-hot
    categoricals, integers for :class:`~pyro.distributions.Categorical`.  A one-hot
    encoding is kept in ``cache`` (per number of classes and dtype) and reused from it."""
    if not _is_one_hot(fn):
        return labels
    num_classes = fn.event_shape[-1]
    dtype = fn.logits.dtype if hasattr(fn, "logits") else torch.get_default_dtype()
    cache = {} if cache is None else cache
    if (num_classes, dtype) not in cache:
        cache[num_classes, dtype] = one_hot_rows(labels, num_classes, dtype)
    return cache[num_classes, dtype]


def _categorical_base(fn: dist.Distribution) -> dist.Distribution:
    """The categorical behind ``fn`` (a clear error if there is none)."""
    base = base_distribution(fn)
    if not hasattr(base, "logits"):
        raise TypeError(
            f"the label site must be a categorical distribution, got {type(base).__name__}"
        )
    return base


def _categorical_logits(fn: dist.Distribution) -> torch.Tensor:
    base = _categorical_base(fn)
    logits = base.logits.expand(fn.batch_shape + base.logits.shape[-1:])
    if isinstance(base, _NORMALISED_LOGITS):  # torch normalises them when it builds these
        return logits
    return logits - logits.logsumexp(-1, keepdim=True)


#: Distributions whose ``logits`` torch stores normalised (``log_softmax``d) on construction.
_NORMALISED_LOGITS = (
    torch.distributions.Categorical,
    torch.distributions.OneHotCategorical,
    torch.distributions.RelaxedOneHotCategorical,
    torch.distributions.relaxed_categorical.ExpRelaxedCategorical,
)


def label_log_prob(fn: dist.Distribution, labels: torch.Tensor) -> torch.Tensor:
    """``log q(y=labels)`` under the categorical behind ``fn``.

    For a Gumbel-softmax (relaxed) site this is the log-probability of the categorical the
    relaxation is built on, which is what a classification loss needs.
    """
    logits = _categorical_logits(fn)
    return logits.gather(-1, labels.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def _num_categories(fn: dist.Distribution) -> int:
    """The number of classes of the categorical behind ``fn``, read off its logits' shape
    (not normalised for it)."""
    return _categorical_base(fn).logits.shape[-1]


def label_range_error(labels: torch.Tensor, fn: dist.Distribution, site: str) -> Optional[str]:
    """The message for the first label out of range for the categorical ``fn`` at
    ``site``, or ``None`` when every label is a class index."""
    num_classes = _num_categories(fn)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if not bad.numel():
        return None
    return (
        f"label {bad[0].item()} is out of range for site '{site}' with {num_classes} classes "
        f"(labels must lie in [0, {num_classes - 1}], or be -1 for unlabelled rows)"
    )


class ObserveLabels(Messenger):
    """Observes the site ``site`` at ``labels`` (integer class indices), encoded to match
    the site's distribution (one-hot or integer).

    Apply it innermost, so that :func:`~pyro.poutine.replay` sees an observed site.
    :meth:`for_programs` makes one for the model and one for the guide that share what
    they compute of the labels: one encoding (one one-hot tensor where both sites are
    one-hot) and, under validation, one range check per number of classes.
    """

    def __init__(self, site: str, labels: torch.Tensor, shared: Optional[dict] = None) -> None:
        super().__init__()
        self.site = site
        self.labels = labels
        self.shared = {} if shared is None else shared
        self.seen = False
        self.error: Optional[str] = None

    @classmethod
    def for_programs(cls, site: str, labels: torch.Tensor, count: int = 2) -> list["ObserveLabels"]:
        """``count`` messengers observing ``site`` at ``labels`` that share their encoding
        and range check."""
        shared: dict = {}
        return [cls(site, labels, shared) for _ in range(count)]

    def check(self) -> None:
        """Raise the label problem found during the run, if any."""
        if self.error:
            raise ValueError(self.error)

    def _pyro_sample(self, msg) -> None:
        if msg["name"] != self.site:
            return
        labels = self.labels
        if is_validation_enabled():
            # raised by check() after the run: an exception inside a trace gets Pyro's
            # whole shape table appended, which buries the message
            num_classes = _num_categories(msg["fn"])
            if ("range error", num_classes) not in self.shared:
                self.shared["range error", num_classes] = label_range_error(labels, msg["fn"], self.site)
            self.error = self.shared["range error", num_classes]
            if self.error:
                labels = labels.clamp(0, num_classes - 1)
        msg["value"] = encode_labels(labels, msg["fn"], None if self.error else self.shared)
        msg["is_observed"] = True
        # a guide-side observed label is no latent variable: mark it auxiliary so Pyro's
        # model/guide match check does not look for it among the model's latents
        msg["infer"] = {**msg["infer"], "enumerate": None, "is_auxiliary": True}
        self.seen = True


class LabelledRows(dist.TorchDistribution):
    """The guide's label distribution ``base_dist`` on unlabelled rows and the point mass
    at the label on labelled ones: enumerated, the labelled rows weigh every term with
    ``1[y = label]`` and the unlabelled rows with ``q(y|x)``, in one run of the whole batch.

    :param base_dist: the guide's categorical at the label site.
    :param labels: encoded labels (integers, or one-hot rows for one-hot sites) laid out
        for the site's batch shape, any value on unlabelled rows.
    :param labelled: boolean, broadcastable to the batch shape.
    """

    arg_constraints: dict = {}
    wraps_base_dist = True  # base_distribution() looks through it, to the classifier

    def __init__(self, base_dist: dist.Distribution, labels: torch.Tensor, labelled: torch.Tensor) -> None:
        self.base_dist, self.labels, self.labelled = base_dist, labels, labelled
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def has_enumerate_support(self) -> bool:
        return self.base_dist.has_enumerate_support

    @dist.constraints.dependent_property
    def support(self):
        return self.base_dist.support

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self.base_dist.enumerate_support(expand=expand)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        value = self.base_dist.sample(sample_shape)
        labelled = self.labelled.reshape(self.labelled.shape + (1,) * self.event_dim)
        return torch.where(labelled, self.labels.to(value.dtype), value)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        hit = value == self.labels
        if self.event_dim:
            hit = hit.all(-1)
        point_mass = torch.zeros((), dtype=self.base_dist.logits.dtype, device=value.device).masked_fill(~hit, -math.inf)
        return torch.where(self.labelled, point_mass, self.base_dist.log_prob(value))


def _at_data_dim(rows: torch.Tensor, msg) -> Optional[torch.Tensor]:
    """A per-row tensor (rows first, then event dims) laid out at the data plate's dim of
    the site of ``msg``, or ``None`` for a site outside the data plate."""
    dim = _data_dim(msg)
    return None if dim is None else rows.reshape(rows.shape[:1] + (1,) * (-dim - 1) + rows.shape[1:])


class MaskLabels(Messenger):
    """Feeds the labels of a batch to a guide without splitting its rows: the site
    ``site`` draws from :class:`LabelledRows` (enumerated in parallel, it weighs the
    labelled rows' terms with the indicator of their label) and its own ``-log q(y|x)``
    is masked to the unlabelled rows, as in Kingma et al.'s labelled bound.  For guides
    whose data plate must keep its size (autoguides: one parameter per datapoint).  Apply
    it innermost, to the guide only.

    :ivar base_fn: the guide's own distribution at ``site`` in the last run (the classifier).
    """

    def __init__(self, site: str, labels: torch.Tensor) -> None:
        super().__init__()
        self.site, self.labels = site, labels
        self.unlabelled = labels == UNLABELLED
        self.base_fn: Optional[dist.Distribution] = None
        self.error: Optional[str] = None

    def _pyro_sample(self, msg) -> None:
        if msg["name"] != self.site or msg["is_observed"]:
            return
        unlabelled = _at_data_dim(self.unlabelled, msg)
        if unlabelled is None:
            raise ValueError(f"the label site '{self.site}' must lie in pyro.plate('{DATA_PLATE}', ...)")
        fn = self.base_fn = msg["fn"]
        if is_validation_enabled() and self.error is None:
            self.error = label_range_error(self.labels[~self.unlabelled], fn, self.site)
        encoded = _at_data_dim(encode_labels(self.labels.clamp(0, _num_categories(fn) - 1), fn), msg)
        msg["fn"] = LabelledRows(fn, encoded, ~unlabelled)
        msg["mask"] = unlabelled if msg["mask"] is None else msg["mask"] & unlabelled

    def check(self) -> None:
        """Raise the label problem found during the run, if any."""
        if self.error:
            raise ValueError(self.error)


class MaskRows(Messenger):
    """Masks every sample site inside the data plate to the rows where ``rows`` is true,
    the way :func:`pyro.poutine.mask` does, with the mask laid out at each site's data
    plate dim."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = rows

    def _pyro_sample(self, msg) -> None:
        rows = _at_data_dim(self.rows, msg)
        if rows is not None:
            msg["mask"] = rows if msg["mask"] is None else msg["mask"] & rows


# --------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------
class ScaleLatents(Messenger):
    """Multiply the log-densities of the named *latent* sites by a weight, in whichever
    program it wraps (wrap both model and guide): the site's ``log p - log q`` (or its
    analytic KL) is weighted, the likelihood is not.  This is KL warm-up (Sønderby et al.
    2016) and the per-term weights of the GMVAE objective (``w_G``, ``w_C``), in the idiom
    of :func:`pyro.poutine.scale` but per site.  Observed sites are left alone.

    :param weights: site name -> weight (non-negative).
    """

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        for name, weight in weights.items():
            if not weight >= 0:
                raise ValueError(f"the weight of latent site '{name}' must be non-negative, got {weight}")
        self.weights = dict(weights)

    def _process_message(self, msg) -> None:
        weight = self.weights.get(msg["name"])
        if weight is not None and msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = weight * msg["scale"]


def trial_traces(model: Optional[Callable], guide: Callable, args: tuple, kwargs: dict) -> list[Trace]:
    """The guide's trace (and the model's against it, if given) of one un-enumerated run
    that leaves no trace outside: blocked, and on forked random number generators."""
    # The trial run must not advance the random number generators: a resumed run guesses
    # again where an uninterrupted one did not, and must still draw the same numbers.
    # Its blocked parameter sites must not count as the registration of a surrounding
    # registered_once() context: it opens its own.
    with poutine.block(), torch.random.fork_rng(devices=_cuda_devices()), registered_once():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        traces = [prune_subsample_sites(guide_trace)]
        if model is not None:
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
            traces.append(prune_subsample_sites(model_trace))
    return traces


def guess_plate_nesting(model: Optional[Callable], guide: Callable, args: tuple, kwargs: dict) -> int:
    """Number of plate dims the guide (and the model, if given) use, from one
    un-enumerated run (:func:`trial_traces`)."""
    return plate_nesting_of(trial_traces(model, guide, args, kwargs))


def plate_nesting_of(traces: Iterable[Trace]) -> int:
    """Number of plate dims the sample sites of ``traces`` use."""
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def particle_plate(num_particles: int, plate_nesting: int) -> Callable[[Callable], Callable]:
    """A wrapper that runs a program in the vectorised particle plate, ``num_particles`` at
    dim ``-(plate_nesting + 1)``.  A single particle gets no plate: every value is the one
    a plate of size 1 would give, with that dim left to broadcasting, and no sample site
    pays for a second plate's messenger (0.3 ms of a 3 ms M2 step with tiny networks, 0.9
    ms of a 46 ms full-size one, on the 2-core CPU)."""
    if num_particles == 1:
        return _unchanged
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1))


def _unchanged(program: Callable) -> Callable:
    return program


def check_plate_nesting(trace: Trace, plate_nesting: int, num_particles: int) -> None:
    """Every plate of the trace's sample sites lies within the ``plate_nesting`` rightmost
    dims, and, for a single particle (which gets no plate: :func:`particle_plate`), no
    site has a batch dim of size other than 1 at the particle dim ``-(plate_nesting + 1)``.
    The dims left of the plates are the particles' and the enumeration's: a program plate
    or an unplated batch dim there would be averaged as particles, silently.  Cheap, and
    on with or without Pyro's validation, like the particle plate's own shape check."""
    particle_dim = -(plate_nesting + 1)
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.name != PARTICLE_PLATE and frame.dim < -plate_nesting:
                raise ValueError(
                    f'at site "{name}", plate stack overflow: plate \'{frame.name}\' uses dim {frame.dim}\n  '
                    f"Try increasing max_plate_nesting to at least {-frame.dim}"
                )
        shape = site["fn"].batch_shape
        if num_particles == 1 and len(shape) >= -particle_dim and shape[particle_dim] != 1:
            raise ValueError(
                f'at site "{name}", batch shape {tuple(shape)} has size {shape[particle_dim]} at dim {particle_dim}, '
                f"left of the {plate_nesting} plate dim(s), where the loss keeps its particles: enclose that dim in a "
                "pyro.plate (and give max_plate_nesting room for it) or .to_event(...) it"
            )


def enumeration_problem(guide_trace: Trace) -> Optional[str]:
    """Why the enumerated guide sites cannot be summed by weighing each term with their
    *joint* guide probability, a product over their dims, or ``None`` when they can: each
    site needs an enumeration dim of its own and an exhaustive enumeration.
    :func:`pyro.markov` in a guide recycles the dims of sites it no longer needs
    (``config_enumerate(expand=False)``, the default), and two sites on one dim would be
    weighed on the diagonal of their joint; a site enumerated with ``num_samples`` is
    sampled, and its values weigh ``1/num_samples`` each, not their probability."""
    owner: dict[int, str] = {}
    for name, site in guide_trace.nodes.items():
        if not (is_latent_site(site) and is_enumerated_site(site)):
            continue
        if site["infer"].get("num_samples") is not None:
            return f"guide site '{name}' is enumerated with num_samples={site['infer']['num_samples']} (sampled, not summed)"
        dim = site["infer"]["_enumerate_dim"]
        if dim in owner:
            return f"guide sites '{owner[dim]}' and '{name}' share enumeration dim {dim} (pyro.markov recycled it)"
        owner[dim] = name
    return None


def check_enumeration_dims(guide_trace: Trace) -> None:
    """A clear error where :func:`enumeration_problem` finds one: for the per-datapoint
    values (a classifier averaged over an enumerated guide, CaGeM's), which only pyrodgm's
    product weighting gives.  The ELBO itself contracts such structures
    (:func:`pyrodgm.contraction.dice_elbo`)."""
    problem = enumeration_problem(guide_trace)
    if problem:
        raise ValueError(
            f"{problem}: a per-datapoint value needs every enumerated guide site summed exhaustively on a dim of its own; "
            "drop pyro.markov (or num_samples) from the guide"
        )


def check_parallel_enumeration(guide_trace: Trace) -> None:
    """pyrodgm enumerates guide sites in parallel only: a site marked
    ``infer={"enumerate": "sequential"}`` is refused, naming it (Pyro's
    :class:`~pyro.infer.TraceEnum_ELBO` runs the guide once per value for it)."""
    for name, site in guide_trace.nodes.items():
        if is_latent_site(site) and site["infer"].get("enumerate") == "sequential":
            raise ValueError(
                f"guide site '{name}' is marked infer={{'enumerate': 'sequential'}}: pyrodgm's losses enumerate in "
                "parallel only; mark it 'parallel' (the same exact sum, vectorised)"
            )


def particle_guide(guide: Callable, num_particles: int, plate_nesting: int, enumerate_guide: bool = True) -> Callable:
    """``guide`` inside the particle plate at dim ``-(plate_nesting + 1)``
    (:func:`particle_plate`), its enumerable sites enumerated in parallel to the left of it."""
    particle_dim = -(plate_nesting + 1)
    guide = particle_plate(num_particles, plate_nesting)(guide)
    if enumerate_guide:
        guide = poutine.enum(guide, first_available_dim=particle_dim - 1)
    return guide


def guide_trace(guide: Callable, args: tuple, kwargs: dict, num_particles: int, plate_nesting: int) -> Trace:
    """A trace of the guide alone, with particles and enumeration, log-densities computed."""
    trace = poutine.trace(particle_guide(guide, num_particles, plate_nesting)).get_trace(*args, **kwargs)
    trace = prune_subsample_sites(trace)
    check_plate_nesting(trace, plate_nesting, num_particles)
    check_enumeration_dims(trace)
    trace.compute_log_prob()
    return trace


def particle_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    plate_nesting: int,
    enumerate_guide: bool = True,
    compute_log_prob: bool = True,
) -> tuple[Trace, Trace]:
    """Run ``guide`` with ``num_particles`` vectorised particles (plate dim
    ``-(plate_nesting + 1)``, :func:`particle_plate`) and its enumerable sites enumerated
    in parallel to the left of that, then replay ``model`` against it; every program plate
    must lie within ``plate_nesting`` dims (:func:`check_plate_nesting`).  Log-densities
    are computed on both traces (and, with Pyro's validation on, their shapes checked
    against the plates); with ``compute_log_prob=False`` none are, and :class:`TraceTerms`
    computes them, skipping the sites whose pair of log-densities an analytic KL replaces,
    and checks the shapes of the terms it uses."""
    particles = particle_plate(num_particles, plate_nesting)
    model_trace, guide_trace = _importance_traces(
        plate_nesting + 1,
        particles(model),
        particle_guide(guide, num_particles, plate_nesting, enumerate_guide),
        args,
        kwargs,
        compute_log_prob,
    )
    _check_no_model_enumeration(model_trace, guide_trace)
    check_plate_nesting(guide_trace, plate_nesting, num_particles)
    check_plate_nesting(model_trace, plate_nesting, num_particles)
    check_parallel_enumeration(guide_trace)
    return model_trace, guide_trace


def site_distribution(
    program: Callable,
    args: tuple,
    kwargs: dict,
    site: str,
    num_particles: int,
    plate_nesting: int,
    role: str = "program",
    required: bool = True,
) -> Optional[dist.Distribution]:
    """The distribution at sample site ``site`` of ``program(*args, **kwargs)`` run inside
    the particle plate (``num_particles`` at dim ``-(plate_nesting + 1)``) and stopped
    there (:func:`~pyro.poutine.escape`): the label classifier of a guide, say, with
    everything it draws first sampled once per particle and nothing after it run.  Sample
    sites and parameters before ``site`` reach the outer handlers as in a full run.  A
    program without the site runs to its end; then ``None`` is returned if not
    ``required``, else the error raised names the program by ``role``."""
    particles = particle_plate(num_particles, plate_nesting)
    try:
        particles(poutine.escape(program, escape_fn=lambda msg: msg["name"] == site))(*args, **kwargs)
    except NonlocalExit as exit_:
        # no exit_.reset_stack(): the messengers of this run have exited already, and a
        # reset would clear the traces above it (SVI's capture of the parameters)
        return exit_.site["fn"]
    if required:
        raise ValueError(f"the {role} has no sample site '{site}'")
    return None


def _importance_traces(
    max_plate_nesting: int, model: Callable, guide: Callable, args: tuple, kwargs: dict, compute_log_prob: bool = True
) -> tuple[Trace, Trace]:
    """:func:`pyro.infer.enum.get_importance_trace` (``"flat"``) but for one check: a model
    site replayed from an enumerated guide site inherits the guide's enumeration dim, and
    its distribution may depend on that dim (CaGeM's ``p(y|z2)`` with ``z2 ~ q(z2|x,y,z1)``
    after ``y`` is enumerated).  Pyro's "enumeration dim conflict" check guards *model*
    enumeration, which pyrodgm does not do (:func:`_check_no_model_enumeration`), so model
    sites are shape-checked without the inherited dim; guide sites are checked in full."""
    guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(*args, **kwargs)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    if compute_log_prob:
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        if is_validation_enabled():
            check_site_shapes(model_trace, guide_trace, max_plate_nesting)
    return model_trace, guide_trace


def check_site_shapes(model_trace: Trace, guide_trace: Trace, max_plate_nesting: int, values: Optional[dict] = None) -> None:
    """Pyro's :func:`~pyro.util.check_site_shape` at every sample site of both traces, on
    its log-density or, where ``values`` (``{(is_model, name): tensor}``) has one, on the
    term that stands in for it (an analytic KL).  A model site replayed from an enumerated
    guide site is checked without the inherited enumeration dim (:func:`_importance_traces`)."""
    values = values or {}
    for trace, is_model in ((model_trace, True), (guide_trace, False)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            value = values.get((is_model, name), site.get("log_prob"))
            if value is None:
                continue
            infer = site["infer"]
            if is_model and infer.get("_enumerate_dim") is not None:
                infer = {k: v for k, v in infer.items() if k != "_enumerate_dim"}
            check_site_shape({**site, "log_prob": value, "infer": infer}, max_plate_nesting)


def _check_no_model_enumeration(model_trace: Trace, guide_trace: Trace) -> None:
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace:
            raise ValueError(
                f"model site '{name}' is latent but the guide has no site of that name; "
                "pyrodgm losses need every latent site in the guide (enumerate discrete "
                "sites in the guide with infer={'enumerate': 'parallel'})"
            )


# --------------------------------------------------------------------------------------
# per-site terms
# --------------------------------------------------------------------------------------
@dataclass
class Term:
    """One additive piece of ``log p(x, latents) - log q(latents)``: a tensor laid out as
    ``(enum dims..., particles, plate dims...)`` (broadcastable), the site it came from and
    whether that site is inside the data plate at dim ``data_dim``."""

    name: str
    value: torch.Tensor
    data_dim: Optional[int]
    enumerated_guide: bool = False
    plates: frozenset[str] = frozenset()


def _plates(site) -> frozenset[str]:
    """The names of the program's vectorised plates around ``site`` (not the particles')."""
    return frozenset(f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE)


def _data_dim(site) -> Optional[int]:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    return None


def _analytic_kl_sites(model_trace: Trace, guide_trace: Trace, wanted: bool | set[str]) -> list[str]:
    """The latent sites (of those ``wanted``) where ``E_q[log p(z|pa) - log q(z|.)] =
    -KL(q || p)`` may be used.

    Sound at ``z`` when every latent site the model samples before ``z`` (a superset of its
    parents) was also sampled before it in the guide, so that nothing the guide draws after
    ``z`` can change ``p(z|pa)``; the guide's ``z`` is reparameterised, not enumerated; and a
    closed form is registered for the pair.  One pass over the model's latents: the
    condition holds when the latest guide position among the model's earlier latents lies
    before ``z``'s.
    """
    if wanted is False:
        return []
    guide_position = {name: i for i, name in enumerate(n for n, site in guide_trace.nodes.items() if is_latent_site(site))}
    sites, latest = [], -1.0
    for name, site in model_trace.nodes.items():
        if not is_latent_site(site):
            continue
        position = guide_position.get(name, math.inf)
        if (wanted is True or name in wanted) and latest < position < math.inf:
            guide_fn = guide_trace.nodes[name]["fn"]
            if not is_enumerated_site(guide_trace.nodes[name]) and guide_fn.has_rsample and _has_kl(guide_fn, site["fn"]):
                sites.append(name)
        latest = max(latest, position)
    return sites


def _has_kl(q: dist.Distribution, p: dist.Distribution) -> bool:
    if isinstance(q, dist.Independent) and isinstance(p, dist.Independent):
        if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims:
            return False
        q, p = q.base_dist, p.base_dist
    return _kl_registered(type(q), type(p), len(_KL_REGISTRY))


@functools.lru_cache(maxsize=None)
def _kl_registered(q_type: type, p_type: type, registry_size: int) -> bool:
    """Whether :func:`~torch.distributions.kl_divergence` has a closed form for the pair,
    remembered per registry size (a later ``register_kl`` is seen)."""
    return any(issubclass(q_type, a) and issubclass(p_type, b) for a, b in _KL_REGISTRY)


def _scale_and_mask(value: torch.Tensor, site) -> torch.Tensor:
    if site["mask"] is not None:
        value = value * site["mask"]
    if site["scale"] is not None and not (isinstance(site["scale"], float) and site["scale"] == 1.0):
        value = value * site["scale"]
    return value


def log_weight_terms(
    model_trace: Trace,
    guide_trace: Trace,
    analytic_kl: bool | Iterable[str] = False,
) -> tuple[list[Term], list[str]]:
    """The terms of ``log p - log q`` (guide-observed sites excluded) and the names of the
    sites whose pair of terms was replaced by ``-KL(q || p)``.

    ``analytic_kl``: ``True`` for every site where it is sound (:func:`_analytic_kl_sites`),
    ``False`` for none, or an iterable of site names (each still checked).
    """
    wanted = analytic_kl if isinstance(analytic_kl, bool) else set(analytic_kl)
    kl_sites = _analytic_kl_sites(model_trace, guide_trace, wanted)
    # log-densities only where no KL replaces them (already computed ones are kept)
    model_trace.compute_log_prob(lambda name, site: name not in kl_sites)
    guide_trace.compute_log_prob(lambda name, site: is_latent_site(site) and name not in kl_sites)
    terms: list[Term] = []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in kl_sites:
            kl = kl_divergence(guide_trace.nodes[name]["fn"], site["fn"])
            terms.append(Term(name, -_scale_and_mask(kl, site), _data_dim(site), plates=_plates(site)))
        else:
            terms.append(Term(name, site["log_prob"], _data_dim(site), plates=_plates(site)))
    for name, site in guide_trace.nodes.items():
        if is_latent_site(site) and name not in kl_sites:
            terms.append(Term(name, -site["log_prob"], _data_dim(site), is_enumerated_site(site), _plates(site)))
    return terms, kl_sites


def enumerated_log_q(guide_trace: Trace) -> Optional[torch.Tensor]:
    """``log q`` of the joint value of all enumerated guide sites (unscaled), or ``None``."""
    logs = [site["unscaled_log_prob"] for site in guide_trace.nodes.values() if is_latent_site(site) and is_enumerated_site(site)]
    return sum(logs[1:], logs[0]) if logs else None


def check_reparameterized(guide_trace: Trace, purpose: str = "this loss") -> None:
    """Every latent guide site must be reparameterised or enumerated where ``purpose``
    differentiates through samples and has no score-function estimator (the IWAE bound, a
    classifier's cross-entropy; :class:`~pyrodgm.losses.SemiSupervisedELBO` has one)."""
    sampled = score_function_sites(guide_trace)
    if sampled:
        raise ValueError(
            f"guide site '{sampled[0]}' ({type(guide_trace.nodes[sampled[0]]['fn']).__name__}) is neither (fully) "
            f"reparameterizable nor enumerated, and {purpose} has no score-function estimator: mark it "
            "infer={'enumerate': 'parallel'} or use a relaxed distribution such as RelaxedOneHotCategorical"
        )


def fast_path_problem(guide_trace: Trace, terms: Iterable[Term]) -> Optional[str]:
    """Why :meth:`TraceTerms.elbo` cannot weigh the terms with the joint guide probability
    of the enumerated sites (its fast path), or ``None`` when it can: every guide site
    reparameterised or enumerated, every enumerated site summed exhaustively on a dim of
    its own (:func:`enumeration_problem`), and every term that depends on an enumerated
    site inside all the plates of every enumerated site (else its expectation needs the
    enumerated sites' marginal in fewer plates: a global enumerated site beside
    per-datapoint ones)."""
    sampled = score_function_sites(guide_trace)
    if sampled:
        return f"guide sites {sampled} are discrete and not enumerated (score-function terms)"
    problem = enumeration_problem(guide_trace)
    if problem:
        return problem
    enumerated = [site for site in guide_trace.nodes.values() if is_latent_site(site) and is_enumerated_site(site)]
    if not enumerated:
        return None
    enum_plates = frozenset().union(*(_plates(site) for site in enumerated))
    enum_dims = {site["infer"]["_enumerate_dim"] for site in enumerated}
    for term in terms:
        if not enum_plates <= term.plates and _has_size_above_one(term.value, enum_dims):
            return (
                f"site '{term.name}' depends on an enumerated site and lies outside plate(s) "
                f"{sorted(enum_plates - term.plates)} of the enumerated sites"
            )
    return None


def _has_size_above_one(value: torch.Tensor, dims: Iterable[int]) -> bool:
    """Whether ``value`` has a dim of size > 1 at one of ``dims`` (enumeration dims)."""
    return any(-dim <= value.dim() and value.shape[dim] > 1 for dim in dims)


class TraceTerms:
    """The log-weight terms of one (model, guide) trace pair, with the reductions the
    losses and the evaluator need.

    Every term is laid out as ``(enum dims..., particles, plates...)`` where the particle
    plate sits at dim ``-(plate_nesting + 1)``.  :meth:`elbo` weighs the terms with the
    joint guide probability of the enumerated sites where that is exact
    (:func:`fast_path_problem`); every other guide structure is contracted by Pyro's own
    machinery (:mod:`pyrodgm.contraction`), and :attr:`fast_path_problem` says why.

    :param int plate_nesting: plate dims of the model, excluding the particle plate.
    :param analytic_kl: see :func:`log_weight_terms`.
    """

    def __init__(
        self,
        model_trace: Trace,
        guide_trace: Trace,
        plate_nesting: int,
        analytic_kl: bool | Iterable[str] = False,
    ) -> None:
        self.model_trace = model_trace
        self.guide_trace = guide_trace
        self.plate_nesting = plate_nesting
        self.terms, self.kl_sites = log_weight_terms(model_trace, guide_trace, analytic_kl)
        if is_validation_enabled():  # every site's shape, a KL pair's on the KL term that replaces it
            for trace in (model_trace, guide_trace):  # sites with no term yet (guide-observed ones)
                trace.compute_log_prob(lambda name, site: name not in self.kl_sites)
            kl_terms = {term.name: term.value for term in self.terms if term.name in self.kl_sites}
            values = {(is_model, name): kl for name, kl in kl_terms.items() for is_model in (True, False)}
            check_site_shapes(model_trace, guide_trace, plate_nesting + 1, values)
        self.num_particles = _plate_size(model_trace, PARTICLE_PLATE) or 1
        self.fast_path_problem = fast_path_problem(guide_trace, self.terms)
        log_q = None if self.fast_path_problem else enumerated_log_q(guide_trace)
        self.enum_weight = None if log_q is None else log_q.exp()

    def elbo(self) -> torch.Tensor:
        """The ELBO of the trace pair (a scalar): enumerated sites summed exactly with their
        guide probabilities, mean over particles, sum over everything else.  Where the
        fast path does not apply, Pyro's estimator for the structure: Dice contraction as in
        :class:`~pyro.infer.TraceEnum_ELBO`, or :class:`~pyro.infer.TraceGraph_ELBO`'s
        surrogate where a guide site asks for a baseline (with Monte Carlo terms only:
        TraceGraph has no analytic KL)."""
        if self.fast_path_problem is None:
            return sum(self._particle_mean(self._enum_expectation(term)).sum() for term in self._merged_terms())
        if baseline_sites(self.guide_trace):
            return tracegraph_elbo(self.model_trace, self.guide_trace, self.num_particles)
        kl_terms = {term.name: term.value for term in self.terms if term.name in self.kl_sites}
        return dice_elbo(self.model_trace, self.guide_trace, kl_terms, self.num_particles, self.plate_nesting)

    def _require_fast_path(self, purpose: str) -> None:
        if self.fast_path_problem is not None:
            raise ValueError(
                f"{purpose} needs every guide site reparameterised or enumerated exhaustively on a dim of its own, and "
                f"every term inside the plates of the enumerated sites; here {self.fast_path_problem}"
            )

    def _merged_terms(self) -> list[Term]:
        """The terms with those of one shape added up first (the ELBO is linear in them):
        one enumeration expectation, particle mean and sum per shape instead of per site."""
        merged: dict[tuple, Term] = {}
        for term in self.terms:
            key = (tuple(term.value.shape), term.data_dim)
            if key in merged:
                previous = merged[key]
                merged[key] = Term(f"{previous.name}+{term.name}", previous.value + term.value, term.data_dim)
            else:
                merged[key] = term
        return list(merged.values())

    def elbo_per_datapoint(self) -> torch.Tensor:
        """The ELBO integrand as a ``(particles, batch)`` tensor, enumerated sites summed
        exactly.  Every site must be local to the data plate."""
        self._require_fast_path("a per-datapoint ELBO")
        shape = (self.num_particles, self.batch_size)
        return sum(self._collapse_plates(term, self._enum_expectation(term)).expand(shape) for term in self.terms)

    def importance_log_weights(self) -> torch.Tensor:
        """``log sum_y p(x, y, z) / q(z, ... | x, y)`` per particle and datapoint, shape
        ``(particles, batch)``: the enumerated sites are summed exactly (their guide
        probabilities do not enter: the sum over ``y`` is exact, not sampled), so each
        particle's weight is an unbiased estimate of ``p(x)``.  Every site must be local to
        the data plate."""
        if self.kl_sites:
            raise ValueError("importance weights need log-densities, not analytic KL terms")
        problem = enumeration_problem(self.guide_trace)
        if problem:
            raise ValueError(f"importance weights sum each enumerated guide site exhaustively on a dim of its own; here {problem}")
        for name, site in self.guide_trace.nodes.items():
            if is_latent_site(site) and is_enumerated_site(site) and _plates(site) != {DATA_PLATE}:
                raise ValueError(
                    f"guide site '{name}' is enumerated in plates {sorted(_plates(site))}: importance weights sum an "
                    f"enumerated site inside each weight, so it must be local to pyro.plate('{DATA_PLATE}', ...) and no other plate"
                )
        terms = [term for term in self.terms if not term.enumerated_guide]
        total = sum(self._collapse_plates(term, term.value) for term in terms)
        enum_dims = total.dim() - 2
        if enum_dims > 0:
            total = total.logsumexp(dim=tuple(range(enum_dims)))
        return total.expand(self.num_particles, self.batch_size)

    @property
    def batch_size(self) -> int:
        size = _plate_size(self.model_trace, DATA_PLATE)
        if size is None:
            raise ValueError(f"no sample site of the model is inside pyro.plate('{DATA_PLATE}', ...)")
        return size

    # ---- shape helpers ------------------------------------------------------------------
    def _enum_expectation(self, term: Term) -> torch.Tensor:
        """``sum_y q(y) * term`` over the enumerated dims, or the term itself when it does
        not depend on an enumerated site (the fast path's structure is checked first:
        :func:`fast_path_problem`)."""
        value = term.value
        enum_dims = value.dim() - (self.plate_nesting + 1)
        if self.enum_weight is None or enum_dims <= 0 or all(s == 1 for s in value.shape[:enum_dims]):
            return value
        weighted = self.enum_weight * value
        return weighted.sum(dim=tuple(range(weighted.dim() - (self.plate_nesting + 1))))

    def _particle_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over the particle dim (a term constant across particles is kept once)."""
        dim = -(self.plate_nesting + 1)
        return value.mean(dim) if value.dim() >= -dim else value

    def _collapse_plates(self, term: Term, value: torch.Tensor) -> torch.Tensor:
        """Sum every plate dim but the data plate: ``(enum..., particles, batch)``."""
        if term.data_dim is None:
            raise ValueError(
                f"site '{term.name}' is outside pyro.plate('{DATA_PLATE}', ...): a per-datapoint "
                "value (IWAE, classification) needs every sample site inside the data plate"
            )
        width = self.plate_nesting + 1
        if value.dim() < width:
            value = value.reshape((1,) * (width - value.dim()) + tuple(value.shape))
        other = tuple(d for d in range(-self.plate_nesting, 0) if d != term.data_dim)
        value = value.sum(dim=other, keepdim=True) if other else value
        keep = value.shape[: value.dim() - width] + (value.shape[-width], value.shape[term.data_dim])
        return value.reshape(keep)


def _plate_size(trace: Trace, plate: str) -> Optional[int]:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == plate:
                return frame.size
    return None


def logmeanexp(value: torch.Tensor, dim: int) -> torch.Tensor:
    """``log mean exp`` along ``dim``, computed stably (a dim of size 1 is just dropped)."""
    if value.shape[dim] == 1:
        return value.squeeze(dim)
    return value.logsumexp(dim) - math.log(value.shape[dim])
