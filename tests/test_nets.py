import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyrodgm.nets import (
    ACTIVATIONS,
    MLP,
    BatchNorm,
    BernoulliHead,
    CategoricalHead,
    ConvDecoder,
    ConvEncoder,
    GaussianHead,
    NormalHead,
    activation,
    batch_shape,
    broadcast_cat,
    concat_linear,
    likelihood_head,
)

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    pyro.clear_param_store()


def _assert_rowwise(net, x, event_dims_in=1):
    """net(x) with leading dims equals net on flattened rows, reshaped back."""
    batch_shape = x.shape[: x.dim() - event_dims_in]
    flat = x.reshape((-1,) + x.shape[x.dim() - event_dims_in :])
    expected = net(flat)
    actual = net(x)
    assert actual.shape == batch_shape + expected.shape[1:]
    assert torch.allclose(actual, expected.reshape(actual.shape), atol=1e-12)
    # and row by row (no cross-row mixing)
    for i in (0, flat.shape[0] - 1):
        assert torch.allclose(net(flat[i : i + 1])[0], expected[i], atol=1e-12)


# ----------------------------------------------------------------- activations


def test_activation_names():
    for name, cls in ACTIVATIONS.items():
        assert isinstance(activation(name), cls)
    assert set(ACTIVATIONS) >= {"relu", "softplus", "tanh", "elu", "leaky_relu", "identity"}


def test_invalid_activation_raises():
    with pytest.raises(ValueError, match="relu"):
        activation("swishy")
    with pytest.raises(ValueError):
        MLP(3, [4], activation="nope")
    with pytest.raises(ValueError):
        ConvEncoder((1, 8, 8), activation="nope")


# ------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("batch_norm", [False, True])
def test_mlp_leading_dims_match_flat(batch_norm):
    net = MLP(6, [8, 5], 4, activation="tanh", batch_norm=batch_norm, dropout=0.3).double()
    net.train()
    net(torch.randn(50, 6, dtype=torch.float64))  # move running stats away from init
    net.eval()
    _assert_rowwise(net, torch.randn(2, 3, 5, 6, dtype=torch.float64))
    assert net.out_features == 4


def test_mlp_without_out_dim_and_features():
    net = MLP(6, [8, 5], activation="elu").double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    assert net.out_features == 5
    feats = net.forward_features(x)
    assert [f.shape for f in feats] == [(2, 3, 8), (2, 3, 5)]
    assert torch.equal(net(x), feats[-1])
    # manual computation of the first hidden layer
    lin = net.hidden_layers[0][0]
    assert torch.allclose(feats[0], F.elu(x @ lin.weight.T + lin.bias))


def test_mlp_final_activation():
    x = torch.randn(4, 3, dtype=torch.float64)
    net = MLP(3, [5], 2, activation="relu", final_activation=True).double()
    out = net(x)
    lin = net.output_layer[0]
    assert torch.allclose(out, F.relu(net.forward_features(x)[-1] @ lin.weight.T + lin.bias))
    net2 = MLP(3, [5], 2, final_activation=False).double()
    assert (net2(torch.randn(200, 3, dtype=torch.float64)) < 0).any()


def test_mlp_batchnorm_train_normalises_all_rows():
    net = MLP(4, [7], batch_norm=True, activation="identity").double()
    net.train()
    x = torch.randn(2, 3, 4, dtype=torch.float64) * 3 + 1
    h = net(x)  # BN affine is identity at init, activation is identity
    assert h.shape == (2, 3, 7)
    rows = h.reshape(6, 7)
    assert torch.allclose(rows.mean(0), torch.zeros(7, dtype=torch.float64), atol=1e-10)
    var = rows.var(0, unbiased=False)
    assert torch.allclose(var, torch.ones(7, dtype=torch.float64), atol=1e-3)
    # equals batch-norm by hand over the flattened 6 rows
    lin, bn = net.hidden_layers[0][0], net.hidden_layers[0][1]
    assert isinstance(bn, BatchNorm)
    pre = x.reshape(6, 4) @ lin.weight.T + lin.bias
    manual = (pre - pre.mean(0)) / (pre.var(0, unbiased=False) + bn.eps).sqrt()
    assert torch.allclose(rows, manual, atol=1e-12)
    assert torch.allclose(bn.running_mean, 0.1 * pre.mean(0))


