"""Hand-written pure-PyTorch losses of the same maths as pyrodgm's Pyro programs, for the
speed benchmark (``bench_speed.py``).  They reuse the Pyro model's and guide's networks and
draw their reparameterisation noise in the order Pyro draws it, so for the same seed they
compute the same number as :class:`pyrodgm.losses.SemiSupervisedELBO` (tested in
``tests/test_experiments.py``); the benchmark then times the abstraction, not the maths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, scale^2) || N(0, 1)) summed over the last dim."""
    return (0.5 * (loc.pow(2) + scale.pow(2)) - scale.log() - 0.5).sum(-1)


def _m2_bound(model, guide, x: torch.Tensor, y_one_hot: torch.Tensor) -> torch.Tensor:
    """``-L(x, y)`` (Kingma et al. 2014, eq. 6) with the closed-form KL, for one-hot labels
    of shape ``[..., B, K]`` broadcasting against ``x`` ``[B, D]``; one noise draw."""
    inputs = torch.cat([x.expand(y_one_hot.shape[:-1] + x.shape[-1:]), y_one_hot], -1)
    loc, scale = guide.encoder_head(guide.encoder(inputs))
    z = loc + scale * torch.randn_like(loc)
    logits = model.likelihood(model.decoder(torch.cat([z, y_one_hot], -1)))
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    return log_px - _gaussian_kl(loc, scale) - math.log(model.num_classes)


def m2_loss(model, guide, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Kingma et al.'s J^alpha for a batch with labels ``y`` (``-1``: unlabelled)."""
    labelled = y >= 0
    x_l, y_l, x_u = x[labelled], y[labelled], x[~labelled]
    num_classes = model.num_classes
    # labelled rows first, as SemiSupervisedELBO runs them: noise [1, B_l, Z]
    bound_l = _m2_bound(model, guide, x_l, F.one_hot(y_l, num_classes).to(x.dtype).unsqueeze(0))
    log_q_l = guide.classifier_head(guide.classifier(x_l)).log_softmax(-1)
    classification = -log_q_l.gather(-1, y_l.unsqueeze(-1)).sum()
    # unlabelled rows: every class at once, noise [K, 1, B_u, Z]
    eye = torch.eye(num_classes, dtype=x.dtype, device=x.device).reshape(num_classes, 1, 1, num_classes)
    bound_u = _m2_bound(model, guide, x_u, eye.expand(num_classes, 1, x_u.shape[0], num_classes)).squeeze(1)
    log_q_u = guide.classifier_head(guide.classifier(x_u)).log_softmax(-1).T  # [K, B_u]
    unlabelled = (log_q_u.exp() * (bound_u - log_q_u)).sum(0)
    return -(bound_l.sum() + unlabelled.sum()) + alpha * classification
