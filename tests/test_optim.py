"""FusedAdam: one torch Adam behind Pyro's optimiser interface, step for step the same as
pyro.optim.Adam, with interchangeable state."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyrodgm.guides import M2Guide
from pyrodgm.losses import SemiSupervisedELBO
from pyrodgm.models import M2
from pyrodgm.nets import MLPSpec
from pyrodgm.optim import FusedAdam, adam_arguments

pytestmark = pytest.mark.usefixtures("pyro_test_env")

ARGS = {"lr": 0.01, "betas": (0.8, 0.95)}


def tiny_pair():
    torch.manual_seed(1)
    return M2(MLPSpec(4, 3, 2, (5,))), M2Guide(MLPSpec(4, 3, 2, (5,)))


def data():
    generator = torch.Generator().manual_seed(2)
    x = torch.bernoulli(torch.full((6, 4), 0.5), generator=generator)
    return x, torch.tensor([0, 1, 2, -1, -1, -1])


def run(optim, steps, pair=None, first_step=0):
    """``steps`` SVI steps, step ``i`` drawing its noise from seed ``i`` (so a run can be
    continued from a saved state with the same draws)."""
    model, guide = pair or tiny_pair()
    svi = SVI(model, guide, optim, SemiSupervisedELBO(alpha=1.0, num_particles=2))
    x, y = data()
    losses = []
    for step in range(first_step, first_step + steps):
        pyro.set_rng_seed(step)
        losses.append(svi.step(x, y=y))
    return model, guide, losses


def params_of(model, guide):
    return {**{f"m.{k}": v.detach().clone() for k, v in model.state_dict().items()},
            **{f"g.{k}": v.detach().clone() for k, v in guide.state_dict().items()}}


def assert_params_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


UNFUSED = {**ARGS, "fused": False}


def test_same_steps_as_pyro_adam():
    """Unfused: bit for bit pyro.optim.Adam's steps; fused (the default on CPU): the same
    to rounding."""
    reference = params_of(*run(pyro.optim.Adam(ARGS), 5)[:2])
    pyro.clear_param_store()
    unfused = params_of(*run(FusedAdam(UNFUSED), 5)[:2])
    pyro.clear_param_store()
    optim = FusedAdam(ARGS)
    fused = params_of(*run(optim, 5)[:2])
    assert optim.optimizer.param_groups[0]["fused"] is True
    assert_params_equal(reference, unfused)
    for key in reference:
        assert torch.allclose(fused[key], reference[key], rtol=1e-5, atol=1e-6), key
    assert any(not torch.equal(fused[k], v) for k, v in params_of(*tiny_pair()).items())  # it did train


def test_kernel_choice_follows_the_arguments():
    pyro.param("a", torch.ones(2))
    for args, fused, foreach in [({}, True, None), ({"fused": False}, False, None), ({"foreach": True}, None, True)]:
        optim = FusedAdam({"lr": 0.1, **args})
        pyro.param("a").unconstrained().grad = torch.ones(2)
        optim([pyro.param("a").unconstrained()])
        group = optim.optimizer.param_groups[0]
        assert (group["fused"], group["foreach"]) == (fused, foreach), args


def test_a_torch_without_the_cpu_kernel_gets_the_unfused_one(monkeypatch):
    """torch before 2.4 has no fused Adam on CPU; the kernel list comes from torch itself."""
    import torch.utils._foreach_utils as foreach_utils

    params = [torch.ones(2, requires_grad=True)]
    assert adam_arguments({"lr": 0.1}, params) == {"lr": 0.1, "fused": True}
    monkeypatch.setattr(foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda", "xpu"])
    assert adam_arguments({"lr": 0.1}, params) == {"lr": 0.1}
    optim = FusedAdam({"lr": 0.1})
    pyro.param("a", torch.ones(2)).unconstrained().grad = torch.ones(2)
    optim([pyro.param("a").unconstrained()])
    assert not optim.optimizer.param_groups[0]["fused"]


@pytest.mark.parametrize("writer, reader_args", [
    (FusedAdam, ARGS),  # fused to fused
    (FusedAdam, UNFUSED),
    (pyro.optim.Adam, UNFUSED),  # pyro's (unfused) state into FusedAdam
])
def test_state_resumes_exactly_and_is_interchangeable(writer, reader_args):
    uninterrupted = params_of(*run(FusedAdam(reader_args), 5)[:2])
    pyro.clear_param_store()
    first = writer(reader_args if writer is FusedAdam else ARGS)
    model, guide, _ = run(first, 3)
    state = first.get_state()
    pyro.clear_param_store()  # a new process: same modules, a fresh store and optimiser
    second = FusedAdam({**reader_args, "lr": 0.5})  # the saved hyper-parameters win, as with torch's load_state_dict
    second.set_state(state)
    resumed = params_of(*run(second, 2, pair=(model, guide), first_step=3)[:2])
    assert second.optimizer.param_groups[0]["lr"] == ARGS["lr"]
    assert_params_equal(uninterrupted, resumed)


def test_unfused_state_resumes_with_the_fused_kernel():
    """A state written by pyro.optim.Adam (unfused) resumes on the fused kernel, which is
    this machine's choice, not the saved run's; the steps agree to rounding."""
    uninterrupted = params_of(*run(FusedAdam(UNFUSED), 5)[:2])
    pyro.clear_param_store()
    first = pyro.optim.Adam(ARGS)
    model, guide, _ = run(first, 3)
    state = first.get_state()
    pyro.clear_param_store()
    second = FusedAdam(ARGS)
    second.set_state(state)
    resumed = params_of(*run(second, 2, pair=(model, guide), first_step=3)[:2])
    assert second.optimizer.param_groups[0]["fused"] is True
    assert all(s["step"].dtype == torch.float32 for s in second.optimizer.state.values())
    for key in uninterrupted:
        assert torch.allclose(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6), key


def test_parameters_absent_from_a_step_are_not_updated():
    a = pyro.param("a", torch.tensor([1.0, 2.0]))
    b = pyro.param("b", torch.tensor([3.0]))
    optim = FusedAdam({"lr": 0.1})
    (a.sum() + b.sum()).backward()
    optim([pyro.param("a").unconstrained(), pyro.param("b").unconstrained()])
    b_after_first = pyro.param("b").detach().clone()
    a_grad = torch.ones(2)
    pyro.param("a").unconstrained().grad = a_grad.clone()
    pyro.param("b").unconstrained().grad = torch.zeros(1)  # zeroed by SVI, not cleared
    optim([pyro.param("a").unconstrained()])
    assert torch.equal(pyro.param("b").detach(), b_after_first)
    assert torch.equal(pyro.param("b").unconstrained().grad, torch.zeros(1))  # restored


def test_rejects_a_callable_or_a_foreign_state():
    with pytest.raises(TypeError, match="dict of torch.optim.Adam arguments"):
        FusedAdam(lambda name: {"lr": 0.1})
    pyro.param("a", torch.ones(2))
    optim = FusedAdam({"lr": 0.1})
    optim.set_state({"a": {"exp_avg": torch.zeros(2)}})
    pyro.param("a").unconstrained().grad = torch.ones(2)
    with pytest.raises(ValueError, match="single-parameter torch optimiser state dict"):
        optim([pyro.param("a").unconstrained()])


def test_learning_rate_set_before_a_saved_state_is_consumed_wins():
    """A resumed run sets the epoch's (decayed) rate before the parameters reappear; the
    saved state's older rate must not override it."""
    first = FusedAdam(ARGS)
    model, guide, _ = run(first, 1)
    state = first.get_state()
    pyro.clear_param_store()
    second = FusedAdam(ARGS)
    second.set_state(state)
    second.set_learning_rate(0.001)
    run(second, 1, pair=(model, guide), first_step=1)
    assert second.optimizer.param_groups[0]["lr"] == 0.001
    assert second.optimizer.param_groups[0]["betas"] == ARGS["betas"]