def test_mlp_xavier_init():
    net = MLP(10, [20], 5, init="xavier")
    for lin in (net.hidden_layers[0][0], net.output_layer[0]):
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max() <= bound
        assert torch.count_nonzero(lin.bias) == 0
    with pytest.raises(ValueError):
        MLP(3, [4], init="he")


def test_small_normal_init_draws_every_weight_of_m2_and_its_guide_from_kingmas_normal():
    from pyrodgm.guides import M2Guide
    from pyrodgm.models import M2
    from pyrodgm.nets import SMALL_NORMAL_STD, MLPSpec

    torch.manual_seed(0)
    spec = MLPSpec(x_dim=300, num_classes=10, z_dim=20, hidden=(400,), init="small-normal")
    layers = [m for net in (M2(spec), M2Guide(spec)) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 7  # decoder, likelihood head; classifier, its head, encoder, loc and scale heads
    weights = torch.cat([layer.weight.reshape(-1) for layer in layers])
    assert weights.std().item() == pytest.approx(SMALL_NORMAL_STD, rel=0.01)
    assert weights.mean().abs().item() < 1e-5
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in layers)


def test_default_init_leaves_pytorchs_weights_and_the_random_stream_alone():
    from pyrodgm.nets import init_weights_

    torch.manual_seed(3)
    net = MLP(10, [20], 5)
    before = [p.clone() for p in net.parameters()]
    state = torch.random.get_rng_state()
    init_weights_(net, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="Unknown init 'he'"):
        init_weights_(net, "he")


def test_mlp_float32_default_and_gradients():
    net = MLP(5, [6, 6], 3, batch_norm=True, dropout=0.1)
    out = net(torch.randn(2, 4, 5))
    assert out.dtype == torch.float32
    out.pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# --------------------------------------------------------------- broadcast_cat


def test_broadcast_cat_matches_manual():
    y = torch.eye(10, dtype=torch.float64).reshape(10, 1, 1, 10)
    x = torch.rand(7, 784, dtype=torch.float64)
    out = broadcast_cat([y, x])
    assert out.shape == (10, 1, 7, 794)
    manual = torch.cat([y.expand(10, 1, 7, 10), x.expand(10, 1, 7, 784)], dim=-1)
    assert torch.equal(out, manual)
    z = torch.randn(3, 1, 4, dtype=torch.float64)
    assert broadcast_cat([x, z, y]).shape == (10, 3, 7, 798)


def test_broadcast_cat_errors():
    with pytest.raises(ValueError):
        broadcast_cat([torch.zeros(2, 3), torch.zeros(2, 3)], dim=0)
    with pytest.raises(ValueError, match=r"batch shapes \[\(2,\), \(4,\)\] .* do not broadcast"):
        broadcast_cat([torch.zeros(2, 3), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="do not broadcast"):
        concat_linear(torch.nn.Linear(6, 2), [torch.zeros(2, 3), torch.zeros(4, 3)])


@pytest.mark.parametrize(
    "shapes", [[(4, 1, 1, 3), (7, 2)], [(7, 2), (7, 5)], [(2,), (3, 1, 4)], [(1, 3, 1, 2), (3, 1, 2), (4, 2)]]
)
def test_batch_shape_is_torch_broadcasting(shapes):
    tensors = [torch.zeros(shape) for shape in shapes]
    assert batch_shape(tensors) == torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    assert isinstance(batch_shape(tensors), torch.Size)


# --------------------------------------------------------------- concat_linear


def _enumerated_inputs():
    """Data ``[B, D]``, an enumerated one-hot label ``[K, 1, 1, K]`` and particles ``[P, B, Z]``."""
    x = torch.rand(7, 20, dtype=torch.float64)
    y = torch.eye(4, dtype=torch.float64).reshape(4, 1, 1, 4)
    z = torch.randn(3, 7, 5, dtype=torch.float64)
    return x, y, z


@pytest.mark.parametrize("parts", [(0, 1), (1, 0), (0, 1, 2), (2, 1)])
def test_concat_linear_equals_the_linear_of_the_concatenation(parts):
    inputs = [_enumerated_inputs()[i] for i in parts]
    linear = torch.nn.Linear(sum(t.shape[-1] for t in inputs), 6).double()
    expected = linear(broadcast_cat(inputs))
    actual = concat_linear(linear, inputs)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-12)
    weight_grad = torch.autograd.grad(expected.square().sum(), [linear.weight, linear.bias])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in
               zip(torch.autograd.grad(actual.square().sum(), [linear.weight, linear.bias]), weight_grad))


