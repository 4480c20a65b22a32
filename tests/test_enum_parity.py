"""SemiSupervisedELBO (``analytic_kl=False``) as a drop-in for Pyro's estimators: the same
value and the same gradient of every param, for the same seed, as
:class:`~pyro.infer.TraceEnum_ELBO` for guide-side enumeration (vectorised particles
included), and as :class:`~pyro.infer.TraceGraph_ELBO` for guides with baselines.

The cases port the guide-side models of Pyro's ``tests/infer/test_enum.py`` (and
``test_gradient.py``, ``test_valid_models.py``): Pyro's tests check against closed-form KLs
or with many particles, these check against Pyro itself with one noise draw.  Model-side
enumeration is not ported: pyrodgm enumerates only in the guide, and must refuse a model
latent the guide lacks.
"""

import contextlib
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.testing.rejection_gamma import ShapeAugmentedGamma
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO, config_enumerate
from pyro.ops.indexing import Vindex
from torch.distributions import kl_divergence

from pyrodgm.losses import SemiSupervisedELBO

pytestmark = pytest.mark.usefixtures("pyro_test_env")

# hypothesis's pytest plugin imports libcst to report a failing example, and that import
# warns (mypy_extensions.TypedDict), an INTERNALERROR under filterwarnings=error: import it now
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import libcst  # noqa: F401

P = 0.2693204236205713  # Pyro's constant: kl(Bernoulli(0.75), Bernoulli(P)) = 0.5
PAR = {"enumerate": "parallel"}
# P: enumerated; S: sampled, not enumerated (score function); N: multiply sampled (num_samples)
INFER = {"P": PAR, "S": {}, "N": {"enumerate": "parallel", "num_samples": 3}}
UNIT = constraints.unit_interval


# ---- helpers -------------------------------------------------------------------------
def pyro_enum(max_plate_nesting, num_particles=1):
    return TraceEnum_ELBO(max_plate_nesting=max_plate_nesting, num_particles=num_particles,
                          vectorize_particles=True, strict_enumeration_warning=False)


def ours(max_plate_nesting, num_particles=1, **kwargs):
    return SemiSupervisedELBO(num_particles=num_particles, analytic_kl=False, max_plate_nesting=max_plate_nesting, **kwargs)


