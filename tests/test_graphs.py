"""The step a CUDA graph captures (pyrodgm.graphs), checked on the CPU: it is the SVI step
for every recipe (same loss, same parameters afterwards, same noise), the recipes marked
capturable run it on the meta device (which refuses every host synchronisation, every
data-dependent shape and every CPU tensor mixed into device work: what a capture
refuses), and a batch that breaks the declared label layout is reported.  The capture
itself needs a GPU: tests/test_cuda.py."""

import copy

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from torch.utils._python_dispatch import TorchDispatchMode
from tiny_recipes import ALL_RECIPES, tiny_case

from pyrodgm.graphs import CapturedStep, LabelLayoutError, StaticStep, _module_state, _optimizer_settings, _plain_state
from pyrodgm.losses import SemiSupervisedELBO
from pyrodgm.losses.elbo import labelled_prefix, split_batch
from pyrodgm.modeling import one_hot_rows
from pyrodgm.optim import FusedAdam
from pyrodgm.zoo import RECIPES

pytestmark = pytest.mark.usefixtures("pyro_test_env")

# Pyro warns about frozen parameters of some pairs; not what these tests are about
FROZEN = "ignore:.*was not registered in the param store because requires_grad=False:UserWarning"


def _state(case):
    return {k: v.detach().clone() for m in (case.model, case.guide) for k, v in m.state_dict().items()}


@pytest.mark.filterwarnings(FROZEN)
@pytest.mark.parametrize("name", ALL_RECIPES)
def test_static_step_is_the_svi_step(name):
    case = tiny_case(name)
    twin = copy.deepcopy(case)

    pyro.clear_param_store()
    svi = SVI(case.model, case.guide, FusedAdam({"lr": 1e-2}), case.loss)
    svi_losses = []
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        svi_losses.append(svi.step(case.x, **case.kwargs()))

    pyro.clear_param_store()
    step = StaticStep(twin.model, twin.guide, twin.loss, FusedAdam({"lr": 1e-2}), twin.num_labelled)
    static_losses = []
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        value = step(twin.x, twin.y)
        assert torch.is_tensor(value) and not value.requires_grad
        static_losses.append(float(value))
    step.check()

    assert static_losses == pytest.approx(svi_losses, rel=1e-12, abs=1e-12)
    before, ours, theirs = _state(tiny_case(name)), _state(twin), _state(case)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-10, atol=1e-12), key
    assert any(not torch.equal(before[k], ours[k]) for k in ours), "the step did not train"


@pytest.mark.filterwarnings(FROZEN)
@pytest.mark.parametrize("name", ALL_RECIPES)
def test_recipes_marked_capturable_step_on_the_meta_device(name):
    """The meta device has no data: reading a value back (``.item()``, ``bool(t)``), a
    boolean-mask selection and a CPU tensor mixed into the work all fail there, as they
    fail (or go wrong) in a CUDA graph capture.  A recipe marked ``graph_capturable``
    must step there; one not marked must not (the mark is not left off lazily)."""
    case = tiny_case(name).to("meta")
    pyro.clear_param_store()
    step = StaticStep(case.model, case.guide, case.loss, FusedAdam({"lr": 1e-2}), case.num_labelled)
    with pyro.validation_enabled(False):
        if RECIPES[name].graph_capturable:
            with _HostToDeviceCopies() as copies:
                for _ in range(2):  # the second step runs with the optimiser's state in place
                    value = step(case.x, case.y)
            assert value.device.type == "meta" and value.shape == ()
            assert not copies.seen, f"host-to-device copies in the step: {copies.seen}"
        else:
            with pytest.raises((RuntimeError, NotImplementedError)):
                step(case.x, case.y)