def test_concat_linear_multiplies_a_broadcast_input_once():
    """The data block is multiplied at the data's batch shape, not once per class: the
    matrix products cost what the un-enumerated layer costs plus the label block."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(100, 784)
    y = torch.eye(10).reshape(10, 1, 1, 10)
    linear = torch.nn.Linear(794, 500)
    with FlopCounterMode(display=False) as split:
        concat_linear(linear, [x, y])
    with FlopCounterMode(display=False) as full:
        linear(broadcast_cat([x, y]))
    assert split.get_total_flops() == 2 * 500 * (100 * 784 + 10 * 10)
    assert full.get_total_flops() == 2 * 500 * 10 * 100 * 794


def test_concat_linear_rejects_widths_that_do_not_fit():
    with pytest.raises(ValueError, match=r"widths \[20, 4\] \(sum 24\) do not fit a layer of 25 inputs"):
        concat_linear(torch.nn.Linear(25, 3).double(), list(_enumerated_inputs()[:2]))


@pytest.mark.parametrize("hidden", [(8, 6), ()])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_mlp_of_parts_equals_the_mlp_of_their_concatenation(hidden, batch_norm):
    x, y, z = _enumerated_inputs()
    net = MLP(29, hidden, out_dim=3, batch_norm=batch_norm).double()
    expected = net(broadcast_cat([x, y, z]))
    assert torch.allclose(net(x, y, z), expected, atol=1e-12)
    features = net.forward_features(x, y, z)
    assert [f.shape[-1] for f in features] == list(hidden)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(features, net.forward_features(broadcast_cat([x, y, z]))))


# ----------------------------------------------------------------------- heads


def test_normal_head_softplus_no_floor():
    head = NormalHead(3, 2).double()
    feats = torch.randn(4, 5, 3, dtype=torch.float64)
    loc, scale = head(feats)
    raw = head.scale_layer(feats)
    assert loc.shape == scale.shape == (4, 5, 2)
    assert (scale > 0).all()
    assert torch.equal(scale, F.softplus(raw))
    with torch.no_grad():
        head.scale_layer.weight.zero_()
        head.scale_layer.bias.fill_(-20.0)
    _, small = head(feats)
    assert (small > 0).all() and (small < 1e-6).all()


def test_normal_head_exp_and_distribution():
    head = NormalHead(3, 2, scale="exp").double()
    feats = torch.randn(4, 3, dtype=torch.float64)
    loc, scale = head(feats)
    assert torch.allclose(scale, head.scale_layer(feats).exp())
    d = head.distribution(feats)
    assert d.batch_shape == (4,) and d.event_shape == (2,)
    v = torch.randn(4, 2, dtype=torch.float64)
    manual = (
        -0.5 * ((v - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)
    ).sum(-1)
    assert torch.allclose(d.log_prob(v), manual)
    with pytest.raises(ValueError):
        NormalHead(3, 2, scale="relu")


def test_gaussian_head_is_normal_head():
    assert GaussianHead is NormalHead


def test_bernoulli_head_log_prob_by_hand():
    head = BernoulliHead(3, 6).double()
    feats = torch.randn(2, 4, 3, dtype=torch.float64)
    logits = head(feats)
    d = head.distribution(feats)
    assert d.batch_shape == (2, 4) and d.event_shape == (6,)
    x = torch.bernoulli(torch.full((2, 4, 6), 0.5, dtype=torch.float64))
    p = torch.sigmoid(logits)
    manual = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert torch.allclose(d.log_prob(x), manual)


def test_categorical_head():
    head = CategoricalHead(3, 10).double()
    feats = torch.randn(5, 3, dtype=torch.float64)
    logits = head(feats)
    d = head.distribution(feats)
    assert isinstance(d, dist.OneHotCategorical)
    assert d.batch_shape == (5,) and d.event_shape == (10,)
    y = F.one_hot(torch.arange(5), 10).double()
    assert torch.allclose(d.log_prob(y), logits.log_softmax(-1)[torch.arange(5), torch.arange(5)])
    head2 = CategoricalHead(3, 10, one_hot=False).double()
    d2 = head2.distribution(feats)
    assert isinstance(d2, dist.Categorical)
    assert d2.batch_shape == (5,) and d2.event_shape == ()


def test_likelihood_head():
    assert isinstance(likelihood_head("bernoulli", 3, 4), BernoulliHead)
    assert isinstance(likelihood_head("gaussian", 3, 4), GaussianHead)
    with pytest.raises(ValueError):
        likelihood_head("poisson", 3, 4)


# ---------------------------------------------------------------------- convs


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
@pytest.mark.parametrize("global_pool", [False, True])
def test_conv_encoder_shapes(image_shape, global_pool):
    enc = ConvEncoder(image_shape, channels=(4, 6), global_pool=global_pool).double()
    c, h, w = image_shape
    expected = 6 if global_pool else 6 * math.ceil(h / 4) * math.ceil(w / 4)
    assert enc.out_features == expected
    enc.train()
    enc(torch.randn(8, c, h, w, dtype=torch.float64))
    enc.eval()
    images = torch.randn(2, 3, 2, c, h, w, dtype=torch.float64)
    out = enc(images)
    assert out.shape == (2, 3, 2, expected)
    _assert_rowwise(enc, images, event_dims_in=3)
    flat = images.reshape(2, 3, 2, c * h * w)
    assert torch.allclose(enc(flat), out)
    with pytest.raises(ValueError):
        enc(torch.randn(2, c * h * w + 1, dtype=torch.float64))


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
def test_conv_decoder_shapes(image_shape):
    dec = ConvDecoder(5, image_shape, channels=(6, 4)).double()
    c, h, w = image_shape
    assert dec.out_features == c * h * w
    dec.train()
    dec(torch.randn(8, 5, dtype=torch.float64))
    dec.eval()
    z = torch.randn(2, 3, 2, 5, dtype=torch.float64)
    out = dec(z)
    assert out.shape == (2, 3, 2, c * h * w)
    _assert_rowwise(dec, z)
    d = dist.Bernoulli(logits=out).to_event(1)
    assert d.batch_shape == (2, 3, 2) and d.event_shape == (c * h * w,)


@pytest.mark.parametrize("kernel_size", [3, 4, 5])
def test_conv_decoder_centre_crop(kernel_size):
    # 28 is not divisible by 2**3, so the 32x32 map is centre-cropped by 2 on each side
    dec = ConvDecoder(5, (1, 28, 28), channels=(4, 4, 4), kernel_size=kernel_size).double()
    dec.eval()
    seen = {}
    dec.deconvs.register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
    out = dec(torch.randn(3, 5, dtype=torch.float64))
    assert seen["map"].shape == (3, 1, 32, 32)
    assert torch.equal(out, seen["map"][..., 2:30, 2:30].reshape(3, 784))


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
def test_conv_gradients_flow(image_shape):
    enc = ConvEncoder(image_shape, channels=(4, 6))
    dec = ConvDecoder(enc.out_features, image_shape, channels=(6, 4))
    x = torch.rand(2, 3, math.prod(image_shape))
    out = dec(enc(x))
    assert out.dtype == torch.float32 and out.shape == x.shape
    F.binary_cross_entropy_with_logits(out, x).backward()
    for name, p in list(enc.named_parameters()) + list(dec.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_heads_gradients_flow():
    heads = [NormalHead(3, 2), BernoulliHead(3, 2), CategoricalHead(3, 4)]
    x = torch.randn(5, 3)
    values = [torch.randn(5, 2), torch.ones(5, 2), F.one_hot(torch.arange(5) % 4, 4).float()]
    for head, v in zip(heads, values):
        head.distribution(x).log_prob(v).sum().backward()
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------- pyro integration


def test_enumerated_label_with_pyro():
    """An M2-style model with enumerated y runs through TraceEnum_ELBO."""
    x_dim, z_dim, n_cls = 12, 3, 4
    decoder = MLP(z_dim + n_cls, [8], batch_norm=True)
    head = BernoulliHead(decoder.out_features, x_dim)
    encoder = MLP(x_dim + n_cls, [8])
    z_head = NormalHead(encoder.out_features, z_dim)
    y_net = MLP(x_dim, [8], n_cls)
    x = torch.bernoulli(torch.full((6, x_dim), 0.5))
    shapes = {}

    def model(x):
        pyro.module("decoder", decoder)
        pyro.module("head", head)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(n_cls)))
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([z_dim]).to_event(1))
            h = decoder(broadcast_cat([z, y]))
            shapes["h"] = h.shape
            pyro.sample("x", head.distribution(h), obs=x)

    @config_enumerate
    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("z_head", z_head)
        pyro.module("y_net", y_net)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.OneHotCategorical(logits=y_net(x)))
            shapes["y"] = y.shape
            pyro.sample("z", z_head.distribution(encoder(broadcast_cat([x, y]))))

    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=2, vectorize_particles=True)
    loss = elbo.differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    assert shapes["y"] == (n_cls, 1, 1, n_cls)  # enum dim left of particle dim
    assert shapes["h"] == (n_cls, 2, 6, 8)
    loss.backward()
    params = set(poutine.trace(guide).get_trace(x).param_nodes)
    assert {"encoder$$$hidden_layers.0.0.weight", "y_net$$$output_layer.0.bias"} <= params
    for net in (decoder, head, encoder, z_head, y_net):
        for name, p in net.named_parameters():
            assert p.grad is not None, name


def test_normal_head_min_scale_keeps_log_densities_finite():
    """exp(raw) underflows for very negative raw scales (an unused cluster's prior in
    CaGeM); the floor keeps the scale at min_scale and the log-density finite."""
    for scale_fn in ("exp", "softplus"):
        bare, floored = NormalHead(3, 2, scale=scale_fn), NormalHead(3, 2, scale=scale_fn, min_scale=1e-3)
        for head in (bare, floored):
            torch.nn.init.zeros_(head.scale_layer.weight)
            torch.nn.init.constant_(head.scale_layer.bias, -1000.0)
        features, value = torch.ones(1, 3), torch.full((1, 2), 1.0)
        assert torch.equal(bare(features)[1], torch.zeros(1, 2))  # underflowed: no valid Normal left
        _, scale = floored(features)
        assert torch.equal(scale, torch.full((1, 2), 1e-3, dtype=scale.dtype))
        assert torch.isfinite(floored.distribution(features).log_prob(value)).all()
    with pytest.raises(ValueError, match="min_scale must be non-negative"):
        NormalHead(3, 2, min_scale=-1.0)


# --------------------------------------------------------------------------------------
# network specs: one per model/guide pair
# --------------------------------------------------------------------------------------
def test_a_spec_is_a_frozen_value_whose_widths_are_tuples():
    from pyrodgm.nets import MLPSpec, TwoLayerSpec

    spec = TwoLayerSpec(6, hidden=[4, 3], hidden2=[2])
    assert (spec.hidden, spec.hidden2) == ((4, 3), (2,)) and hash(spec) == hash(TwoLayerSpec(6, hidden=(4, 3), hidden2=(2,)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.z_dim = 3
    assert MLPSpec(6).mlp(6).out_features == 500


def test_a_model_and_its_guide_are_built_from_one_spec():
    from pyrodgm.guides import ADGMGuide, LadderGuide
    from pyrodgm.models import ADGM, HierarchicalVAE
    from pyrodgm.nets import AuxiliarySpec, TwoLayerSpec

    spec = AuxiliarySpec(6, 3, 2, (5,), a_dim=4)
    model, guide = ADGM(spec), ADGMGuide(spec)
    assert model.spec is guide.spec is spec and (guide.a_dim, guide.classifier.in_dim) == (4, 6 + 4)
    vae = HierarchicalVAE(TwoLayerSpec(6, z_dim=3, hidden=(5,), z2_dim=2, hidden2=(4,), scale="softplus"))
    ladder = LadderGuide(vae)  # the model's spec: its widths and scale
    assert ladder.spec is vae.spec and ladder.up2.out_features == 4 and ladder.head1.scale_fn == "softplus"
