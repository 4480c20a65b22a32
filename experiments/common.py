"""Shared plumbing of the experiment scripts: arguments every script takes, and the
results JSON (device, epochs, wall time, the paper's target beside what we measured)."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from pyrodgm.allocator import tune_glibc_malloc
from pyrodgm.denormals import flush_denormals
from pyrodgm.plots import plot_test_curve
from pyrodgm.training import train

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str, epochs: int) -> argparse.ArgumentParser:
    """Arguments shared by every experiment (the paper's schedule is the default)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="mnist", help="mnist (paper) or digits (offline smoke runs)")
    p.add_argument("--root", default=None, help="data folder in torchvision layout, e.g. ../shared/data")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--validation", type=int, default=None)
    p.add_argument("--out", default=None, help="run folder (default runs/experiments/NAME_seedS)")
    p.add_argument("--results", default=str(RESULTS), help="folder for the results JSON")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no epoch that would end after this (continue later with --resume)")
    p.add_argument("--track-test", action="store_true",
                   help="record the test metrics after every epoch: test error against epoch and training seconds")
    p.add_argument("--cuda-graph", action="store_true", help="capture the training step in a CUDA graph (--device cuda)")
    return p


def run_options(args: argparse.Namespace) -> dict:
    """The :class:`~pyrodgm.training.TrainConfig` fields of how a run is driven, from the
    arguments every script takes (they do not change the maths)."""
    return {"time_limit": args.time_limit, "track_test": args.track_test, "cuda_graph": args.cuda_graph}


def setup(args: argparse.Namespace) -> float:
    tune_glibc_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    flush_denormals()  # before any parallel work starts torch's worker threads (pyrodgm.denormals)
    return time.perf_counter()


def run_training(args: argparse.Namespace, config, baseline: bool = False) -> dict:
    """Train ``config`` as the script's arguments say (``--resume``, ``--overwrite``,
    ``--quiet``); with ``baseline``, LabelSpreading on the run's split beside it."""
    return train(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite, baseline=baseline)


def command_line() -> str:
    """The command that ran this script, as it was typed (for the results table)."""
    return f"python {Path(sys.argv[0]).as_posix()} {shlex.join(sys.argv[1:])}".rstrip()


def baseline_line(result: dict) -> tuple[str, float] | None:
    """``(label, error)`` of the LabelSpreading baseline a run computed on its own split, for
    the test curve's horizontal line; ``None`` if it ran none."""
    baseline = result.get("baseline") or {}
    if baseline.get("test_error") is None:
        return None
    return f"LabelSpreading ({baseline.get('pixels', 'same')} pixels)", baseline["test_error"]


def write_result(
    args: argparse.Namespace, name: str, metrics: dict, target: dict, started: float, extra: dict | None = None,
    reference: dict | None = None,
) -> Path:
    """Write ``results/NAME_DATASET_seedS.json`` and return its path.  A run that recorded
    its test error every epoch (``--track-test``) also gets ``NAME_DATASET_seedS_test_curve.png``:
    that error against the epoch and the training seconds, beside ``reference`` (the
    authors' published curve, ``{"label": ..., "points": [(epoch, error), ...]}``) if any
    and the run's own LabelSpreading baseline if it ran one."""
    path = Path(args.results) / f"{name}_{args.dataset}_seed{args.seed}.json"
    history = metrics.get("history") or []
    curve = path.with_name(path.stem + "_test_curve.png") if any(h.get("test_error") is not None for h in history) else None
    result = {
        "experiment": name,
        "date": datetime.date.today().isoformat(),
        "device": metrics["device"],
        "dataset": args.dataset,
        "seed": args.seed,
        "epochs_planned": args.epochs,
        "epochs_completed": metrics["epochs_completed"],
        "train_seconds": metrics["train_seconds_total"],
        "wall_seconds": time.perf_counter() - started,
        "best_validation": metrics["best_validation"],
        "test": metrics.get("test"),
        "history": metrics.get("history"),  # per epoch: validation (and with --track-test, test) metrics, training seconds
        "stopped_by_time_limit": metrics.get("stopped_by_time_limit"),
        "baseline": metrics.get("baseline"),  # LabelSpreading on the run's split (train(baseline=True))
        "paper": target,
        "command": command_line(),
        "test_curve_png": curve and curve.name,
        "authors_curve": reference,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if curve:
        plot_test_curve(history, curve, reference=reference, baseline=baseline_line(result))
    print(json.dumps({k: result[k] for k in ("experiment", "device", "epochs_completed", "test")}, indent=2))
    return path
