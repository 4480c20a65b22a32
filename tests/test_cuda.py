"""pyrodgm on CUDA against the CPU (``pytest -m cuda``; skipped without a GPU).

Every model's loss and gradients on the device equal the CPU's for the same noise (float64;
:func:`pyrodgm.devices.host_random_numbers` draws the device run's random numbers on the
CPU), and so do SVI steps, IWAE estimates, a checkpoint written on one device and resumed
on the other, and the step captured in a CUDA graph (:mod:`pyrodgm.graphs`) against the
same step run eagerly.  ``PYRODGM_TEST_DEVICE=cpu`` runs them CPU against CPU (the GPU
kit's rehearsal), the graph tests excepted."""

import contextlib
import copy

import pyro
import pytest
import torch
from tiny_recipes import ALL_RECIPES, tiny_case

from pyrodgm.checkpoint import load_checkpoint
from pyrodgm.devices import host_random_numbers
from pyrodgm.evaluation import iwae_log_likelihood
from pyrodgm.graphs import CapturedStep, StaticStep
from pyrodgm.optim import FusedAdam
from pyrodgm.training import TrainConfig, train, training_step
from pyrodgm.zoo import RECIPES

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("pyro_test_env")]

FROZEN = "ignore:.*was not registered in the param store because requires_grad=False:UserWarning"
CAPTURABLE = sorted(name for name in ALL_RECIPES if RECIPES[name].graph_capturable)


def _params(case):
    return [p for m in (case.model, case.guide) for p in m.parameters()]


def _loss_and_grads(case, seed, device_noise_on_host):
    pyro.clear_param_store()
    for p in _params(case):
        p.grad = None
    pyro.set_rng_seed(seed)
    if device_noise_on_host:
        with host_random_numbers():
            value = case.loss.loss_and_grads(case.model, case.guide, case.x, **case.kwargs())
    else:
        value = case.loss.loss_and_grads(case.model, case.guide, case.x, **case.kwargs())
    return value, [None if p.grad is None else p.grad.cpu() for p in _params(case)]


def _assert_close(a, b, rtol=1e-8, atol=1e-10):
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            assert torch.allclose(u, v, rtol=rtol, atol=atol), (u - v).abs().max()


@pytest.mark.filterwarnings(FROZEN)
@pytest.mark.parametrize("name", ALL_RECIPES)
def test_loss_and_gradients_equal_the_cpus(name, test_device):
    cpu = tiny_case(name)
    device = copy.deepcopy(cpu).to(test_device)
    loss_cpu, grads_cpu = _loss_and_grads(cpu, 7, False)
    loss_device, grads_device = _loss_and_grads(device, 7, True)
    assert loss_device == pytest.approx(loss_cpu, rel=1e-9)
    _assert_close(grads_device, grads_cpu)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_device)


@pytest.mark.filterwarnings(FROZEN)
@pytest.mark.parametrize("name", ["m2", "adgm", "cagem", "gmvae", "conv-mmcva", "mmva"])
def test_svi_steps_equal_the_cpus(name, test_device):
    cpu = tiny_case(name)
    device = copy.deepcopy(cpu).to(test_device)
    results = []
    for case, on_host in ((cpu, False), (device, True)):
        pyro.clear_param_store()
        optim = FusedAdam({"lr": 1e-2})
        losses = []
        for seed in (1, 2, 3):
            pyro.set_rng_seed(seed)
            with host_random_numbers() if on_host else contextlib.nullcontext():
                losses.append(training_step(case.model, case.guide, case.loss, optim, (case.x, case.y)))
        results.append((losses, [p.detach().cpu() for p in _params(case)]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-9)
    _assert_close(results[1][1], results[0][1], rtol=1e-7, atol=1e-9)
    assert all(p.device.type == test_device.type for p in _params(device))


@pytest.mark.parametrize("name", ["m2", "adgm", "cagem"])
def test_iwae_equals_the_cpus(name, test_device):
    cpu = tiny_case(name)
    cpu.model.eval(), cpu.guide.eval()
    device = copy.deepcopy(cpu).to(test_device)
    pyro.set_rng_seed(4)
    expected = iwae_log_likelihood(cpu.model, cpu.guide, cpu.x, num_particles=40, chunk_size=15)
    pyro.set_rng_seed(4)
    with host_random_numbers():
        got = iwae_log_likelihood(device.model, device.guide, device.x, num_particles=40, chunk_size=15)
    assert got.device.type == test_device.type
    assert torch.allclose(got.cpu(), expected, rtol=1e-9)


def _config(tmp_path, name, device, **overrides):
    values = dict(model="m2", dataset="digits", validation=300, batch_size=100, labelled_per_batch=50, hidden=(32,),
                  z_dim=4, eval_particles=2, lr=1e-3, labels=100, epochs=1, samples=False, device=str(device))
    return TrainConfig.for_model(out=str(tmp_path / name), **{**values, **overrides})


@pytest.mark.parametrize("first", ["device", "cpu"])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, test_device, first):
    """Written on one device, resumed on the other: the parameters resume as saved, the
    optimiser's state follows them, and the run goes on and finishes."""
    devices = (test_device, torch.device("cpu")) if first == "device" else (torch.device("cpu"), test_device)
    torch.set_default_dtype(torch.float32)  # what training uses (the data's dtype)
    one = train(_config(tmp_path, "run", devices[0]), progress=False)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert one["epochs_completed"] == 1
    two = train(_config(tmp_path, "run", devices[1], epochs=2), resume=True, progress=False)
    assert two["epochs_completed"] == 2 and [r["epoch"] for r in two["history"]] == [1, 2]
    assert two["history"][0] == saved["history"][0]
    assert two["test"]["error"] <= 1 and two["test"]["elbo"] < 0
    resumed = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert any(not torch.equal(saved["model"][k], resumed["model"][k]) for k in saved["model"])  # epoch 2 trained
    assert {k for k in resumed["optim"]} == {k for k in saved["optim"]}


