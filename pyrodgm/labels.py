r"""The discrete label site of the semi-supervised models: summed out exactly by enumeration,
or relaxed with the Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017), plain or
straight-through.  One switch, :class:`RelaxableLabel`, shared by every guide that offers it
(:class:`~pyrodgm.guides.M2Guide`, :class:`~pyrodgm.guides.gmvae.GMVAEGuide`).

``label_mode``:

* ``"enumerate"``: ``q(y|x)`` is a :class:`~pyro.distributions.OneHotCategorical` marked for
  parallel enumeration; the loss sums over the classes exactly (Kingma et al. 2014, eq. 7).
* ``"relaxed"``: ``y`` is a reparameterised sample of a Gumbel-softmax
  (:class:`RelaxedLabel`, a :class:`~pyro.distributions.RelaxedOneHotCategorical`) at the
  guide's ``temperature``: a point of the simplex, one decoder pass instead of ``K``.
* ``"straight-through"``: the sample is the one-hot argmax of the relaxed one in the forward
  pass and the relaxed one in the backward pass (:class:`StraightThroughLabel`, a
  :class:`~pyro.distributions.RelaxedOneHotCategoricalStraightThrough`).

**What the model's p(y) site must be, and where L_C comes from.**  The bound of the GMVAE
(Arias Figueroa 2019, eq. 7) keeps the *categorical* KL, :math:`\mathcal L_C =
\mathrm{KL}(q(y|\hat x)\,\|\,p(y))`; the Gumbel-softmax only replaces the sample that feeds
``q(z|x, y)``, ``p(z|y)`` and the decoder.  A relaxed sample is not in the support of a
one-hot categorical, so its ``log_prob`` there is meaningless (and fails Pyro's validation),
and the relaxed density has no KL to a discrete prior.  So:

1. This module registers with :func:`torch.distributions.kl.register_kl` the KL of
   (:class:`RelaxedLabel` or :class:`StraightThroughLabel`) against any
   :class:`~torch.distributions.OneHotCategorical` as the KL of the categoricals behind them,
   :math:`\sum_k q_k (\log q_k - \log \pi_k)`.  pyrodgm's losses use a registered closed
   form where it is sound (:func:`pyrodgm.traces._analytic_kl_sites`: the guide site is
   reparameterised, not enumerated, and the model samples no latent before ``y`` that the
   guide samples after it; true of ``p(y)`` at the top of every model here), so the
   ``y`` term of the ELBO *is* :math:`-\mathcal L_C`, scaled by ``latent_weights["y"]``
   (:math:`w_C`) like any latent.  The registration is narrow on the guide side (only the
   two classes of this module), so no other code's ``kl_divergence`` changes meaning.
2. The model's ``p(y)`` is a :class:`LabelPrior`: a one-hot categorical whose support is the
   simplex, so a relaxed value validates; its ``log_prob`` is the linear extension
   :math:`\sum_k y_k \log \pi_k`, equal to the usual one at a one-hot value (labelled data,
   straight-through samples).  It enters the loss only where the analytic KL is off
   (``analytic_kl=False``), where a relaxed ``y`` gives a surrogate, not a bound: keep the
   analytic KL on with the relaxed modes.  The IWAE evaluator uses log-densities, so
   evaluate relaxed-mode guides with ``label_mode = "enumerate"`` (the categorical model the
   relaxation trains).
3. :class:`RelaxedLabel`/:class:`StraightThroughLabel` evaluate ``log_prob`` at values
   clamped into the open simplex, so an *observed* one-hot label (the labelled rows of
   :class:`~pyrodgm.losses.SemiSupervisedELBO`) and a sample that underflowed to a vertex
   have a finite relaxed log-density (unused by the loss, but computed by Pyro's trace).

References

[1] `Categorical Reparameterization with Gumbel-Softmax`, Eric Jang, Shixiang Gu, Ben Poole
    (2017)
[2] `The Concrete Distribution`, Chris J. Maddison, Andriy Mnih, Yee Whye Teh (2017)
[3] `Semi-supervised Learning using Deep Generative Models and Auxiliary Tasks`,
    Jhosimar Arias Figueroa (2019)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions.utils import clamp_probs
from torch.distributions import constraints
from torch.distributions.kl import register_kl

__all__ = ["LABEL_MODES", "LabelPrior", "RelaxableLabel", "RelaxedLabel", "StraightThroughLabel", "label_distribution"]

#: The accepted values of ``label_mode``.
LABEL_MODES: tuple[str, ...] = ("enumerate", "relaxed", "straight-through")


class _ClampedLogProb:
    """``log_prob`` of a Gumbel-softmax at its value clamped into the open simplex."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = getattr(value, "_unquantize", value)
        if self._validate_args:
            self._validate_sample(value)
        log_value = clamp_probs(value).log()
        return self.base_dist.log_prob(log_value) - log_value.sum(-1)