def value_and_grads(loss, model, guide, *args, seed=0, **kwargs):
    """``differentiable_loss`` (detached) and its gradient w.r.t. every param it reached
    (unconstrained; zero where it does not depend on one), after seeding with ``seed``."""
    pyro.set_rng_seed(seed)
    with poutine.trace(param_only=True) as capture:
        value = loss.differentiable_loss(model, guide, *args, **kwargs)
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return value.detach(), {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def assert_same(actual, expected, what=""):
    (value, grads), (value_e, grads_e) = actual, expected
    torch.testing.assert_close(value, value_e, rtol=1e-10, atol=1e-12, msg=lambda m: f"loss {what}\n{m}")
    assert set(grads) == set(grads_e), what
    for name in grads_e:
        torch.testing.assert_close(grads[name], grads_e[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name!r} {what}\n{m}")


def assert_same_as_pyro(model, guide, *args, max_plate_nesting, num_particles=1, seed=0, **kwargs):
    """Our loss and gradients equal TraceEnum_ELBO's for the same seed; returns Pyro's."""
    expected = value_and_grads(pyro_enum(max_plate_nesting, num_particles), model, guide, *args, seed=seed, **kwargs)
    actual = value_and_grads(ours(max_plate_nesting, num_particles), model, guide, *args, seed=seed, **kwargs)
    assert_same(actual, expected)
    return expected


def outcome(loss, model, guide, *args, **kwargs):
    """``(value, grads, warnings)`` of value_and_grads, or the exception it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value, grads = value_and_grads(loss, model, guide, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any refusal counts
            return error
    return value, grads, {(w.category, str(w.message)) for w in caught}


def assert_same_or_both_raise(model, guide, *args, max_plate_nesting, num_particles=1, seed=0):
    """Where Pyro raises, pyrodgm raises too (never a number); otherwise pyrodgm gives
    Pyro's loss and gradients and warns exactly what Pyro warns (its "possibly invalid
    dependency"), unless it refuses what Pyro warned of.  Returns Pyro's outcome."""
    expected = outcome(pyro_enum(max_plate_nesting, num_particles), model, guide, *args, seed=seed)
    actual = outcome(ours(max_plate_nesting, num_particles), model, guide, *args, seed=seed)
    if isinstance(expected, Exception):
        assert isinstance(actual, Exception), f"Pyro raised {expected!r} but pyrodgm gave {actual[0]}"
    elif isinstance(actual, Exception) and not expected[2]:
        raise actual
    elif not isinstance(actual, Exception):
        assert_same(actual[:2], expected[:2])
        assert actual[2] == expected[2], f"Pyro warned {expected[2]}, pyrodgm {actual[2]}"
    return expected


def assert_same_or_refused(site, model, guide, *args, max_plate_nesting=1):
    """pyrodgm gives TraceEnum_ELBO's loss and gradients, or refuses naming ``site``."""
    expected = value_and_grads(pyro_enum(max_plate_nesting), model, guide, *args)
    try:
        actual = value_and_grads(ours(max_plate_nesting), model, guide, *args)
    except (ValueError, NotImplementedError) as error:
        assert f"'{site}'" in str(error) or f'"{site}"' in str(error), error
    else:
        assert_same(actual, expected)


def store_grads(loss, model, guide, *args, seed=0):
    """``loss_and_grads`` from zeroed grads: the value and every store param's ``.grad``
    (the decaying-average baselines' state, ``__baseline*``, left out)."""
    store = pyro.get_param_store()
    for _, p in store.named_parameters():
        p.grad = None
    pyro.set_rng_seed(seed)
    value = loss.loss_and_grads(model, guide, *args)
    return torch.tensor(value), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                 for n, p in store.named_parameters() if not n.startswith("__baseline")}


def twins(program, model_probs, guide_probs, config):
    """The model (``model_probs``, nothing enumerated) and the guide (param ``q``
    initialised at ``guide_probs``, site i's infer ``INFER[config[i]]``, or ``config[i]``
    if a dict) of one program."""
    model = program(lambda: torch.as_tensor(model_probs), lambda i: {})
    guide = program(lambda: pyro.param("q", torch.as_tensor(guide_probs), constraint=UNIT),
                    lambda i: config[i] if isinstance(config[i], dict) else INFER[config[i]])
    return model, guide


# ---- 1. single sites and global sites (test_elbo_bern, test_elbo_categoricals, ...) ----
@pytest.mark.parametrize("method", ["loss", "differentiable_loss", "loss_and_grads"])
@pytest.mark.parametrize("scale", [1, 10])
def test_elbo_bern(method, scale):
    """Port of test_enum.py::test_elbo_bern (enumerate1="parallel"; its "particles" plate
    is "data" here): exact, so both equal scale * N * KL(q || p)."""
    def program(probs, infer):
        @poutine.scale(scale=scale)
        def run():
            with pyro.plate("data", 3):
                pyro.sample("z", dist.Bernoulli(probs()), infer=infer(0))
        return run

    model, guide = twins(program, 0.25, 0.5, "P")
    run = {"loss": lambda loss: (torch.tensor(loss.loss(model, guide)), {}),
           "differentiable_loss": lambda loss: value_and_grads(loss, model, guide),
           "loss_and_grads": lambda loss: store_grads(loss, model, guide)}[method]
    pyro.set_rng_seed(0)
    expected = run(pyro_enum(1))
    pyro.set_rng_seed(0)
    assert_same(run(ours(1)), expected)
    q = torch.tensor(0.5, requires_grad=True)
    kl = scale * 3 * kl_divergence(dist.Bernoulli(q), dist.Bernoulli(0.25))
    assert expected[0].item() == pytest.approx(kl.item(), rel=1e-12)
    if method != "loss":
        assert expected[1]["q"].item() == pytest.approx(torch.autograd.grad(kl, q)[0].item() * 0.25, rel=1e-10)


@pytest.mark.parametrize("infer", ["P", "N"])
@pytest.mark.parametrize("max_plate_nesting", [0, 1])
def test_elbo_categoricals(max_plate_nesting, infer):
    """Port of test_enum.py::test_elbo_categoricals (all parallel; N: num_samples=3)."""
    ps = [torch.tensor([0.6, 0.4]), torch.tensor([0.3, 0.3, 0.4]), torch.tensor([0.1, 0.2, 0.3, 0.4])]
    qs = [torch.tensor([0.4, 0.6]), torch.tensor([0.4, 0.3, 0.3]), torch.tensor([0.4, 0.3, 0.2, 0.1])]

    def model():
        for i, p in enumerate(ps):
            pyro.sample(f"x{i}", dist.Categorical(p))

    def guide():
        for i, q in enumerate(qs):
            pyro.sample(f"x{i}", dist.Categorical(pyro.param(f"q{i}", q, constraint=constraints.simplex)), infer=INFER[infer])

    value, _ = assert_same_as_pyro(model, guide, max_plate_nesting=max_plate_nesting)
    exact = sum(kl_divergence(dist.Categorical(q), dist.Categorical(p)) for p, q in zip(ps, qs))
    assert (value.item() == pytest.approx(exact.item(), rel=1e-12)) == (infer == "P")


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("config", ["PPP", "SPS", "PSP", "SSS", "NNN", "NSP", "NxN", "xNx"])
def test_elbo_berns_and_normals(config, num_particles):
    """Ports of test_enum.py::test_elbo_bern_bern / test_elbo_berns (Bernoullis) and, with
    an x (a plain reparameterised site) in the config, test_elbo_normals (Normals, N
    multiply sampled beside reparameterised ones)."""
    normal = "x" in config

    def model():
        for i, p in enumerate([0.1, 0.2, 0.3]):
            pyro.sample(f"x{i}", dist.Normal(p, 1.0) if normal else dist.Bernoulli(p))

    def guide():
        q = pyro.param("q", torch.tensor(0.75), constraint=UNIT)
        for i, c in enumerate(config):
            pyro.sample(f"x{i}", dist.Normal(q, 1.0) if normal else dist.Bernoulli(q), infer=INFER.get(c, {}))

    assert_same_as_pyro(model, guide, max_plate_nesting=0, num_particles=num_particles)


# ---- 2. plates (test_elbo_plate, test_elbo_iplate, test_elbo_plate_plate, ...) --------
@pytest.mark.parametrize("layout", ["plate", "iplate"])
@pytest.mark.parametrize("plate_dim", [1, 2])
@pytest.mark.parametrize("config", ["PP", "SP", "PS", "NN"])
def test_elbo_plate(config, plate_dim, layout):
    """Ports of test_enum.py::test_elbo_plate and ::test_elbo_iplate: a site in "data" and
    sites in a vectorised plate nested in it, or in a sequential one."""
    def program(q, infer):
        def run():
            with pyro.plate("data", 3):  # Pyro's "particles" plate
                pyro.sample("y", dist.Bernoulli(q()), infer=infer(0))
                if layout == "plate":
                    with pyro.plate("plate", plate_dim):
                        pyro.sample("z", dist.Bernoulli(q()).expand([plate_dim, 3]), infer=infer(1))
                else:
                    for i in pyro.plate("plate", plate_dim):
                        pyro.sample(f"z_{i}", dist.Bernoulli(q()), infer=infer(1))
        return run

    value, _ = assert_same_as_pyro(*twins(program, P, 0.75, config), max_plate_nesting=2 if layout == "plate" else 1)
    if config == "PP":
        assert value.item() == pytest.approx(3 * 0.5 * (1 + plate_dim), rel=1e-10)


@pytest.mark.parametrize("dependent", [False, True])
@pytest.mark.parametrize("config", ["PPPP", "SPPS", "PSSP", "NNNN", "PNSP"])
def test_elbo_plate_plate(config, dependent):
    """Port of test_enum.py::test_elbo_plate_plate: w global, x in "data" (dim -1), y in
    "inner" (dim -2), z in both.  ``dependent``: the local sites depend on w (a global
    enumerated site beside per-datapoint ones)."""
    def program(probs, infer):
        def run():
            w = pyro.sample("w", dist.Bernoulli(probs()[0]), infer=infer(0))
            row = probs()[w.long()] if dependent else probs()[1]
            outer, inner = pyro.plate("data", 2, dim=-1), pyro.plate("inner", 3, dim=-2)
            with outer:
                pyro.sample("x", dist.Bernoulli(row), infer=infer(1))
            with inner:
                pyro.sample("y", dist.Bernoulli(row), infer=infer(2))
            with outer, inner:
                pyro.sample("z", dist.Bernoulli(row), infer=infer(3))
        return run

    result = assert_same_or_both_raise(*twins(program, [P, 0.6], [0.75, 0.4], config), max_plate_nesting=2)
    if config == "PNSP" and dependent:  # Pyro's multiple sampling (tmc="diagonal") of 3 x's
        assert isinstance(result, IndexError), result  # downstream of w's 2 values fails
    else:
        assert not result[2], result[2]  # no warning
    if config == "PPPP" and not dependent:
        kl = kl_divergence(dist.Bernoulli(torch.tensor(0.4)), dist.Bernoulli(torch.tensor(0.6)))
        assert result[0].item() == pytest.approx(0.5 + (2 + 3 + 6) * kl.item(), rel=1e-10)


@pytest.mark.parametrize("layout", ["plate_iplate", "iplate_plate", "iplate_iplate"])
@pytest.mark.parametrize("config", ["PPP", "SPP", "PPS"])
def test_elbo_mixed_plates(layout, config):
    """Ports of test_enum.py::test_elbo_plate_iplate, ::test_elbo_iplate_plate and
    ::test_elbo_iplate_iplate (the inner plate one object, re-entered, as there)."""
    def program(q, infer):
        def run():
            with pyro.plate("data", 2):
                pyro.sample("x", dist.Bernoulli(q()), infer=infer(0))
                if layout == "plate_iplate":
                    with pyro.plate("outer", 3, dim=-2):
                        pyro.sample("y", dist.Bernoulli(q()).expand([3, 2]), infer=infer(1))
                        for i in pyro.plate("inner", 2):
                            pyro.sample(f"z_{i}", dist.Bernoulli(q()).expand([3, 2]), infer=infer(2))
                    return
                inner = pyro.plate("inner", 3, dim=-2) if layout == "iplate_plate" else pyro.plate("inner", 2)
                for i in pyro.plate("outer", 2):
                    pyro.sample(f"y_{i}", dist.Bernoulli(q()), infer=infer(1))
                    if layout == "iplate_plate":
                        with inner:
                            pyro.sample(f"z_{i}", dist.Bernoulli(q()).expand([3, 2]), infer=infer(2))
                    else:
                        for j in inner:
                            pyro.sample(f"z_{i}_{j}", dist.Bernoulli(q()), infer=infer(2))
        return run

    assert_same_as_pyro(*twins(program, P, 0.75, config), max_plate_nesting=1 if layout == "iplate_iplate" else 2)


# ---- 3. dependent structures: rsvi, HMM in the guide, mixtures ------------------------
@pytest.mark.parametrize("enumerate1", [None, "parallel"])
def test_elbo_rsvi(enumerate1):
    """Port of test_enum.py::test_elbo_rsvi: a Bernoulli (enumerated, or score function)
    beside a rejection-sampled Gamma whose score_parts carry a score-function part too."""
    def model():
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Bernoulli(0.25))
            pyro.sample("y", dist.Gamma(0.5, 1.0))

    @config_enumerate(default=enumerate1)
    def guide():
        q = pyro.param("q", torch.tensor(0.5), constraint=UNIT)
        a = pyro.param("a", torch.tensor(1.5), constraint=constraints.positive)
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Bernoulli(q))
            pyro.sample("y", ShapeAugmentedGamma(a, torch.tensor(1.0)))

    assert_same_as_pyro(model, guide, max_plate_nesting=1)


