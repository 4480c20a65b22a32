"""Training: one step as a plain function, and the epoch loop with validation, metrics,
sample grids and resumable checkpoints.

:func:`training_step` is a function of ``(model, guide, loss, optim, batch)`` and nothing
else, so a Lightning module (or any other driver) can wrap it.  :func:`train` runs the
whole schedule of a :class:`TrainConfig`: the semi-supervised split (validation carved from
the training set; the test set only evaluated, with the checkpoint chosen on validation),
ADGM-style batches with dynamic binarisation, a checkpoint written atomically after every
epoch, and ``resume=True`` continuing from it exactly: same batches, same random draws,
same parameters as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError, copy_checkpoint, load_checkpoint, previous_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from .configs import ModelConfig, config_fields, field_defaults, option
from .data import IMAGE_SHAPES, ImageData, SemiSupervisedBatches, binarize, load_dataset, semi_supervised_split
from .evaluation import classification_error
from .graphs import CapturedStep
from .losses import Loss, SemiSupervisedELBO
from .optim import FusedAdam
from .zoo import RECIPES, Recipe, defaults, recipe, recipes_with

__all__ = ["TrainConfig", "migrate_config", "saved_config", "TrainingDiverged", "training_step", "train", "build_from_checkpoint", "device_description", "load_test_data"]


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint): the options every
    model takes, and in ``params`` the model's own hyper-parameters, an instance of its
    recipe's config class (:attr:`pyrodgm.zoo.Recipe.config`; ``None``: its defaults).

    :meth:`for_model` routes keyword arguments to the two, :meth:`paper` starts from the
    paper's values, :meth:`from_dict` reads a checkpoint's config (older flat ones
    included)."""

    model: str = option("m2", "the model, a recipe of pyrodgm.zoo", cli=False)
    # data
    dataset: str = option("digits", "the data set (torchvision)")
    root: Optional[str] = option(None, "data folder (torchvision layout); downloads there unless --no-download")
    download: bool = option(True, "do not download a missing data set")
    labels: int = option(100, "labelled examples, balanced by class")
    validation: Optional[int] = option(None, "validation examples carved from the training set (default: the data set's; 0: none, the last epoch is kept)")
    binarize: bool = option(True, "keep grey pixels (with --likelihood gaussian: a Bernoulli model refuses them)")
    # optimisation
    epochs: int = option(10, "passes over the unlabelled data")
    batch_size: int = option(200, "rows per step, labelled ones included")
    labelled_per_batch: int = option(100, "labelled rows in every step's batch")
    lr: float = option(3e-4, "Adam's learning rate")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam's betas", cli=False)
    lr_decay: float = option(1.0, "learning-rate factor every --lr-decay-every epochs")
    lr_decay_every: int = option(0, "epochs between learning-rate decays (0: none)")
    lr_decay_start: int = option(0, "epochs before the decays start (Conv-MMCVA: 1499)", metavar="E")
    seed: int = option(0, "seed of the split, the initialisation and the noise")
    num_particles: int = option(1, "Monte Carlo samples per step (vectorised)")
    eval_particles: int = option(10, "samples the classifier is averaged over when evaluating")
    # the authors' code beyond the papers' text (issue 15; pyrodgm.training.optimiser for the units)
    weight_prior_std: Optional[float] = option(None, "N(0, STD^2) prior on weight matrices (inf: none)", metavar="STD")
    grad_clip_norm: Optional[float] = option(None, "clip the gradient per batch row to NORM (0: none)", metavar="NORM")
    grad_clip_value: Optional[float] = option(None, "then each element to +-V (0: none)", metavar="V")
    # how the run is driven (none of these changes the maths: a run may resume with others)
    device: str = option("cpu", "cpu or cuda")
    out: str = option("runs/m2", "output folder (default runs/MODEL)")
    samples: bool = option(True, "write no sample grids")
    validate_inputs: bool = option(
        True, "skip per-step NaN/range checks (pyro.enable_validation(False)), for speed"
    )
    cuda_graph: bool = option(False, "capture the training step in a CUDA graph and replay it (--device cuda)")
    time_limit: Optional[float] = option(None, "seconds: start no epoch that would end after this (resume later)")
    track_test: bool = option(
        False, "record the test set's metrics after every epoch (a curve; the checkpoint is still chosen on validation)"
    )
    params: Optional[ModelConfig] = option(None, "the model's own hyper-parameters", cli=False)
    image_shape: Optional[tuple[int, int, int]] = option(
        None, "(C, H, W) of images of one's own (the estimator, --data); None: the data set's", cli=False
    )

    def __post_init__(self) -> None:
        self.params = _model_params(self.model, self.params)
        self.betas = tuple(self.betas)
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)
        for name in ("epochs", "batch_size", "num_particles", "eval_particles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.labels < 0:
            raise ValueError(f"labels must be non-negative, got {self.labels}")
        if self.params.likelihood == "bernoulli" and not self.binarize:
            raise ValueError("a Bernoulli likelihood needs binary pixels: keep binarisation on, or use likelihood='gaussian'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device '{self.device}' was asked for but CUDA is not available")
        if self.cuda_graph and not self.device.startswith("cuda"):
            raise ValueError(
                f"cuda_graph needs a CUDA device (--device cuda), got '{self.device}': CUDA graphs are a GPU feature, "
                "and the eager step is the CPU's path"
            )
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be a positive number of seconds, got {self.time_limit}")

    def __getattr__(self, name: str):
        """Only for a missing attribute: name the model's hyper-parameter that was meant."""
        params = self.__dict__.get("params")
        if params is not None and name in config_fields(type(params)):
            raise AttributeError(f"'TrainConfig' has no attribute {name!r}: it is the model's, config.params.{name}")
        raise AttributeError(f"'TrainConfig' object has no attribute {name!r}")

    @classmethod
    def for_model(cls, model: str, params: Optional[ModelConfig | dict] = None, **values) -> "TrainConfig":
        """``model``'s config from keyword arguments, each routed to the training options or
        to ``params`` (the model's own); a hyper-parameter of other models only is a
        TypeError that names them."""
        common, own = _split(model, values, lambda name, value: _refuse(model, name))
        if isinstance(params, ModelConfig):
            params = dataclasses.replace(params, **own)
        else:
            params = {**(params or {}), **own}
        return cls(model=model, params=params, **common)

    @classmethod
    def paper(cls, model: str, dataset: str = "digits", **values) -> "TrainConfig":
        """``model``'s config with its paper's hyper-parameters for ``dataset``
        (:func:`pyrodgm.zoo.defaults`, what ``pyrodgm train`` starts from), then ``values``."""
        return cls.for_model(model, **{**defaults(model, dataset), "dataset": dataset, **values})

    @classmethod
    def from_dict(cls, saved: dict, **overrides) -> "TrainConfig":
        """The config a checkpoint saved (:func:`migrate_config`: older flat ones too), with
        ``overrides`` of its training options."""
        return cls(**{**migrate_config(saved), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def num_validation(self) -> int:
        if self.validation is not None:
            return self.validation
        return 300 if self.dataset == "digits" else 10000


def _model_params(model: str, params: Optional[ModelConfig | dict]) -> ModelConfig:
    """``params`` as an instance of ``model``'s config class (its defaults for ``None``)."""
    config_class = recipe(model).config
    if params is None or isinstance(params, dict):
        unknown = [name for name in (params or {}) if name not in config_fields(config_class)]
        if unknown:
            raise TypeError(_not_a_field(model, unknown[0]))
        return config_class(**(params or {}))
    if type(params) is not config_class:
        raise TypeError(f"the params of '{model}' must be its {config_class.__name__}, got {type(params).__name__}")
    return params


def _not_a_field(model: str, name: str) -> str:
    owners = recipes_with(name)
    where = f"it is {', '.join(owners)}'s" if owners else "no model has it"
    return f"{name} is not a hyper-parameter of {model} ({where})"


def _split(model: str, values: dict, other: Callable[[str, object], None]) -> tuple[dict, dict]:
    """``values`` split into training options and ``model``'s own hyper-parameters;
    ``other(name, value)`` for a field of neither."""
    common_names, own_names = config_fields(TrainConfig), config_fields(recipe(model).config)
    common, own = {}, {}
    for name, value in values.items():
        if name in own_names:
            own[name] = value
        elif name in common_names and name != "params":
            common[name] = value
        else:
            other(name, value)
    return common, own


def _refuse(model: str, name: str) -> None:
    raise TypeError(_not_a_field(model, name))


def migrate_config(saved: dict) -> dict:
    """A checkpoint's config as this version saves it (``params`` holding the model's own).
    A flat one (written before the typed configs) is routed: the model's hyper-parameters
    into ``params``, other models' dropped where they hold their default (the recipe never
    read them), and a ValueError where one does not."""
    if "params" in saved:
        return {**saved, "params": dict(saved["params"] or {})}
    model = saved.get("model", field_defaults(TrainConfig)["model"])
    values, params = _split(model, saved, lambda name, value: _check_foreign(model, name, value))
    return {**values, "params": params}


def _check_foreign(model: str, name: str, value) -> None:
    """A flat config's ``name`` that ``model`` does not have: at its default, or an error."""
    owners = recipes_with(name)
    if not owners:
        raise ValueError(f"the checkpoint's config has a field {name!r} that no model has")
    default = field_defaults(recipe(owners[0]).config)[name]
    if _norm(value) != _norm(default):
        raise ValueError(
            f"the checkpoint's config sets {name}={value!r}, a hyper-parameter of {', '.join(owners)}, not of its model "
            f"'{model}' (only its default {default!r} can be dropped)"
        )


def saved_config(saved: dict) -> dict:
    """A checkpoint's config migrated (:func:`migrate_config`), fields it predates at their
    defaults."""
    values = migrate_config(saved)
    params_class = recipe(values.get("model", field_defaults(TrainConfig)["model"])).config
    return {**field_defaults(TrainConfig), **values, "params": {**field_defaults(params_class), **values["params"]}}


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite (the step has already updated the
    parameters, so the run cannot go on; the checkpoint of the last epoch is untouched)."""


def training_step(model, guide, loss: Loss, optim: pyro.optim.PyroOptim, batch: tuple[torch.Tensor, Optional[torch.Tensor]]) -> float:
    """One SVI step on ``batch = (x, y)`` (``y`` may be ``None`` or hold ``-1`` for
    unlabelled rows).  Returns the loss."""
    x, y = batch
    svi = SVI(model, guide, optim, loss)
    return svi.step(x) if y is None else svi.step(x, y=y)


def device_description(device: torch.device) -> str:
    """The hardware a run used, for results tables."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def optimiser(config: TrainConfig, num_data: int, labelled_per_batch: int) -> FusedAdam:
    """The run's Adam, with the weight prior and the gradient clipping of the config.

    The ADGM authors' code of Dec 2015 (whose 1-MC curve :mod:`experiments.adgm_mnist_100`
    tracks) steps on the gradient of a batch's summed bound divided by its ``B`` rows (100
    labelled and 100 unlabelled), plus that of ``-log p(W) / n``, ``n`` its 120,000 rows (the
    60,000 images and each batch's 100 replicated labelled ones), clipped to total norm 5 and
    then each element to 1.  pyrodgm's loss is the batch's sum, ``B`` times theirs; so the
    thresholds of ``grad_clip_norm`` and ``grad_clip_value`` are taken per row of a batch
    (multiplied by ``B``), and the prior weighs ``U / N`` of ``-log N(W | 0,
    weight_prior_std^2)``, with ``U`` the unlabelled rows of a batch (``B`` if it has none)
    and ``N`` the unlabelled images (their ``B / n`` = 200 / 120,000 = 100 / 60,000).  With
    their values (1, 5, 1) a run takes their steps.  Their later SDGM code clips the mean over
    the labelled rows plus the mean over the unlabelled ones, twice the mean per row in
    that layout: its (5, 1) are (2.5, 0.5) here.

    A data set's preset can turn them on (the ADGM's on MNIST); ``weight_prior_std`` of
    ``inf`` (a flat prior) and clipping thresholds of 0 turn them off."""
    std, norm, value = config.weight_prior_std, config.grad_clip_norm, config.grad_clip_value
    if std is not None and not std > 0:
        raise ValueError(f"weight_prior_std must be positive (inf: no prior), got {std}")
    for name, threshold in (("grad_clip_norm", norm), ("grad_clip_value", value)):
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"{name} must be positive (0: no clipping), got {threshold}")
    rows = config.batch_size
    unlabelled = rows - labelled_per_batch if labelled_per_batch < rows else rows
    return FusedAdam(
        {"lr": learning_rate(config, 0), "betas": config.betas, **({"capturable": True} if config.cuda_graph else {})},
        weight_prior_precision=None if std is None or math.isinf(std) else unlabelled / (num_data * std ** 2),
        max_grad_norm=norm * rows if norm else None,
        max_grad_value=value * rows if value else None,
    )


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """``lr * lr_decay ** (max(0, epoch - lr_decay_start) // lr_decay_every)`` for the
    0-based ``epoch`` (ADGM: x0.75 every 200 epochs; the Conv-MMCVA authors' code: x0.995
    after every epoch from the 1500th of 3000 on, ``lr_decay_start`` 1499)."""
    if config.lr_decay_every <= 0:
        return config.lr
    return config.lr * config.lr_decay ** (max(0, epoch - config.lr_decay_start) // config.lr_decay_every)


@dataclass
class Run:
    """The state of a training run between epochs."""

    config: TrainConfig
    recipe: Recipe
    device: torch.device
    model: torch.nn.Module
    guide: torch.nn.Module
    loss: Loss
    optim: FusedAdam
    batches: SemiSupervisedBatches
    validation: Optional[ImageData]  # None for a run without a validation set (config.validation == 0)
    test: Optional[ImageData] = None  # only with config.track_test
    captured: Optional[CapturedStep] = None  # only with config.cuda_graph
    engine: Optional[dict] = None  # what drives the steps when not the native loop (pyrodgm.lightning)
    epoch: int = 0
    history: list = field(default_factory=list)
    best: Optional[dict] = None


def _prepare(config: TrainConfig) -> Run:
    recipe_ = recipe(config.model)
    device = torch.device(config.device)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    pyro.enable_validation(config.validate_inputs)
    train_data = load_dataset(config.dataset, root=config.root, train=True, download=config.download)
    if recipe_.supervised:  # every non-validation example labelled, batches all labelled
        config.labels, config.labelled_per_batch = len(train_data) - config.num_validation, config.batch_size
    uses_labels = recipe_.supervised or recipe_.label_site is not None
    labels = config.labels if uses_labels else 0
    if uses_labels and labels == 0 and not recipe_.labels_optional:
        raise ValueError(f"'{config.model}' is semi-supervised: --labels 0 gives an empty labelled set")
    labelled_per_batch = config.labelled_per_batch if labels else 0
    split = semi_supervised_split(
        train_data.y, labels, train_data.num_classes, config.num_validation, config.seed
    ) if labels else None
    x = train_data.flat().to(device)
    if split is None:
        validation_index, unlabelled_index = _unsupervised_split(len(train_data), config.num_validation, config.seed)
        labelled_index = unlabelled_index[:0]
    else:
        validation_index, unlabelled_index, labelled_index = split.validation, split.unlabelled, split.labelled
    y = train_data.y.to(device)
    batches = SemiSupervisedBatches(
        x[labelled_index.to(device)],
        y[labelled_index.to(device)],
        x[unlabelled_index.to(device)],
        batch_size=config.batch_size,
        labelled_per_batch=labelled_per_batch,
        seed=config.seed,
        binarize=config.binarize,
        num_classes=train_data.num_classes,
    )
    model, guide = recipe_.create(config, train_data.num_features, train_data.num_classes)
    model.to(device), guide.to(device)
    loss = recipe_.loss(config, num_data=len(unlabelled_index), num_labels=labels)
    optim = optimiser(config, num_data=len(unlabelled_index), labelled_per_batch=labelled_per_batch)
    validation = evaluation_data(train_data.subset(validation_index), config).to(device) if len(validation_index) else None
    test = load_test_data(config, device) if config.track_test else None
    captured = None
    if config.cuda_graph:
        if not recipe_.graph_capturable:
            capturable = ", ".join(name for name, r in RECIPES.items() if r.graph_capturable)
            raise ValueError(
                f"'{config.model}' cannot be captured in a CUDA graph: its losses look at which rows are labelled on the "
                f"host; train it without --cuda-graph (capturable: {capturable})"
            )
        captured = CapturedStep(model, guide, loss, optim, num_labelled=labelled_per_batch)
    return Run(config, recipe_, device, model, guide, loss, optim, batches, validation, test, captured)


def evaluation_data(data: ImageData, config: TrainConfig) -> ImageData:
    """Validation/test images, binarised once with a generator seeded by ``config.seed``
    (a fixed stochastic binarisation, as is usual for binarised MNIST) when training
    binarises."""
    if not config.binarize:
        return data
    generator = torch.Generator().manual_seed(config.seed)
    return ImageData(binarize(data.x, generator), data.y, data.num_classes, data.name)


def _unsupervised_split(size: int, num_validation: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[:num_validation].sort().values, order[num_validation:].sort().values


def _restore(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    run.guide.load_state_dict(state["guide"])
    run.optim.set_state(state["optim"])
    run.epoch = state["epoch"]
    run.history = list(state["history"])
    run.best = state.get("best")
    set_rng_state(state["rng"])


def _checkpoint_state(run: Run) -> dict:
    return {
        **({"engine": run.engine} if run.engine is not None else {}),
        "config": run.config.to_dict(),
        "epoch": run.epoch,
        "model": run.model.state_dict(),
        "guide": run.guide.state_dict(),
        "optim": run.optim.get_state(),
        "rng": rng_state(),
        "history": run.history,
        "best": run.best,
    }


@torch.no_grad()
def validation_metrics(
    model,
    guide,
    label_site: Optional[str],
    eval_particles: int,
    data: ImageData,
    extra: Optional[Callable[..., dict]] = None,
) -> dict:
    """ELBO per example (labels unseen) and, for classifiers (``label_site`` given), the
    error of the guide's classifier averaged over ``eval_particles`` samples; plus
    ``extra(model, guide, data)`` (a recipe's own metrics) when given."""
    model.eval(), guide.eval()
    x = data.flat()
    elbo = SemiSupervisedELBO(max_plate_nesting=1)
    total = sum(-elbo.loss(model, guide, x[i : i + 1000]) for i in range(0, x.shape[0], 1000))
    metrics = {"elbo": total / x.shape[0]}
    if label_site:
        metrics["error"] = classification_error(guide, x, data.y, num_particles=eval_particles, label_site=label_site)
    if extra is not None:
        metrics.update(extra(model, guide, data))
    return metrics


def _is_better(metrics: dict, best: Optional[dict]) -> bool:
    """Whether this epoch's validation ``metrics`` beat ``best``; without a validation set
    (no metrics) every epoch does, so ``best.pt`` is the last epoch's checkpoint."""
    if best is None or not metrics:
        return True
    key = "error" if "error" in metrics else "elbo"
    return metrics[key] < best[key] if key == "error" else metrics[key] > best[key]


def _run_epoch(run: Run, progress: bool) -> float:
    run.model.train(), run.guide.train()
    run.optim.set_learning_rate(learning_rate(run.config, run.epoch))
    if run.recipe.schedule is not None:
        run.recipe.schedule(run.config, run.epoch, run.model, run.guide, run.loss)
    run.batches.set_epoch(run.epoch)
    total, steps = 0.0, 0
    bar = tqdm(run.batches, desc=f"epoch {run.epoch + 1}/{run.config.epochs}", disable=not progress, leave=False)
    for x, y in bar:
        labels = y if run.batches.labelled_per_batch else None
        steps += 1
        if run.captured is None:
            value = training_step(run.model, run.guide, run.loss, run.optim, (x, labels))
            _check_finite(value, run, f"step {steps}")
        else:  # a device tensor: read back once an epoch, not once a step
            value = run.captured(x, labels)
        total += value
        if progress and steps % 20 == 0:
            bar.set_postfix(loss=f"{float(total) / steps / x.shape[0]:.2f}")
    if run.captured is not None:
        run.captured.check()
        total = float(total)
        _check_finite(total, run, "one of its steps (a CUDA-graph run reads the loss back once an epoch)")
    return total / max(steps, 1) / run.config.batch_size


def _check_finite(value: float, run: Run, where: str) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"the loss became {value} at epoch {run.epoch + 1}, {where}; the parameters are no longer "
            f"finite, so training stops here. The last checkpoint (epoch {run.epoch}) is intact: lower --lr, or "
            "lengthen the KL warm-up, and start again or resume from it"
        )


#: The run's learning curve (loss and validation error against the epoch), drawn when it ends.
LEARNING_CURVE = "learning_curve.png"

#: What a run writes into its folder (what ``overwrite`` removes before a new run).
RUN_FILES = ("checkpoint.pt", previous_checkpoint("checkpoint.pt").name, "best.pt", "metrics.json", "samples", LEARNING_CURVE)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False, baseline: bool = False) -> dict:
    """Run (or, with ``resume``, continue) the schedule of ``config``; returns the metrics
    written to ``out/metrics.json``.  With ``baseline``, a semi-supervised run's metrics
    also hold ``"baseline"``: scikit-learn's LabelSpreading on the run's split and pixels
    (:func:`pyrodgm.baselines.run_baseline`), the classical method the model should beat.

    A folder that holds a run already is refused unless the run is resumed (``resume``) or
    replaced (``overwrite``: its checkpoints, metrics and sample grids are removed first,
    once the new run has started without error); ``resume`` without a checkpoint is an
    error; a run that fails before its first checkpoint leaves no folder it created behind."""
    out = Path(config.out)
    _check_run_folder(out, resume, overwrite)
    created = not out.exists()
    try:
        run = _prepare(config)
        if resume:
            _restore(run, _resumable_state(out / "checkpoint.pt", config))
        elif overwrite:
            _remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
        metrics = _train_epochs(run, out, progress)
    except BaseException:
        if created and out.is_dir() and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    return add_baseline(metrics) if baseline else metrics


def add_baseline(metrics: dict) -> dict:
    """A finished semi-supervised run's ``metrics`` with ``"baseline"`` added (and written
    to its ``metrics.json``): scikit-learn's LabelSpreading on the run's split and pixels
    (:func:`pyrodgm.baselines.run_baseline`); unchanged for a run without a label site."""
    config = TrainConfig.from_dict(metrics["config"])
    recipe_ = recipe(config.model)
    if recipe_.classifier_site(config) is None or recipe_.supervised:
        return metrics
    from .baselines import run_baseline

    metrics = {**metrics, "baseline": run_baseline(config)}
    with open(Path(config.out) / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def _check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: give a folder for the run's files")
    if resume and not (out / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"nothing to resume: {out} holds no checkpoint.pt; start the run without --resume")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present and not resume and not overwrite:
        raise ValueError(
            f"{out} holds a run already ({', '.join(present)}): --resume continues it, --overwrite replaces it, "
            "or give another --out"
        )


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _resumable_state(path: Path, config: TrainConfig) -> dict:
    """The checkpoint to resume from; a damaged one is named, with the previous epoch's
    checkpoint kept beside it."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        previous = previous_checkpoint(path)
        hint = f"; the checkpoint of the epoch before is kept as {previous}: copy it over {path.name} to resume from there"
        raise CheckpointError(f"{error}{hint if previous.is_file() else ''}") from None
    _check_resumable(config, state["config"])
    return state


def _train_epochs(run: Run, out: Path, progress: bool) -> dict:
    """The epochs left of ``run.config``'s schedule, each checkpointed in ``out``."""
    config = run.config
    started = time.perf_counter()
    longest_epoch, stopped_early = 0.0, False
    while run.epoch < config.epochs:
        epoch_start = time.perf_counter()
        if config.time_limit is not None and longest_epoch and epoch_start - started + longest_epoch > config.time_limit:
            stopped_early = True  # the next epoch would end after the limit
            break
        train_loss = _run_epoch(run, progress)
        metrics = epoch_validation(run)
        run.epoch += 1
        record = end_epoch(run, out, train_loss, metrics, epoch_start)
        if progress:
            tqdm.write(_format_record(record))
        _write_metrics(out, run, wall_seconds=time.perf_counter() - started)
        longest_epoch = max(longest_epoch, time.perf_counter() - epoch_start)
    metrics = _write_metrics(out, run, wall_seconds=time.perf_counter() - started, final=True, stopped_early=stopped_early)
    _save_learning_curve(run, out / LEARNING_CURVE)
    return metrics


def epoch_validation(run: Run) -> dict:
    """The validation metrics after an epoch (none for a run without a validation set)."""
    if run.validation is None:
        return {}
    site = run.recipe.classifier_site(run.config)
    return validation_metrics(run.model, run.guide, site, run.config.eval_particles, run.validation, run.recipe.metrics)


def end_epoch(run: Run, out: Path, train_loss: float, metrics: dict, epoch_start: float, extra_state: Optional[dict] = None) -> dict:
    """What follows epoch ``run.epoch`` (already counted) in either training loop: its
    record (with the test curve's point under ``track_test``) in the history, the best
    epoch, the checkpoint (with ``extra_state``), ``best.pt`` and the sample grid; returns
    the record."""
    record = {"epoch": run.epoch, "train_loss_per_example": train_loss, **{f"valid_{k}": v for k, v in metrics.items()}}
    record["epoch_seconds"] = time.perf_counter() - epoch_start
    record["train_seconds"] = sum(r["epoch_seconds"] for r in run.history) + record["epoch_seconds"]
    if run.test is not None:
        record.update(_test_curve_point(run, run.recipe.classifier_site(run.config)))
    run.history.append(record)
    if _is_better(metrics, run.best):
        run.best = {"epoch": run.epoch, **metrics}
    checkpoint = out / "checkpoint.pt"
    save_checkpoint(checkpoint, {**_checkpoint_state(run), **(extra_state or {})}, keep_previous=True)
    if run.best["epoch"] == run.epoch:
        copy_checkpoint(checkpoint, out / "best.pt")
    if run.config.samples:
        with torch.random.fork_rng(devices=_cuda_devices(run.device)):  # resume stays exact
            _save_samples(run, out / "samples" / f"epoch_{run.epoch:04d}.png")
    return record


def _test_curve_point(run: Run, site: Optional[str]) -> dict:
    """The test set's metrics now, for the curve of test error against epoch and time
    (``config.track_test``); in its own random stream, so tracking does not change the run."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=_cuda_devices(run.device)):
        metrics = validation_metrics(run.model, run.guide, site, run.config.eval_particles, run.test, run.recipe.metrics)
    return {**{f"test_{k}": v for k, v in metrics.items()}, "test_seconds": time.perf_counter() - start}


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _check_resumable(config: TrainConfig, saved: dict) -> None:
    current, saved = _flat(config.to_dict()), _flat(saved_config(saved))  # fields it predates compare as their defaults
    ignored = ("epochs", "out", "device", "samples", "cuda_graph", "time_limit", "track_test")
    differing = [k for k in dict.fromkeys([*current, *saved]) if k not in ignored and _norm(current.get(k)) != _norm(saved.get(k))]
    if differing:
        raise ValueError(f"cannot resume: the checkpoint was trained with different {', '.join(differing)}")


def _flat(values: dict) -> dict:
    """A config dict with its ``params`` merged in (their names are not the training options')."""
    return {**{k: v for k, v in values.items() if k != "params"}, **values["params"]}


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _format_record(record: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _save_samples(run: Run, path: Path) -> None:
    from .plots import save_samples

    num_classes = run.model.num_classes if run.recipe.label_site else None
    save_samples(run.model, path, IMAGE_SHAPES[run.config.dataset], num_classes=num_classes)


def _save_learning_curve(run: Run, path: Path) -> None:
    """The loss, the validation error (or ELBO) and, with ``track_test``, the test error
    against the epoch (:func:`pyrodgm.plots.plot_learning_curve`), for the whole run."""
    from .plots import plot_learning_curve

    if run.history:
        plot_learning_curve(run.history, path)


def _write_metrics(out: Path, run: Run, wall_seconds: float, final: bool = False, stopped_early: bool = False) -> dict:
    metrics = {
        "config": run.config.to_dict(),
        "device": device_description(run.device),
        "epochs_completed": run.epoch,
        "history": run.history,
        "best_validation": run.best,
        "wall_seconds_this_session": wall_seconds,
        "train_seconds_total": sum(r["epoch_seconds"] for r in run.history),
    }
    if stopped_early:
        metrics["stopped_by_time_limit"] = run.config.time_limit
    if run.captured is not None:
        metrics["cuda_graph_captures"] = run.captured.captures
    if run.engine is not None:
        metrics["engine"] = run.engine
    if final:
        metrics["test"] = evaluate_test_set(out / "best.pt", run.device)
    with open(out / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def build_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[TrainConfig, Recipe, torch.nn.Module, torch.nn.Module, dict]:
    """Rebuild the (model, guide) pair saved at ``path``, in eval mode on ``device``."""
    state = load_checkpoint(path)
    if "estimator" in state:  # pyrodgm train MODEL --data: rows of the user's own, no named data set
        raise ValueError(
            f"{path} was trained on your own data (pyrodgm train MODEL --data): `pyrodgm evaluate {path} --data PATH` "
            f"evaluates it and `pyrodgm predict {path} --data PATH --out FILE` predicts with it"
        )
    config = TrainConfig.from_dict(state["config"], device=str(device))
    recipe_ = recipe(config.model)
    model, guide = recipe_.build(config, math.prod(IMAGE_SHAPES[config.dataset]), 10)
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    model.to(device).eval(), guide.to(device).eval()
    return config, recipe_, model, guide, state


def load_test_data(
    config: TrainConfig,
    device: str | torch.device = "cpu",
    root: Optional[str] = None,
    limit: Optional[int] = None,
    download: Optional[bool] = None,
) -> ImageData:
    """The test set of ``config``'s dataset as the run evaluates it (binarised once when
    training binarises), the first ``limit`` images, on ``device``."""
    download = config.download if download is None else download
    test = evaluation_data(load_dataset(config.dataset, root=root or config.root, train=False, download=download), config)
    if limit is not None:
        test = test.subset(torch.arange(min(limit, len(test))))
    return test.to(device)


def evaluate_test_set(checkpoint: Path, device: torch.device, limit: Optional[int] = None) -> dict:
    """Test-set ELBO and classification error of the checkpoint chosen on validation."""
    config, recipe_, model, guide, state = build_from_checkpoint(checkpoint, device)
    test = load_test_data(config, device, limit=limit)
    metrics = validation_metrics(model, guide, recipe_.classifier_site(config), config.eval_particles, test, recipe_.metrics)
    return {"epoch": state["epoch"], "num_examples": len(test), **metrics}
