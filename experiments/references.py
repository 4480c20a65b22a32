"""Hand-written pure-PyTorch losses of the same maths as pyrodgm's Pyro programs, for the
speed benchmark (``bench_speed.py``).  They reuse the Pyro model's and guide's networks and
call them as the Pyro programs do (the parts of a concatenated input passed separately, so
that the first layer multiplies a broadcast input once: :func:`pyrodgm.nets.concat_linear`),
and draw their reparameterisation noise in the order Pyro draws it, so for the same seed they
compute the same number as :class:`pyrodgm.losses.SemiSupervisedELBO` (CaGeM: as
:func:`pyrodgm.losses.cagem.cagem_objective`; Conv-MMCVA and the GMVAE: as their recipes'
:class:`~pyrodgm.losses.WeightedSum`), with the same gradients (tested in
``tests/test_experiments.py``); the benchmark then times the abstraction, not the maths.
The ELBOs are written out here (log-densities and closed-form KLs); the max-margin and
metric terms call pyrodgm's plain tensor functions (``multiclass_hinge``, ``hat_loss``,
``label_balance``, ``knn_assignment``, ``lifted_structured``), which are the maths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyrodgm.losses.cagem import frozen_batch_norm_stats  # batch-norm momentum 0 within a block: plain torch
from pyrodgm.losses.margin import hat_loss, label_balance, multiclass_hinge  # plain tensor functions
from pyrodgm.losses.metric import knn_assignment, lifted_structured  # plain tensor functions
from pyrodgm.models.gmvae import MSE_SCALE


def _gaussian_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, scale^2) || N(0, 1)) summed over the last dim."""
    return (0.5 * (loc.pow(2) + scale.pow(2)) - scale.log() - 0.5).sum(-1)


def _m2_bound(model, guide, x: torch.Tensor, y_one_hot: torch.Tensor) -> torch.Tensor:
    """``-L(x, y)`` (Kingma et al. 2014, eq. 6) with the closed-form KL, for one-hot labels
    of shape ``[..., B, K]`` broadcasting against ``x`` ``[B, D]``; one noise draw."""
    loc, scale = guide.encoder_head(guide.encoder(x, y_one_hot))
    z = loc + scale * torch.randn_like(loc)
    logits = model.likelihood(model.decoder(z, y_one_hot))
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
    log_q_y = guide.classifier_head(guide.classifier(x, a)).log_softmax(-1)
    return a, _gaussian_kl(loc, scale), log_q_y


def _adgm_log_px(model, guide, x: torch.Tensor, y_one_hot: torch.Tensor, noise_shape: torch.Size):
    """``log p(x|y, z) - KL(q(z|y, x) || N(0, I)) + log p(y)`` with ``z = mu + sigma * eps``,
    ``eps`` of shape ``noise_shape + [Z]``; ``y_one_hot`` is ``[..., B, K]``, ``x`` ``[B, D]``."""
    loc, scale = guide.encoder.head(guide.encoder.net(x, y_one_hot))
    z = loc + scale * torch.randn(noise_shape + loc.shape[-1:], dtype=loc.dtype, device=loc.device)
    logits = model.likelihood(model.decoder(z, y_one_hot))
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


