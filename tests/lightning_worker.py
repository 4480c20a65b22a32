"""A data-parallel run of pyrodgm.lightning for tests/test_lightning.py, in processes of its
own: Lightning's ``ddp`` launcher starts the other processes by running this script again.

``--noise-free`` evaluates the loss with every reparameterised latent at its mean (the
labels still enumerated), so that two processes can be compared with one process on the
combined batch; ``--grads PREFIX`` saves each process's gradients of the first step after
they were summed over the processes, as ``PREFIX.rankR.pt``.
"""

from __future__ import annotations

import argparse

import torch
from pyro.poutine.messenger import Messenger

import pyrodgm.lightning as pyrodgm_lightning
from pyrodgm.distributed import GradientAllReduce
from pyrodgm.training import TrainConfig

#: The runs' settings: M2 on the digits, tiny networks, 12 steps an epoch with two processes.
SMALL = dict(model="m2", dataset="digits", labels=100, validation=300, batch_size=100, labelled_per_batch=50, hidden=(32,),
             z_dim=4, eval_particles=2, lr=1e-3, samples=False)


class AtMean(Messenger):
    """Every reparameterised latent not yet valued takes its distribution's mean."""

    def _pyro_sample(self, msg):
        if msg["value"] is None and not msg["is_observed"] and not msg["infer"].get("enumerate") and msg["fn"].has_rsample:
            msg["value"] = msg["fn"].mean


def noise_free(run):
    """``run`` with its loss evaluated under :class:`AtMean` (deterministic, a sum over rows)."""
    differentiate = run.loss.differentiate

    def at_mean(*args, **kwargs):
        with AtMean():
            return differentiate(*args, **kwargs)

    run.loss.differentiate = at_mean
    return run


def config(out: str, epochs: int) -> TrainConfig:
    return TrainConfig.for_model(out=out, epochs=epochs, **SMALL)


def _save_first_gradients(prefix: str) -> None:
    reduce = GradientAllReduce.all_reduce_gradients

    def saving(self):
        finite = reduce(self)
        if not getattr(self, "_saved", False):
            rank = torch.distributed.get_rank()
            torch.save({n: p.grad.clone() for n, p in self.named_params if p.grad is not None}, f"{prefix}.rank{rank}.pt")
            self._saved = True
        return finite

    GradientAllReduce.all_reduce_gradients = saving


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--noise-free", action="store_true")
    parser.add_argument("--grads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.noise_free:
        prepare = pyrodgm_lightning._prepare
        pyrodgm_lightning._prepare = lambda c: noise_free(prepare(c))
    if args.grads:
        _save_first_gradients(args.grads)
    options = pyrodgm_lightning.LightningOptions(devices=args.devices)
    pyrodgm_lightning.train_lightning(config(args.out, args.epochs), options, resume=args.resume, progress=False)


if __name__ == "__main__":
    main()