def test_gradients_are_cleared_after_a_step():
    """Cleared (None), as torch's zero_grad() leaves them, so that SVI's zeroing skips them
    and the next backward pass writes rather than adds."""
    model, guide, _ = run(FusedAdam(ARGS), 1)
    assert all(p.grad is None for p in [*model.parameters(), *guide.parameters()])


def _quadratic_grads(weight: torch.Tensor, bias: torch.Tensor, scale: float) -> None:
    """Gradients of a loss whose rows all pull the parameters the same way (large, so
    the clipping acts)."""
    target = torch.arange(12.0).reshape(3, 4)
    loss = scale * ((weight - target).pow(2).sum() + (bias + 7).pow(2).sum())
    weight.grad, bias.grad = torch.autograd.grad(loss, (weight, bias))


def test_weight_prior_then_clipping_is_the_adgm_authors_update():
    """Prior gradient on matrices only, then total-norm clipping, then element clipping;
    each step written out by hand (the order matters: a bias with a prior, or the element
    clip first, gives different numbers)."""
    weight = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    bias = torch.nn.Parameter(torch.tensor([0.5, -0.5, 1.0, 2.0]))
    _quadratic_grads(weight, bias, 1.0)
    optim = FusedAdam(dict(ARGS), weight_prior_precision=0.3, max_grad_norm=20.0, max_grad_value=4.0)
    optim._prepare_gradients([weight, bias])

    g_weight = 2 * (weight.detach() - torch.arange(12.0).reshape(3, 4)) + 0.3 * weight.detach()
    g_bias = 2 * (bias.detach() + 7)
    total = math.sqrt(g_weight.pow(2).sum() + g_bias.pow(2).sum())
    assert total > 20.0
    factor = 20.0 / (total + 1e-6)
    expected_weight, expected_bias = (g_weight * factor).clamp(-4, 4), (g_bias * factor).clamp(-4, 4)
    assert (expected_bias.abs() == 4).any()  # the element clip acts too
    torch.testing.assert_close(weight.grad, expected_weight)
    torch.testing.assert_close(bias.grad, expected_bias)


