"""Step throughput of data-parallel training: the native loop against Lightning with 1 and
2 processes (and, on CUDA, one process in float32 against bf16 autocast).

Each measurement is a real run of one epoch (``pyrodgm.training.train`` or
``pyrodgm.lightning.train_lightning``) in a process of its own; the time of every training
step is recorded on process 0 (from the start of a step to the start of the next, so it
includes the data, the all-reduce and Lightning's own work between steps), and the rate is
``median steps per second x images per step`` over the steps after ``--warmup`` (images
per step: the batch of every process together, ``processes x --batch-size``).  With
``--processes 2`` each process has ``--batch-size`` rows, so the two-process run steps
twice the images of the one-process runs.

    python experiments/lightning_throughput.py --model adgm --dataset digits --threads 1
    python experiments/lightning_throughput.py --device cuda --dataset mnist --root ../shared/data --no-download --processes 1 --precisions 32-true bf16-mixed
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="adgm")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None)
    parser.add_argument("--no-download", dest="download", action="store_false")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=200, help="rows per process and step")
    parser.add_argument("--labelled-per-batch", type=int, default=100)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--hidden", default=None, help="e.g. 500,500 (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")


def _config(args: argparse.Namespace, out: str):
    from pyrodgm.training import TrainConfig
    from pyrodgm.zoo import defaults

    values = {**defaults(args.model, args.dataset), "model": args.model, "dataset": args.dataset, "root": args.root,
              "download": args.download, "device": args.device, "batch_size": args.batch_size,
              "labelled_per_batch": args.labelled_per_batch, "labels": args.labels, "epochs": 1, "samples": False,
              "eval_particles": 1, "out": out}
    if args.hidden:
        values["hidden"] = tuple(int(h) for h in args.hidden.split(","))
    return TrainConfig.for_model(**values)


class _StopAfter(Exception):
    pass


def measure(args: argparse.Namespace) -> None:
    """One run (``measure`` mode; Lightning's launcher runs this mode again for process 1)."""
    import pyrodgm.lightning as pyrodgm_lightning
    import pyrodgm.training as training

    torch.set_num_threads(args.threads)
    stamps: list[float] = []
    step = training.training_step

    def timed(*a, **k):
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return step(*a, **k)

    training.training_step = pyrodgm_lightning.training_step = timed
    config = _config(args, args.out)
    if args.engine == "native":
        training.train(config, progress=False)
        rank = 0
    else:
        options = pyrodgm_lightning.LightningOptions(devices=args.processes, precision=args.precision)
        rank = pyrodgm_lightning.global_rank_from_environment(args.processes)
        pyrodgm_lightning.train_lightning(config, options, progress=False)
    if rank == 0:
        Path(args.stamps).write_text(json.dumps(stamps))


def _rate(stamps: list[float], warmup: int, images_per_step: int) -> dict:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    median = statistics.median(gaps)
    return {"steps_timed": len(gaps), "median_step_seconds": median, "images_per_second": images_per_step / median,
            "images_per_step": images_per_step}


def _run_one(args: argparse.Namespace, engine: str, processes: int, precision: str, work: Path) -> dict:
    out, stamps = work / f"{engine}-{processes}-{precision}", work / f"{engine}-{processes}-{precision}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "measure", "--engine", engine, "--processes", str(processes),
               "--precision", precision, "--out", str(out), "--stamps", str(stamps), *_passed_options(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, timeout=args.timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    row = {"engine": engine, "processes": processes, "precision": precision,
           **_rate(json.loads(stamps.read_text()), args.warmup, processes * args.batch_size),
           "run_seconds": time.perf_counter() - started}
    print(json.dumps(row), flush=True)
    return row


def _passed_options(args: argparse.Namespace) -> list[str]:
    passed = ["--model", args.model, "--dataset", args.dataset, "--device", args.device, "--batch-size", str(args.batch_size),
              "--labelled-per-batch", str(args.labelled_per_batch), "--labels", str(args.labels), "--threads", str(args.threads)]
    passed += ["--root", args.root] if args.root else []
    passed += ["--hidden", args.hidden] if args.hidden else []
    passed += [] if args.download else ["--no-download"]
    return passed


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["measure"]:
        parser = argparse.ArgumentParser()
        _options(parser)
        parser.add_argument("--engine", choices=("native", "lightning"))
        parser.add_argument("--processes", type=int)
        parser.add_argument("--precision")
        parser.add_argument("--out")
        parser.add_argument("--stamps")
        measure(parser.parse_args(argv[1:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _options(parser)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="Lightning's process counts")
    parser.add_argument("--precisions", nargs="+", default=["32-true"], help="Lightning's precisions (bf16-mixed: CUDA)")
    parser.add_argument("--no-native", dest="native", action="store_false", help="skip the native loop's run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--output", default=None, help="JSON (default experiments/results/lightning_throughput_DEVICE.json)")
    args = parser.parse_args(argv)
    from pyrodgm.training import device_description

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lightning_throughput_"))
    try:
        rows = [_run_one(args, "native", 1, "32-true", work)] if args.native else []
        rows += [_run_one(args, "lightning", n, p, work) for n in args.processes for p in args.precisions]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.device(args.device)
    result = {
        "experiment": "lightning_throughput",
        "date": datetime.date.today().isoformat(),
        "device": device_description(device) + (f" per process, {os.cpu_count()} cores" if device.type == "cpu" else ""),
        "model": args.model,
        "dataset": args.dataset,
        "batch_size_per_process": args.batch_size,
        "rows": rows,
        "command": "python experiments/lightning_throughput.py " + " ".join(argv),
    }
    output = Path(args.output) if args.output else RESULTS / f"lightning_throughput_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
