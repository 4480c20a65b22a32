r"""The semi-supervised ELBO of Kingma et al. (2014), for any model/guide pair.

For a labelled pair :math:`(x, y)` the bound is (Kingma et al. 2014, eq. 6)

.. math:: -\mathcal L(x, y) = \mathbb E_{q(z|x,y)}[\log p(x|y,z) + \log p(y) + \log p(z) - \log q(z|x,y)]

and for an unlabelled :math:`x` the label is summed out exactly (eq. 7)

.. math:: -\mathcal U(x) = \sum_y q(y|x)\,(-\mathcal L(x, y)) + \mathcal H(q(y|x)).

The loss of a batch is (eq. 9, per example)

.. math:: \mathcal J^\alpha = \sum_{(x,y)} \mathcal L(x,y) + \sum_x \mathcal U(x)
          + \alpha \sum_{(x,y)} -\log \bar q(y|x),

where :math:`\bar q(y|x) = \mathbb E_{q(\cdot|x)}[q(y|\cdot, x)]` is the classifier averaged
over whatever the guide samples before ``y`` (the auxiliary ``a`` of the ADGM, Maaløe et al.
2016, eq. 10), estimated with the loss's particles.  ``alpha`` is a weight *per labelled
example*: Kingma et al.'s :math:`\alpha = 0.1 N` on the mean over the :math:`N_l` labelled
examples is ``alpha = 0.1 * N / N_l`` here.

References

[1] `Semi-Supervised Learning with Deep Generative Models`,
    Diederik P. Kingma, Danilo J. Rezende, Shakir Mohamed, Max Welling (2014)
[2] `Auxiliary Deep Generative Models`,
    Lars Maaløe, Casper K. Sønderby, Søren K. Sønderby, Ole Winther (2016)
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, Optional

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites

from ..contraction import has_score_function, is_latent_site
from ..traces import (
    DATA_PLATE,
    _data_dim,
    MaskLabels,
    MaskRows,
    ObserveLabels,
    ScaleLatents,
    TraceTerms,
    check_reparameterized,
    label_log_prob,
    label_range_error,
    logmeanexp,
    particle_traces,
    plate_nesting_of,
    site_distribution,
    trial_traces,
)
from ..modeling import register_programs, registered_once
from ..validation import UNLABELLED, check_labels
from .base import Loss, batch_tensor, call_key, publish

__all__ = [
    "SemiSupervisedELBO", "ClassifierCrossEntropy", "classifier_log_prob", "split_batch", "labelled_rows", "labelled_prefix",
]


#: The number of leading labelled rows declared by :func:`labelled_prefix`, or ``None``.
_LABELLED_PREFIX: ContextVar[Optional[int]] = ContextVar("pyrodgm_labelled_prefix", default=None)


@contextlib.contextmanager
def labelled_prefix(num_labelled: int) -> Iterator[None]:
    """Within the block, the batches given to the losses have a fixed layout: their first
    ``num_labelled`` rows are labelled, the others unlabelled (``-1``), as
    :class:`~pyrodgm.data.SemiSupervisedBatches` lays them out.  :func:`split_batch` then
    slices instead of selecting rows by a boolean mask, which reads the labels back to the
    host and gives shapes that depend on the data; the slices have fixed shapes and need no
    synchronisation, as a step captured in a CUDA graph requires (:mod:`pyrodgm.graphs`).
    The labels are *not* looked at to confirm the layout: whoever declares it checks it
    (:class:`~pyrodgm.graphs.StaticStep` does, on the device)."""
    if not isinstance(num_labelled, int) or isinstance(num_labelled, bool) or num_labelled < 0:
        raise ValueError(f"num_labelled must be a non-negative integer, got {num_labelled!r}")
    token = _LABELLED_PREFIX.set(num_labelled)
    try:
        yield
    finally:
        _LABELLED_PREFIX.reset(token)


def split_batch(labels: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple, dict, torch.Tensor]:
    """Split every tensor argument whose first dim is the batch into its labelled rows
    (``labels != -1``) and unlabelled rows.  Returns ``(args_l, kwargs_l, args_u, kwargs_u,
    labels_l)``.  Within :func:`labelled_prefix` the first rows are the labelled ones."""
    batch = labels.shape[0]
    prefix = _LABELLED_PREFIX.get()
    if prefix is not None:
        if prefix > batch:
            raise ValueError(f"the batch has {batch} rows, fewer than the {prefix} labelled rows its layout declares")
        labelled, unlabelled = slice(0, prefix), slice(prefix, batch)
    else:
        labelled = labels != UNLABELLED
        unlabelled = ~labelled

    def take(value, rows):
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
            return value[rows if isinstance(rows, slice) else rows.to(value.device)]
        return value

    args_l = tuple(take(a, labelled) for a in args)
    args_u = tuple(take(a, unlabelled) for a in args)
    kwargs_l = {k: take(v, labelled) for k, v in kwargs.items()}
    kwargs_u = {k: take(v, unlabelled) for k, v in kwargs.items()}
    return args_l, kwargs_l, args_u, kwargs_u, labels[labelled]


def classifier_log_prob(terms: TraceTerms, label_site: str, labels: torch.Tensor) -> torch.Tensor:
    r"""``log E_q[q(y=labels | ..., x)]`` per datapoint, from a guide trace in which the label
    site was observed: the guide's categorical at that site, averaged over the particles of
    everything sampled before it."""
    site = terms.guide_trace.nodes.get(label_site)
    if site is None:
        raise ValueError(f"the guide has no site '{label_site}' to classify with")
    return particle_mean_log_prob(site["fn"], labels)


def particle_mean_log_prob(fn, labels: torch.Tensor) -> torch.Tensor:
    """``log mean_particles q(y=labels)`` per datapoint for a categorical ``fn`` of batch
    shape ``(particles..., batch)``."""
    log_q = label_log_prob(fn, labels).reshape(-1, labels.shape[0])
    return logmeanexp(log_q, dim=0)


class _TracingLoss(Loss):
    """Shared tracing for the ELBO-type losses: plate nesting guessed once, particles
    vectorised, the guide's discrete sites enumerated.  The first call makes one trial run
    (:func:`~pyrodgm.traces.trial_traces`, which draws no random numbers) to guess the
    plate nesting if it is not given and to see whether a guide site asks for a baseline;
    then the guide's non-reparameterised values are provenance-tracked, as
    :class:`~pyro.infer.TraceGraph_ELBO` tracks them."""

    def __init__(self, num_particles: int, max_plate_nesting: float, analytic_kl, latent_weights: Optional[dict] = None) -> None:
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.analytic_kl = analytic_kl
        self.latent_weights: dict[str, float] = dict(latent_weights or {})
        self._track_provenance: Optional[bool] = None
        self._global_latents: list[str] = []

    def _plate_nesting(self, model: Optional[Callable], guide: Callable, args: tuple, kwargs: dict) -> int:
        """``max_plate_nesting``, guessed from one trial run on the first call if not given."""
        if self.max_plate_nesting == float("inf") or self._track_provenance is None:
            traces = trial_traces(model if self.max_plate_nesting == float("inf") else None, guide, args, kwargs)
            if self.max_plate_nesting == float("inf"):
                self.max_plate_nesting = plate_nesting_of(traces)
            self._track_provenance = _asks_for_baseline(traces[0])
            self._global_latents = _global_latents(traces[0])
        return int(self.max_plate_nesting)

    def _terms(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> TraceTerms:
        if self.latent_weights:
            model, guide = ScaleLatents(self.latent_weights)(model), ScaleLatents(self.latent_weights)(guide)
        nesting = self._plate_nesting(model, guide, args, kwargs)
        with TrackNonReparam() if self._track_provenance else contextlib.nullcontext():
            model_trace, guide_trace = particle_traces(model, guide, args, kwargs, self.num_particles, nesting, compute_log_prob=False)
        return TraceTerms(model_trace, guide_trace, nesting, self.analytic_kl)

    def _labelled_terms(self, model, guide, args, kwargs, label_site: str, labels: torch.Tensor) -> TraceTerms:
        in_model, in_guide = ObserveLabels.for_programs(label_site, labels)
        terms = self._terms(in_model(model), in_guide(guide), args, kwargs)
        in_model.check()
        in_guide.check()
        if not in_model.seen:
            raise ValueError(f"labels were given but the model has no sample site '{label_site}'")
        return terms


class SemiSupervisedELBO(_TracingLoss):
    r"""The semi-supervised ELBO :math:`\mathcal J^\alpha` (module docstring) as an SVI loss.

    Call it like any Pyro loss; labels travel as the keyword argument named ``label_site``
    (``svi.step(x, y=labels)``) with ``-1`` for unlabelled rows.  The rows are split: the
    labelled ones run with the label site observed in both model and guide (the model and
    guide are called *without* the label keyword), the unlabelled ones with the guide's
    discrete sites enumerated in parallel and summed exactly.  Every tensor argument whose
    first dim is the batch is split the same way.  Without labels (``y`` absent or
    ``None``) this is the plain ELBO with enumerated sites summed exactly: what
    :class:`~pyro.infer.TraceEnum_ELBO` computes for guide-side enumeration, equal in
    expectation (the closed-form KL replaces Monte Carlo terms where sound), and with
    ``analytic_kl=False`` and one particle the same number for the same noise.  Every enumerated guide site needs an enumeration dim
    of its own (:func:`~pyrodgm.traces.check_enumeration_dims`: a guide whose
    :func:`pyro.markov` recycles dims is refused).

    :param int num_particles: vectorised particles (samples of the continuous latents).
    :param float alpha: weight per labelled example of :math:`-\log \bar q(y|x)`.
    :param str label_site: the name of the label site (and of the labels' keyword).
    :param analytic_kl: use the closed-form KL where it is sound (``True``), nowhere
        (``False``), or only at the named sites.
    :param max_plate_nesting: plate dims of the model; guessed on the first call if omitted.
    :param latent_weights: site name -> weight of that latent's ``log p - log q`` (its KL
        term): KL warm-up, or the GMVAE's ``w_G``/``w_C``.  The attribute of the same name
        may be changed between steps (an epoch schedule does).  Labelled rows observe the
        label site, so its weight applies to unlabelled rows only.
    :param bool labelled_elbo: add the bound :math:`-\mathcal L(x, y)` of the labelled rows
        (Kingma et al.).  ``False``: labelled rows add only the ``alpha`` term, so the
        bound covers the unlabelled rows alone (CaGeM's objective, Maaløe et al. 2017,
        App. B, whose labelled data train only the classifiers).
    :param str label_rows: how a labelled batch reaches the programs.  ``"split"``: the
        labelled and unlabelled rows run apart (the labelled ones with the label observed,
        not enumerated: the fastest).  ``"mask"``: the whole batch runs once, the label
        site enumerated for every row, the labelled rows' terms weighed with the indicator
        of their label (:class:`~pyrodgm.traces.MaskLabels`): the same objective, for
        guides whose data plate must keep its size, such as autoguides (one parameter per
        datapoint), at the cost of every class on the labelled rows too.  ``"auto"``
        (default): ``"mask"`` for a :class:`~pyro.infer.autoguide.AutoGuide` (wrapped in handlers such as
        :func:`~pyro.infer.config_enumerate` or not) and for a guide with latent sites
        outside the data plate (the split would draw them twice: ``"split"`` refuses
        those), else ``"split"``.
        With ``"mask"``, :attr:`last_components` has one ``"elbo"`` for both kinds of row.
    """

    def __init__(
        self,
        num_particles: int = 1,
        alpha: float = 0.0,
        label_site: str = "y",
        analytic_kl: bool | Iterable[str] = True,
        max_plate_nesting: float = float("inf"),
        latent_weights: Optional[dict[str, float]] = None,
        labelled_elbo: bool = True,
        label_rows: str = "auto",
    ) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if label_rows not in ("auto", "split", "mask"):
            raise ValueError(f"label_rows must be 'auto', 'split' or 'mask', got {label_rows!r}")
        super().__init__(num_particles, max_plate_nesting, analytic_kl, latent_weights)
        self.alpha = float(alpha)
        self.label_site = label_site
        self.labelled_elbo = bool(labelled_elbo)
        self.label_rows = label_rows

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        with registered_once():  # the labelled and unlabelled runs register the parameters once
            register_programs(model, guide)  # here, outside the runs' traces
            return self._loss(model, guide, args, kwargs)

    def _loss(self, model, guide, args: tuple, kwargs: dict) -> torch.Tensor:
        labels: Optional[torch.Tensor] = kwargs.pop(self.label_site, None)
        self.last_components = {}
        if labels is None:
            terms = self._terms(model, guide, args, kwargs)
            publish(whole_batch_guide_trace_key(guide, args, kwargs, self.num_particles), terms.guide_trace)
            return -self._record("unlabelled_elbo", terms.elbo())
        _check_batch_labels(labels, args, kwargs)
        if self._masks_rows(model, guide, args, kwargs):
            return self._masked_loss(model, guide, args, kwargs, labels)
        args_l, kwargs_l, args_u, kwargs_u, labels_l = split_batch(labels, args, kwargs)
        loss = torch.zeros((), device=labels.device)
        if labels_l.numel() and (self.labelled_elbo or self.alpha):
            terms = self._labelled_terms(model, guide, args_l, kwargs_l, self.label_site, labels_l)
            if self.labelled_elbo:
                loss = loss - self._record("labelled_elbo", terms.elbo())
            if self.alpha:
                nll = -classifier_log_prob(terms, self.label_site, labels_l).sum()
                loss = loss + self.alpha * self._record("classification", nll)
        if labels_l.numel() < labels.numel():
            loss = loss - self._record("unlabelled_elbo", self._terms(model, guide, args_u, kwargs_u).elbo())
        return loss

    def _masks_rows(self, model, guide, args: tuple, kwargs: dict) -> bool:
        """Whether the labelled rows are masked in (else split off): ``label_rows``, and
        for ``"auto"`` the guide (an autoguide) and its global latent sites, which the
        split would draw twice, once for each kind of row."""
        self._plate_nesting(model, guide, args, kwargs)  # the first call's trial run finds the global latents
        if self.label_rows == "split" and self._global_latents:
            raise ValueError(
                f"guide sites {self._global_latents} lie outside pyro.plate('{DATA_PLATE}', ...): label_rows='split' runs "
                "the labelled and unlabelled rows apart and would draw them once for each; use label_rows='mask' "
                "(the default 'auto' does)"
            )
        return self.label_rows == "mask" or (
            self.label_rows == "auto" and (isinstance(poutine.unwrap(guide), AutoGuide) or bool(self._global_latents))
        )

    def _masked_loss(self, model, guide, args: tuple, kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the whole batch in one run, labelled rows masked in
        (``label_rows="mask"``)."""
        labelled = labels != UNLABELLED
        in_guide = MaskLabels(self.label_site, labels)
        guide = in_guide(guide)
        if not self.labelled_elbo:
            model, guide = MaskRows(~labelled)(model), MaskRows(~labelled)(guide)
        terms = self._terms(model, guide, args, kwargs)
        in_guide.check()
        if in_guide.base_fn is None:
            raise ValueError(f"labels were given but the guide has no sample site '{self.label_site}'")
        if self.label_site not in terms.model_trace.nodes:
            raise ValueError(f"labels were given but the model has no sample site '{self.label_site}'")
        loss = -self._record("elbo", terms.elbo())
        if self.alpha:
            log_q = particle_mean_log_prob(in_guide.base_fn, labels.clamp(min=0))
            nll = -torch.where(labelled, log_q, torch.zeros((), dtype=log_q.dtype, device=log_q.device)).sum()
            loss = loss + self.alpha * self._record("classification", nll)
        return loss

    def _record(self, name: str, value: torch.Tensor) -> torch.Tensor:
        self.last_components[name] = value.detach()
        return value


