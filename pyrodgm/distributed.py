"""Data-parallel training's two engine-independent pieces: each process's shard of the
batches, and the gradient all-reduce in front of the optimiser.

Semantics (what :mod:`pyrodgm.lightning` runs): ``N`` processes, each with a batch of ``B``
rows of which ``L`` are labelled, take exactly the step one process takes on the
concatenation of their batches (``N·B`` rows, ``N·L`` labelled).

- **Rows.**  Batch ``b`` of epoch ``e`` is cut from one *global* batch of
  :class:`~pyrodgm.data.SemiSupervisedBatches` with ``batch_size=N·B`` and
  ``labelled_per_batch=N·L``, whose row order is a pure function of ``(seed, e)``: process
  ``r`` takes the ``r``-th ``L`` of its labelled rows and the ``r``-th ``B - L`` of its
  unlabelled ones (:class:`ShardedBatches`).  So the unlabelled rows of an epoch are split
  between the processes without overlap, and the labelled set is cycled as the recipe
  says: with ADGM's 100 labels and ``L = 100``, every process's batch holds all 100.
- **Loss scale.**  pyrodgm's losses are sums over a batch's rows, so the gradient of the
  combined batch is the *sum* of the processes' gradients: :class:`GradientAllReduce` sums
  them (one all-reduce of all gradients flattened, before every optimiser step).  That is
  PyTorch DDP's average of each process's loss multiplied by ``N``; nothing else is
  rescaled, and the learning rate is the one-process recipe's.
- **Noise.**  Binarisation noise is drawn per process from a generator seeded by
  ``(seed, e, r)``; Pyro's sampling noise from torch's global generator, seeded by
  ``(seed, r)`` on process ``r > 0`` (:func:`process_seed`).  With one process both are
  exactly the native loop's, so one process reproduces :func:`pyrodgm.training.train`.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional

import torch

from .data import UNLABELLED, SemiSupervisedBatches, _bernoulli_from_uniform
from .optim import FusedAdam

__all__ = ["ShardedBatches", "GradientAllReduce", "process_seed"]


def process_seed(seed: int, rank: int) -> int:
    """The seed of Pyro's sampling noise on process ``rank``: ``seed`` itself on process 0
    (the native loop's), a different stream on every other process."""
    return seed if rank == 0 else (seed * 1_000_003 + 7_919 * rank) % (2**63)


class ShardedBatches(SemiSupervisedBatches):
    """Process ``rank``'s share of the global batches of ``world_size`` processes (module
    docstring): ``batch_size`` rows per batch, ``labelled_per_batch`` of them labelled
    (first), as :class:`~pyrodgm.data.SemiSupervisedBatches` lays them out.

    ``world_size=1`` yields exactly :class:`~pyrodgm.data.SemiSupervisedBatches`'s batches.
    Every process sees ``len(self)`` batches an epoch, the number of global batches.

    :param int rank: this process's index, ``0 <= rank < world_size``.
    :param int world_size: the number of processes.
    """

    def __init__(
        self,
        x_labelled: torch.Tensor,
        y_labelled: torch.Tensor,
        x_unlabelled: torch.Tensor,
        batch_size: int = 200,
        labelled_per_batch: int = 100,
        seed: int = 0,
        binarize: bool = False,
        num_classes: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        super().__init__(
            x_labelled, y_labelled, x_unlabelled, batch_size=world_size * batch_size,
            labelled_per_batch=world_size * labelled_per_batch, seed=seed, binarize=binarize, num_classes=num_classes,
        )
        self.rank, self.world_size = rank, world_size
        self.shard_labelled = labelled_per_batch
        self.shard_unlabelled = batch_size - labelled_per_batch

    @classmethod
    def shard(cls, batches: SemiSupervisedBatches, rank: int, world_size: int) -> "ShardedBatches":
        """``batches`` (one process's layout: its ``batch_size`` and ``labelled_per_batch``
        are per process) cut into ``rank``'s share."""
        return cls(
            batches.x_labelled, batches.y_labelled, batches.x_unlabelled, batch_size=batches.batch_size,
            labelled_per_batch=batches.labelled_per_batch, seed=batches.seed, binarize=batches.binarize,
            rank=rank, world_size=world_size,
        )

    def _noise_generator(self, epoch: int, generator: torch.Generator) -> torch.Generator:
        """Binarisation noise: the epoch's generator with one process, else one of the
        process's own seeded by ``(seed, epoch, rank)`` (no process draws another's)."""
        if self.world_size == 1:
            return generator
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_009 + self.rank) % (2**63))

    def _iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = self._generator(epoch)
        num_batches = len(self)
        device = self.x_unlabelled.device
        n_u = int(self.x_unlabelled.shape[0])
        u_order = torch.randperm(n_u, generator=generator)[: num_batches * self.unlabelled_per_batch].to(device)
        l_order = self._labelled_stream(generator, num_batches * self.labelled_per_batch).to(device)
        noise = self._noise_generator(epoch, generator)
        for b in range(num_batches):
            l_start = b * self.labelled_per_batch + self.rank * self.shard_labelled
            u_start = b * self.unlabelled_per_batch + self.rank * self.shard_unlabelled
            l_idx = l_order[l_start : l_start + self.shard_labelled]
            u_idx = u_order[u_start : u_start + self.shard_unlabelled]
            x = self.x_unlabelled[u_idx]
            y = torch.full((u_idx.shape[0],), UNLABELLED, dtype=torch.int64, device=device)
            if self.shard_labelled > 0:
                x = torch.cat([self.x_labelled[l_idx], x])
                y = torch.cat([self.y_labelled[l_idx], y])
            if self.binarize:
                x = _bernoulli_from_uniform(x, noise)
            yield x, y


