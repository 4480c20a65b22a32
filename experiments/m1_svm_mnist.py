"""Kingma et al. (2014), Table 1, M1 + TSVM with 100 labels on MNIST (paper: 11.82% +- 0.25
test error): an SVM trained semi-supervised on the features of M1, the unsupervised VAE.

M1 (z 50, 2x600 softplus, Bernoulli pixels, Adam 3e-4, batches of 100) is trained without
labels on the training images the other experiments train on (the training set less its
validation part), as ``m1m2_mnist_100.py`` trains it; or ``--m1-checkpoint`` takes one
already trained.  Its features are the means of ``q(z|x)`` of the binarised images (binarised
once, as every run evaluates).  On them, on pyrodgm's own split for ``--seed`` (the labelled
images of every experiment with that seed: :func:`baselines.problem`):

* ``self_training_svm``: scikit-learn's ``SelfTrainingClassifier`` around an RBF SVM with
  probabilities (``CalibratedClassifierCV(SVC(), ensemble=False)``), labelling the most confident tenth of the
  unlabelled images in each of ten rounds: the transductive SVM's role in the paper
  (scikit-learn has no TSVM; its default threshold of 0.75 is rarely reached by ten
  classes' calibrated probabilities, so little would be added);
* ``labelled_only_svm``: the same SVM on the labelled images alone;
* ``label_spreading``: the baseline's ``LabelSpreading`` on the M1 features instead of PCA.

    python experiments/m1_svm_mnist.py --root ../shared/data --no-download --epochs 30 --threads 1
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from baselines import problem, train_config
from common import parser, run_training, setup, write_result
from sklearn.calibration import CalibratedClassifierCV
from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier
from sklearn.svm import SVC

from pyrodgm.baselines import NEIGHBOURS
from pyrodgm.data import load_dataset
from pyrodgm.evaluation import posterior_mean
from pyrodgm.training import TrainConfig, build_from_checkpoint, device_description

#: Kingma et al. (2014), Table 1, M1+TSVM with 100 labels.
PAPER = {"test_error": 0.1182, "std": 0.0025, "source": "Kingma et al. 2014, Table 1 (M1+TSVM)"}


def m1_config(args) -> TrainConfig:
    """M1 as ``m1m2_mnist_100.py`` trains it (the paper's M1)."""
    return TrainConfig.for_model(
        model="m1", dataset=args.dataset, root=args.root, download=args.download, validation=args.validation,
        labels=0, labelled_per_batch=0, batch_size=100, epochs=args.epochs, z_dim=50, hidden=(600, 600),
        activation="softplus", lr=3e-4, seed=args.seed, device=args.device, out=args.out or f"runs/experiments/m1_{args.dataset}_seed{args.seed}",
        time_limit=args.time_limit,
    )


@torch.no_grad()
def features(guide, x: np.ndarray, device: str) -> np.ndarray:
    """The means of ``q(z|x)`` (:func:`pyrodgm.evaluation.posterior_mean`), in chunks."""
    rows = [posterior_mean(guide, torch.as_tensor(x[i : i + 2000], device=device), "z") for i in range(0, len(x), 2000)]
    return torch.cat(rows).cpu().numpy()


#: Self-training labels the most confident tenth of the unlabelled images each round.
SELF_TRAINING_ROUNDS = 10


def svm() -> CalibratedClassifierCV:
    """An RBF SVM with probabilities (Platt scaling, as ``SVC(probability=True)`` did
    before scikit-learn 1.9 deprecated it), as self-training needs."""
    return CalibratedClassifierCV(SVC(), ensemble=False)


def classify(p) -> dict:
    """Every classifier on the problem's features: test and validation error, seconds."""
    labelled = p.labelled_rows
    fits = {
        "self_training_svm": lambda: SelfTrainingClassifier(
            svm(), criterion="k_best", k_best=max(1, (len(p.y_fit) - len(labelled)) // SELF_TRAINING_ROUNDS),
            max_iter=SELF_TRAINING_ROUNDS,
        ).fit(p.x_fit, p.y_fit),
        "labelled_only_svm": lambda: svm().fit(p.x_fit[labelled], p.y_fit[labelled]),
        "label_spreading": lambda: LabelSpreading(kernel="knn", n_neighbors=NEIGHBOURS, n_jobs=1).fit(p.x_fit, p.y_fit),
    }
    record = {}
    for name, fit in fits.items():
        started = time.perf_counter()
        classifier = fit()
        seconds = time.perf_counter() - started
        record[name] = {
            "test_error": float(np.mean(classifier.predict(p.x_test) != p.y_test)),
            "validation_error": float(np.mean(classifier.predict(p.x_validation) != p.y_validation)) if len(p.y_validation) else None,
            "seconds": seconds,
        }
    return record


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], epochs=30)
    p.add_argument("--labels", type=int, default=100)
    p.add_argument("--m1-checkpoint", default=None, help="a trained m1 run's best.pt (no training then)")
    args = p.parse_args(argv)
    started = setup(args)
    m1_metrics = None
    checkpoint = args.m1_checkpoint
    if checkpoint is None:
        config = m1_config(args)
        m1_metrics = run_training(args, config)
        checkpoint = str(Path(config.out) / "best.pt")
    saved, _, _, guide, state = build_from_checkpoint(checkpoint, args.device)
    saved_epoch = state["epoch"]  # M1's
    split_config = train_config(args.dataset, args.labels, saved.validation, args.seed, binarized=True)
    if saved.num_validation != split_config.num_validation:
        raise SystemExit(f"the M1 checkpoint holds out {saved.num_validation} validation images; the split needs the same")
    arrays = problem(load_dataset(args.dataset, root=args.root, download=args.download),
                     load_dataset(args.dataset, root=args.root, train=False, download=args.download), split_config)
    arrays.x_fit, arrays.x_validation, arrays.x_test = (
        features(guide, x, args.device) for x in (arrays.x_fit, arrays.x_validation, arrays.x_test)
    )
    classifiers = classify(arrays)
    metrics = {
        "device": device_description(torch.device(args.device)),
        "epochs_completed": m1_metrics["epochs_completed"] if m1_metrics else None,
        "history": m1_metrics["history"] if m1_metrics else [],
        "best_validation": m1_metrics["best_validation"] if m1_metrics else None,
        "train_seconds_total": m1_metrics["train_seconds_total"] if m1_metrics else None,
        "test": {"error": classifiers["self_training_svm"]["test_error"], "num_examples": int(len(arrays.y_test)),
                 "epoch": saved_epoch},
    }
    extra = {"m1_checkpoint": checkpoint, "labels": args.labels, "classifiers": classifiers,
             "labelled_indices": arrays.split.labelled.tolist()}
    write_result(args, f"m1_svm_{args.labels}_labels", metrics, PAPER, started, extra)
    return metrics


if __name__ == "__main__":
    main()
