"""Typed hyper-parameters: each recipe's paper's own (a :class:`ModelConfig` subclass per
recipe family), composed with the training options every model takes in
:class:`~pyrodgm.training.TrainConfig` (its ``params``).

A field is declared once, with its type, default and one line of help (:func:`option`);
``pyrodgm train MODEL --help``, the options ``pyrodgm train MODEL`` accepts and the
estimator's ``model_params`` are read from the fields (:func:`config_fields`,
:func:`option_kwargs`).  The defaults here are the library's; a recipe's paper overrides
them through :attr:`pyrodgm.zoo.Recipe.defaults`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "ModelConfig", "ActivationConfig", "MLPConfig", "ClassifierConfig", "GumbelConfig", "ClustersConfig", "TopLayerConfig",
    "option", "config_fields", "field_defaults", "option_flag", "option_kwargs", "int_tuple",
]


def option(default: Any, help: str, *, choices: Optional[tuple] = None, cli: bool = True, metavar: Optional[str] = None) -> Any:
    """A config field: its ``default``, one line of ``help``, its ``choices`` if any,
    whether ``pyrodgm train`` has it as an option (``cli``) and the name its value goes by
    in the help (``metavar``; default: the field's name in capitals)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "cli": cli, "metavar": metavar})


def int_tuple(text: str) -> tuple[int, ...]:
    """``"500,500"`` -> ``(500, 500)`` (argparse's ``type`` of widths)."""
    try:
        return tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 500,500, got '{text}'") from None


def config_fields(config_class: type) -> dict[str, dataclasses.Field]:
    """``config_class``'s fields by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(config_class)}


def field_defaults(config_class: type) -> dict[str, Any]:
    """``config_class``'s fields' defaults by name."""
    return {name: f.default for name, f in config_fields(config_class).items()}


def _field_type(config_class: type, name: str) -> Any:
    """The field's type, ``Optional[T]`` read as ``T``."""
    kind = typing.get_type_hints(config_class)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind


def option_flag(config_class: type, name: str) -> str:
    """The field's command-line flag: ``--name`` (``_`` as ``-``), ``--no-name`` for a
    switch that is on by default."""
    flag = "--" + name.replace("_", "-")
    default = config_fields(config_class)[name].default
    return "--no-" + flag[2:] if default is True else flag


def option_kwargs(config_class: type, name: str) -> dict:
    """argparse keyword arguments of the field (no default: an option not given keeps the
    recipe's)."""
    field = config_fields(config_class)[name]
    kind, kwargs = _field_type(config_class, name), {"help": field.metadata.get("help", ""), "dest": name}
    if kind is bool:
        return {**kwargs, "action": "store_false" if field.default else "store_true"}
    if field.metadata.get("choices"):
        kwargs["choices"] = field.metadata["choices"]
    if field.metadata.get("metavar"):
        kwargs["metavar"] = field.metadata["metavar"]
    if typing.get_origin(kind) is tuple:
        kwargs["type"] = int_tuple
    elif kind in (int, float):
        kwargs["type"] = kind
    return kwargs


def _tuple_fields(config) -> None:
    """Sequences of tuple-typed fields as tuples (a list from a JSON file, say); a
    non-sequence is a TypeError."""
    for name in config_fields(type(config)):
        value = getattr(config, name)
        if typing.get_origin(_field_type(type(config), name)) is tuple and value is not None:
            setattr(config, name, tuple(value))


@dataclass
class ModelConfig:
    """The hyper-parameters every model has: its latent size and its likelihood."""

    z_dim: int = option(50, "units of the latent z (z1 for the hierarchical models)")
    likelihood: str = option("bernoulli", "p(x|...)", choices=("bernoulli", "gaussian"))

    def __post_init__(self) -> None:
        _tuple_fields(self)


@dataclass
class ActivationConfig(ModelConfig):
    """Networks with a chosen nonlinearity."""

    activation: str = option("softplus", "hidden activation (softplus, relu, tanh, ...)")


@dataclass
class MLPConfig(ActivationConfig):
    """Fully connected networks: Kingma et al.'s M1, the VAE of VA+Pegasos."""

    hidden: tuple[int, ...] = option((500,), "hidden widths, e.g. 500 or 600,600")


@dataclass
class ClassifierConfig(MLPConfig):
    """MLPs and a classifier ``q(y|x)`` weighted by Kingma et al.'s alpha."""

    alpha_factor: float = option(0.1, "Kingma et al.'s alpha = FACTOR * N, the classifier's weight")


@dataclass
class GumbelConfig:
    """How the guide samples an unlabelled ``y`` (:mod:`pyrodgm.labels`)."""

    label_mode: str = option(
        "enumerate", "how the guide samples y: summed exactly, Gumbel-softmax, or straight-through",
        choices=("enumerate", "relaxed", "straight-through"),
    )
    temperature: float = option(1.0, "initial Gumbel-softmax temperature")


@dataclass
class ClustersConfig:
    """A categorical ``y`` of any number of values when unlabelled."""

    num_clusters: Optional[int] = option(None, "K values of y (default: the number of classes; any K without labels)")


@dataclass
class TopLayerConfig:
    """A second stochastic layer ``z2`` above ``z1``, and a KL warm-up."""

    top_z_dim: int = option(50, "units of the top latent z2 (--z-dim is z1)")
    top_hidden: tuple[int, ...] = option((100, 100), "widths between z1 and z2, e.g. 100,100")
    kl_warmup_epochs: int = option(0, "the KL weight rises linearly from 0 to 1 over N epochs")