def hmm_in_guide(expand, batch=None):
    """test_enum.py::test_elbo_hmm_in_guide's model and guide; with ``batch``, a batch of
    sequences in pyro.plate("data", batch)."""
    init, start = torch.tensor([0.5, 0.5]), torch.tensor([[0.75, 0.25], [0.25, 0.75]])

    def program(observe):
        def run(data):
            plate = pyro.plate("data", batch) if batch else contextlib.nullcontext()  # one object per run
            transition = pyro.param("transition_probs", start.clone(), constraint=constraints.simplex)
            emission = pyro.param("emission_probs", start.clone(), constraint=constraints.simplex) if observe else None
            x = None
            for i, y in pyro.markov(enumerate(data)):
                with plate:
                    x = pyro.sample(f"x_{i}", dist.Categorical(init if x is None else transition[x]))
                    if observe:
                        pyro.sample(f"y_{i}", dist.Categorical(emission[x]), obs=y)
        return run

    return program(True), config_enumerate(program(False), default="parallel", expand=expand)


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("num_steps", [2, 3, 5])
def test_elbo_hmm_in_guide(num_steps, expand):
    """Port of test_enum.py::test_elbo_hmm_in_guide: pyro.markov in an enumerated guide,
    which recycles enumeration dims when expand=False (config_enumerate's default)."""
    _, grads = assert_same_as_pyro(*hmm_in_guide(expand), torch.ones(num_steps), max_plate_nesting=0)
    golden = {  # Pyro's golden gradients, which the port reproduces
        2: {"transition_probs": [[0.1029949, -0.1029949]] * 2, "emission_probs": [[0.75, -0.75], [0.25, -0.25]]},
        3: {"transition_probs": [[0.25748726, -0.25748726]] * 2, "emission_probs": [[1.125, -1.125], [0.375, -0.375]]},
    }
    for name, value in golden.get(num_steps, {}).items():
        torch.testing.assert_close(grads[name], torch.tensor(value), rtol=0, atol=1e-7)


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("num_particles", [1, 2])
def test_elbo_hmm_in_guide_batched(expand, num_particles):
    """test_elbo_hmm_in_guide with a batch of 3 sequences of 4 steps in the data plate."""
    data = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]])  # (time, batch)
    assert_same_as_pyro(*hmm_in_guide(expand, batch=3), data, max_plate_nesting=1, num_particles=num_particles)


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("enumerate_c", ["parallel", None])
def test_gaussian_mixture(enumerate_c, num_particles):
    """A mixture (test_enum.py's gmm models): a global reparameterised location,
    per-datapoint assignments (enumerated, or score function) and a per-datapoint
    continuous latent depending on them."""
    def model(x):
        weights = pyro.param("weights", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 2.0).to_event(1))
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(weights))
            z = pyro.sample("z", dist.Normal(Vindex(mu)[..., c], 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        w, shift = pyro.param("w", torch.tensor([1.0, -1.0])), pyro.param("shift", torch.tensor([0.1, -0.2]))
        pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.tensor([-0.5, 0.5])), 0.3).to_event(1))
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(logits=w * x.unsqueeze(-1)), infer={"enumerate": enumerate_c})
            scale = pyro.param("scale", torch.tensor(0.7), constraint=constraints.positive)
            pyro.sample("z", dist.Normal(0.8 * x + shift[c], scale))

    x = torch.tensor([0.3, -1.2, 2.0, 0.7])
    assert_same_as_pyro(model, guide, x, max_plate_nesting=1, num_particles=num_particles)


