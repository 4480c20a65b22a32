"""
Neural network building blocks shared by the models and guides of :mod:`pyrodgm`.

All networks are plain :class:`torch.nn.Module` s with registered parameters,
so that models and guides can register them with :func:`pyro.module` or wrap
them in :class:`pyro.nn.PyroModule`. Every network accepts inputs with
arbitrary leading batch dimensions ``[..., D]`` -- e.g. ``[K, P, B, D]`` when
Pyro enumerates a label ``K`` ways and vectorises ``P`` particles. Layers that
need a single batch dimension (batch-norm, convolutions) flatten the leading
dimensions and restore them afterwards.

The heads (:class:`NormalHead`, :class:`BernoulliHead`,
:class:`CategoricalHead`) map features to distribution parameters and build
Pyro distributions whose last dimension is the event dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributions import IndependentBernoulli

__all__ = [
    "ACTIVATIONS",
    "AuxiliarySpec",
    "ConvMMVASpec",
    "ImageSpec",
    "MLPSpec",
    "TwoLayerSpec",
    "BatchNorm",
    "BernoulliHead",
    "CategoricalHead",
    "ConvDecoder",
    "ConvEncoder",
    "CONV_MMVA_LAYERS",
    "PoolingConvEncoder",
    "Unpool",
    "UnpoolingConvDecoder",
    "conv_layers_fit",
    "GaussianHead",
    "GaussianMLP",
    "INITS",
    "MLP",
    "NormalHead",
    "SMALL_NORMAL_STD",
    "activation",
    "batch_shape",
    "broadcast_cat",
    "concat_linear",
    "init_weights_",
    "likelihood_head",
]

#: Activation names accepted by :func:`activation`, mapped to module classes.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}

#: Initialisations accepted by :func:`init_weights_`.
INITS: tuple[str, ...] = ("default", "xavier", "small-normal")

#: Standard deviation of the ``"small-normal"`` initial weights (Kingma et al.'s code).
SMALL_NORMAL_STD = 1e-3


def activation(name: str) -> nn.Module:
    """
    Instantiate an activation module by name.

    :param str name: one of the keys of :data:`ACTIVATIONS`.
    :rtype: torch.nn.Module
    :raises ValueError: if ``name`` is unknown.
    """
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


# Alias for constructors whose ``activation`` argument shadows the factory.
_activation = activation


def init_weights_(module: nn.Module, init: str = "default") -> nn.Module:
    """
    Initialise the linear and convolutional layers of ``module`` in place.

    :param torch.nn.Module module: the module whose sub-layers to initialise.
    :param str init: ``"default"`` keeps PyTorch's initialisation;
        ``"xavier"`` uses Glorot/Xavier-uniform weights and zero biases
        (as in the ADGM paper); ``"small-normal"`` draws the weights from
        N(0, :data:`SMALL_NORMAL_STD` ²) with zero biases (as in Kingma et al.'s code).
    :returns: ``module``.
    :raises ValueError: if ``init`` is unknown.
    """
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; expected one of {list(INITS)}")
    if init == "default":
        return module
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            if init == "xavier":
                nn.init.xavier_uniform_(layer.weight)
            else:
                nn.init.normal_(layer.weight, 0.0, SMALL_NORMAL_STD)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def batch_shape(tensors: Sequence[Tensor]) -> torch.Size:
    """The broadcast of the leading (batch) shapes ``t.shape[:-1]`` of ``tensors``.

    :func:`numpy.broadcast_shapes` on plain shapes: the same rules as
    :func:`torch.broadcast_shapes`, which spends over 100 µs on shapes that differ (torch
    2.15 routes them through its symbolic-shape reference code) where this takes about 2.
    :raises ValueError: naming the shapes when they do not broadcast.
    """
    shapes = [tuple(t.shape[:-1]) for t in tensors]
    try:
        return torch.Size(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ValueError(f"batch shapes {shapes} (the shapes before the last dim) do not broadcast") from None


def broadcast_cat(tensors: Sequence[Tensor], dim: int = -1) -> Tensor:
    """
    Broadcast the leading (batch) dimensions of ``tensors`` against each other
    and concatenate them along the last dimension.

    E.g. an enumerated label of shape ``[K, 1, 1, 10]`` and data of shape
    ``[B, 784]`` give a tensor of shape ``[K, 1, B, 794]``.

    :param tensors: tensors of shape ``[..., D_i]``.
    :param int dim: must be ``-1`` (the only supported dimension).
    :returns: tensor of shape ``broadcast(...) + [sum_i D_i]``.
    :raises ValueError: if ``dim != -1`` or ``tensors`` is empty.
    """
    if dim != -1:
        raise ValueError(f"broadcast_cat only supports dim=-1, got dim={dim}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("broadcast_cat needs at least one tensor")
    shape = batch_shape(tensors)
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], dim=-1)


def _flatten_batch(x: Tensor, event_dims: int) -> tuple[Tensor, torch.Size]:
    """Reshape ``x`` to ``[N, *event]``; return it with the leading shape."""
    split = x.dim() - event_dims
    batch_shape, event_shape = x.shape[:split], x.shape[split:]
    return x.reshape((math.prod(batch_shape),) + event_shape), batch_shape


class BatchNorm(nn.BatchNorm1d):
    """
    :class:`torch.nn.BatchNorm1d` over the last dimension of an input with
    arbitrary leading dimensions ``[..., D]``: all leading dimensions are
    flattened into one batch dimension (so statistics are taken over all rows)
    and restored afterwards.
    """

    def forward(self, x: Tensor) -> Tensor:
        flat, batch_shape = _flatten_batch(x, 1)
        return super().forward(flat).reshape(batch_shape + x.shape[-1:])


class MLP(nn.Module):
    """
    Multi-layer perceptron with ``Linear -> [BatchNorm] -> activation ->
    [Dropout]`` hidden layers and an optional final ``Linear`` layer.

    :param int in_dim: input width.
    :param hidden: widths of the hidden layers.
    :param out_dim: width of the final linear layer; if ``None`` the output is
        the last hidden layer.
    :param str activation: activation name, see :data:`ACTIVATIONS`.
    :param bool batch_norm: add batch-norm before each hidden activation.
    :param float dropout: dropout probability after each hidden activation.
    :param bool final_activation: apply the activation after the final linear
        layer too (only used when ``out_dim`` is given).
    :param str init: ``"default"`` or ``"xavier"``, see :func:`init_weights_`.

    :ivar int out_features: width of the output.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        activation: str = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
        final_activation: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.hidden_layers = nn.ModuleList()
        width = in_dim
        for h in hidden:
            layers: list[nn.Module] = [nn.Linear(width, h)]
            if batch_norm:
                layers.append(BatchNorm(h))
            layers.append(_activation(activation))
            self.hidden_layers.append(nn.Sequential(*layers))
            width = h
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_layer: nn.Module = nn.Identity()
        if out_dim is not None:
            out: list[nn.Module] = [nn.Linear(width, out_dim)]
            if final_activation:
                out.append(_activation(activation))
            self.output_layer = nn.Sequential(*out)
            width = out_dim
        self.out_features = width
        init_weights_(self, init)

    def _run(self, inputs: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor]:
        layers = [*self.hidden_layers, self.output_layer]
        h = _first_layer(layers[0], inputs)
        features = []
        for layer in layers[1:]:  # each hidden layer's output is a feature, then dropout
            features.append(h)
            h = layer(self.dropout(h))
        return features, h

    def forward(self, *inputs: Tensor) -> Tensor:
        """
        :param inputs: one input of shape ``[..., in_dim]``, or several whose widths add
            up to ``in_dim``, taken as their concatenation (:func:`broadcast_cat`) but
            computed without building it (see :func:`concat_linear`).
        :returns: output of shape ``broadcast(...) + [out_features]``.
        """
        return self._run(inputs)[1]

    def forward_features(self, *inputs: Tensor) -> list[Tensor]:
        """
        Hidden activations, e.g. as features for a max-margin classifier.

        :param inputs: as for :meth:`forward`.
        :returns: one tensor ``[..., hidden[i]]`` per hidden layer (after the
            activation, before dropout).
        :rtype: list[torch.Tensor]
        """
        return self._run(inputs)[0]


def _first_layer(layer: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """``layer`` (a ``Sequential`` that starts with a ``Linear``, or ``Identity``) applied to
    the concatenation of ``inputs``."""
    if not inputs:
        raise ValueError("an MLP needs at least one input")
    if len(inputs) == 1:
        return layer(inputs[0])
    if isinstance(layer, nn.Identity):
        return broadcast_cat(inputs)
    modules = list(layer)
    h = concat_linear(modules[0], inputs)
    for module in modules[1:]:
        h = module(h)
    return h


def concat_linear(linear: nn.Linear, inputs: Sequence[Tensor]) -> Tensor:
    """
    ``linear(broadcast_cat(inputs))``, computed as the sum of each input times its block
    of columns of the weight when some input is broadcast (smaller than the others'
    batch shape): data ``x`` of shape ``[B, D]`` under an enumerated label ``[K, 1, 1, K]``
    is then multiplied by its block once, not once per class, and the ``[K, 1, B, D + K]``
    concatenation is never built.  With every input at the full batch shape it is the
    concatenation and one matrix product, which costs the same and fewer operations.

    :param torch.nn.Linear linear: a layer with ``in_features`` = the sum of the widths.
    :param inputs: tensors of shape ``[..., D_i]`` whose batch shapes broadcast.
    :returns: tensor of shape ``broadcast(...) + [out_features]``.
    :raises ValueError: if the widths do not add up to ``in_features``.
    """
    widths = [t.shape[-1] for t in inputs]
    if sum(widths) != linear.in_features:
        raise ValueError(f"inputs of widths {widths} (sum {sum(widths)}) do not fit a layer of {linear.in_features} inputs")
    shape = batch_shape(inputs)
    if all(t.shape[:-1] == shape for t in inputs):
        return linear(torch.cat(list(inputs), dim=-1))
    # the largest input first, with the bias: one broadcasting addition per other input
    order = sorted(range(len(inputs)), key=lambda i: -inputs[i].shape[:-1].numel())
    starts = [sum(widths[:i]) for i in range(len(widths))]
    out = None
    for i in order:
        weight = linear.weight[:, starts[i] : starts[i] + widths[i]]
        term = F.linear(inputs[i], weight, linear.bias if out is None else None)
        out = term if out is None else out + term
    return out


class NormalHead(nn.Module):
    """
    Map features to the ``(loc, scale)`` of a diagonal Normal.

    The scale is ``min_scale + softplus(raw)`` (default) or ``min_scale + exp(raw)``;
    ``min_scale`` is 0 by default (no floor, as the papers write their Gaussians).  A
    small floor is a numerical guard for scales no data constrain (an unused cluster's
    prior in CaGeM), whose ``exp(raw)`` can underflow until a log-density is ``-inf``.

    :param int in_features: input width.
    :param int out_dim: event size.
    :param str scale: ``"softplus"`` or ``"exp"``.
    :param str init: ``"default"`` or ``"xavier"``, see :func:`init_weights_`.
    :param float min_scale: the floor added to the scale.
    """

    def __init__(
        self, in_features: int, out_dim: int, scale: str = "softplus", init: str = "default", min_scale: float = 0.0
    ) -> None:
        super().__init__()
        if scale not in ("softplus", "exp"):
            raise ValueError(f"Unknown scale {scale!r}; expected 'softplus' or 'exp'")
        if not min_scale >= 0:
            raise ValueError(f"min_scale must be non-negative, got {min_scale}")
        self.scale_fn = scale
        self.min_scale = float(min_scale)
        self.loc_layer = nn.Linear(in_features, out_dim)
        self.scale_layer = nn.Linear(in_features, out_dim)
        init_weights_(self, init)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """
        :param torch.Tensor features: shape ``[..., in_features]``.
        :returns: ``(loc, scale)``, each of shape ``[..., out_dim]``.
        """
        raw = self.scale_layer(features)
        scale = F.softplus(raw) if self.scale_fn == "softplus" else raw.exp()
        if self.min_scale:
            scale = scale + self.min_scale
        return self.loc_layer(features), scale

    def distribution(self, features: Tensor) -> dist.TorchDistribution:
        """
        :returns: ``Normal(loc, scale).to_event(1)``.
        """
        loc, scale = self(features)
        return dist.Normal(loc, scale).to_event(1)


#: :class:`NormalHead` under the name used for real-valued (Gaussian) likelihoods.
GaussianHead = NormalHead


class BernoulliHead(nn.Module):
    """
    Map features to the logits of independent Bernoullis.

    :param int in_features: input width.
    :param int out_dim: event size.
    :param str init: ``"default"`` or ``"xavier"``, see :func:`init_weights_`.
    """

    def __init__(self, in_features: int, out_dim: int, init: str = "default") -> None:
        super().__init__()
        self.logits_layer = nn.Linear(in_features, out_dim)
        init_weights_(self, init)

    def forward(self, features: Tensor) -> Tensor:
        """
        :param torch.Tensor features: shape ``[..., in_features]``.
        :returns: logits of shape ``[..., out_dim]``.
        """
        return self.logits_layer(features)

    def distribution(self, features: Tensor) -> dist.TorchDistribution:
        """
        :returns: ``Bernoulli(logits=logits).to_event(1)``, as
            :class:`~pyrodgm.distributions.IndependentBernoulli`.
        """
        return IndependentBernoulli(self(features))


class CategoricalHead(nn.Module):
    """
    Map features to the logits of a categorical distribution over labels.

    :param int in_features: input width.
    :param int num_classes: number of classes.
    :param bool one_hot: build a :class:`~pyro.distributions.OneHotCategorical`
        (default) rather than a :class:`~pyro.distributions.Categorical`.
    :param str init: ``"default"`` or ``"xavier"``, see :func:`init_weights_`.
    """

    def __init__(
        self, in_features: int, num_classes: int, one_hot: bool = True, init: str = "default"
    ) -> None:
        super().__init__()
        self.one_hot = one_hot
        self.logits_layer = nn.Linear(in_features, num_classes)
        init_weights_(self, init)

    def forward(self, features: Tensor) -> Tensor:
        """
        :param torch.Tensor features: shape ``[..., in_features]``.
        :returns: logits of shape ``[..., num_classes]``.
        """
        return self.logits_layer(features)

    def distribution(self, features: Tensor) -> dist.TorchDistribution:
        """
        :returns: ``OneHotCategorical(logits=logits)`` (event shape
            ``[num_classes]``) or ``Categorical(logits=logits)``.
        """
        logits = self(features)
        if self.one_hot:
            return dist.OneHotCategorical(logits=logits)
        return dist.Categorical(logits=logits)


class GaussianMLP(nn.Module):
    """A diagonal Gaussian whose mean and scale are an MLP of the concatenated inputs
    (broadcast against each other as by :func:`broadcast_cat`, so that an
    enumerated label ``[K, 1, 1, K]`` meets data ``[B, D]`` and particles ``[P, B, D']``;
    the first layer is :func:`concat_linear`).

    :param int in_dim: total width of the inputs.
    :param hidden: hidden widths.
    :param int out_dim: event size.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: str = "relu",
        batch_norm: bool = False,
        init: str = "xavier",
        scale: str = "softplus",
        min_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = MLP(in_dim, hidden, activation=activation, batch_norm=batch_norm, init=init)
        self.head = NormalHead(self.net.out_features, out_dim, scale=scale, init=init, min_scale=min_scale)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of shape ``broadcast(inputs) + [out_dim]``."""
        return self.head(self.net(*inputs))

    def distribution(self, *inputs: torch.Tensor) -> dist.TorchDistribution:
        """``Normal(loc, scale).to_event(1)``."""
        return self.head.distribution(self.net(*inputs))


def likelihood_head(kind: str, in_features: int, out_dim: int) -> nn.Module:
    """
    Build the observation head for a likelihood.

    :param str kind: ``"bernoulli"`` (binary data) or ``"gaussian"``
        (real-valued data).
    :param int in_features: input width.
    :param int out_dim: data dimension.
    :raises ValueError: if ``kind`` is unknown.
    """
    if kind == "bernoulli":
        return BernoulliHead(in_features, out_dim)
    if kind == "gaussian":
        return GaussianHead(in_features, out_dim)
    raise ValueError(f"Unknown likelihood {kind!r}; expected 'bernoulli' or 'gaussian'")


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    return shape  # type: ignore[return-value]


def _conv_block(conv: nn.Module, channels: int, batch_norm: bool, act: str) -> nn.Sequential:
    layers = [conv]
    if batch_norm:
        layers.append(nn.BatchNorm2d(channels))
    layers.append(activation(act))
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """
    Stack of stride-2 convolutions (padding ``kernel_size // 2``), each
    followed by optional batch-norm and an activation, for small images
    (28x28 MNIST, 32x32 SVHN, 8x8 scikit-learn digits).

    Inputs may be images ``[..., C, H, W]`` or flattened images
    ``[..., C*H*W]``; leading dimensions are preserved.

    :param image_shape: ``(C, H, W)``.
    :param channels: output channels of each convolution.
    :param int kernel_size: convolution kernel size.
    :param bool batch_norm: add :class:`~torch.nn.BatchNorm2d` after each conv.
    :param str activation: activation name, see :data:`ACTIVATIONS`.
    :param bool global_pool: average the final feature map over space, giving
        ``channels[-1]`` features; otherwise flatten it.
    :param str init: ``"default"`` or ``"xavier"``, see :func:`init_weights_`.

    :ivar int out_features: width of the output ``[..., out_features]``.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        batch_norm: bool = True,
        activation: str = "relu",
        global_pool: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.global_pool = global_pool
        c, h, w = self.image_shape
        pad = kernel_size // 2
        blocks = []
        for out_c in channels:
            conv = nn.Conv2d(c, out_c, kernel_size, stride=2, padding=pad)
            blocks.append(_conv_block(conv, out_c, batch_norm, activation))
            c = out_c
            h = (h + 2 * pad - kernel_size) // 2 + 1
            w = (w + 2 * pad - kernel_size) // 2 + 1
            if h < 1 or w < 1:
                raise ValueError(f"Too many down-sampling layers for image {image_shape}")
        self.convs = nn.Sequential(*blocks)
        self.feature_shape = (c, h, w)
        self.out_features = c if global_pool else c * h * w
        init_weights_(self, init)

    def forward(self, x: Tensor) -> Tensor:
        """
        :param torch.Tensor x: ``[..., C, H, W]`` or ``[..., C*H*W]``.
        :returns: features of shape ``[..., out_features]``.
        """
        shape = self.image_shape
        if x.dim() >= 3 and tuple(x.shape[-3:]) == shape:
            images, batch_shape = _flatten_batch(x, 3)
        elif x.dim() >= 1 and x.shape[-1] == math.prod(shape):
            flat, batch_shape = _flatten_batch(x, 1)
            images = flat.reshape((flat.shape[0],) + shape)
        else:
            raise ValueError(
                f"Expected input of shape [..., {shape}] or [..., {math.prod(shape)}], "
                f"got {tuple(x.shape)}"
            )
        h = self.convs(images)
        h = h.mean(dim=(-2, -1)) if self.global_pool else h.flatten(start_dim=1)
        return h.reshape(batch_shape + (self.out_features,))


class ConvDecoder(nn.Module):
    """
    Map a feature vector to a flattened image of logits (Bernoulli) or means
    (Gaussian).

    A linear layer produces a ``channels[0]``-channel feature map of size
    ``ceil(H / 2**n) x ceil(W / 2**n)`` with ``n = len(channels)``; then
    ``n`` stride-2 transposed convolutions each exactly double the spatial
    size (``channels[0] -> ... -> channels[-1] -> C``, batch-norm and
    activation after all but the last), so the map reaches at least
    ``H x W``. The result is **centre-cropped** to ``H x W`` (no-op when
    ``H`` and ``W`` are divisible by ``2**n``, e.g. 28x28, 32x32 and 8x8 with
    the default two layers) and returned flattened as ``[..., C*H*W]`` without
    an output activation, ready for ``Bernoulli(logits=...).to_event(1)`` or
    ``Normal(loc=..., ...).to_event(1)``.

    :param int in_features: input width.
    :param image_shape: ``(C, H, W)``.
    :param channels: channels of the feature maps before each up-sampling.
    :param int kernel_size: transposed convolution kernel size.
    :param bool batch_norm: add batch-norm after the hidden layers.
    :param str activation: activation name, see :data:`ACTIVATIONS`.
    :param str init: ``"default"`` or ``"xavier"``, see :func:`init_weights_`.

    :ivar int out_features: ``C * H * W``.
    """

    def __init__(
        self,
        in_features: int,
        image_shape: tuple[int, int, int],
        channels: Sequence[int] = (64, 32),
        kernel_size: int = 4,
        batch_norm: bool = True,
        activation: str = "relu",
        init: str = "default",
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        channels = list(channels)
        if not channels:
            raise ValueError("ConvDecoder needs at least one channel entry")
        c_out, h, w = self.image_shape
        n = len(channels)
        self.start_shape = (channels[0], math.ceil(h / 2**n), math.ceil(w / 2**n))
        self.in_features = in_features
        self.out_features = c_out * h * w
        self.linear = nn.Linear(in_features, math.prod(self.start_shape))
        self.start_norm = nn.BatchNorm2d(channels[0]) if batch_norm else nn.Identity()
        self.start_act = _activation(activation)
        # exact doubling: (in - 1) * 2 - 2 * pad + k + out_pad == 2 * in
        pad = (kernel_size - 1) // 2
        out_pad = 2 - kernel_size + 2 * pad
        blocks = []
        for i, c_in in enumerate(channels):
            last = i == n - 1
            c_next = c_out if last else channels[i + 1]
            conv = nn.ConvTranspose2d(
                c_in, c_next, kernel_size, stride=2, padding=pad, output_padding=out_pad
            )
            blocks.append(conv if last else _conv_block(conv, c_next, batch_norm, activation))
        self.deconvs = nn.Sequential(*blocks)
        init_weights_(self, init)

    def forward(self, z: Tensor) -> Tensor:
        """
        :param torch.Tensor z: features of shape ``[..., in_features]``.
        :returns: flattened image parameters of shape ``[..., C*H*W]``.
        """
        flat, batch_shape = _flatten_batch(z, 1)
        h = self.linear(flat).reshape((flat.shape[0],) + self.start_shape)
        h = self.deconvs(self.start_act(self.start_norm(h)))
        _, height, width = self.image_shape
        top = (h.shape[-2] - height) // 2
        left = (h.shape[-1] - width) // 2
        h = h[..., top : top + height, left : left + width]
        return h.reshape(batch_shape + (self.out_features,))


# ---------------------------------------------------------------------------
# Max-pooling conv nets and their unpooling mirror (Conv-MMVA, Li et al. 2016, Fig. 2)
# ---------------------------------------------------------------------------

#: One layer of :class:`PoolingConvEncoder`: ``(channels, kernel, pool, padding)`` with
#: padding ``"valid"`` or ``"same"``.  The Conv-MMVA recognition model on MNIST (the
#: authors' code): 28 -> 24 -> 12 -> 12 -> 10 -> 5 -> 5 -> 5, then a 500-unit layer.
CONV_MMVA_LAYERS: tuple[tuple[int, int, int, str], ...] = (
    (32, 5, 2, "valid"), (32, 3, 1, "same"), (64, 3, 2, "valid"), (64, 3, 1, "same"), (64, 3, 1, "same"),
)


def _conv_out_size(size: int, kernel: int, pool: int, padding: str) -> int:
    size = size - kernel + 1 if padding == "valid" else size
    return size // pool


def conv_layers_fit(image_shape: Sequence[int], layers: Sequence[tuple[int, int, int, str]]) -> bool:
    """Whether ``layers`` leave a non-empty map on ``image_shape`` and their unpooling
    mirror (:class:`UnpoolingConvDecoder`) gives the image size back exactly."""
    _, h, w = image_shape
    for size in (h, w):
        sizes = [size]
        for _, kernel, pool, padding in layers:
            sizes.append(_conv_out_size(sizes[-1], kernel, pool, padding))
            if sizes[-1] < 1:
                return False
        back = sizes[-1]
        for _, kernel, pool, padding in reversed(layers):
            back = back * pool + (kernel - 1 if padding == "valid" else 0)
        if back != size:
            return False
    return True


class Unpool(nn.Module):
    """Unpooling (Dosovitskiy et al. 2015, as in the Conv-MMVA code): each value goes to
    the top-left corner of a ``pool x pool`` block of zeros."""

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if self.pool == 1:
            return x
        n, c, h, w = x.shape
        out = x.new_zeros((n, c, h * self.pool, w * self.pool))
        out[..., :: self.pool, :: self.pool] = x
        return out


def _check_layers(layers: Sequence[tuple[int, int, int, str]]) -> list[tuple[int, int, int, str]]:
    layers = [tuple(layer) for layer in layers]
    if not layers:
        raise ValueError("a conv net needs at least one layer")
    for layer in layers:
        if len(layer) != 4 or layer[3] not in ("valid", "same") or min(layer[:3]) < 1:
            raise ValueError(f"each conv layer is (channels, kernel, pool, 'valid'|'same') with positive sizes, got {layer}")
        if layer[3] == "same" and layer[1] % 2 == 0:
            raise ValueError(f"'same' padding needs an odd kernel, got {layer}")
    return layers


class PoolingConvEncoder(nn.Module):
    """
    A standard CNN (LeCun et al. 1998): convolution, activation and max-pooling per layer,
    then a fully connected layer, the Conv-MMVA recognition network (Li et al. 2016,
    Sec. 4.1.2, Fig. 2).  Inputs ``[..., C*H*W]`` or ``[..., C, H, W]``; leading dims kept.

    :param image_shape: ``(C, H, W)``.
    :param layers: ``(channels, kernel, pool, padding)`` per conv layer
        (default :data:`CONV_MMVA_LAYERS`).
    :param int hidden: width of the fully connected layer (500 in the paper).
    :param str activation: activation name (ReLU in the paper).

    :ivar int out_features: ``hidden``.
    :ivar tuple feature_shape: ``(C, H, W)`` of the last feature map.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        layers: Sequence[tuple[int, int, int, str]] = CONV_MMVA_LAYERS,
        hidden: int = 500,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.layers = _check_layers(layers)
        if not conv_layers_fit(self.image_shape, self.layers):
            raise ValueError(f"conv layers {self.layers} do not fit images of shape {self.image_shape}")
        c, h, w = self.image_shape
        blocks = []
        for channels, kernel, pool, padding in self.layers:
            conv = nn.Conv2d(c, channels, kernel, padding=0 if padding == "valid" else kernel // 2)
            blocks += [conv, _activation(activation)] + ([nn.MaxPool2d(pool)] if pool > 1 else [])
            c, h, w = channels, _conv_out_size(h, kernel, pool, padding), _conv_out_size(w, kernel, pool, padding)
        self.convs = nn.Sequential(*blocks)
        self.feature_shape = (c, h, w)
        self.fc = nn.Sequential(nn.Linear(c * h * w, hidden), _activation(activation))
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        shape = self.image_shape
        if x.dim() >= 3 and tuple(x.shape[-3:]) == shape:
            images, batch_shape = _flatten_batch(x, 3)
        elif x.dim() >= 1 and x.shape[-1] == math.prod(shape):
            flat, batch_shape = _flatten_batch(x, 1)
            images = flat.reshape((flat.shape[0],) + shape)
        else:
            raise ValueError(f"Expected input of shape [..., {shape}] or [..., {math.prod(shape)}], got {tuple(x.shape)}")
        h = self.fc(self.convs(images).flatten(start_dim=1))
        return h.reshape(batch_shape + (self.out_features,))


class UnpoolingConvDecoder(nn.Module):
    """
    The "symmetric" generative network of Conv-MMVA (Li et al. 2016, Sec. 4.1.2, after
    Dosovitskiy et al.'s unconvnets): fully connected layers ``in -> hidden -> C'*H'*W'``,
    then the encoder's layers in reverse, each as unpooling, convolution and activation
    (a ``"valid"`` convolution mirrored by a ``"full"`` one), ending in ``C`` channels of
    logits (Bernoulli) or means (Gaussian) without activation, flattened ``[..., C*H*W]``.

    :param int in_features: input width (the latent dimension).
    :param image_shape: ``(C, H, W)``.
    :param layers: the encoder's layers (mirrored here).
    :param int hidden: width of the first fully connected layer.
    :param str activation: activation name.
    """

    def __init__(
        self,
        in_features: int,
        image_shape: Sequence[int],
        layers: Sequence[tuple[int, int, int, str]] = CONV_MMVA_LAYERS,
        hidden: int = 500,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        layers = _check_layers(layers)
        encoder = PoolingConvEncoder(self.image_shape, layers, hidden, activation)  # checks the fit, gives the sizes
        self.start_shape = encoder.feature_shape
        self.in_features, self.out_features = in_features, math.prod(self.image_shape)
        self.fc = nn.Sequential(
            nn.Linear(in_features, hidden), _activation(activation),
            nn.Linear(hidden, math.prod(self.start_shape)), _activation(activation),
        )
        in_channels = [self.image_shape[0]] + [layer[0] for layer in layers[:-1]]
        blocks: list[nn.Module] = []
        for i in reversed(range(len(layers))):
            channels, kernel, pool, padding = layers[i]
            pad = kernel - 1 if padding == "valid" else kernel // 2
            blocks += [Unpool(pool), nn.Conv2d(channels, in_channels[i], kernel, padding=pad)]
            if i > 0:
                blocks.append(_activation(activation))
        self.deconvs = nn.Sequential(*blocks)

    def forward(self, z: Tensor) -> Tensor:
        flat, batch_shape = _flatten_batch(z, 1)
        h = self.fc(flat).reshape((flat.shape[0],) + self.start_shape)
        return self.deconvs(h).reshape(batch_shape + (self.out_features,))


@dataclass(frozen=True)
class MLPSpec:
    """The sizes and layers that a model and its guide share, written once and passed to
    both (``M2(spec)``, ``M2Guide(spec)``).  The defaults are Kingma et al.'s M2.

    :param int x_dim: features per example.
    :param int num_classes: values of the label ``y`` (unused by label-free models).
    :param int z_dim: units of the latent ``z``.
    :param hidden: hidden widths of the MLPs.
    :param str activation: hidden activation (:data:`ACTIVATIONS`).
    :param bool batch_norm: batch normalisation in the hidden layers.
    :param str init: one of :data:`INITS` (:func:`init_weights_`).
    :param str scale: Gaussian scale parameterisation, ``"softplus"`` or ``"exp"``.
    :param float min_scale: floor of the Gaussian scales (0: none).
    """

    x_dim: int
    num_classes: int = 10
    z_dim: int = 50
    hidden: tuple[int, ...] = (500,)
    activation: str = "softplus"
    batch_norm: bool = False
    init: str = "default"
    scale: str = "softplus"
    min_scale: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))

    def mlp(self, in_dim: int, out_dim: int | None = None, hidden: Sequence[int] | None = None) -> "MLP":
        """An :class:`MLP` from ``in_dim`` features, of the spec's widths (or ``hidden``)."""
        widths = self.hidden if hidden is None else hidden
        return MLP(in_dim, widths, out_dim=out_dim, activation=self.activation, batch_norm=self.batch_norm, init=self.init)

    def gaussian(self, in_dim: int, out_dim: int, hidden: Sequence[int] | None = None) -> "GaussianMLP":
        """A :class:`GaussianMLP` from ``in_dim`` features, of the spec's widths (or ``hidden``)."""
        widths = self.hidden if hidden is None else hidden
        return GaussianMLP(in_dim, widths, out_dim, self.activation, self.batch_norm, self.init, self.scale, self.min_scale)

    def normal_head(self, in_features: int, out_dim: int) -> "NormalHead":
        """A :class:`NormalHead` with the spec's scale, initialisation and floor."""
        return NormalHead(in_features, out_dim, scale=self.scale, init=self.init, min_scale=self.min_scale)


@dataclass(frozen=True)
class AuxiliarySpec(MLPSpec):
    """An :class:`MLPSpec` with an auxiliary variable ``a`` of ``a_dim`` units (the ADGM and
    SDGM of Maaløe et al. 2016; the defaults are the paper's MNIST ones, Glorot-initialised)."""

    z_dim: int = 100
    hidden: tuple[int, ...] = (500, 500)
    activation: str = "relu"
    init: str = "xavier"
    a_dim: int = 100


@dataclass(frozen=True)
class TwoLayerSpec(MLPSpec):
    """An :class:`MLPSpec` with a second stochastic layer ``z2`` of ``z2_dim`` units above
    ``z = z1``, ``hidden2`` the widths of the networks between them (``hidden``: between
    ``x`` and ``z1``).  The defaults are Burda et al.'s two-layer MNIST model."""

    z_dim: int = 100
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    init: str = "xavier"
    scale: str = "exp"
    z2_dim: int = 50
    hidden2: tuple[int, ...] = (100, 100)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "hidden2", tuple(self.hidden2))


@dataclass(frozen=True)
class ImageSpec:
    """The sizes that a convolutional model and its guide share, written once for both.

    :param image_shape: ``(C, H, W)`` of the images (``x`` is given flattened).
    :param int num_classes: values of the label ``y``.
    :param int z_dim: units of the latent ``z``.
    """

    image_shape: tuple[int, int, int]
    num_classes: int = 10
    z_dim: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", _check_image_shape(self.image_shape))


@dataclass(frozen=True)
class ConvMMVASpec(ImageSpec):
    """Conv-MMVA's sizes and layers (Li et al. 2016, Fig. 2): the recognition CNN's
    ``(channels, kernel, pool, padding)`` ``layers`` (mirrored by the generator), the fully
    connected width ``hidden`` and the ``activation``."""

    layers: tuple[tuple[int, int, int, str], ...] = CONV_MMVA_LAYERS
    hidden: int = 500
    activation: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", tuple(tuple(layer) for layer in self.layers))