def test_weight_prior_and_clipping_reach_the_parameters_through_svi():
    """Through SVI, the prior and clipping change the step exactly as applying them to
    the gradients before a plain Adam step does."""
    pair = tiny_pair()
    options = dict(weight_prior_precision=0.5, max_grad_norm=0.1, max_grad_value=0.01)
    model, guide, _ = run(FusedAdam(dict(ARGS), **options), 1, pair=pair)
    pyro.clear_param_store()
    reference_pair = tiny_pair()
    svi = SVI(*reference_pair, _Prepared(dict(ARGS), **options), SemiSupervisedELBO(alpha=1.0, num_particles=2))
    x, y = data()
    pyro.set_rng_seed(0)
    svi.step(x, y=y)
    for (name, p), q in zip(model.named_parameters(), reference_pair[0].parameters()):
        torch.testing.assert_close(p, q, msg=name)
    pyro.clear_param_store()
    unclipped, _, _ = run(FusedAdam(dict(ARGS)), 1, pair=tiny_pair())
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), unclipped.parameters()))


class _Prepared(pyro.optim.PyroOptim):
    """pyro.optim.Adam over gradients prepared by hand: prior on matrices, clip the norm
    over every parameter of the step, then each element."""

    def __init__(self, args, weight_prior_precision, max_grad_norm, max_grad_value):
        super().__init__(torch.optim.Adam, args)
        self.prior, self.norm, self.value = weight_prior_precision, max_grad_norm, max_grad_value

    def __call__(self, params, *args, **kwargs):
        params = [p for p in params if p.grad is not None]
        for p in params:
            if p.dim() >= 2:
                p.grad = p.grad + self.prior * p.detach()
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        for p in params:
            p.grad = (p.grad * torch.clamp(self.norm / (total + 1e-6), max=1.0)).clamp(-self.value, self.value)
        super().__call__(params, *args, **kwargs)


@pytest.mark.parametrize("name", ["weight_prior_precision", "max_grad_norm", "max_grad_value"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_prior_and_clipping_must_be_positive(name, value):
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        FusedAdam(dict(ARGS), **{name: value})


def test_the_adgm_takes_its_authors_prior_and_clipping_on_mnist_only_and_each_can_be_turned_off():
    from pyrodgm.training import TrainConfig, optimiser
    from pyrodgm.zoo import ADGM_MNIST, defaults

    assert {k: defaults("adgm", "mnist")[k] for k in ADGM_MNIST} == ADGM_MNIST
    assert not set(ADGM_MNIST) & {k for k, v in defaults("adgm", "digits").items() if k != "alpha_factor" and v is not None}
    assert defaults("adgm", "digits")["alpha_factor"] == defaults("sdgm", "mnist")["alpha_factor"] == 0.1
    mnist = TrainConfig.paper("adgm", "mnist")
    optim = optimiser(mnist, num_data=60000, labelled_per_batch=100)
    assert optim.weight_prior_precision == pytest.approx(100 / 60000)  # U / (N s^2): their 200 / 120,000
    assert (optim.max_grad_norm, optim.max_grad_value) == (5.0 * 200, 1.0 * 200)  # per batch row
    off = optimiser(TrainConfig.paper("adgm", "mnist", weight_prior_std=math.inf, grad_clip_norm=0.0, grad_clip_value=0.0), 60000, 100)
    assert (off.weight_prior_precision, off.max_grad_norm, off.max_grad_value) == (None, None, None)
    for bad, message in ((dict(weight_prior_std=-1.0), "weight_prior_std must be positive"), (dict(grad_clip_norm=-5.0), "grad_clip_norm must be positive"),
                         (dict(grad_clip_value=math.nan), "grad_clip_value must be positive")):
        with pytest.raises(ValueError, match=message):
            optimiser(TrainConfig.paper("adgm", "mnist", **bad), 60000, 100)