# ---- 4. scale, mask, subsample --------------------------------------------------------
@pytest.mark.parametrize("num_particles", [1, 2])
@pytest.mark.parametrize("variant", ["subsample", "mask", "scale"])
def test_scale_mask_subsample(variant, num_particles):
    """pyro.plate's subsample_size (a scale N/n on the local sites), poutine.mask
    (observations and enumerated latents masked per datapoint) and poutine.scale around
    both programs, with an enumerated local site and a reparameterised global one."""
    data = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.1, 1.5])
    size = 3 if variant == "subsample" else None
    mask = torch.tensor([True, False, True, True, False, True])
    masked = poutine.mask(mask=mask) if variant == "mask" else contextlib.nullcontext()

    def program(role):
        @poutine.scale(scale=0.1 if variant == "scale" else 1.0)
        def run():
            q = pyro.param("q", torch.full((6,), 0.4), constraint=UNIT) if role == "guide" else torch.full((6,), 0.3)
            prior = dist.Normal(pyro.param("loc_q", torch.tensor(0.2)), 0.5) if role == "guide" else dist.Normal(0.0, 2.0)
            loc = pyro.sample("loc", prior)
            with pyro.plate("data", len(data), subsample_size=size) as ind, masked:
                c = pyro.sample("c", dist.Bernoulli(q[ind]), infer=PAR if role == "guide" else {})
                if role == "model":
                    pyro.sample("x", dist.Normal(loc + 2 * c - 1, 1.0), obs=data[ind])
        return run

    assert_same_as_pyro(program("model"), program("guide"), max_plate_nesting=1, num_particles=num_particles)


