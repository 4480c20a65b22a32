"""Classical semi-supervised baselines on exactly the splits pyrodgm's experiments train on.

Three scikit-learn classifiers, all on 50 PCA components of the pixels (the PCA fitted on
the training images the models see: the training set less its validation part, the
labelled images included):

* ``LabelSpreading(kernel="knn", n_neighbors=10)``, fitted transductively on those images
  with every label but the labelled subset hidden, then predicting the test set;
* ``SelfTrainingClassifier(LogisticRegression())`` on the same images and labels;
* ``LogisticRegression()`` fitted on the labelled images alone.

The split is pyrodgm's own: the training set, the validation size (``TrainConfig``'s
default: 10,000 for MNIST, 300 for the digits) and ``semi_supervised_split`` with the run's
seed, as :mod:`pyrodgm.training` calls them, so seed ``S`` here has the labelled images of
every experiment script's ``--seed S`` (``tests/test_experiments.py`` checks the index
arrays against a training run's).  The test set is the dataset's own (MNIST's 10,000; the
digits' last 297 images), in grey levels; ``--binarized`` gives every method the binarised
pixels instead, the test and validation images binarised exactly as the models are
evaluated on them.  Nothing is chosen on the validation set; its error is recorded beside.

    python experiments/baselines.py --root ../shared/data --no-download --labels 100 --seeds 0 1 2 --threads 1
    python experiments/baselines.py --dataset digits --labels 100 --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, command_line
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
from threadpoolctl import threadpool_limits

from pyrodgm.baselines import NEIGHBOURS, PCA_COMPONENTS, predict_with_label_mass
from pyrodgm.data import DATASETS, ImageData, SemiSupervisedSplit, load_dataset, semi_supervised_split
from pyrodgm.training import TrainConfig, _cpu_name, evaluation_data
from pyrodgm.validation import UNLABELLED

#: What each method is, for the results JSON; keys are the JSON's method names.
METHODS = {
    "label_spreading": f"LabelSpreading(kernel='knn', n_neighbors={NEIGHBOURS}) on the labelled and unlabelled training images",
    "self_training": "SelfTrainingClassifier(LogisticRegression()) on the labelled and unlabelled training images",
    "labelled_only": "LogisticRegression() on the labelled images alone",
}


@dataclass
class Problem:
    """One seed's split as arrays: the training images the models see (``x_fit``, with
    ``y_fit`` holding the labelled subset's labels and ``UNLABELLED`` elsewhere), the
    validation and the test images, all as flat pixel rows."""

    split: SemiSupervisedSplit
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def labelled_rows(self) -> np.ndarray:
        """Rows of ``x_fit`` whose labels are given."""
        return np.flatnonzero(self.y_fit != UNLABELLED)


def train_config(dataset: str, labels: int, validation: int | None, seed: int, binarized: bool) -> TrainConfig:
    """A :class:`TrainConfig` with the fields that decide a run's split (dataset, labels,
    validation size, seed) and its evaluation images (binarised or not)."""
    likelihood = "bernoulli" if binarized else "gaussian"  # any model's config: only the split's fields matter
    return TrainConfig.for_model("m2", dataset=dataset, labels=labels, validation=validation, seed=seed, binarize=binarized,
                                 likelihood=likelihood, device="cpu")


def pyrodgm_split(train: ImageData, config: TrainConfig) -> SemiSupervisedSplit:
    """The labelled, unlabelled and validation indices a pyrodgm run with ``config`` trains
    on (the call :func:`pyrodgm.training` makes)."""
    if config.labels < 1:
        raise ValueError(f"the baselines need labelled images: --labels must be positive, got {config.labels}")
    return semi_supervised_split(train.y, config.labels, train.num_classes, config.num_validation, config.seed)


def _pixels(data: ImageData, config: TrainConfig) -> np.ndarray:
    """Flat pixel rows: grey levels, or binarised once as the runs binarise evaluation images."""
    return evaluation_data(data, config).flat().numpy()


def problem(train: ImageData, test: ImageData, config: TrainConfig) -> Problem:
    """The arrays of ``config``'s split (its seed, labels and validation size)."""
    split = pyrodgm_split(train, config)
    if not torch.isin(split.labelled, split.unlabelled).all():
        raise AssertionError("pyrodgm's unlabelled set should include the labelled images (labelled_in_unlabelled)")
    y_fit = torch.full((len(split.unlabelled),), UNLABELLED, dtype=torch.int64)
    rows = torch.searchsorted(split.unlabelled, split.labelled)
    y_fit[rows] = train.y[split.labelled]
    validation = train.subset(split.validation)
    return Problem(
        split=split,
        x_fit=_pixels(train.subset(split.unlabelled), config),
        y_fit=y_fit.numpy(),
        x_validation=_pixels(validation, config),
        y_validation=validation.y.numpy(),
        x_test=_pixels(test, config),
        y_test=test.y.numpy(),
    )