class _HostToDeviceCopies(TorchDispatchMode):
    """Records every copy of a CPU tensor to another device (on CUDA: a host-to-device
    transfer, which the meta device itself allows but a graph capture does not hold)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = out
            if isinstance(source, torch.Tensor) and source.device.type == "cpu" and target.device.type != "cpu":
                self.seen.append(f"{func} {tuple(source.shape)}")
        return out


def test_static_step_reports_a_batch_that_breaks_its_label_layout():
    case = tiny_case("m2")
    step = StaticStep(case.model, case.guide, case.loss, FusedAdam({"lr": 1e-3}), case.num_labelled)
    step(case.x, case.y)
    step.check()  # the declared layout: nothing to report
    bad = case.y.clone()
    bad[-2:] = 3  # unlabelled rows with labels: they would train as unlabelled, their labels unused
    with pyro.validation_enabled(False):  # as in a capture
        step(case.x, bad)
        step(case.x, case.y)
        with pytest.raises(LabelLayoutError, match="2 label"):
            step.check()
        step.check()  # reported once, then counted afresh
        bad = case.y.clone()
        bad[0] = -1  # a labelled row without label: the one-hot encoding's device-side assertion
        with pytest.raises(RuntimeError, match="class indices"):
            step(case.x, bad)
    with pytest.raises(LabelLayoutError, match="fewer than the 6 labelled rows"):
        step(case.x[:4], case.y[:4])


def test_static_step_refuses_what_it_cannot_run():
    case = tiny_case("m2")
    with pytest.raises(TypeError, match="pyrodgm loss"):
        StaticStep(case.model, case.guide, pyro.infer.Trace_ELBO(), FusedAdam({"lr": 1e-3}), 6)
    with pytest.raises(ValueError, match="num_labelled"):
        StaticStep(case.model, case.guide, case.loss, FusedAdam({"lr": 1e-3}), -1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_captured_step_needs_cuda():
    case = tiny_case("m2")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        CapturedStep(case.model, case.guide, case.loss, FusedAdam({"lr": 1e-3, "capturable": True}), 6)


def test_labelled_prefix_splits_like_the_labels_do():
    x = torch.arange(24.0).reshape(8, 3)
    y = torch.tensor([4, 0, 2, -1, -1, -1, -1, -1])
    by_mask = split_batch(y, (x,), {"w": x[:, 0]})
    with labelled_prefix(3):
        by_slice = split_batch(y, (x,), {"w": x[:, 0]})
    for a, b in zip(by_mask, by_slice):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        for u, v in zip(a, b):
            u, v = (u["w"], v["w"]) if isinstance(u, dict) else (u, v)
            assert torch.equal(u, v)
    with labelled_prefix(9), pytest.raises(ValueError, match="8 rows, fewer than the 9 labelled"):
        split_batch(y, (x,), {})
    with pytest.raises(ValueError, match="non-negative integer"):
        with labelled_prefix(-1):
            pass


def test_one_hot_rows_is_torchs_one_hot_and_checks_the_range():
    labels = torch.tensor([[0, 3], [2, 1]])
    assert torch.equal(one_hot_rows(labels, 4, torch.float64), F.one_hot(labels, 4).double())
    for bad in (torch.tensor([0, 4]), torch.tensor([-1, 2])):
        with pytest.raises(RuntimeError, match=r"class indices in \[0, 3\]"):
            one_hot_rows(bad, 4, torch.float64)


@pytest.mark.parametrize("name", ["adgm", "cagem"])  # cagem: a WeightedSum with restricted terms (params=)
def test_differentiate_is_loss_and_grads_without_the_float(name):
    case = tiny_case(name)
    params = [p for m in (case.model, case.guide) for p in m.parameters()]
    results = []
    for method in ("loss_and_grads", "differentiate"):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(3)
        value = getattr(case.loss, method)(case.model, case.guide, case.x, y=case.y)
        results.append((value, [None if p.grad is None else p.grad.clone() for p in params]))
    (as_float, grads), (as_tensor, tensor_grads) = results
    assert isinstance(as_float, float) and torch.is_tensor(as_tensor) and not as_tensor.requires_grad
    assert float(as_tensor) == as_float
    assert any(g is not None for g in grads)
    for a, b in zip(grads, tensor_grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_what_a_graph_bakes_in_is_fingerprinted():
    """CapturedStep captures again when one of these changes; each must show."""
    case = tiny_case("cagem")
    pyro.clear_param_store()
    optim = FusedAdam({"lr": 1e-3})
    StaticStep(case.model, case.guide, case.loss, optim, case.num_labelled)(case.x, case.y)

    def fingerprint():
        return (_optimizer_settings(optim), _plain_state(case.loss), _module_state(case.model), _module_state(case.guide))

    start = fingerprint()
    assert fingerprint() == start  # nothing changed, nothing shows
    changes = [
        lambda: optim.set_learning_rate(5e-4),
        lambda: case.loss.terms["elbo"].loss.latent_weights.update(z1=0.5),  # KL warm-up
        lambda: setattr(case.loss.terms["elbo"], "weight", 2.0),
        lambda: case.model.eval(),
        lambda: setattr(case.guide.z1_encoder.head, "min_scale", 0.5),
    ]
    seen = {start}
    for change in changes:
        change()
        now = fingerprint()
        assert now not in seen
        seen.add(now)
    layer = case.model.decoder.hidden_layers[0][0]
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    assert fingerprint() not in seen  # a replaced parameter object: the graph holds the old one
    seen.add(fingerprint())
    norm = next(m for m in case.guide.modules() if isinstance(m, torch.nn.BatchNorm1d))
    norm.running_mean = norm.running_mean.clone()
    assert fingerprint() not in seen  # a replaced buffer, likewise