# ---- 5. discrete guide sites that are not enumerated: the score function, as Dice has it ----
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("structure", ["local", "global_then_enumerated", "enumerated_then_sampled", "nonreparam_normal"])
def test_score_function_sites(structure, num_particles):
    """Sampled discrete guide sites (not enumerated): a local one below an enumerated global
    one; a global one above an enumerated local one; one below an enumerated one; and
    test_gradient.py's test_particle_gradient, a Normal whose has_rsample is False."""
    def model():
        g = pyro.sample("g", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])))
        with pyro.plate("data", 3):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor([0.3, 0.6, 0.5])[g]))
            b = pyro.sample("b", dist.Normal(c, 1.0) if structure == "nonreparam_normal" else dist.Bernoulli(0.4 + 0.2 * c))
            pyro.sample("x", dist.Normal(g + c - b, 1.0), obs=torch.tensor([0.3, -1.2, 2.0]))

    def guide():
        qg = pyro.param("qg", torch.tensor([0.5, 0.2, 0.3]), constraint=constraints.simplex)
        qc = pyro.param("qc", torch.tensor([0.5, 0.45, 0.3]), constraint=UNIT)
        qb = pyro.param("qb", torch.tensor([0.3, 0.8]))
        g = pyro.sample("g", dist.Categorical(qg), infer={} if structure == "global_then_enumerated" else PAR)
        with pyro.plate("data", 3):
            c = pyro.sample("c", dist.Bernoulli(qc[g]), infer={} if structure == "local" else PAR)
            if structure == "nonreparam_normal":
                pyro.sample("b", dist.Normal(qb[c.long()], 1.0).has_rsample_(False))
            else:
                pyro.sample("b", dist.Bernoulli(qb.sigmoid()[c.long()]), infer=PAR if structure == "local" else {})

    assert_same_as_pyro(model, guide, max_plate_nesting=1, num_particles=num_particles)


