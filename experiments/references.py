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


def _check_adgm(model, guide) -> None:
    if getattr(model, "auxiliary_prior", None) != "standard" or model.likelihood_kind != "bernoulli":
        raise ValueError("adgm_loss is written for ADGM(auxiliary_prior='standard', likelihood='bernoulli')")
    if guide.z_sees_a or guide.deterministic_auxiliary:
        raise ValueError("adgm_loss is written for ADGMGuide(z_sees_a=False, deterministic_auxiliary=False)")


def _adgm_auxiliary(guide, x: torch.Tensor, num_particles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a ~ q(a|x)`` with noise ``[P, B, A]`` (the particle plate at dim -2), the closed-form
    ``KL(q(a|x) || N(0, I))`` ``[B]`` and ``log q(y|a, x)`` ``[P, B, K]``."""
    loc, scale = guide.auxiliary.head(guide.auxiliary.net(x))
    a = loc + scale * torch.randn((num_particles,) + loc.shape, dtype=loc.dtype, device=loc.device)
    classifier_in = torch.cat([x.expand(a.shape[:-1] + x.shape[-1:]), a], -1)
    log_q_y = guide.classifier_head(guide.classifier(classifier_in)).log_softmax(-1)
    return a, _gaussian_kl(loc, scale), log_q_y


def _adgm_log_px(model, guide, x: torch.Tensor, y_one_hot: torch.Tensor, noise_shape: torch.Size):
    """``log p(x|y, z) - KL(q(z|y, x) || N(0, I)) + log p(y)`` with ``z = mu + sigma * eps``,
    ``eps`` of shape ``noise_shape + [Z]``; ``y_one_hot`` is ``[..., B, K]``, ``x`` ``[B, D]``."""
    inputs = torch.cat([x.expand(y_one_hot.shape[:-1] + x.shape[-1:]), y_one_hot], -1)
    loc, scale = guide.encoder.head(guide.encoder.net(inputs))
    z = loc + scale * torch.randn(noise_shape + loc.shape[-1:], dtype=loc.dtype, device=loc.device)
    logits = model.likelihood(model.decoder(torch.cat([z, y_one_hot.expand(z.shape[:-1] + y_one_hot.shape[-1:])], -1)))
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    return log_px - _gaussian_kl(loc, scale) - math.log(model.num_classes)


def adgm_loss(model, guide, x: torch.Tensor, y: torch.Tensor, alpha: float, num_particles: int = 1) -> torch.Tensor:
    """Maaløe et al.'s (2016) ADGM loss (eq. 7-11) with ``p(a) = N(0, I)``, for a batch with
    labels ``y`` (``-1``: unlabelled): ``-sum L(x, y) - sum U(x) + alpha * sum -log E_q(a|x)
    q(y|a, x)``, with ``num_particles`` vectorised samples of ``a`` (and of ``z`` per ``a``),
    the closed-form KLs at ``a`` and ``z``, and ``y`` summed exactly for unlabelled rows."""
    _check_adgm(model, guide)
    labelled = y >= 0
    x_l, y_l, x_u = x[labelled], y[labelled], x[~labelled]
    num_classes, loss = model.num_classes, x.new_zeros(())
    if x_l.shape[0]:  # labelled rows first, as SemiSupervisedELBO runs them: a [P, B_l, A], then z [P, B_l, Z]
        _, kl_a, log_q_y = _adgm_auxiliary(guide, x_l, num_particles)
        y_one_hot = F.one_hot(y_l, num_classes).to(x.dtype)
        bound = _adgm_log_px(model, guide, x_l, y_one_hot, torch.Size((num_particles, x_l.shape[0])))
        log_q = log_q_y.gather(-1, y_l.expand(log_q_y.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # [P, B_l]
        classification = -(log_q.logsumexp(0) - math.log(num_particles)).sum()
        loss = loss - (bound.mean(0).sum() - kl_a.sum()) + alpha * classification
    if x_u.shape[0]:  # then the unlabelled rows: a [P, B_u, A], then z for every class at once [K, P, B_u, Z]
        _, kl_a, log_q_y = _adgm_auxiliary(guide, x_u, num_particles)
        eye = torch.eye(num_classes, dtype=x.dtype, device=x.device).reshape(num_classes, 1, 1, num_classes)
        eye = eye.expand(num_classes, 1, x_u.shape[0], num_classes)
        bound = _adgm_log_px(model, guide, x_u, eye, torch.Size((num_classes, num_particles, x_u.shape[0])))
        log_q = log_q_y.permute(2, 0, 1)  # [K, P, B_u]
        unlabelled = (log_q.exp() * (bound - log_q)).sum(0).mean(0)  # sum_y q(y|a,x) (bound - log q), mean over a
        loss = loss - (unlabelled.sum() - kl_a.sum())
    return loss
