r"""A straight-through gradient from a generative loss into the classifier behind a
point-estimate label (the Conv-MMCVA authors' code, ``cdgm_x2y_xy2z_zy2x.py``).

In Conv-MMCVA the generative model sees the label as a one-hot vector: the given one on
labelled rows, :math:`\hat y = \arg\max_y F(y; x)` on unlabelled ones.  The argmax has no
gradient, so the bound :math:`\mathcal L_G` does not train the classifier.  The authors'
code adds a straight-through estimate of that gradient anyway, scaled by ``s``
(``-alpha_straight_through 3e-4`` for MNIST): with :math:`p_n = \mathrm{softmax}(F(\cdot;
x_n))` the classifier's parameters :math:`\theta` receive

.. math:: s \sum_n \sum_k \frac{\partial \mathcal L_G}{\partial y_{nk}}
          \frac{\partial p_{nk}}{\partial \theta}

on every row of the batch, labelled ones included (forward: scores -> argmax -> one-hot
-> bound; backward: the bound's gradient at the one-hot, through the softmax).

Here it is :class:`StraightThroughLabels`, a messenger on the label site that replaces
its value :math:`y` by :math:`y + s\,(p - \mathrm{sg}(p))` (``sg``: stop-gradient): the
same number, so every log-density and every other parameter's gradient is unchanged,
and the gradient above for :math:`\theta`.  The guide's messenger reads :math:`p` from the
site's distribution (its logits are the scores) and shares the offset with the model's,
so the encoder :math:`q(z|x,y)` and the decoder :math:`p(x|y,z)` both carry it, as both
take the one-hot in the authors' graph.  :class:`StraightThroughELBO` wraps a generative
loss (:class:`~pyrodgm.losses.SemiSupervisedELBO`) with the pair.

The authors' bound is a mean over the batch's ``B`` rows and ``s`` multiplies its
gradient; pyrodgm's is the sum (``B`` times theirs) and so is the whole objective, so the
same ``s`` gives the same relative weight.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from pyro.poutine.messenger import Messenger

from ..modeling import register_programs, registered_once
from .base import Loss

__all__ = ["StraightThroughLabels", "StraightThroughELBO"]


class StraightThroughLabels(Messenger):
    r"""Adds :math:`s\,(p - \mathrm{sg}(p))` to the value of the label site ``site``
    (module docstring), after every other handler has set it (sampled, observed or
    replayed): apply it innermost, directly around the program.

    :param str site: the label site.
    :param float scale: :math:`s`.
    :param str role: ``"guide"`` computes :math:`p` from the site's distribution (a
        categorical with ``logits``) and shares it; ``"model"`` adds the offset the guide's
        last run shared (nothing before the guide has run).
    :param dict shared: the state the model's and the guide's messenger share
        (:meth:`for_programs`).
    """

    def __init__(self, site: str, scale: float, role: str, shared: dict) -> None:
        super().__init__()
        if role not in ("model", "guide"):
            raise ValueError(f"role must be 'model' or 'guide', got {role!r}")
        self.site, self.scale, self.role, self.shared = site, float(scale), role, shared

    @classmethod
    def for_programs(cls, site: str, scale: float) -> tuple["StraightThroughLabels", "StraightThroughLabels"]:
        """The model's and the guide's messengers, sharing the offset."""
        shared: dict = {}
        return cls(site, scale, "model", shared), cls(site, scale, "guide", shared)

    def _pyro_post_sample(self, msg) -> None:
        if msg["name"] != self.site or msg["value"] is None:
            return
        if msg["infer"].get("_enumerate_dim") is not None:
            raise ValueError(f"the straight-through label gradient needs a point-estimate site '{self.site}', not an enumerated one")
        if self.role == "guide":
            self.shared["offset"] = self._offset(msg["fn"])
        offset = self.shared.get("offset")
        if offset is not None:
            msg["value"] = msg["value"] + offset.to(msg["value"].dtype)

    def _offset(self, fn) -> torch.Tensor:
        logits = getattr(fn, "logits", None)
        if logits is None:
            raise ValueError(f"the guide's site '{self.site}' has no logits ({type(fn).__name__}) to pass a gradient to")
        p = logits.softmax(-1)
        return self.scale * (p - p.detach())


class StraightThroughELBO(Loss):
    r"""``loss`` (a generative loss, e.g. :class:`~pyrodgm.losses.SemiSupervisedELBO`) with
    the straight-through label gradient of scale ``scale`` (module docstring): the same
    value, and :math:`s\,\partial\mathcal L/\partial y \cdot \partial p/\partial\theta`
    added to the gradient of the classifier behind the guide's label site.

    :param loss: the wrapped loss.
    :param float scale: :math:`s` (the authors': 3e-4); 0 gives ``loss`` unchanged.
    :param str label_site: the label site.
    """

    def __init__(self, loss: Loss, scale: float, label_site: str = "y") -> None:
        if not isinstance(loss, Loss):
            raise TypeError(f"StraightThroughELBO wraps a pyrodgm.losses.Loss, got {type(loss).__name__}")
        if not scale >= 0 or not math.isfinite(scale):
            raise ValueError(f"scale must be non-negative and finite, got {scale}")
        super().__init__()
        self.inner, self.scale, self.label_site = loss, float(scale), label_site

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        if self.scale:
            in_model, in_guide = StraightThroughLabels.for_programs(self.label_site, self.scale)
            with registered_once():
                register_programs(model, guide)  # the wrapped programs are no longer pyrodgm modules
                value = self.inner.differentiable_loss(in_model(model), in_guide(guide), *args, **kwargs)
        else:
            value = self.inner.differentiable_loss(model, guide, *args, **kwargs)
        self.last_components = dict(self.inner.last_components)
        return value