def _normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``log N(value | loc, diag scale^2)`` summed over the last dim (torch's formula)."""
    return (-((value - loc) ** 2) / (2 * scale.pow(2)) - scale.log() - math.log(math.sqrt(2 * math.pi))).sum(-1)


def _check_cagem(model, guide) -> None:
    if model.likelihood_kind != "bernoulli" or not guide.skip:
        raise ValueError("cagem_loss is written for CaGeM(likelihood='bernoulli') and CaGeMGuide(skip=True)")


def _cagem_guide(guide, x: torch.Tensor, num_particles: int, eye: torch.Tensor | None):
    """``z1 ~ q(z1|x)`` (noise ``[P, B, Z1]``), ``log q(y|z1, x)`` ``[P, B, K]`` and, for
    ``eye`` the enumerated one-hot labels ``[K, 1, 1, K]``, ``z2 ~ q(z2|x, y, z1)`` for every
    class at once (noise ``[K, P, B, Z2]``) with its ``(loc, scale)``; ``eye=None`` stops
    at the classifier, as the guide run of :class:`~pyrodgm.losses.ClassifierCrossEntropy` does."""
    loc1, scale1 = guide.z1_encoder.head(guide.z1_encoder.net(x))
    z1 = loc1 + scale1 * torch.randn((num_particles,) + loc1.shape, dtype=loc1.dtype, device=loc1.device)
    log_q_y = guide.classifier_head(guide.classifier(x, z1)).log_softmax(-1)
    if eye is None:
        return z1, loc1, scale1, log_q_y, None, None, None
    loc2, scale2 = guide.z2_encoder.head(guide.z2_encoder.net(x, eye, z1))  # [K, P, B, Z2]
    z2 = loc2 + scale2 * torch.randn_like(loc2)
    return z1, loc1, scale1, log_q_y, z2, loc2, scale2


def _cagem_terms(model, guide, x, y, num_particles: int, latent_weight: float):
    """CaGeM's three terms (Maaløe et al. 2017, App. B) for a batch with labels ``y``
    (``-1``: unlabelled): ``-sum F(x_u)`` (the ELBO of the unlabelled rows, ``y`` summed
    with ``q(y|z1, x)``, the closed-form KL at ``z2``, Monte Carlo at ``z1``, the latent terms
    weighted by ``latent_weight``: KL warm-up), ``H_q = sum -log E_q(z1|x)[q(y|z1, x)]`` and
    ``H_p = sum -log E_q[p(y|z2)]`` (``z2`` from the guide with ``y`` enumerated) over the
    labelled rows, these two with the batch-norm running statistics frozen; in the order
    :func:`pyrodgm.losses.cagem.cagem_objective` draws its noise."""
    _check_cagem(model, guide)
    labelled = y >= 0
    x_l, y_l, x_u = x[labelled], y[labelled], x[~labelled]
    num_classes = model.num_clusters
    eye = torch.eye(num_classes, dtype=x.dtype, device=x.device).reshape(num_classes, 1, 1, num_classes)
    # 1. the unlabelled rows' bound: z1 [P, B_u, Z1], then z2 for every class [K, P, B_u, Z2]
    z1, loc1, scale1, log_q_y, z2, loc2, scale2 = _cagem_guide(guide, x_u, num_particles, eye)
    log_q_y = log_q_y.movedim(-1, 0)  # [K, P, B_u]
    log_p_y = model.cluster_prior(z2).log_softmax(-1).diagonal(dim1=0, dim2=-1).movedim(-1, 0)  # log p(y=k|z2_k)
    loc_p1, scale_p1 = model.z1_prior.head(model.z1_prior.net(eye, z2))
    logits = model.likelihood(model.decoder(z1, eye))
    log_px = -F.binary_cross_entropy_with_logits(logits, x_u.expand_as(logits), reduction="none").sum(-1)
    latent = _normal_log_prob(z1, loc_p1, scale_p1) + log_p_y - log_q_y - _gaussian_kl(loc2, scale2)
    per_class = log_px + latent_weight * latent  # [K, P, B_u]
    bound = (log_q_y.exp() * per_class).sum(0) - latent_weight * _normal_log_prob(z1, loc1, scale1)
    elbo_loss = -bound.mean(0).sum()
    with frozen_batch_norm_stats(model, guide):
        # 2. H_q: the guide up to y; z1 [P, B_l, Z1]
        _, _, _, log_q_y, _, _, _ = _cagem_guide(guide, x_l, num_particles, None)
        log_q = log_q_y.gather(-1, y_l.expand(log_q_y.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # [P, B_l]
        h_q = -(log_q.logsumexp(0) - math.log(num_particles)).sum()
        # 3. H_p: y enumerated in the guide; z1 [P, B_l, Z1], z2 [K, P, B_l, Z2]
        _, _, _, log_q_y, z2, _, _ = _cagem_guide(guide, x_l, num_particles, eye)
        log_p = model.cluster_prior(z2).log_softmax(-1)
        log_p = log_p.gather(-1, y_l.expand(log_p.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # log p(y_l|z2_k) [K, P, B_l]
        log_p = (log_p + log_q_y.movedim(-1, 0)).logsumexp(0)  # sum_k q(k|z1, x) p(y_l|z2_k)
        h_p = -(log_p.logsumexp(0) - math.log(num_particles)).sum()
    return elbo_loss, h_q, h_p


def cagem_loss(model, guide, x: torch.Tensor, y: torch.Tensor, alpha: float, num_particles: int = 1,
               latent_weight: float = 1.0) -> torch.Tensor:
    """Maaløe et al.'s (2017) CaGeM loss ``-sum F(x_u) + alpha (H_q + H_p)`` (App. B): the
    value :func:`pyrodgm.losses.cagem.cagem_objective` computes.  Its gradient is *not*
    CaGeM's (the cross-entropies reach only the networks into ``y``):
    :func:`cagem_loss_and_grads` is."""
    elbo_loss, h_q, h_p = _cagem_terms(model, guide, x, y, num_particles, latent_weight)
    return elbo_loss + alpha * h_q + alpha * h_p


def cagem_loss_and_grads(model, guide, x: torch.Tensor, y: torch.Tensor, alpha: float, num_particles: int = 1,
                         latent_weight: float = 1.0) -> torch.Tensor:
    """:func:`cagem_loss` (returned, detached) with CaGeM's gradients accumulated into the
    parameters' ``.grad``: ``alpha H_q`` to ``q(y|z1, x)``'s networks (``phi_y``) only,
    ``alpha H_p`` to those and ``p(y|z2)``'s (``theta_y``) only, the bound to everything."""
    elbo_loss, h_q, h_p = _cagem_terms(model, guide, x, y, num_particles, latent_weight)
    phi_y = [*guide.classifier.parameters(), *guide.classifier_head.parameters()]
    theta_y = list(model.cluster_prior.parameters())
    for value, params in ((alpha * h_q, phi_y), (alpha * h_p, phi_y + theta_y)):
        for param, grad in zip(params, torch.autograd.grad(value, params)):
            param.grad = grad if param.grad is None else param.grad + grad
    elbo_loss.backward()
    return (elbo_loss + alpha * h_q + alpha * h_p).detach()


def _check_conv_mmcva(model, guide) -> None:
    from pyrodgm.guides.mmcva import ConvMMCVAGuide
    from pyrodgm.models.mmcva import ConvMMCVA

    if not isinstance(model, ConvMMCVA) or not isinstance(guide, ConvMMCVAGuide):
        raise ValueError("conv_mmcva_loss is written for ConvMMCVA and ConvMMCVAGuide (pyrodgm.recipes.mmcva)")


def _conv_mmcva_bound(model, guide, x: torch.Tensor, y_one_hot: torch.Tensor) -> torch.Tensor:
    """``-L(x, y)`` (Li et al. eq. 8) per row with the closed-form KL at ``z`` (noise
    ``[B, Z]``) and ``log p(y) = -log K``: for a labelled row the observed label's, for an
    unlabelled one ``log p(y_hat) - log q(y_hat) = -KL(delta || p(y))`` of the point estimate."""
    loc, scale = guide.encoder(x, y_one_hot)
    z = loc + scale * torch.randn_like(loc)
    logits = model.decoder(z, y_one_hot)
    log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    return log_px - _gaussian_kl(loc, scale) - math.log(model.num_classes)


def conv_mmcva_loss(model, guide, x: torch.Tensor, y: torch.Tensor, alpha: float, alpha_u: float, alpha_b: float,
                    C: float, sigma: float, cost: float = 1.0) -> torch.Tensor:
    """Li et al.'s Conv-MMCVA loss (eq. 16) in the summed form of
    :mod:`pyrodgm.recipes.mmcva`: ``-sum L(x, y) - sum L(x_u, y_hat) + alpha (C sum hinge +
    ||lambda||^2 / 2 sigma^2) + alpha alpha_u sum hat + alpha alpha_b balance``, for a batch
    with labels ``y`` (``-1``: unlabelled), the value
    :func:`~pyrodgm.losses.margin.max_margin_objective` computes, with its noise drawn in
    the same order:

    1. the bound of the labelled rows: the max-margin CNN runs on them first (the guide
       records its scores before the observed label; only its dropout masks matter here, so
       without a graph), then ``z`` ``[B_l, Z]``;
    2. the bound of the unlabelled rows with ``y_hat = argmax_y F(y; x)`` from the CNN's
       run on them (no gradient flows through an argmax: without a graph), then ``z``
       ``[B_u, Z]``;
    3. the margin terms from one run of the CNN on the whole batch (new dropout masks and
       batch-norm statistics of the whole batch, as the loss's shared guide run).
    """
    _check_conv_mmcva(model, guide)
    labelled = y >= 0
    x_l, y_l, x_u = x[labelled], y[labelled], x[~labelled]
    num_classes = model.num_classes
    with torch.no_grad():
        guide.classifier(x_l)  # what the labelled run of the guide computes (dropout draws, batch-norm statistics)
    bound_l = _conv_mmcva_bound(model, guide, x_l, F.one_hot(y_l, num_classes).to(x.dtype))
    with torch.no_grad():
        y_hat = F.one_hot(guide.classifier(x_u).argmax(-1), num_classes).to(x.dtype)
    bound_u = _conv_mmcva_bound(model, guide, x_u, y_hat)
    scores = guide.classifier(x)
    scores_l, scores_u = scores[labelled], scores[~labelled]
    hinge = C * multiclass_hinge(scores_l, y_l, cost).sum() + guide.classifier.scores.penalty() / sigma**2
    hat = hat_loss(scores_u, cost).sum()
    balance = label_balance(scores_u, scores_l, y_l)
    return -(bound_l.sum() + bound_u.sum()) + alpha * hinge + alpha * alpha_u * hat + alpha * alpha_b * balance


def _check_gmvae(model, guide) -> None:
    from pyrodgm.guides.gmvae import GMVAEGuide
    from pyrodgm.models.gmvae import GMVAE

    if not isinstance(model, GMVAE) or not isinstance(guide, GMVAEGuide) or guide.label_mode != "relaxed":
        raise ValueError("gmvae_loss is written for GMVAE and GMVAEGuide(label_mode='relaxed') (pyrodgm.recipes.gmvae)")


def gmvae_loss(model, guide, x: torch.Tensor, y: torch.Tensor, w_gaussian: float, w_categorical: float, w_assign: float,
               w_metric: float, k: int, margin: float) -> torch.Tensor:
    """Arias Figueroa & Rivera's semi-supervised GMVAE loss (eq. 1, 7) as
    :func:`pyrodgm.recipes.gmvae.gmvae_loss` builds it: ``-sum [log p(x|z) - w_G KL(q(z|x,
    y) || p(z|y)) - w_C KL(q(y|x) || p(y))]`` over every row with the label unseen (``y`` a
    Gumbel-softmax sample at the guide's temperature, noise ``[B, K]``, then ``z``
    ``[B, Z]``; the categorical KL of the relaxed label, :mod:`pyrodgm.labels`) ``+ w_A L_A +
    w_M L_M``: the classifier's cross-entropy against the labels and, for the unlabelled
    rows (``y = -1``), their distance-weighted k-NN assignments (labelled rows included, as
    the recipe's), and the lifted structured loss of the features times the batch size, all
    from the one feature pass of the bound."""
    _check_gmvae(model, guide)
    labelled = y >= 0
    features = guide.features(x)
    logits = guide.classifier_head(guide.classifier(features))
    log_q = logits - logits.logsumexp(-1, keepdim=True)  # torch's normalised logits
    temperature = torch.tensor(guide.temperature, dtype=logits.dtype, device=logits.device)
    y_relaxed = torch.distributions.RelaxedOneHotCategorical(temperature, logits=logits).rsample()
    loc, scale = guide.encoder(features, y_relaxed)
    z = loc + scale * torch.randn_like(loc)
    prior_loc, prior_scale = model.prior(y_relaxed)
    kl_z = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(prior_loc, prior_scale)
    ).sum(-1)
    log_p_y = model.y_logits - model.y_logits.logsumexp(-1, keepdim=True)
    kl_y = (log_q.exp() * (log_q - log_p_y)).sum(-1)
    out = model.decoder(z)
    if model.likelihood_kind == "bernoulli":
        log_px = -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
    else:
        log_px = torch.distributions.Normal(torch.sigmoid(out), MSE_SCALE).log_prob(x).sum(-1)
    elbo = (log_px - w_gaussian * kl_z - w_categorical * kl_y).sum()
    targets = y.clone()
    targets[~labelled] = knn_assignment(features[~labelled], features[labelled], y[labelled], k, model.num_classes)
    assignment = -log_q.gather(-1, targets.unsqueeze(-1)).sum()
    metric = lifted_structured(features, targets, margin) * x.shape[0]
    return -elbo + w_assign * assignment + w_metric * metric
