"""Labelled batches with any guide: ``SemiSupervisedELBO(label_rows="mask")`` runs the whole
batch once, the labelled rows weighed with the indicator of their label, and must give
the objective the row split gives; autoguides (one parameter per datapoint) train with
labels; a sequentially enumerated guide site is refused, naming it."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDiscreteParallel, AutoGuideList, AutoNormal

from pyrodgm.losses import SemiSupervisedELBO

pytestmark = pytest.mark.usefixtures("pyro_test_env")

PRIOR = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
LABELS = torch.tensor([0, 2, -1, -1, 1, -1, 2])


def _discrete_pair(one_hot: bool, global_site: bool):
    """y in the data plate (integer or one-hot), x | y observed; optionally a global
    enumerated site c beside it (a structure Pyro's Dice contraction computes)."""
    site = dist.OneHotCategorical if one_hot else dist.Categorical

    def value_of(y):
        return (y * torch.arange(3.0)).sum(-1) if one_hot else y.to(torch.get_default_dtype())

    def model(x):
        shift = pyro.sample("c", dist.Bernoulli(0.4)) if global_site else 0.0
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", site(PRIOR))
            pyro.sample("x", dist.Normal(value_of(y) + shift, 1.0), obs=x)

    @config_enumerate
    def guide(x):
        if global_site:
            pyro.sample("c", dist.Bernoulli(pyro.param("c_prob", torch.tensor(0.3), constraint=dist.constraints.unit_interval)))
        w = pyro.param("w", torch.tensor([0.1, -0.2, 0.3]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", site(logits=w * x.unsqueeze(-1)))

    return model, guide


def _value_and_grads(loss, model, guide, *args, **kwargs):
    value = loss.differentiable_loss(model, guide, *args, **kwargs)
    names = sorted(pyro.get_param_store().keys())
    grads = torch.autograd.grad(value, [pyro.param(n).unconstrained() for n in names])
    return value, dict(zip(names, grads))


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("labelled_elbo", [True, False])
def test_masked_rows_equal_split_rows_exactly(one_hot, labelled_elbo):
    """Without continuous latents both ways are exact sums, so they agree to rounding, in
    value and gradient."""
    model, guide = _discrete_pair(one_hot, global_site=False)
    x = torch.tensor([0.3, 2.2, -0.5, 1.1, 0.9, 1.7, 2.5])
    results = [
        _value_and_grads(SemiSupervisedELBO(alpha=0.7, labelled_elbo=labelled_elbo, label_rows=rows), model, guide, x, y=LABELS)
        for rows in ("split", "mask")
    ]
    (split, split_grads), (mask, mask_grads) = results
    assert torch.allclose(mask, split, rtol=1e-12)
    for name in split_grads:
        assert torch.allclose(mask_grads[name], split_grads[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("one_hot", [False, True])
def test_a_global_latent_beside_labels_is_masked_and_equals_pyro(one_hot):
    """A global enumerated site c beside the labels: the split would run c once for the
    labelled rows and once for the unlabelled ones (its KL counted twice), so "split"
    refuses it and "auto" masks.  The masked objective is TraceEnum_ELBO's on a guide
    whose labelled rows have the point mass at their label (Dice contraction, as c is
    global), plus the alpha term."""
    model, guide = _discrete_pair(one_hot, global_site=True)
    x = torch.tensor([0.3, 2.2, -0.5, 1.1, 0.9, 1.7, 2.5])
    with pytest.raises(ValueError, match=r"guide sites \['c'\] lie outside pyro.plate\('data', ...\): label_rows='split'"):
        SemiSupervisedELBO(label_rows="split").loss(model, guide, x, y=LABELS)
    value, grads = _value_and_grads(SemiSupervisedELBO(alpha=0.7), model, guide, x, y=LABELS)

    labelled = LABELS >= 0
    point_mass = torch.where(
        labelled.unsqueeze(-1), torch.nn.functional.one_hot(LABELS.clamp(min=0), 3).double().log(), torch.zeros(3, dtype=torch.float64)
    )
    site = dist.OneHotCategorical if one_hot else dist.Categorical

    @config_enumerate
    def reference_guide(x):
        pyro.sample("c", dist.Bernoulli(pyro.param("c_prob")))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", site(logits=pyro.param("w") * x.unsqueeze(-1) + point_mass))

    log_q = torch.log_softmax(pyro.param("w") * x.unsqueeze(-1), -1)
    alpha_term = -0.7 * log_q[labelled].gather(-1, LABELS[labelled].unsqueeze(-1)).sum()
    expected = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, reference_guide, x) + alpha_term
    names = sorted(grads)
    expected_grads = torch.autograd.grad(expected, [pyro.param(n).unconstrained() for n in names])
    assert torch.allclose(value, expected, rtol=1e-12)
    for name, expected_grad in zip(names, expected_grads):
        assert torch.allclose(grads[name], expected_grad, rtol=1e-10, atol=1e-12), name


def test_masked_rows_by_hand():
    """One labelled row: the masked objective is ``-log p(x, y=label) - alpha log q(label|x)``;
    one unlabelled row: ``-sum_y q(y|x) (log p(x, y) - log q(y|x))``."""
    model, guide = _discrete_pair(one_hot=False, global_site=False)
    x, labels = torch.tensor([0.4, 1.6]), torch.tensor([2, -1])
    value = SemiSupervisedELBO(alpha=0.5, label_rows="mask").differentiable_loss(model, guide, x, y=labels)
    log_q = torch.log_softmax(pyro.param("w") * x.unsqueeze(-1), -1)
    log_joint = PRIOR.log() + dist.Normal(torch.arange(3.0), 1.0).log_prob(x.unsqueeze(-1))
    labelled = -log_joint[0, 2] - 0.5 * log_q[0, 2]
    unlabelled = -(log_q[1].exp() * (log_joint[1] - log_q[1])).sum()
    assert value.item() == pytest.approx((labelled + unlabelled).item(), rel=1e-12)


def test_masked_rows_equal_split_rows_in_expectation_with_continuous_latents():
    """With a continuous latent z ~ q(z|x, y) the two ways draw different noise (the masked
    way draws z for every class on the labelled rows); their values agree in expectation."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(PRIOR))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + y.to(z.dtype), 0.5), obs=x)

    @config_enumerate
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=torch.tensor([0.1, 0.2, -0.1]) * x.unsqueeze(-1)))
            pyro.sample("z", dist.Normal(0.3 * (x - y.to(x.dtype)), 0.8))

    x = torch.tensor([0.3, 2.2, -0.5, 1.1, 0.9, 1.7, 2.5])
    values = [
        SemiSupervisedELBO(num_particles=20000, alpha=0.3, label_rows=rows).loss(model, guide, x, y=LABELS)
        for rows in ("split", "mask")
    ]
    assert values[1] == pytest.approx(values[0], abs=0.05)


def _mixture_with_autoguide():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(torch.ones(2) / 2))
            z = pyro.sample("z", dist.Normal(4.0 * y.to(x.dtype) - 2.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, hide=["y"])))
    guide.append(AutoDiscreteParallel(poutine.block(model, expose=["y"])))
    return model, guide


@pytest.mark.slow
def test_autoguide_trains_with_labels():
    """The issue's failure: an AutoGuideList (AutoNormal + AutoDiscreteParallel) trained with
    ``y=`` labels failed ("Shape mismatch inside plate('data')": the autoguide keeps one
    parameter per datapoint, and the labelled rows ran apart).  ``label_rows="auto"`` masks
    instead; the labelled rows' classifier learns their labels (the alpha term) and the
    unlabelled rows are assigned to the component that generated them."""
    torch.manual_seed(0)
    truth = torch.tensor([0, 1] * 10)
    x = 4.0 * truth.to(torch.get_default_dtype()) - 2.0 + 0.3 * torch.randn(20)
    labels = torch.where(torch.arange(20) < 4, truth, torch.full_like(truth, -1))
    model, guide = _mixture_with_autoguide()
    svi = SVI(model, config_enumerate(guide), pyro.optim.Adam({"lr": 0.05}), SemiSupervisedELBO(alpha=5.0))
    losses = [svi.step(x, y=labels) for _ in range(300)]
    assert sum(losses[-20:]) < sum(losses[:20])
    probs = pyro.param("AutoGuideList.1.y_probs").detach()
    assert (probs.argmax(-1) == truth).all()


def test_auto_label_rows_chooses_mask_for_an_autoguide():
    """The same seed gives the same number with ``"auto"`` as with ``"mask"`` for an
    autoguide (and "split" is refused by the autoguide itself, with Pyro's plate error)."""
    model, guide = _mixture_with_autoguide()
    x, labels = torch.tensor([-2.1, 1.9, -1.8, 2.2]), torch.tensor([0, -1, -1, 1])
    values = []
    for rows in ("auto", "mask"):
        pyro.set_rng_seed(1)
        values.append(SemiSupervisedELBO(alpha=1.0, label_rows=rows).loss(model, config_enumerate(guide), x, y=labels))
    assert values[0] == values[1]
    with pytest.raises(ValueError, match="plate"):
        SemiSupervisedELBO(alpha=1.0, label_rows="split").loss(model, config_enumerate(guide), x, y=labels)


def test_mask_mode_label_errors():
    model, guide = _discrete_pair(one_hot=False, global_site=False)
    x = torch.tensor([0.3, 2.2])
    with pytest.raises(ValueError, match="label 3 is out of range for site 'y' with 3 classes"):
        SemiSupervisedELBO(label_rows="mask").loss(model, guide, x, y=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="the guide has no sample site 'label'"):
        SemiSupervisedELBO(label_rows="mask", label_site="label").loss(model, guide, x, label=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="label_rows must be"):
        SemiSupervisedELBO(label_rows="rows")


def test_sequential_enumeration_is_refused_naming_the_site():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(PRIOR))
            pyro.sample("x", dist.Normal(y.to(x.dtype), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(PRIOR), infer={"enumerate": "sequential"})

    with pytest.raises(ValueError, match="guide site 'y' is marked infer=\\{'enumerate': 'sequential'\\}"):
        SemiSupervisedELBO().loss(model, guide, torch.tensor([0.5, 1.5]))


# --------------------------------------------------------------------------------------
# one run of the feature network per step for the composite losses
# --------------------------------------------------------------------------------------
def _count_calls(network: torch.nn.Module) -> list:
    """A list that grows by one at every call of ``network``'s first convolution."""
    calls: list = []
    first = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("name, network, expected", [
    # the ELBO runs the whole batch once; the assignment and metric terms read its features
    ("gmvae", "features", 1),
    # the ELBO runs the labelled and the unlabelled rows apart; the hinge, hat and balance
    # terms share one run of the classifier, stopped at its scores (no encoder, no z)
    ("conv-mmcva", "classifier", 3),
])
def test_composite_losses_run_the_feature_network_once_per_step(name, network, expected):
    """WeightedSum's terms used to run the guide once each: Conv-MMCVA's guide five times a
    step, the GMVAE's conv features three times.  In eval mode (no dropout, batch-norm's
    running statistics) the shared value equals the sum of the terms computed one by one."""
    from tiny_recipes import tiny_case

    case = tiny_case(name)
    calls = _count_calls(getattr(case.guide, network))
    encoder_calls = _count_calls(case.guide.encoder) if name == "conv-mmcva" else []
    case.loss.differentiable_loss(case.model, case.guide, case.x, **case.kwargs())  # the first call's trial run
    calls.clear(), encoder_calls.clear()
    case.loss.differentiable_loss(case.model, case.guide, case.x, **case.kwargs())
    assert len(calls) == expected
    assert len(encoder_calls) == (2 if name == "conv-mmcva" else 0)  # the ELBO's two runs only
    case.guide.eval(), case.model.eval()
    torch.manual_seed(3)
    shared = case.loss.differentiable_loss(case.model, case.guide, case.x, **case.kwargs())
    separate = 0.0
    for term in case.loss.terms.values():
        torch.manual_seed(3)
        separate = separate + term.weight * term.loss.differentiable_loss(case.model, case.guide, case.x, **case.kwargs())
    assert torch.allclose(shared, separate, rtol=1e-6)
