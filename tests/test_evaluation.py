"""Tests of pyrodgm.evaluation against closed forms: linear-Gaussian models with an exact
marginal likelihood, mixtures of them with an enumerated label, and classifiers whose
particle average is known."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyrodgm.evaluation import (
    IWAEResult,
    active_units,
    classification_error,
    importance_diagnostics,
    importance_log_weights,
    iwae_evaluate,
    iwae_log_likelihood,
    posterior_mean,
    predict_proba,
)
from pyrodgm.guides import M2Guide
from pyrodgm.nets import MLPSpec

pytestmark = pytest.mark.usefixtures("pyro_test_env")



# --------------------------------------------------------------------------------------
# a linear-Gaussian model with exact log p(x)
# --------------------------------------------------------------------------------------
class LinearGaussian:
    """``z ~ N(0, I_2)``, ``x ~ N(W z + b, s^2 I_3)``."""

    def __init__(self, s=0.5, z_dim=2, x_dim=3):
        self.W = torch.randn(x_dim, z_dim)
        self.b = torch.randn(x_dim)
        self.s = s
        self.z_dim, self.x_dim = z_dim, x_dim

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.x_dim)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def posterior(self, x):
        precision = torch.eye(self.z_dim) + self.W.T @ self.W / self.s**2
        cov = torch.linalg.inv(precision)
        mean = (x - self.b) @ self.W @ cov / self.s**2  # cov symmetric
        return mean, cov

    def exact_guide(self, x):
        mean, cov = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))

    def prior_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], self.z_dim), 1.0).to_event(1))

    def sample(self, n):
        z = torch.randn(n, self.z_dim)
        return z @ self.W.T + self.b + self.s * torch.randn(n, self.x_dim)


@pytest.mark.parametrize("k", [1, 7])
def test_iwae_exact_with_exact_posterior(k):
    lg = LinearGaussian()
    x = lg.sample(20)
    value = iwae_log_likelihood(lg.model, lg.exact_guide, x, num_particles=k)
    assert value.shape == (20,)
    assert torch.allclose(value, lg.log_px(x), rtol=0, atol=1e-8)
    # every single weight is exact, not only their mean
    lw = importance_log_weights(lg.model, lg.exact_guide, x, num_particles=k)
    assert lw.shape == (k, 20)
    assert torch.allclose(lw, lg.log_px(x).expand(k, 20), rtol=0, atol=1e-8)


def test_iwae_with_poor_guide_converges_from_below():
    lg = LinearGaussian()
    n = 50
    x = lg.sample(n)
    exact = lg.log_px(x)
    means, stderrs = [], []
    for k in (1, 10, 100, 5000):
        value = iwae_log_likelihood(lg.model, lg.prior_guide, x, num_particles=k, chunk_size=700)
        gap = exact - value
        stderr = float(gap.std() / math.sqrt(n))
        assert float(gap.mean()) >= -3 * stderr, k  # a lower bound in expectation
        means.append(float(value.mean()))
        stderrs.append(stderr)
    # tightens with k (in expectation: up to 3 standard errors of the noisier estimate)
    for i in range(len(means) - 1):
        assert means[i + 1] >= means[i] - 3 * stderrs[i], (i, means)
    assert means[0] < means[-1] - 1.0
    assert abs(means[-1] - float(exact.mean())) < 0.05
    assert float((value - exact).abs().median()) < 0.1


def test_chunking():
    lg = LinearGaussian()
    x = lg.sample(6)
    # zero-variance proposal: the chunking cannot change the numbers
    one = iwae_log_likelihood(lg.model, lg.exact_guide, x, num_particles=5000, chunk_size=5000)
    chunked = iwae_log_likelihood(lg.model, lg.exact_guide, x, num_particles=5000, chunk_size=700)
    assert torch.allclose(one, chunked, rtol=0, atol=1e-10)
    assert torch.allclose(chunked, lg.log_px(x), rtol=0, atol=1e-8)
    # every particle is returned, distinct across chunks
    lw = importance_log_weights(lg.model, lg.prior_guide, x, num_particles=1500, chunk_size=700)
    assert lw.shape == (1500, 6)
    assert torch.unique(lw[:, 0]).numel() == 1500
    # iwae_log_likelihood is the log-mean-exp of these weights
    pyro.set_rng_seed(3)
    lw = importance_log_weights(lg.model, lg.prior_guide, x, num_particles=1500, chunk_size=700)
    pyro.set_rng_seed(3)
    value = iwae_log_likelihood(lg.model, lg.prior_guide, x, num_particles=1500, chunk_size=700)
    assert torch.allclose(value, lw.logsumexp(0) - math.log(1500), rtol=1e-12)


def test_iwae_evaluate_batches_and_diagnostics():
    lg = LinearGaussian()
    x = lg.sample(25)
    result = iwae_evaluate(lg.model, lg.exact_guide, x, num_particles=40, batch_size=10, chunk_size=15)
    assert isinstance(result, IWAEResult) and result.num_particles == 40
    assert torch.allclose(result.log_likelihood, lg.log_px(x), rtol=0, atol=1e-8)
    assert result.pareto_k.shape == (25,) and result.ess.shape == (25,)
    np.testing.assert_allclose(result.ess, 40.0, rtol=1e-6)  # equal weights
    summary = result.summary()
    assert summary["num_examples"] == 25 and summary["iwae_k"] == 40
    assert summary["iwae_log_likelihood"] == pytest.approx(float(lg.log_px(x).mean()), abs=1e-8)
    assert summary["ess_min"] == pytest.approx(40.0, rel=1e-6)


# --------------------------------------------------------------------------------------
# a mixture of linear Gaussians with an enumerated label
# --------------------------------------------------------------------------------------
class LinearGaussianMixture:
    """``y ~ Cat(pi)``, ``z ~ N(0, 1)``, ``x ~ N(a_y z + b_y, s^2 I_2)``."""

    def __init__(self, num_classes=3, x_dim=2, s=0.5, one_hot=False):
        self.K, self.x_dim, self.s, self.one_hot = num_classes, x_dim, s, one_hot
        self.pi = torch.tensor([0.2, 0.3, 0.5])[:num_classes]
        self.A = torch.randn(num_classes, x_dim)
        self.B = 2 * torch.randn(num_classes, x_dim)

    def _label(self, y):
        return y if self.one_hot else F.one_hot(y, self.K).to(self.A.dtype)

    def _label_dist(self, probs):
        return dist.OneHotCategorical(probs) if self.one_hot else dist.Categorical(probs)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = self._label(pyro.sample("y", self._label_dist(self.pi)))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.unsqueeze(-1) * (y @ self.A) + y @ self.B
            pyro.sample("x", dist.Normal(loc, self.s).to_event(1), obs=x)

    def log_px(self, x):
        parts = [
            self.pi[k].log()
            + dist.MultivariateNormal(self.B[k], torch.outer(self.A[k], self.A[k]) + self.s**2 * torch.eye(self.x_dim)).log_prob(x)
            for k in range(self.K)
        ]
        return torch.stack(parts).logsumexp(0)

    def posterior(self, x):
        """Mean ``(B, K)`` and sd ``(K,)`` of ``p(z|x,y)`` for every class."""
        precision = 1 + (self.A**2).sum(-1) / self.s**2
        var = 1 / precision
        mean = var * ((x.unsqueeze(-2) - self.B) * self.A).sum(-1) / self.s**2
        return mean, var.sqrt()

    def guide(self, x, q_y, exact=True, shift=0.0):
        mean, sd = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            y = self._label(pyro.sample("y", self._label_dist(q_y), infer={"enumerate": "parallel"}))
            if exact:
                loc, scale = (y * mean).sum(-1), (y * sd).sum(-1)
            else:  # a poor proposal: shifted and too wide
                loc, scale = (y * mean).sum(-1) + shift, 2.0 * (y * sd).sum(-1)
            pyro.sample("z", dist.Normal(loc, scale))

    def sample(self, n):
        y = torch.multinomial(self.pi, n, replacement=True)
        z = torch.randn(n)
        return z.unsqueeze(-1) * self.A[y] + self.B[y] + self.s * torch.randn(n, self.x_dim)


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("q_y", [[1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]])
@pytest.mark.parametrize("k", [1, 6])
def test_enumerated_iwae_exact_with_exact_conditional_posterior(one_hot, q_y, k):
    mix = LinearGaussianMixture(one_hot=one_hot)
    x = mix.sample(10)
    q_y = torch.tensor(q_y)
    value = iwae_log_likelihood(mix.model, lambda x: mix.guide(x, q_y), x, num_particles=k)
    assert torch.allclose(value, mix.log_px(x), rtol=0, atol=1e-8)


def test_enumerated_iwae_weights_do_not_depend_on_z():
    """With exact conditional posteriors q(z|x,y) = p(z|x,y) every particle's weight is
    the same number, whatever q(y|x): the label is summed, not sampled."""
    mix = LinearGaussianMixture()
    x = mix.sample(10)
    q_y = torch.tensor([0.7, 0.2, 0.1])
    lw = importance_log_weights(mix.model, lambda x: mix.guide(x, q_y), x, num_particles=5)
    assert lw.shape == (5, 10)
    assert torch.allclose(lw, lw[:1].expand(5, 10), rtol=0, atol=1e-10)


def test_enumerated_iwae_with_poor_proposal_converges_from_below():
    mix = LinearGaussianMixture()
    n = 40
    x = mix.sample(n)
    exact = mix.log_px(x)
    q_y = torch.tensor([0.6, 0.3, 0.1])
    guide = lambda x: mix.guide(x, q_y, exact=False, shift=1.0)  # noqa: E731
    means, stderrs = [], []
    for k in (1, 10, 2000):
        value = iwae_log_likelihood(mix.model, guide, x, num_particles=k, chunk_size=700)
        gap = exact - value
        stderr = float(gap.std()) / math.sqrt(n)
        assert float(gap.mean()) >= -3 * stderr, k  # a lower bound in expectation
        means.append(float(value.mean()))
        stderrs.append(stderr)
    for i in range(len(means) - 1):
        assert means[i + 1] >= means[i] - 3 * stderrs[i], (i, means)
    assert means[0] < means[-1] - 0.3
    assert abs(means[-1] - float(exact.mean())) < 0.08


# --------------------------------------------------------------------------------------
# importance_diagnostics
# --------------------------------------------------------------------------------------
def test_diagnostics_equal_weights_full_ess():
    lw = torch.full((1000, 4), -2.5)
    khat, ess = importance_diagnostics(lw)
    assert khat.shape == (4,) and ess.shape == (4,)
    np.testing.assert_allclose(ess, 1000.0, rtol=1e-10)


def test_diagnostics_equal_weights_small_khat():
    khat, _ = importance_diagnostics(torch.full((1000, 4), -2.5))
    assert np.all(khat < 0.5)


def test_diagnostics_light_tailed_weights():
    khat, ess = importance_diagnostics(0.1 * torch.randn(2000, 4))
    assert np.all(khat < 0.5)
    assert np.all(ess > 0.95 * 2000)


def test_diagnostics_heavy_tailed_weights():
    # log w = 2 E with E ~ Exp(1): w is Pareto with tail index 1/2, i.e. k = 2
    lw = 2 * torch.distributions.Exponential(1.0).sample((5000, 4))
    khat, ess = importance_diagnostics(lw)
    assert np.all(khat > 0.7)
    assert np.all(ess < 0.05 * 5000)


def test_diagnostics_match_ess_formula_without_smoothing_effect():
    """ESS is 1 / sum of squared normalised (smoothed) weights; for light tails the
    smoothing barely moves the weights, so it matches the raw-weight formula."""
    lw = 0.3 * torch.randn(3000, 3)
    _, ess = importance_diagnostics(lw)
    w = torch.softmax(lw, 0)
    raw = (1 / (w**2).sum(0)).numpy()
    np.testing.assert_allclose(ess, raw, rtol=0.01)


# --------------------------------------------------------------------------------------
# predict_proba / classification_error
# --------------------------------------------------------------------------------------
class SignClassifier:
    """``a ~ N(0, 1)`` then ``y ~ Cat(logits = x M_+ if a > 0 else x M_-)``, so that
    ``E_a q(y|a, x) = (softmax(x M_+) + softmax(x M_-)) / 2``."""

    def __init__(self, x_dim=3, num_classes=4, one_hot=False):
        self.pos = 2 * torch.randn(x_dim, num_classes)
        self.neg = 2 * torch.randn(x_dim, num_classes)
        self.one_hot = one_hot

    def logits(self, x, a):
        return torch.where((a > 0).unsqueeze(-1), x @ self.pos, x @ self.neg)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            logits = self.logits(x, a)
            fn = dist.OneHotCategorical(logits=logits) if self.one_hot else dist.Categorical(logits=logits)
            pyro.sample("y", fn)

    def exact(self, x):
        return 0.5 * ((x @ self.pos).softmax(-1) + (x @ self.neg).softmax(-1))


@pytest.mark.parametrize("one_hot", [False, True])
def test_predict_proba_averages_over_particles(one_hot):
    clf = SignClassifier(one_hot=one_hot)
    x = torch.randn(5, 3)
    probs = predict_proba(clf.guide, x, num_particles=20000)
    assert probs.shape == (5, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    # each entry is a mean of 20000 values in [0, 1]: sd <= 0.5 / sqrt(20000) = 0.0035
    assert torch.allclose(probs, clf.exact(x), atol=0.02)
    # and it is no single-sample classifier
    single = [(x @ clf.pos).softmax(-1), (x @ clf.neg).softmax(-1)]
    assert all((probs - s).abs().max() > 0.05 for s in single)


def test_predict_proba_single_particle_is_the_sampled_classifier():
    clf = SignClassifier()
    x = torch.randn(6, 3)
    pyro.set_rng_seed(8)
    probs = predict_proba(clf.guide, x, num_particles=1)
    pyro.set_rng_seed(8)
    a = torch.randn(1, 6)  # the guide's only draw
    assert torch.allclose(probs, clf.logits(x, a)[0].softmax(-1), rtol=1e-12)


def test_predict_proba_m2_is_softmax_of_classifier():
    guide = M2Guide(MLPSpec(5, 3, 2, (4,)))
    x = torch.rand(7, 5)
    expected = guide.classifier_head(guide.classifier(x)).softmax(-1)
    for num_particles in (1, 4):
        probs = predict_proba(guide, x, num_particles=num_particles)
        assert torch.allclose(probs, expected, rtol=1e-12, atol=0)
    # classification_error is the argmax error of these probabilities, batched
    y = torch.randint(0, 3, (7,))
    expected_error = float((expected.argmax(-1) != y).double().mean())
    assert classification_error(guide, x, y, batch_size=3) == pytest.approx(expected_error)
    y = expected.argmax(-1)
    assert classification_error(guide, x, y, batch_size=3) == 0.0


def test_predict_proba_without_label_site():
    lg = LinearGaussian()
    with pytest.raises(ValueError, match="no sample site 'y'"):
        predict_proba(lg.exact_guide, lg.sample(3))


# --------------------------------------------------------------------------------------
# posterior_mean / active_units
# --------------------------------------------------------------------------------------
def _two_unit_guide(x):
    with pyro.plate("data", x.shape[0]):
        loc = torch.stack([x.sum(-1), torch.full((x.shape[0],), 0.3)], -1)
        pyro.sample("z", dist.Normal(loc, 0.5).to_event(1))


def test_active_units():
    x = torch.randn(50, 3)
    count, variances = active_units(_two_unit_guide, x, "z", batch_size=20)
    assert count == 1
    assert variances.shape == (2,)
    assert torch.allclose(variances[0], x.sum(-1).var(), rtol=1e-10)
    assert variances[1] == 0
    assert torch.allclose(posterior_mean(_two_unit_guide, x, "z")[:, 0], x.sum(-1))
    # a threshold above the first unit's variance: no active unit
    assert active_units(_two_unit_guide, x, "z", threshold=float(variances[0]) + 1)[0] == 0
    # one input has no variance across the data: a clear error, not NaN counted as 0 units
    with pytest.raises(ValueError, match="at least 2 inputs"):
        active_units(_two_unit_guide, x[:1], "z")


def test_posterior_mean_m2_sums_enumerated_label():
    guide = M2Guide(MLPSpec(4, 3, 2, (5,)))
    x = torch.rand(6, 4)
    probs = guide.classifier_head(guide.classifier(x)).softmax(-1)
    expected = 0
    for k in range(3):
        y = F.one_hot(torch.full((6,), k), 3).to(x.dtype)
        loc, _ = guide.encoder_head(guide.encoder(torch.cat([x, y], -1)))
        expected = expected + probs[:, k : k + 1] * loc
    with torch.no_grad():
        assert torch.allclose(posterior_mean(guide, x, "z"), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="no sample site 'w'"):
        posterior_mean(guide, x, "w")


# --------------------------------------------------------------------------------------
# IWAE error paths
# --------------------------------------------------------------------------------------
def _global_model(x):
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(g, 1.0), obs=x)


def _global_guide(x):
    pyro.sample("g", dist.Normal(0.1, 1.0))


def test_iwae_rejects_global_latent():
    with pytest.raises(ValueError, match=r"'g'.*pyro\.plate\('data'"):
        iwae_log_likelihood(_global_model, _global_guide, torch.randn(4), num_particles=3)


def test_iwae_rejects_model_without_data_plate():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).expand(z.shape + x.shape).to_event(1), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="data"):
        iwae_log_likelihood(model, guide, torch.randn(4), num_particles=3)


@pytest.mark.parametrize("kwargs", [{"num_particles": 0}, {"num_particles": 2.0}, {"num_particles": 3, "chunk_size": 0}])
def test_iwae_rejects_bad_particle_counts(kwargs):
    lg = LinearGaussian()
    with pytest.raises(ValueError, match="num_particles|chunk_size"):
        iwae_log_likelihood(lg.model, lg.exact_guide, lg.sample(2), **kwargs)