class ClassifierCrossEntropy(_TracingLoss):
    r""":math:`\sum_{(x,y)} -\log \bar q(y|x)` over the labelled rows, with
    :math:`\bar q(y|x)` the guide's classifier averaged over the particles of whatever the
    guide samples before the label (Maaløe et al. 2016, eq. 10).  Unlabelled rows (``-1``)
    are ignored.  Only the guide runs, and only up to its label site
    (:func:`~pyrodgm.traces.site_distribution`): nothing after the label, and nothing of
    the model, enters the value.  Combine it with other terms in
    :class:`~pyrodgm.losses.WeightedSum` (with ``params=`` to restrict which parameters it
    trains, as CaGeM does)."""

    def __init__(self, num_particles: int = 1, label_site: str = "y", max_plate_nesting: float = float("inf")) -> None:
        super().__init__(num_particles, max_plate_nesting, analytic_kl=False)
        self.label_site = label_site

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        args_l, kwargs_l, labels_l = labelled_rows(type(self).__name__, self.label_site, args, kwargs)
        nesting = self._plate_nesting(None, guide, args_l, kwargs_l)
        with poutine.trace() as before_label:  # what the guide samples before its label
            fn = site_distribution(guide, args_l, kwargs_l, self.label_site, self.num_particles, nesting, role="guide")
        check_reparameterized(prune_subsample_sites(before_label.trace), type(self).__name__)
        if is_validation_enabled():
            error = label_range_error(labels_l, fn, self.label_site)
            if error:
                raise ValueError(error)
        value = -particle_mean_log_prob(fn, labels_l).sum()
        self.last_components = {"classification": value.detach()}
        return value