class GradientAllReduce(FusedAdam):
    """:class:`~pyrodgm.optim.FusedAdam` whose every step first sums the gradients of
    ``params`` over the processes of ``torch.distributed``'s default group.

    One all-reduce (``SUM``) of every gradient flattened into one buffer, with one flag per
    parameter for whether any process has its gradient (a parameter no process reached
    keeps ``None`` and is not stepped, as in one process) and the buffer's finiteness
    checked once, so a diverged step stops every process at the same step.  ``params``
    is the named list of every trainable parameter, in an order all processes share
    (Pyro's own list of a step's parameters is a set, ordered differently per process).

    :param dict optim_args: :class:`torch.optim.Adam`'s arguments, as for ``FusedAdam``.
    :param list named_params: ``(name, parameter)`` of the model's and guide's trainable
        parameters, the same names in the same order on every process.
    :param gradient_options: ``FusedAdam``'s weight prior and clipping, applied to the sum.
    """

    def __init__(self, optim_args: dict, named_params: list[tuple[str, torch.Tensor]], **gradient_options) -> None:
        super().__init__(optim_args, **gradient_options)
        self.named_params = list(named_params)
        self.diverged = False

    @classmethod
    def for_processes(cls, optim: FusedAdam, named_params: list[tuple[str, torch.Tensor]], world_size: int) -> "GradientAllReduce":
        """The all-reducing twin of one process's ``optim`` (:func:`pyrodgm.training.optimiser`),
        for ``world_size`` processes: the sum is the gradient of ``world_size`` times the
        rows, so the clipping thresholds (per batch row) and the weight prior's precision
        (per unlabelled row) are ``world_size`` times one process's."""
        scaled = {
            name: None if getattr(optim, name) is None else getattr(optim, name) * world_size
            for name in ("weight_prior_precision", "max_grad_norm", "max_grad_value")
        }
        return cls(dict(optim.pt_optim_args), named_params, **scaled)

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """Sum the gradients over the processes, then one Adam step of every parameter
        that has one on any process (:meth:`all_reduce_gradients`)."""
        stepped = list(params)
        known = {p for _, p in self.named_params}
        strangers = [p for p in stepped if p not in known]
        if strangers:
            raise ValueError(
                f"{len(strangers)} parameter(s) of the step belong to neither the model nor the guide (a pyro.param "
                "outside their modules?): data-parallel training synchronises only the modules' parameters"
            )
        if not self.all_reduce_gradients():
            self.diverged = True  # every process sees the same sum: all of them stop at this step
            for p in stepped:
                p.grad = None
            return
        super().__call__([p for _, p in self.named_params if p.grad is not None], *args, **kwargs)

    def all_reduce_gradients(self) -> bool:
        """Sum every parameter's gradient over the processes; whether the sum is finite."""
        import torch.distributed as dist

        params = [p for _, p in self.named_params]
        if not params:
            return True
        device = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=device)
        flat = torch.cat([has] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if not math.isfinite(float(flat.sum())):
            return False
        flags, offset = flat[: len(params)], len(params)
        for p, flag in zip(params, flags.tolist()):
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p) if flag > 0 else None
            offset += size
        return True
