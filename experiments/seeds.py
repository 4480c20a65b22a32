"""One ``pyrodgm train`` command repeated over seeds: the test error's mean ± sd, beside
scikit-learn's LabelSpreading on each seed's own split and pixels (``pyrodgm.baselines``).

Everything after ``--`` is the command as ``pyrodgm train`` takes it (the model, then its
options); ``--seed``, ``--out`` and ``--quiet`` are set here, one run folder per seed.

    python experiments/seeds.py --seeds 0 1 2 --threads 1 -- m2 --dataset digits --labels 100 --epochs 100
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, command_line, setup

from pyrodgm.cli import _train_config, build_parser
from pyrodgm.training import device_description, train


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/seeds", help="folder of the runs (one per seed)")
    p.add_argument("--results", default=str(RESULTS), help="folder for the results JSON")
    p.add_argument("--resume", action="store_true", help="continue each seed's run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the runs already there")
    p.add_argument("--suffix", default="", help="appended to the results file's name (e.g. _authors_code), so that variants of one model keep their own files")
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- MODEL [pyrodgm train options]")
    args = p.parse_args(argv)
    command = args.train[1:] if args.train[:1] == ["--"] else args.train
    if not command:
        p.error("give the training command after --, e.g. -- m2 --dataset digits --labels 100")
    return args, command


def seed_config(command: list[str], seed: int, out: Path):
    """The :class:`~pyrodgm.training.TrainConfig` ``pyrodgm train COMMAND --seed SEED`` builds."""
    args = build_parser().parse_args(["train", *command, "--seed", str(seed), "--out", str(out / f"seed{seed}"), "--quiet"])
    return _train_config(args)


def refuse_other_command(path: Path, train_command: str) -> None:
    """Stop before training when ``path`` holds the result of another command: a variant of
    a model needs its own ``--suffix`` rather than silently replacing the other's numbers."""
    if path.exists():
        recorded = json.loads(path.read_text()).get("train_command")
        if recorded != train_command:
            raise SystemExit(f"{path} holds the result of another command ({recorded!r}); give this one a --suffix")


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def main(argv=None) -> dict:
    args, command = parse_args(argv)
    started = setup(args)  # threads, malloc thresholds, subnormal flush: as every script
    configs = [seed_config(command, seed, Path(args.out)) for seed in args.seeds]
    first = configs[0]
    path = Path(args.results) / f"seeds_{first.model}_{first.labels}_labels{args.suffix}_{first.dataset}.json"
    refuse_other_command(path, "pyrodgm train " + shlex.join(command))
    per_seed = {}
    for seed, config in zip(args.seeds, configs):
        metrics = train(config, resume=args.resume, progress=False, overwrite=args.overwrite, baseline=True)
        per_seed[seed] = {
            "test_error": metrics["test"]["error"], "epoch": metrics["test"]["epoch"],
            "baseline_test_error": metrics["baseline"]["test_error"], "train_seconds": metrics["train_seconds_total"],
        }
    result = {
        "experiment": f"seeds_{first.model}_{first.labels}_labels{args.suffix}",
        "date": datetime.date.today().isoformat(),
        "device": device_description(torch.device(first.device)),
        "dataset": first.dataset,
        "model": first.model,
        "labels": first.labels,
        "train_command": "pyrodgm train " + shlex.join(command),
        "baseline": metrics["baseline"]["method"] + f", {metrics['baseline']['pixels']} pixels",
        "seeds": per_seed,
        "test_error": _summary([r["test_error"] for r in per_seed.values()]),
        "baseline_test_error": _summary([r["baseline_test_error"] for r in per_seed.values()]),
        "wall_seconds": time.perf_counter() - started,
        "command": command_line(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("experiment", "test_error", "baseline_test_error")}, indent=2))
    return result


if __name__ == "__main__":
    main()