# --------------------------------------------------------------------------------------
# the step captured in a CUDA graph
# --------------------------------------------------------------------------------------
@pytest.fixture
def cuda_device(test_device):
    if test_device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    return test_device


def _batches(case, count, seed=11):
    """``count`` batches of the case's layout (labels first), each with other pixels."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.rand(case.x.shape, generator=generator).bernoulli(generator=generator).to(case.x)
        out.append((x, case.y))
    return out


@pytest.mark.filterwarnings(FROZEN)
@pytest.mark.parametrize("name", CAPTURABLE)
def test_captured_step_equals_the_eager_step(name, cuda_device):
    """Three eager warm-up steps, the capture and three replays against seven eager steps
    from the same state and seed: the graph draws the numbers the eager steps draw."""
    eager = tiny_case(name).to(cuda_device)
    graphed = copy.deepcopy(eager)
    batches = _batches(eager, 7)
    runs = []
    for case, make in ((eager, StaticStep), (graphed, CapturedStep)):
        pyro.clear_param_store()
        step = make(case.model, case.guide, case.loss, FusedAdam({"lr": 1e-2, "capturable": True}), case.num_labelled)
        pyro.set_rng_seed(5)
        losses = [float(step(x, y)) for x, y in batches]
        step.check()
        runs.append((losses, [p.detach().clone() for p in _params(case)], step))
    assert runs[1][2].captures == 1
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-12)
    _assert_close(runs[1][1], runs[0][1], rtol=1e-10, atol=1e-12)


def test_captured_step_captures_again_when_the_learning_rate_changes(cuda_device):
    eager = tiny_case("adgm").to(cuda_device)
    graphed = copy.deepcopy(eager)
    batches = _batches(eager, 8)
    runs = []
    for case, make in ((eager, StaticStep), (graphed, CapturedStep)):
        pyro.clear_param_store()
        optim = FusedAdam({"lr": 1e-2, "capturable": True})
        step = make(case.model, case.guide, case.loss, optim, case.num_labelled)
        pyro.set_rng_seed(5)
        for i, (x, y) in enumerate(batches):
            if i == 5:
                optim.set_learning_rate(1e-3)
            step(x, y)
        runs.append(([p.detach().clone() for p in _params(case)], step))
    assert runs[1][1].captures == 2
    _assert_close(runs[1][0], runs[0][0], rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings(FROZEN)
@pytest.mark.parametrize("name", CAPTURABLE)
def test_static_step_never_synchronises_with_the_host(name, cuda_device):
    case = tiny_case(name).to(cuda_device)
    pyro.clear_param_store()
    step = StaticStep(case.model, case.guide, case.loss, FusedAdam({"lr": 1e-2, "capturable": True}), case.num_labelled)
    with pyro.validation_enabled(False):
        step(case.x, case.y)  # the first step creates the parameters and the optimiser state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(case.x, case.y)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_training_with_a_cuda_graph_equals_eager_training(tmp_path, cuda_device):
    torch.set_default_dtype(torch.float32)
    eager = train(_config(tmp_path, "eager", cuda_device, epochs=2), progress=False)
    graphed = train(_config(tmp_path, "graph", cuda_device, epochs=2, cuda_graph=True), progress=False)
    assert graphed["cuda_graph_captures"] >= 1
    for a, b in zip(eager["history"], graphed["history"]):
        assert b["train_loss_per_example"] == pytest.approx(a["train_loss_per_example"], rel=1e-5)
        assert b["valid_error"] == pytest.approx(a["valid_error"], abs=0.01)
    a = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "graph" / "checkpoint.pt")["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


def test_a_recipe_that_cannot_be_captured_is_refused(tmp_path, cuda_device):
    with pytest.raises(ValueError, match="'gmvae' cannot be captured in a CUDA graph"):
        train(_config(tmp_path, "gmvae", cuda_device, model="gmvae", cuda_graph=True), progress=False)