def test_sequential_enumeration_is_exact_or_refused():
    """infer={"enumerate": "sequential"} in the guide (test_enum.py's "sequential" cases):
    TraceEnum_ELBO sums the site exactly, running the guide once per value."""
    def program(q, infer):
        def run():
            with pyro.plate("data", 2):
                c = pyro.sample("c", dist.Bernoulli(q()), infer=infer(0))
                if not infer(0):  # the model
                    pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=torch.tensor([0.5, -1.0]))
        return run

    assert_same_or_refused("c", *twins(program, 0.3, 0.6, [{"enumerate": "sequential"}]))


def test_a_model_latent_missing_from_the_guide_is_refused():
    """Model-side enumeration (test_enum.py::test_elbo_hmm_in_model, test_elbo_enumerate_*)
    is not ported: TraceEnum_ELBO sums ``c`` out in the model, pyrodgm must refuse it."""
    def model():
        with pyro.plate("data", 2):
            c = pyro.sample("c", dist.Bernoulli(0.3), infer=PAR)
            pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(c, 1.0)), 1.0), obs=torch.tensor([0.5, -1.0]))

    def guide():
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.1)), 1.0))

    assert torch.isfinite(value_and_grads(pyro_enum(1), model, guide)[0])
    with pytest.warns(UserWarning, match="model but not guide"):  # Pyro's own check, then pyrodgm's (test_adgm.py's style)
        with pytest.raises(ValueError, match="model site 'c'"):
            ours(1).loss(model, guide)


# ---- 6. baselines: equal to TraceGraph_ELBO when nothing is enumerated ----------------
def baseline_pair(kind):
    """b ~ Bernoulli per datapoint with a baseline, a reparameterised z beside it;
    "two_sites": a second, independent b2 (TraceGraph_ELBO's provenance tracking keeps b2's
    costs out of b's score term, which Dice does not); "beside_enumerated": b enumerated,
    b2 sampled with a baseline."""
    x = torch.tensor([0.3, -1.2, 2.0])
    net = torch.nn.Linear(3, 3)  # the nn_baseline: x -> one baseline per datapoint
    with torch.no_grad():
        net.weight.copy_(0.1 * torch.arange(9.0).reshape(3, 3) - 0.4)
        net.bias.fill_(-0.2)
    two = kind in ("two_sites", "beside_enumerated")

    def model():
        with pyro.plate("data", 3):
            b = pyro.sample("b", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(2 * b - 1 + pyro.sample("z", dist.Normal(0.0, 1.0)), 1.0), obs=x)
            if two:
                pyro.sample("x2", dist.Normal(pyro.sample("b2", dist.Bernoulli(0.6)), 1.0), obs=x)

    def guide():
        q = pyro.param("q", torch.tensor([0.6, 0.4, 0.5]), constraint=UNIT)
        if kind == "nn_baseline":
            pyro.module("baseline", net)
            baseline = {"nn_baseline": net, "nn_baseline_input": x}
        elif kind == "baseline_value":
            baseline = {"baseline_value": pyro.param("baseline_value", torch.tensor([0.5, -0.5, 1.0]))}
        else:
            baseline = {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}
        with pyro.plate("data", 3):
            b = pyro.sample("b", dist.Bernoulli(q), infer=PAR if kind == "beside_enumerated" else {"baseline": baseline})
            pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(3)) + 0.5 * b, 1.0))
            if two:
                pyro.sample("b2", dist.Bernoulli(1 - q), infer={"baseline": baseline})

    return model, guide


@pytest.mark.parametrize("kind", ["decaying_avg", "nn_baseline", "baseline_value", "two_sites"])
def test_baselines_match_trace_graph_elbo(kind):
    """Guides with infer={"baseline": ...} (Pyro's tracegraph_elbo baselines):
    loss_and_grads equals TraceGraph_ELBO's, over two steps (a decaying average is zero on
    the first, Pyro's average of it on the second)."""
    model, guide = baseline_pair(kind)
    store, runs = pyro.get_param_store(), []
    for loss in (TraceGraph_ELBO(max_plate_nesting=1), ours(1)):
        for name in [n for n in store.keys() if n.startswith("__baseline")]:
            del store[name]  # each estimator starts its decaying average afresh
        runs.append([store_grads(loss, model, guide, seed=seed) for seed in (0, 1)])
    for step, (expected, actual) in enumerate(zip(*runs)):
        assert_same(actual, expected, f"at step {step}")
    if kind == "nn_baseline":  # the baseline's own loss trains the net
        assert runs[0][1][1]["baseline$$$weight"].abs().sum() > 0
    # the baseline matters: Dice (TraceEnum_ELBO, no baselines) gives another gradient
    assert not torch.allclose(store_grads(pyro_enum(1), model, guide, seed=1)[1]["q"], runs[0][1][1]["q"])


