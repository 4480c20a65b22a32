"""pyrodgm.SemiSupervisedClassifier against scikit-learn's semi-supervised classifiers, on
the same splits: test error and fit time.

Two tasks (issue 18's benchmark):

* ``synthetic``: ``make_classification(n_samples, n_features=20, n_informative=10,
  n_classes=3)`` with the seed; a quarter of the rows (stratified) is the test set, 5% of
  the rest (stratified, at least one per class) is labelled, the other training rows
  unlabelled.  Every method sees the training rows standardised (the estimator
  standardises them itself; the peers get a ``StandardScaler`` in a pipeline).
* ``digits`` (and ``mnist``, from ``--root``, never downloaded: 50,000 training images, the
  10,000 validation images unused, the 10,000 test images): scikit-learn's 8x8 digits with 100 labels on pyrodgm's own split
  (``semi_supervised_split`` with the seed: 1,200 training images, 300 held out for
  validation and unused here, the 297 test images), exactly as ``baselines.py`` makes it;
  the peers are ``baselines.py``'s own run (50 PCA components, fit time without the PCA),
  the estimator sees the grey pixels (a Gaussian likelihood on standardised pixels).

Peers: ``LabelSpreading(kernel="knn", n_neighbors=10)``, ``SelfTrainingClassifier(
LogisticRegression())`` and, for scale, a ``LogisticRegression`` on the labelled rows alone.
The estimator runs every ``--models`` entry with the same small networks (``--hidden``,
``--z-dim``, ``--a-dim``), ``--epochs`` epochs at ``--lr``, no early stopping; its fit
time is the whole ``fit`` (preprocessing included), its prediction time is recorded apart.
Results: ``results/estimator_benchmark_TASK.json``, errors per seed with mean ± sd.

    python experiments/estimator_benchmark.py --tasks synthetic digits --seeds 0 1 2 --threads 1
    python experiments/estimator_benchmark.py --tasks digits --models m2 --hidden 500 --z-dim 50 --lr 1e-3 --suffix _m2_paper_size
    python experiments/estimator_benchmark.py --tasks mnist --root /work/shared/data --seeds 0 --models m2 --epochs 10
    python experiments/estimator_benchmark.py --tasks digits --models m2 adgm --alpha-factor 2 --suffix _alpha2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from baselines import FITS, problem, run_seed, train_config
from common import RESULTS, command_line
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
from threadpoolctl import threadpool_limits

from pyrodgm.allocator import tune_glibc_malloc
from pyrodgm.data import load_dataset
from pyrodgm.estimator import TABULAR_MODELS, SemiSupervisedClassifier
from pyrodgm.training import _cpu_name

TASKS = ("synthetic", "digits", "mnist")
#: The peers, as in baselines.py (its METHODS' keys).
PEERS = tuple(FITS)


def synthetic_split(samples: int, labelled_fraction: float, seed: int) -> dict:
    """The synthetic task's arrays for ``seed``: training rows with ``-1`` for the
    unlabelled ones, and the test rows."""
    X, y = make_classification(n_samples=samples, n_features=20, n_informative=10, n_classes=3, random_state=seed)
    train, test = train_test_split(np.arange(samples), test_size=0.25, stratify=y, random_state=seed)
    train, test = np.sort(train), np.sort(test)
    num_labelled = max(3, round(labelled_fraction * len(train)))
    labelled, _ = train_test_split(train, train_size=num_labelled, stratify=y[train], random_state=seed)
    y_fit = np.full(len(train), -1)
    y_fit[np.searchsorted(train, labelled)] = y[labelled]
    return {"x_fit": X[train], "y_fit": y_fit, "x_test": X[test], "y_test": y[test], "labelled": int(len(labelled))}


def synthetic_peers(split: dict) -> dict:
    """Test error and seconds (fit and test prediction) of each peer on standardised rows."""
    labelled = split["y_fit"] != -1
    fits = {
        "label_spreading": lambda: make_pipeline(StandardScaler(), LabelSpreading(kernel="knn", n_neighbors=10, n_jobs=1))
        .fit(split["x_fit"], split["y_fit"]),
        "self_training": lambda: make_pipeline(StandardScaler(), SelfTrainingClassifier(LogisticRegression()))
        .fit(split["x_fit"], split["y_fit"]),
        "labelled_only": lambda: make_pipeline(StandardScaler(), LogisticRegression())
        .fit(split["x_fit"][labelled], split["y_fit"][labelled]),
    }
    record = {}
    for name, fit in fits.items():
        started = time.perf_counter()
        classifier = fit()
        fitted = time.perf_counter()
        predicted = classifier.predict(split["x_test"])
        record[name] = {
            "test_error": float(np.mean(predicted != split["y_test"])),
            "fit_seconds": fitted - started,
            "predict_seconds": time.perf_counter() - fitted,
        }
    return record


def estimator(model: str, args: argparse.Namespace, seed: int) -> SemiSupervisedClassifier:
    params = {"hidden": tuple(args.hidden), "z_dim": args.z_dim}
    if args.alpha_factor is not None:
        params.update(alpha_factor=args.alpha_factor)
    if model in ("adgm", "sdgm", "adgm-deterministic"):
        params.update(a_dim=args.a_dim)
    if model not in ("m2", "adgm-deterministic"):
        params.update(eval_particles=args.eval_particles)
    if model == "m1m2":
        params.update(end_to_end=True, m1_z_dim=args.z_dim, m1_hidden=tuple(args.hidden))
    return SemiSupervisedClassifier(model, model_params=params, likelihood=args.likelihood, max_epochs=args.epochs, lr=args.lr,
                                    random_state=seed)


def run_estimator(model: str, args: argparse.Namespace, seed: int, x_fit, y_fit, x_test, y_test) -> dict:
    started = time.perf_counter()
    classifier = estimator(model, args, seed).fit(x_fit, y_fit)
    fitted = time.perf_counter()
    predicted = classifier.predict(x_test)
    return {
        "test_error": float(np.mean(predicted != y_test)),
        "fit_seconds": fitted - started,
        "predict_seconds": time.perf_counter() - fitted,
        "likelihood": classifier.likelihood_,
        "final_train_loss_per_example": classifier.loss_curve_[-1],
    }


def run_task(task: str, args: argparse.Namespace) -> dict:
    per_seed = {}
    if task in ("digits", "mnist"):
        train = load_dataset(task, root=args.root, download=False)
        test = load_dataset(task, root=args.root, train=False, download=False)
    for seed in args.seeds:
        if task == "synthetic":
            split = synthetic_split(args.samples, args.labelled_fraction, seed)
            record = synthetic_peers(split)
            x_fit, y_fit, x_test, y_test = split["x_fit"], split["y_fit"], split["x_test"], split["y_test"]
            sizes = {"num_fit": len(x_fit), "num_labelled": split["labelled"], "num_test": len(x_test)}
        else:
            labels = args.digits_labels if task == "digits" else args.mnist_labels
            config = train_config(task, labels, None, seed, binarized=False)
            p = problem(train, test, config)
            x_fit, y_fit, x_test, y_test = p.x_fit, p.y_fit, p.x_test, p.y_test
            baseline = run_seed(train, test, config)  # baselines.py's own run: PCA 50, then each peer
            record = {name: {"test_error": baseline[name]["test_error"], "fit_seconds": baseline[name]["seconds"],
                             "predict_seconds": None} for name in PEERS}
            sizes = {"num_fit": len(x_fit), "num_labelled": int(np.sum(y_fit != -1)), "num_test": len(x_test),
                     "pca_seconds": baseline["pca_seconds"]}
        for model in args.models:
            record[f"pyrodgm_{model}"] = run_estimator(model, args, seed, x_fit, y_fit, x_test, y_test)
        record["sizes"] = sizes
        per_seed[seed] = record
        if not args.quiet:
            errors = ", ".join(f"{name} {100 * r['test_error']:.2f}% ({r['fit_seconds']:.1f} s)" for name, r in record.items() if name != "sizes")
            print(f"{task} seed {seed}: {errors}", flush=True)
    return per_seed


def summary(per_seed: dict) -> dict:
    names = [name for name in next(iter(per_seed.values())) if name != "sizes"]
    methods = {}
    for name in names:
        errors = {seed: record[name]["test_error"] for seed, record in per_seed.items()}
        values = list(errors.values())
        methods[name] = {
            "test_error": errors,
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "fit_seconds": {seed: record[name]["fit_seconds"] for seed, record in per_seed.items()},
            "predict_seconds": {seed: record[name]["predict_seconds"] for seed, record in per_seed.items()},
        }
    return methods


def describe(task: str, args: argparse.Namespace) -> str:
    if task == "synthetic":
        return (f"make_classification(n_samples={args.samples}, n_features=20, n_informative=10, n_classes=3, "
                f"random_state=seed); 25% test (stratified), {100 * args.labelled_fraction:g}% of the rest labelled")
    if task == "mnist":
        return f"MNIST, {args.mnist_labels} labels on pyrodgm's split (50,000 training images, 10,000 test), grey pixels"
    return f"digits, {args.digits_labels} labels on pyrodgm's split (1,200 training images, 297 test), grey pixels"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["synthetic", "digits"], choices=TASKS,
                   help="default: synthetic digits (mnist needs --root with MNIST in it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=4000, help="rows of the synthetic task (a quarter are test rows)")
    p.add_argument("--labelled-fraction", type=float, default=0.05, help="labelled share of the synthetic training rows")
    p.add_argument("--digits-labels", type=int, default=100)
    p.add_argument("--mnist-labels", type=int, default=100)
    p.add_argument("--root", default=None, help="the folder holding MNIST in torchvision's layout (never downloaded)")
    p.add_argument("--models", nargs="+", default=["m2", "adgm"], choices=TABULAR_MODELS)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=[128], help="hidden widths of every network")
    p.add_argument("--z-dim", type=int, default=16)
    p.add_argument("--a-dim", type=int, default=16, help="auxiliary units (adgm, sdgm)")
    p.add_argument("--alpha-factor", type=float, default=None,
                   help="the classifier's weight, alpha = FACTOR * N (default: each model's paper's)")
    p.add_argument("--eval-particles", type=int, default=20, help="samples the Monte Carlo classifiers average (not m2)")
    p.add_argument("--likelihood", default="auto", choices=("auto", "bernoulli", "gaussian"),
                   help="the estimator's likelihood (auto: Bernoulli for 0/1 features, else Gaussian)")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    p.add_argument("--results", default=str(RESULTS), help="folder for the results JSON")
    p.add_argument("--suffix", default="", help="appended to the results' names (estimator_benchmark_TASKSUFFIX.json)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    p = build_parser()
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if not 0 < args.labelled_fraction < 1:
        p.error(f"--labelled-fraction must lie in (0, 1), got {args.labelled_fraction}")
    if args.samples < 40 or args.epochs < 1 or args.threads < 1:
        p.error("--samples must be at least 40, --epochs and --threads at least 1")
    tune_glibc_malloc()
    torch.set_num_threads(args.threads)
    written = []
    for task in args.tasks:
        started = time.perf_counter()
        with threadpool_limits(args.threads):
            per_seed = run_task(task, args)
        result = {
            "experiment": f"estimator_benchmark_{task}{args.suffix}",
            "date": datetime.date.today().isoformat(),
            "device": f"{_cpu_name()} CPU ({platform.machine()}), {args.threads} torch/BLAS threads",
            "task": describe(task, args),
            "seeds": args.seeds,
            "estimator_settings": {"hidden": args.hidden, "z_dim": args.z_dim, "a_dim": args.a_dim, "epochs": args.epochs,
                                   "lr": args.lr, "eval_particles": args.eval_particles, "batch_size": 200,
                                   "likelihood": args.likelihood, "alpha_factor": args.alpha_factor},
            "methods": summary(per_seed),
            "sizes": {seed: record["sizes"] for seed, record in per_seed.items()},
            "wall_seconds": time.perf_counter() - started,
            "command": command_line(),
        }
        path = Path(args.results) / f"{result['experiment']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        for name, method in result["methods"].items():
            sd = "" if method["sd"] is None else f" ± {100 * method['sd']:.2f}%"
            seconds = statistics.fmean(method["fit_seconds"].values())
            print(f"{task} {name}: test error {100 * method['mean']:.2f}%{sd}, fit {seconds:.1f} s (mean over seeds {args.seeds})")
        print(f"wrote {path}", flush=True)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
