"""IndependentBernoulli: Bernoulli(logits).to_event(n), its log-density summed before it is
negated."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrodgm.distributions import IndependentBernoulli

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


def test_as_an_observed_site():
    logits, x = torch.randn(4, 6), torch.rand(4, 6).bernoulli()

    def model():
        with pyro.plate("data", 4):
            pyro.sample("x", IndependentBernoulli(logits), obs=x)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    assert torch.allclose(trace.nodes["x"]["log_prob"], dist.Bernoulli(logits=logits).to_event(1).log_prob(x))