def test_baselines_beside_enumerated_sites_are_refused_or_ignored():
    """TraceEnum_ELBO ignores baselines, TraceGraph_ELBO does not enumerate: a guide with
    both gives TraceEnum_ELBO's number or is refused, naming the baseline site."""
    assert_same_or_refused("b2", *baseline_pair("beside_enumerated"))


# ---- 7. labelled batches: TraceEnum_ELBO on the labelled part plus the unlabelled part ----
def ss_pair():
    def model(x):
        prior = pyro.param("prior", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(prior))
            pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(Vindex(locs)[..., y], 1.0)), 0.5), obs=x)

    def guide(x):
        w, shift = pyro.param("w", torch.tensor([0.5, -0.5])), pyro.param("shift", torch.tensor([0.2, -0.3]))
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=w * x.unsqueeze(-1)), infer=PAR)
            pyro.sample("z", dist.Normal(0.5 * x + Vindex(shift)[..., y], 0.8))

    return model, guide


@pytest.mark.parametrize("num_particles", [1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_labelled_batch_is_the_sum_of_its_parts(alpha, num_particles):
    """SemiSupervisedELBO(x, y=labels) (elbo.py's module docstring: -L(x, y) for labelled
    rows, y observed in model and guide and so no log q(y) term; -U(x) for the others;
    alpha * -log q(y|x) per labelled row) equals TraceEnum_ELBO on the labelled rows with y
    conditioned in the model and conditioned and hidden in the guide (Dice would count an
    observed guide site's log q), plus TraceEnum_ELBO on the unlabelled rows, in that order
    for the same noise; gradients too."""
    model, guide = ss_pair()
    x, labels = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4]), torch.tensor([1, -1, 0, -1, 1])
    lab = labels != -1
    x_l, y_l, x_u = x[lab], labels[lab], x[~lab]
    model_l = poutine.condition(model, data={"y": y_l})
    guide_l = poutine.block(poutine.condition(guide, data={"y": y_l}), hide=["y"])
    pyro.set_rng_seed(3)
    with poutine.trace(param_only=True) as capture:
        elbo = pyro_enum(1, num_particles)
        expected = elbo.differentiable_loss(model_l, guide_l, x_l) + elbo.differentiable_loss(model, guide, x_u)
        expected = expected - alpha * dist.Categorical(logits=pyro.param("w") * x_l.unsqueeze(-1)).log_prob(y_l).sum()
    params = {n: s["value"].unconstrained() for n, s in capture.trace.nodes.items()}
    expected_grads = dict(zip(params, torch.autograd.grad(expected, list(params.values()))))
    actual = value_and_grads(ours(1, num_particles, alpha=alpha), model, guide, x, seed=3, y=labels)
    assert_same(actual, (expected.detach(), expected_grads))


# ---- 8. random structures (hypothesis) ------------------------------------------------
LEVEL = {"global": 0, "data": 1, "inner": 2}


