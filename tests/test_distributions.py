"""IndependentBernoulli: Bernoulli(logits).to_event(n), its log-density summed before it is
negated; StandardNormal: Normal(0, 1) with its closed-form KL and log-density."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import math

from torch.distributions import kl_divergence

from pyrodgm.distributions import IndependentBernoulli, StandardNormal

pytestmark = pytest.mark.usefixtures("pyro_test_env")


@pytest.mark.parametrize("event_dim", [1, 2])
def test_log_prob_equals_pyro_bernoulli(event_dim):
    logits = torch.randn(4, 3, 5) * 3
    value = torch.rand(4, 3, 5).bernoulli()
    ours, theirs = IndependentBernoulli(logits, event_dim), dist.Bernoulli(logits=logits).to_event(event_dim)
    assert ours.batch_shape == theirs.batch_shape and ours.event_shape == theirs.event_shape
    assert torch.allclose(ours.log_prob(value), theirs.log_prob(value), rtol=1e-14, atol=0)
    by_hand = (value * logits - torch.nn.functional.softplus(logits)).sum(tuple(range(-event_dim, 0)))
    assert torch.allclose(ours.log_prob(value), by_hand, rtol=1e-12)


def test_broadcasting_expansion_and_gradients():
    logits = torch.randn(2, 1, 3, 5, requires_grad=True)
    value = torch.rand(3, 5).bernoulli()
    ours = IndependentBernoulli(logits)
    assert ours.log_prob(value).shape == (2, 1, 3)
    expanded = ours.expand((2, 4, 3))
    assert isinstance(expanded, IndependentBernoulli) and expanded.batch_shape == (2, 4, 3)
    assert torch.equal(expanded.log_prob(value), ours.log_prob(value).expand(2, 4, 3))
    grad, = torch.autograd.grad(ours.log_prob(value).sum(), logits)
    assert torch.allclose(grad, value - torch.sigmoid(logits))  # d/dl log Bernoulli(v | l)
    assert ours.sample().shape == (2, 1, 3, 5) and torch.equal(ours.mean, torch.sigmoid(logits))


def test_non_binary_value_is_rejected_under_validation():
    with pytest.raises(ValueError, match="support"):
        IndependentBernoulli(torch.zeros(2, 3)).log_prob(torch.full((2, 3), 0.5))


@pytest.mark.parametrize("where", [0, 7, 14])
def test_nan_logits_are_rejected_under_validation(where):
    """Validation rejects a NaN logit wherever it is, as torch's Bernoulli does; infinite
    logits pass, also of both signs (a NaN sum, checked element-wise); without validation
    nothing is checked."""
    logits = torch.randn(3, 5)
    logits.view(-1)[where] = float("nan")
    with pytest.raises(ValueError, match=r"logits .*shape \(3, 5\).*constraint Real\(\).*1 NaN"):
        IndependentBernoulli(logits)
    with pytest.raises(ValueError):
        dist.Bernoulli(logits=logits)  # torch's own check agrees
    IndependentBernoulli(logits, validate_args=False)
    infinite = torch.randn(3, 5)
    infinite[0, 0], infinite[1, 1] = float("inf"), -float("inf")
    assert IndependentBernoulli(infinite).batch_shape == (3,)


def test_as_an_observed_site():
    logits, x = torch.randn(4, 6), torch.rand(4, 6).bernoulli()

    def model():
        with pyro.plate("data", 4):
            pyro.sample("x", IndependentBernoulli(logits), obs=x)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    assert torch.allclose(trace.nodes["x"]["log_prob"], dist.Bernoulli(logits=logits).to_event(1).log_prob(x))


# --------------------------------------------------------------------------------------
# StandardNormal
# --------------------------------------------------------------------------------------
def test_standard_normal_is_normal_zero_one():
    """Shape, dtype and device of ``like``, not its values; Normal(0, 1)'s log-density,
    entropy and moments; expansion keeps the class."""
    like = torch.randn(3, 5)  # values ignored
    ours, theirs = StandardNormal(like), dist.Normal(torch.zeros(3, 5), torch.ones(3, 5))
    assert ours.batch_shape == (3, 5) and ours.event_shape == ()
    assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.stddev, theirs.stddev)
    value = torch.randn(4, 3, 5) * 3
    assert torch.allclose(ours.log_prob(value), theirs.log_prob(value), rtol=1e-14, atol=0)
    assert torch.equal(ours.log_prob(value), -0.5 * value.pow(2) - 0.5 * math.log(2 * math.pi))
    assert ours.log_prob(torch.randn(5)).shape == (3, 5)  # broadcast to the batch shape
    assert torch.allclose(ours.entropy(), theirs.entropy())
    expanded = ours.expand((2, 3, 5))
    assert isinstance(expanded, StandardNormal) and expanded.batch_shape == (2, 3, 5)
    assert ours.rsample((2,)).shape == (2, 3, 5)
    assert StandardNormal(torch.zeros(2, dtype=torch.float32)).sample().dtype == torch.float32


@pytest.mark.parametrize("q_shape, p_shape", [((3, 5), (3, 5)), ((2, 1, 3, 5), (3, 5)), ((5,), (2, 5))])
def test_kl_to_standard_normal_equals_torchs_normal_kl(q_shape, p_shape):
    """The registered closed form equals torch's Normal-Normal KL against N(0, 1), with
    the same broadcast shape and the same gradients, also through ``.to_event``."""
    loc = torch.randn(q_shape, requires_grad=True)
    scale = (torch.rand(q_shape) + 0.1).requires_grad_()
    q = dist.Normal(loc, scale)
    ours = kl_divergence(q, StandardNormal(torch.zeros(p_shape)))
    theirs = kl_divergence(q, dist.Normal(torch.zeros(p_shape), torch.ones(p_shape)))
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    by_hand = 0.5 * (loc.pow(2) + scale.pow(2)) - scale.log() - 0.5
    assert torch.allclose(ours, by_hand.expand(ours.shape), rtol=1e-14, atol=0)
    grads = torch.autograd.grad(ours.sum(), [loc, scale])
    assert all(torch.allclose(a, b) for a, b in zip(grads, torch.autograd.grad(theirs.sum(), [loc, scale])))
    independent = kl_divergence(q.to_event(1), StandardNormal(torch.zeros(p_shape)).to_event(1))
    assert torch.allclose(independent, theirs.sum(-1))


def test_kl_from_standard_normal_is_torchs():
    """Only KL(Normal || StandardNormal) is registered: the other direction is torch's."""
    q = StandardNormal(torch.zeros(4))
    p = dist.Normal(torch.randn(4), torch.rand(4) + 0.5)
    expected = kl_divergence(dist.Normal(torch.zeros(4), torch.ones(4)), p)
    assert torch.allclose(kl_divergence(q, p), expected)


def test_standard_normal_rejects_nan_under_validation():
    with pytest.raises(ValueError, match="support|nan|NaN"):
        StandardNormal(torch.zeros(3)).log_prob(torch.tensor([0.0, float("nan"), 1.0]))
