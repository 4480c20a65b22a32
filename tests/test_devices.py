"""pyrodgm.devices.host_random_numbers on the CPU: it changes nothing there (the same numbers
for every kind of random op a pyrodgm program draws), and it reaches every random op, not a
list that could miss one.  Its purpose, the same numbers on CUDA, is tests/test_cuda.py's."""

import pyro
import pytest
import torch
import torch.nn.functional as F
from tiny_recipes import tiny_case
from torch.utils._python_dispatch import TorchDispatchMode

from pyrodgm.devices import _is_random, host_random_numbers

pytestmark = pytest.mark.usefixtures("pyro_test_env")

DRAWS = {
    "normal_": lambda: torch.empty(5, 3).normal_(),
    "randn": lambda: torch.randn(4, 2),
    "rand": lambda: torch.rand(7),
    "rand_like": lambda: torch.rand_like(torch.zeros(3, 3)),
    "bernoulli": lambda: torch.bernoulli(torch.full((6,), 0.3)),
    "bernoulli_": lambda: torch.empty(6).bernoulli_(0.7),
    "dropout": lambda: F.dropout(torch.ones(4, 5), 0.5, training=True),
    "multinomial": lambda: torch.multinomial(torch.tensor([0.2, 0.5, 0.3]), 4, replacement=True),
    "randperm": lambda: torch.randperm(9),
    "normal": lambda: torch.normal(torch.zeros(3), torch.ones(3)),
    "gumbel": lambda: pyro.distributions.RelaxedOneHotCategorical(torch.tensor(0.5), logits=torch.zeros(2, 4)).rsample(),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_on_the_cpu_it_draws_what_torch_draws(name):
    torch.manual_seed(3)
    plain = DRAWS[name]()
    torch.manual_seed(3)
    with host_random_numbers():
        hosted = DRAWS[name]()
    assert torch.equal(plain, hosted)


def test_a_models_loss_is_unchanged_on_the_cpu():
    case = tiny_case("conv-mmcva")  # Gaussian noise and dropout
    values = []
    for hosted in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        if hosted:
            with host_random_numbers():
                values.append(case.loss.loss(case.model, case.guide, case.x, y=case.y))
        else:
            values.append(case.loss.loss(case.model, case.guide, case.x, y=case.y))
    assert values[0] == values[1]


class _RandomOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_random(func):
            self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


def test_it_recognises_the_random_ops_by_torchs_own_tag():
    """Every draw above dispatches an op the tag marks; deterministic ops are not marked."""
    for name, draw in DRAWS.items():
        with _RandomOps() as ops:
            draw()
        assert ops.seen, name
    assert not _is_random(torch.ops.aten.add.Tensor) and not _is_random(torch.ops.aten.mm.default)
