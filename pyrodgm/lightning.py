"""Data-parallel training through Lightning (``pip install "pyrodgm[lightning]"``).

:func:`train_lightning` runs a :class:`~pyrodgm.training.TrainConfig` as
:func:`pyrodgm.training.train` does (the same recipes, schedules, validation, checkpoint
chosen on validation, ``metrics.json``, sample grids, learning curve and checkpoint
format) with Lightning's :class:`~lightning.pytorch.Trainer` driving the steps: its
launchers and process groups (DDP, gloo on CPU, NCCL on CUDA), its loggers (CSV, and
TensorBoard where installed, under ``OUT/logs``) and progress bar.

:class:`DGMModule` wraps :func:`pyrodgm.training.training_step` (Pyro's SVI step, with the
run's :class:`~pyrodgm.optim.FusedAdam`).  Each process trains on its shard of every
global batch and the gradients are summed over the processes before each step
(:mod:`pyrodgm.distributed`: ``N`` processes with batch ``B`` take the step of one process
with their ``N·B`` rows).  The gradients are reduced by pyrodgm, not by DDP's reducer:
Pyro's step differentiates inside the loss (and a parameter-restricted term of
:class:`~pyrodgm.losses.WeightedSum` with :func:`torch.autograd.grad`, which DDP's hooks
never see); DDP's wrapper still broadcasts process 0's parameters and buffers.

Process 0 validates, writes the checkpoints (with every process's random state, so a
killed run resumes exactly) and the metrics; the checkpoints are pyrodgm's own
(:mod:`pyrodgm.checkpoint`), so ``pyrodgm evaluate``, ``plot`` and ``impute`` read them and
either loop resumes them.  One process reproduces the native loop's parameters exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyro
import torch
from torch.overrides import TorchFunctionMode

from .checkpoint import load_checkpoint, rng_state, set_rng_state
from .distributed import GradientAllReduce, ShardedBatches, process_seed
from .training import (
    Run, TrainConfig, TrainingDiverged, _check_finite, _check_run_folder, _format_record, _prepare, _remove_run_files,
    _restore, _resumable_state, _save_learning_curve, _write_metrics, end_epoch, epoch_validation, learning_rate, train,
    training_step,
)

__all__ = ["LightningOptions", "DGMModule", "train_lightning", "PRECISIONS", "STRATEGIES", "lightning_available",
           "Float32Products", "native_batch_epoch", "global_rank_from_environment"]

#: Lightning's precisions pyrodgm runs: float32, and bf16 autocast of the networks' products.
PRECISIONS = ("32-true", "bf16-mixed")
#: ``ddp`` starts the other processes by running the same command again; ``ddp_spawn`` forks them.
STRATEGIES = ("ddp", "ddp_spawn")


def lightning_available() -> bool:
    """Whether the ``lightning`` package (the extra) is installed."""
    return importlib.util.find_spec("lightning") is not None


@dataclass
class LightningOptions:
    """How Lightning runs the processes (none of it changes the recipe; see the module
    docstring for what the number of processes does to the batch)."""

    devices: int = 1  # processes per machine (one per GPU on CUDA)
    num_nodes: int = 1  # machines
    strategy: str = "ddp"
    precision: str = "32-true"

    def __post_init__(self) -> None:
        for name in ("devices", "num_nodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


class Float32Products(TorchFunctionMode):
    """Under bf16 autocast, hand the result of every matrix product and convolution back
    in float32: the networks' products run in bf16, and everything after them (the
    distributions' log-densities, the enumeration's log-sum-exp, the KL terms) in float32."""

    PRODUCTS = {
        torch.nn.functional.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
        torch.Tensor.__matmul__, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
        torch.nn.functional.conv_transpose2d,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in self.PRODUCTS and isinstance(result, torch.Tensor) and result.dtype == torch.bfloat16:
            return result.float()
        return result


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        raise ValueError('--engine lightning needs the lightning extra: pip install "pyrodgm[lightning]"') from None
    return pl


def _base_module():
    return _lightning().LightningModule


def native_batch_epoch(epoch: int) -> int:
    """The epoch of :class:`~pyrodgm.data.SemiSupervisedBatches` whose batches the native
    loop trains on in its epoch ``epoch``: ``epoch + 1``, since its progress bar
    (``tqdm.auto``) calls ``iter`` on the batches once before iterating them, and every
    ``iter`` advances their epoch.  Still a pure function of the seed and the epoch."""
    return epoch + 1


class _EpochBatches:
    """The run's batches of its current epoch, as Lightning's training data (the native
    loop's batches, :func:`native_batch_epoch`)."""

    def __init__(self, module: "DGMModule") -> None:
        self.module = module

    def __len__(self) -> int:
        return len(self.module.run.batches)

    def __iter__(self):
        run = self.module.run
        run.batches.set_epoch(native_batch_epoch(run.epoch))
        return iter(run.batches)


class DGMModule(_base_module() if lightning_available() else torch.nn.Module):
    """A pyrodgm run as a LightningModule: the run is built in :meth:`setup`, once the
    process knows its rank; each training step is :func:`~pyrodgm.training.training_step`.

    :param TrainConfig config: the run.
    :param LightningOptions options: how Lightning runs it.
    :param bool resume: continue from ``OUT/checkpoint.pt``.
    :param bool progress: show the per-epoch record lines (the bar is the Trainer's).
    """

    def __init__(self, config: TrainConfig, options: LightningOptions, resume: bool = False, progress: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.config, self.options, self.resume, self.progress = config, options, resume, progress
        self.run: Optional[Run] = None
        self.stopped_early = False
        self._epoch_total, self._epoch_steps, self._epoch_start = 0.0, 0, 0.0
        self._started, self._longest_epoch = 0.0, 0.0

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        config = dataclasses.replace(self.config, device=_device_name(self.trainer.strategy.root_device))
        run = _prepare(config)
        run.batches = ShardedBatches.shard(run.batches, rank, world)
        if world > 1:
            named = [(f"{owner}.{name}", p) for owner, module in (("model", run.model), ("guide", run.guide))
                     for name, p in module.named_parameters() if p.requires_grad]
            run.optim = GradientAllReduce.for_processes(run.optim, named, world)
        run.engine = {"name": "lightning", "processes": world, **dataclasses.asdict(self.options)}
        if self.resume:
            state = _resumable_state(Path(config.out) / "checkpoint.pt", config)
            _restore(run, state)
            ranks = state.get("rng_ranks")
            if rank > 0 and ranks is not None and len(ranks) == world:
                set_rng_state(ranks[rank])
            elif rank > 0:  # resumed with another number of processes: a fresh stream per process
                pyro.set_rng_seed(process_seed(config.seed, rank) + run.epoch)
        elif rank > 0:
            pyro.set_rng_seed(process_seed(config.seed, rank))
        self.run, self.model, self.guide = run, run.model, run.guide
        self._started = time.perf_counter()

    def train_dataloader(self) -> _EpochBatches:
        return _EpochBatches(self)

    def configure_optimizers(self):
        return None  # the run's FusedAdam steps inside training_step (Pyro's SVI)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        run = self.run
        run.model.train(), run.guide.train()
        run.optim.set_learning_rate(learning_rate(run.config, run.epoch))
        if run.recipe.schedule is not None:
            run.recipe.schedule(run.config, run.epoch, run.model, run.guide, run.loss)
        self._epoch_total, self._epoch_steps, self._epoch_start = 0.0, 0, time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> None:
        run = self.run
        x, y = batch
        labels = y if run.batches.labelled_per_batch else None
        with Float32Products() if self.options.precision.startswith("bf16") else nullcontext():
            value = training_step(run.model, run.guide, run.loss, run.optim, (x, labels))
        self._epoch_steps += 1
        if getattr(run.optim, "diverged", False):  # every process sees the same reduced gradients
            raise TrainingDiverged(
                f"the gradients became NaN or infinite at epoch {run.epoch + 1}, step {self._epoch_steps} (on some "
                f"process); training stops here with the parameters of the step before. The last checkpoint (epoch "
                f"{run.epoch}) is intact: lower --lr, or lengthen the KL warm-up, and start again or resume from it"
            )
        if self.trainer.world_size == 1:
            _check_finite(value, run, f"step {self._epoch_steps}")
        self._epoch_total += value
        self.log("loss", value / x.shape[0], prog_bar=True, logger=False)

    def on_train_epoch_end(self) -> None:
        run, config, world = self.run, self.run.config, self.trainer.world_size
        total = self._sum_over_processes(self._epoch_total)
        train_loss = total / max(self._epoch_steps, 1) / (config.batch_size * world)
        zero = self.trainer.is_global_zero
        metrics = epoch_validation(run) if zero else {}
        run.epoch += 1
        rngs = self._gather(rng_state())
        if zero:
            self._end_of_epoch(train_loss, metrics, rngs)
        self.stopped_early = self._broadcast(self._out_of_time() if zero else False)
        if self.stopped_early:
            self.trainer.should_stop = True

    def _end_of_epoch(self, train_loss: float, metrics: dict, rngs: list) -> None:
        """Process 0: the epoch's record, checkpoint, best checkpoint, samples, logs, metrics."""
        run, out = self.run, Path(self.run.config.out)
        record = end_epoch(run, out, train_loss, metrics, self._epoch_start, extra_state={"rng_ranks": rngs})
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        for logger in self.loggers:
            logger.log_metrics(numbers, step=run.epoch)
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(_format_record(record))
        _write_metrics(out, run, wall_seconds=time.perf_counter() - self._started)
        self._longest_epoch = max(self._longest_epoch, time.perf_counter() - self._epoch_start)

    def _out_of_time(self) -> bool:
        """Whether the next epoch would end after ``time_limit`` (the native loop's rule)."""
        limit = self.run.config.time_limit
        elapsed = time.perf_counter() - self._started
        return limit is not None and self.run.epoch < self.run.config.epochs and elapsed + self._longest_epoch > limit

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        out = Path(self.run.config.out)
        _write_metrics(out, self.run, wall_seconds=time.perf_counter() - self._started, final=True,
                       stopped_early=self.stopped_early)
        _save_learning_curve(self.run, out / "learning_curve.png")

    # ------------------------------------------------------------------ collectives
    def _sum_over_processes(self, value: float) -> float:
        if self.trainer.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.run.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor)

    def _gather(self, obj) -> list:
        if self.trainer.world_size == 1:
            return [obj]
        objects = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(objects, obj)
        return objects

    def _broadcast(self, obj):
        return obj if self.trainer.world_size == 1 else self.trainer.strategy.broadcast(obj, src=0)


def _device_name(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)


def global_rank_from_environment(devices: int) -> int:
    """This process's rank as its launcher set it (``RANK``, or Lightning's ``NODE_RANK``
    and ``LOCAL_RANK``); 0 for the command a user started."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))


def _loggers(out: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(save_dir=str(out), name="logs")]
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        loggers.append(TensorBoardLogger(save_dir=str(out), name="logs"))
    return loggers


def _strategy(options: LightningOptions):
    if options.world_size == 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(start_method="spawn" if options.strategy == "ddp_spawn" else "popen")


#: Lightning's advice that does not apply to pyrodgm's runs (their data are tensors in memory).
_QUIET = (
    r".*does not have many workers.*",
    r".*`LightningModule.configure_optimizers` returned `None`.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*GPU available but not used.*",
    r".*`training_step` returned `None`.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning 2.6, on this torch
)


def train_lightning(
    config: TrainConfig,
    options: Optional[LightningOptions] = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """:func:`pyrodgm.training.train` with Lightning driving ``options.world_size``
    data-parallel processes (module docstring); returns the metrics of ``out/metrics.json``
    on process 0 and ``{"rank": r}`` on the others."""
    options = options or LightningOptions()
    pl = _lightning()
    if config.cuda_graph:
        raise ValueError("--cuda-graph is the native loop's: train without it under --engine lightning")
    out = Path(config.out)
    rank = global_rank_from_environment(options.devices)
    if rank > 0:  # started by process 0's launcher, which checked the folder
        _fit(pl, config, options, resume, progress)
        return {"rank": rank}
    _check_run_folder(out, resume, overwrite)
    if resume and load_checkpoint(out / "checkpoint.pt")["epoch"] >= config.epochs:
        return train(config, resume=True, progress=progress)  # nothing left to train: the final metrics
    created = not out.exists()
    try:
        if overwrite:
            _remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
        _fit(pl, config, options, resume, progress)
    except BaseException:
        if created and out.is_dir() and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    return json.loads((out / "metrics.json").read_text())


def _fit(pl, config: TrainConfig, options: LightningOptions, resume: bool, progress: bool) -> None:
    """Lightning's ``Trainer.fit`` of the epochs left (this process's part of the run)."""
    remaining = config.epochs - (load_checkpoint(Path(config.out) / "checkpoint.pt")["epoch"] if resume else 0)
    module = DGMModule(config, options, resume=resume, progress=progress)
    trainer = pl.Trainer(
        accelerator="gpu" if config.device.startswith("cuda") else "cpu",
        devices=options.devices,
        num_nodes=options.num_nodes,
        strategy=_strategy(options),
        precision=options.precision,
        max_epochs=remaining,
        logger=_loggers(Path(config.out)),
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module)