def whole_batch_guide_trace_key(guide: Callable, args: tuple, kwargs: dict, num_particles: int) -> tuple:
    """The key under which :class:`SemiSupervisedELBO` offers the guide trace of a batch
    without labels to the later terms of a :class:`~pyrodgm.losses.WeightedSum` (the
    metric losses read the features from it instead of running the guide again)."""
    return ("whole-batch guide trace", num_particles) + call_key(guide, args, kwargs)


def _global_latents(guide_trace) -> list[str]:
    """The latent sites of a guide trace outside the data plate."""
    return [name for name, site in guide_trace.nodes.items() if is_latent_site(site) and _data_dim(site) is None]


def _asks_for_baseline(guide_trace) -> bool:
    """Whether a latent site of an un-enumerated guide trace needs the score function
    (:func:`~pyrodgm.contraction.has_score_function`), is not marked for enumeration, and
    asks for a baseline."""
    return any(
        is_latent_site(site) and has_score_function(site["fn"])
        and not site["infer"].get("enumerate") and site["infer"].get("baseline")
        for site in guide_trace.nodes.values()
    )


def labelled_rows(loss_name: str, label_site: str, args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
    """The labelled rows of a batch whose labels travel as the keyword ``label_site``
    (popped from ``kwargs``): ``(args_l, kwargs_l, labels_l)``, with clear errors for missing
    labels and an empty labelled set."""
    labels = kwargs.pop(label_site, None)
    if labels is None:
        raise ValueError(f"{loss_name} needs labels as the keyword '{label_site}'")
    _check_batch_labels(labels, args, kwargs)
    args_l, kwargs_l, _, _, labels_l = split_batch(labels, args, kwargs)
    if not labels_l.numel():
        raise ValueError("the batch has an empty labelled set: every label is -1")
    return args_l, kwargs_l, labels_l


def _check_batch_labels(labels: torch.Tensor, args: tuple, kwargs: dict) -> None:
    """Type, shape and (while Pyro's validation is on) the lower bound of a batch's labels;
    the upper bound is checked at the label site, where the number of classes is known."""
    if not torch.is_tensor(labels) or labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex():
        check_labels(labels, num_classes=1)  # raises the TypeError naming the problem
    batch = _batch_size(args, kwargs, labels)
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"y must have shape [{batch}] (one label per row, -1 for unlabelled), got {tuple(labels.shape)}")
    if is_validation_enabled() and bool((labels < UNLABELLED).any()):
        bad = labels[labels < UNLABELLED].unique().tolist()
        raise ValueError(f"label(s) {bad} out of range: labels must be class indices, or -1 for unlabelled rows")


def _batch_size(args: tuple, kwargs: dict, labels: torch.Tensor) -> int:
    batch = batch_tensor(args, kwargs)
    return labels.shape[0] if batch is None else batch.shape[0]