class RelaxedLabel(_ClampedLogProb, dist.RelaxedOneHotCategorical):
    """The Gumbel-softmax of ``label_mode="relaxed"``: a
    :class:`~pyro.distributions.RelaxedOneHotCategorical` with a finite ``log_prob`` at the
    simplex's vertices and the categorical KL to a one-hot prior (module docstring)."""


class StraightThroughLabel(_ClampedLogProb, dist.RelaxedOneHotCategoricalStraightThrough):
    """The straight-through Gumbel-softmax of ``label_mode="straight-through"``."""


class LabelPrior(dist.OneHotCategorical):
    """``p(y)``: a one-hot categorical that also accepts points of the simplex (relaxed
    labels), with ``log_prob(y) = sum_k y_k log pi_k`` (the usual value at a one-hot ``y``)."""

    support = constraints.simplex

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (value * self.logits).sum(-1)  # torch stores the logits normalised


def _categorical_kl(q: dist.RelaxedOneHotCategorical, p: torch.distributions.OneHotCategorical) -> torch.Tensor:
    log_q, log_p = q.logits, p.logits  # torch stores both normalised
    return (log_q.exp() * (log_q - log_p)).sum(-1)


register_kl(RelaxedLabel, torch.distributions.OneHotCategorical)(_categorical_kl)
register_kl(StraightThroughLabel, torch.distributions.OneHotCategorical)(_categorical_kl)


def _check_mode(label_mode: str) -> str:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {label_mode!r}")
    return label_mode


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"the Gumbel-softmax temperature must be positive and finite, got {temperature}")
    return temperature


def label_distribution(logits: torch.Tensor, label_mode: str = "enumerate", temperature: float = 1.0) -> dist.TorchDistribution:
    """``q(y|.)`` with ``logits`` for ``label_mode``: a one-hot categorical
    (``"enumerate"``), :class:`RelaxedLabel` or :class:`StraightThroughLabel`."""
    if _check_mode(label_mode) == "enumerate":
        return dist.OneHotCategorical(logits=logits)
    cls = RelaxedLabel if label_mode == "relaxed" else StraightThroughLabel
    tau = torch.as_tensor(_check_temperature(temperature), dtype=logits.dtype, device=logits.device)
    return cls(tau, logits=logits)


class RelaxableLabel:
    """Mixin for guides with a label site: the attributes ``label_mode`` (one of
    :data:`LABEL_MODES`) and ``temperature`` (of the Gumbel-softmax), both checked when set
    and free to change between steps (a schedule anneals the temperature), and
    :meth:`sample_label`.  Plain attributes, not buffers: a guide's ``state_dict`` is the same
    in every mode."""

    _label_mode: str = "enumerate"
    _temperature: float = 1.0

    @property
    def label_mode(self) -> str:
        return self._label_mode

    @label_mode.setter
    def label_mode(self, value: str) -> None:
        self._label_mode = _check_mode(value)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_temperature(value)

    def sample_label(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        """Sample (or mark for enumeration) the label site ``name`` of ``q(y|.)`` with
        ``logits``, as :attr:`label_mode` says."""
        fn = label_distribution(logits, self.label_mode, self.temperature)
        infer = {"enumerate": "parallel"} if self.label_mode == "enumerate" else {}
        return pyro.sample(name, fn, infer=infer)