@st.composite
def structures(draw):
    """1-3 categorical guide sites (2-3 categories; in no plate, in "data", or in "data" x
    "inner", the more global first; each maybe depending on an earlier one; enumerated, or
    now and then sampled), an optional pyro.markov chain after them (expand or not), a
    reparameterised Normal depending on the sites, in their plates, and an observation of
    it; each discrete site observed through a Normal.  ``invalid``: the Normal is put
    outside the plates of a site it depends on (Pyro raises, or warns of the dependency)."""
    sites = []
    for i, where in enumerate(sorted(draw(st.lists(st.sampled_from(list(LEVEL)), min_size=1, max_size=3)), key=LEVEL.get)):
        sites.append({"k": draw(st.integers(2, 3)), "where": where, "parent": draw(st.sampled_from([None, *range(i)])),
                      "infer": draw(st.sampled_from([PAR, PAR, PAR, {}]))})
    deepest = max(LEVEL[s["where"]] for s in sites)
    chain_where = ["data", "global"] if deepest == 0 else ["data"] if deepest == 1 else []  # Pyro warns of a
    chain = draw(st.none() | st.fixed_dictionaries(  # global site after a local enumerated one
        {"length": st.integers(2, 3), "where": st.sampled_from(chain_where)})) if chain_where else None
    invalid = deepest >= 1 and draw(st.integers(0, 7)) == 0
    return {
        "sites": sites, "chain": chain, "expand": draw(st.booleans()), "invalid": invalid,
        "z_where": "global" if invalid else draw(st.sampled_from([w for w in LEVEL if LEVEL[w] >= max(deepest, 1)])),
        "n_data": 3 if invalid else draw(st.integers(1, 3)), "n_inner": draw(st.integers(1, 2)),
        "num_particles": draw(st.sampled_from([1, 2])), "extra_nesting": draw(st.integers(0, 1)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(spec):
    """The model, the guide and max_plate_nesting of a structure, the params drawn from its
    seed (``p*`` the model's, ``q*`` the guide's)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    randn = lambda *shape: torch.randn(shape, generator=gen)  # noqa: E731
    shape = {"global": (), "data": (spec["n_data"],), "inner": (spec["n_inner"], spec["n_data"])}
    sites, chain = spec["sites"], spec["chain"]
    init, obs = {"zscale": torch.tensor(0.8)}, {}
    for i, s in enumerate(sites):
        lead = () if s["parent"] is None else (sites[s["parent"]]["k"],)
        for role in "pq":
            init[f"{role}{i}"], init[f"{role}e{i}"] = randn(*lead, s["k"]), randn(s["k"])
        obs[f"o{i}"] = randn(*shape[s["where"]])
    for role in "pq" if chain else "":
        init[f"{role}_init"], init[f"{role}_trans"] = randn(2), randn(2, 2)
    for t in range(chain["length"] if chain else 0):
        obs[f"y{t}"] = randn(*shape[chain["where"]])
    init["zloc"], obs["x"] = randn(*shape[spec["z_where"]]), randn(*shape[spec["z_where"]])

    def program(role):
        def run():
            def param(name):
                return pyro.param(name, init[name], constraint=constraints.positive if name == "zscale" else constraints.real)

            data, inner = pyro.plate("data", spec["n_data"], dim=-1), pyro.plate("inner", spec["n_inner"], dim=-2)

            def plates(where):
                stack = contextlib.ExitStack()
                for plate in [data, inner][: LEVEL[where]]:
                    stack.enter_context(plate)
                return stack

            def sample(name, logits, where, infer, emission, observed):
                with plates(where):
                    infer = {**infer, "expand": spec["expand"]} if infer and role == "q" else {}
                    value = pyro.sample(name, dist.Categorical(logits=logits), infer=infer)
                    if role == "p":
                        pyro.sample(observed, dist.Normal(param(emission)[value], 1.0), obs=obs[observed])
                return value

            values, loc = [], 0.0
            for i, s in enumerate(sites):
                logits = param(f"{role}{i}") if s["parent"] is None else Vindex(param(f"{role}{i}"))[..., values[s["parent"]], :]
                values.append(sample(f"c{i}", logits, s["where"], s["infer"], f"pe{i}", f"o{i}"))
                loc = loc + param(f"{role}e{i}")[values[-1]]
            m = None
            for t in pyro.markov(range(chain["length"] if chain else 0)):
                logits = param(f"{role}_init") if m is None else Vindex(param(f"{role}_trans"))[..., m, :]
                m = sample(f"m{t}", logits, chain["where"], PAR, "p_init", f"y{t}")
            with plates(spec["z_where"]):
                if role == "p":
                    pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(loc, 1.0)), 1.0), obs=obs["x"])
                else:
                    pyro.sample("z", dist.Normal(param("zloc") + loc, param("zscale")))
        return run

    used = [s["where"] for s in sites] + [spec["z_where"]] + ([chain["where"]] if chain else [])
    return program("p"), program("q"), max(LEVEL[w] for w in used) + spec["extra_nesting"]


@settings(max_examples=40, deadline=None, database=None, derandomize=True, phases=[Phase.generate, Phase.shrink],  # no example database
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=structures())
def test_random_structures_match_trace_enum_elbo(spec):
    """Random guide-enumerated structures: pyrodgm's loss and gradients equal
    TraceEnum_ELBO's for the same seed; where Pyro raises, pyrodgm raises; where Pyro warns
    of an invalid dependency (and gives a number), pyrodgm refuses, or warns the same and
    gives the same number."""
    pyro.clear_param_store()
    model, guide, nesting = build(spec)
    result = assert_same_or_both_raise(model, guide, max_plate_nesting=nesting, num_particles=spec["num_particles"])
    refused = isinstance(result, Exception) or bool(result[2])  # Pyro raised, or warned of an invalid dependency
    assert refused == spec["invalid"], result  # the generator knows which structures are invalid