def _label_spreading(p: Problem) -> LabelSpreading:
    return LabelSpreading(kernel="knn", n_neighbors=NEIGHBOURS, n_jobs=1).fit(p.x_fit, p.y_fit)


def _self_training(p: Problem) -> SelfTrainingClassifier:
    return SelfTrainingClassifier(LogisticRegression()).fit(p.x_fit, p.y_fit)


def _labelled_only(p: Problem) -> LogisticRegression:
    rows = p.labelled_rows
    return LogisticRegression().fit(p.x_fit[rows], p.y_fit[rows])


FITS: dict[str, Callable[[Problem], object]] = {
    "label_spreading": _label_spreading,
    "self_training": _self_training,
    "labelled_only": _labelled_only,
}


def predict(classifier, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Predicted classes, and how many rows had no class probability at all (LabelSpreading
    only: :func:`pyrodgm.baselines.predict_with_label_mass`)."""
    if not isinstance(classifier, LabelSpreading):
        return classifier.predict(x), 0
    return predict_with_label_mass(classifier, x)


def run_seed(train: ImageData, test: ImageData, config: TrainConfig) -> dict:
    """Every method on ``config``'s split: test and validation error, seconds (PCA apart),
    and the labelled indices."""
    p = problem(train, test, config)
    started = time.perf_counter()
    pca = PCA(PCA_COMPONENTS, random_state=config.seed).fit(p.x_fit)
    p.x_fit, p.x_validation, p.x_test = pca.transform(p.x_fit), pca.transform(p.x_validation), pca.transform(p.x_test)
    record = {"pca_seconds": time.perf_counter() - started, "labelled_indices": p.split.labelled.tolist(),
              "num_fit_images": len(p.x_fit), "num_validation": len(p.x_validation), "num_test": len(p.x_test)}
    for name, fit in FITS.items():
        started = time.perf_counter()
        classifier = fit(p)
        predicted, unreached = predict(classifier, p.x_test)
        seconds = time.perf_counter() - started
        validation_predicted, _ = predict(classifier, p.x_validation)
        record[name] = {
            "test_error": float(np.mean(predicted != p.y_test)),
            "validation_error": float(np.mean(validation_predicted != p.y_validation)),
            "seconds": seconds,
            **({"test_without_label_mass": unreached} if isinstance(classifier, LabelSpreading) else {}),
        }
    return record


def summary(per_seed: dict[int, dict]) -> dict:
    """Per method: test error per seed, mean, sample sd (ddof 1; None for one seed),
    validation error and seconds per seed."""
    methods = {}
    for name, description in METHODS.items():
        errors = {seed: record[name]["test_error"] for seed, record in per_seed.items()}
        values = list(errors.values())
        methods[name] = {
            "description": description,
            "test_error": errors,
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "validation_error": {seed: record[name]["validation_error"] for seed, record in per_seed.items()},
            "seconds": {seed: record[name]["seconds"] for seed, record in per_seed.items()},
        }
        unreached = {seed: record[name].get("test_without_label_mass") for seed, record in per_seed.items()}
        if any(v is not None for v in unreached.values()):
            methods[name]["test_without_label_mass"] = unreached
    return methods


def result_name(dataset: str, labels: int, validation: int | None, binarized: bool) -> str:
    """``baselines_LABELS_labels[_validationV][_binarized]``, the results JSON's stem less the dataset."""
    name = f"baselines_{labels}_labels"
    if validation is not None:
        name += f"_validation{validation}"
    return name + ("_binarized" if binarized else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="mnist or digits (offline)")
    p.add_argument("--root", "--data-root", dest="root", default=None,
                   help="data folder in torchvision layout, e.g. ../shared/data")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--labels", type=int, default=100, help="labelled images, a multiple of the 10 classes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one split per seed (pyrodgm's --seed)")
    p.add_argument("--validation", type=int, default=None,
                   help="validation size, as the experiment scripts' --validation (default: theirs)")
    p.add_argument("--binarized", action="store_true", help="binarised pixels, as the models see them")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads (threadpoolctl; default: the libraries')")
    p.add_argument("--results", default=str(RESULTS), help="folder for the results JSON")
    p.add_argument("--quiet", action="store_true")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2, one line) what no split can be made of."""
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.labels < 1:
        p.error(f"--labels must be positive (the baselines learn from labels), got {args.labels}")


def load(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[ImageData, ImageData]:
    """The training and test sets, every seed's split checked first (a missing dataset or an
    impossible split is a one-line error, exit 2)."""
    try:
        train = load_dataset(args.dataset, root=args.root, train=True, download=args.download)
        test = load_dataset(args.dataset, root=args.root, train=False, download=args.download)
        for seed in args.seeds:
            pyrodgm_split(train, train_config(args.dataset, args.labels, args.validation, seed, args.binarized))
    except (FileNotFoundError, ValueError) as error:
        p.error(str(error))
    return train, test


def run(args: argparse.Namespace, train: ImageData, test: ImageData, started: float) -> dict:
    """Every seed of ``args``; the results JSON's content."""
    per_seed = {}
    for seed in args.seeds:
        config = train_config(args.dataset, args.labels, args.validation, seed, args.binarized)
        per_seed[seed] = run_seed(train, test, config)
        if not args.quiet:
            errors = ", ".join(f"{name} {100 * per_seed[seed][name]['test_error']:.2f}% ({per_seed[seed][name]['seconds']:.1f} s)" for name in METHODS)
            print(f"seed {seed}: {errors}", flush=True)
    first = per_seed[args.seeds[0]]
    return {
        "experiment": result_name(args.dataset, args.labels, args.validation, args.binarized),
        "date": datetime.date.today().isoformat(),
        "device": f"{_cpu_name()} CPU ({platform.machine()}), {args.threads or 'default'} BLAS threads",
        "dataset": args.dataset,
        "labels": args.labels,
        "validation": first["num_validation"],
        "validation_option": args.validation,
        "pixels": "binarized" if args.binarized else "grey",
        "pca_components": PCA_COMPONENTS,
        "num_fit_images": first["num_fit_images"],
        "num_test": first["num_test"],
        "seeds": args.seeds,
        "methods": summary(per_seed),
        "pca_seconds": {seed: record["pca_seconds"] for seed, record in per_seed.items()},
        "labelled_indices": {seed: record["labelled_indices"] for seed, record in per_seed.items()},
        "wall_seconds": time.perf_counter() - started,
        "command": command_line(),
    }


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    with threadpool_limits(args.threads):
        result = run(args, *load(p, args), started)
    path = Path(args.results) / f"{result['experiment']}_{args.dataset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    for name, method in result["methods"].items():
        sd = "" if method["sd"] is None else f" ± {100 * method['sd']:.2f}%"
        print(f"{name}: test error {100 * method['mean']:.2f}%{sd} over seeds {result['seeds']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
