"""The ``pyrodgm`` command: ``train``, ``evaluate``, ``predict``, ``plot``, ``impute`` and ``models``.

Examples::

    pyrodgm train m2 --dataset digits --labels 100 --epochs 20 --out runs/m2
    pyrodgm train m2 --dataset mnist --root ../shared/data --labels 100 --epochs 1000 --device cuda
    pyrodgm train m2 ... --resume          # continue exactly where the last checkpoint was
    pyrodgm train adgm ... --engine lightning --devices 2   # data-parallel, two processes (pyrodgm[lightning])
    pyrodgm evaluate runs/m2/best.pt            # IWAE-100: seconds
    pyrodgm evaluate runs/m2/best.pt --paper    # IWAE-5000, as the papers report (minutes)
    pyrodgm models                              # a table; --json for JSON
    pyrodgm train m2 --data train.csv --label-column label --out runs/mine   # your own data
    pyrodgm predict runs/mine/model.pt --data new.csv --out predictions.csv
    pyrodgm evaluate runs/mine/model.pt --data test.csv
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .allocator import tune_glibc_malloc
from .denormals import flush_denormals

__all__ = ["main", "build_parser", "train_options", "models_table", "split_description", "QUICK_IWAE_K", "PAPER_IWAE_K"]

#: ``pyrodgm evaluate``'s importance samples: a quick default, and the papers' (``--paper``).
QUICK_IWAE_K, PAPER_IWAE_K = 100, 5000


def train_options(config_class: type) -> tuple[str, ...]:
    """The fields of ``config_class`` (the :class:`~pyrodgm.training.TrainConfig`, or a
    recipe's :attr:`~pyrodgm.zoo.Recipe.config`) that ``pyrodgm train`` takes as options."""
    from .configs import config_fields

    return tuple(name for name, f in config_fields(config_class).items() if f.metadata.get("cli", True))


def _format_default(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def _default_text(field: str, model: str, config_class: type) -> str:
    """`` (default: V; mnist: W)``: the value of ``field`` a run of ``model`` gets on the
    digits, and on the data sets where its paper's differs (``none``: off on the digits);
    empty for a switch and where the field has no fixed default (the model decides)."""
    from .configs import field_defaults, option_kwargs
    from .data import DATASETS
    from .zoo import defaults

    base = field_defaults(config_class)
    if field in ("dataset", "out") or "action" in option_kwargs(config_class, field):
        return ""
    value = defaults(model, "digits").get(field, base[field])
    others = [
        f"{dataset}: {_format_default(other)}"
        for dataset in DATASETS
        if dataset != "digits" and (other := defaults(model, dataset).get(field, base[field])) != value
    ]
    if value is None and not others:
        return ""
    shown = "none" if value is None else _format_default(value)
    return f" (default: {shown}" + ("; " + "; ".join(others) if others else "") + ")"


def _add_train_parser(commands, name: str, recipe_, debug: argparse.ArgumentParser) -> None:
    """``pyrodgm train NAME``: the common options, the recipe's own, and run control, each
    with its default for NAME."""
    from .configs import option_flag, option_kwargs
    from .data import DATASETS
    from .training import TrainConfig

    parser = commands.add_parser(name, parents=[debug], help=recipe_.description, description=recipe_.description)
    groups = (
        ("training (every model)", TrainConfig),
        (f"{name}: its paper's hyper-parameters", recipe_.config),
    )
    for title, config_class in groups:
        group = parser.add_argument_group(title)
        for field in train_options(config_class):
            flag, kwargs = option_flag(config_class, field), option_kwargs(config_class, field)
            kwargs["help"] += _default_text(field, name, config_class)
            if field == "dataset":
                group.add_argument(flag, choices=DATASETS, default=None, **{**kwargs, "help": kwargs["help"] + " (default: digits)"})
            else:
                group.add_argument(flag, default=None, **kwargs)
    engine = parser.add_argument_group('data-parallel (pip install "pyrodgm[lightning]")')
    engine.add_argument("--engine", choices=("native", "lightning"), default="native", help="the training loop (default native)")
    engine.add_argument("--devices", type=int, metavar="N", help="lightning: processes per machine (default 1)")
    engine.add_argument("--num-nodes", type=int, metavar="M", help="lightning: machines (default 1)")
    engine.add_argument("--strategy", choices=("ddp", "ddp_spawn"), help="lightning: how processes start (default ddp)")
    engine.add_argument("--precision", choices=("32-true", "bf16-mixed"), help="lightning: float32, or bf16 autocast (default 32-true)")
    own = parser.add_argument_group(
        "your own data (instead of --dataset)", "the estimator on a file: OUT/model.pt for `pyrodgm predict` (models: "
        + ", ".join(OWN_DATA_MODELS) + ")",
    )
    own.add_argument("--data", metavar="PATH", help="a CSV (empty label: unlabelled), a .npz (X, y; -1: unlabelled) or an "
                     "ImageFolder (a folder per class)")
    own.add_argument("--label-column", metavar="NAME", default="label", help="the CSV's label column (default: label)")
    own.add_argument("--unlabelled", metavar="FOLDER", help="unlabelled images, beside --data's labelled ones")
    own.add_argument("--image-size", metavar="HxW", help="resize the images (default: they must share a size)")
    own.add_argument("--early-stopping", action="store_true", help="stop on the error of held-out labelled rows")
    own.add_argument("--validation-fraction", metavar="F", type=float, help="share held out (default 0.1)")
    own.add_argument("--patience", metavar="N", type=int, help="epochs without improvement (default 10)")
    run = parser.add_argument_group("run control")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (its checkpoints, metrics, samples)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--no-baseline", dest="baseline", action="store_false",
                     help="skip scikit-learn's LabelSpreading on the run's split, printed beside its test error")


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .zoo import RECIPES

    parser = argparse.ArgumentParser(prog="pyrodgm", description="Deep generative models for semi-supervised learning, in Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)  # every command takes --debug
    debug.add_argument("--debug", action="store_true", help="show an error's whole traceback, not one line")

    train = commands.add_parser(
        "train", help="train a model (writes checkpoints, metrics.json, sample grids, a learning curve)",
        description="Train MODEL; `pyrodgm train MODEL --help` lists its options with their defaults.",
    )
    models_ = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, recipe_ in sorted(RECIPES.items()):
        _add_train_parser(models_, name, recipe_, debug)

    evaluate = commands.add_parser("evaluate", parents=[debug], help="test-set IWAE log-likelihood (with PSIS k-hat, ESS) and error")
    evaluate.add_argument("checkpoint")
    particles = evaluate.add_mutually_exclusive_group()
    particles.add_argument("--iwae-k", type=int, help=f"importance samples per image (default {QUICK_IWAE_K}: a quick "
                           f"estimate, seconds on the digits; the papers report k = {PAPER_IWAE_K})")
    particles.add_argument("--paper", action="store_true", help=f"the papers' IWAE-{PAPER_IWAE_K} (--iwae-k {PAPER_IWAE_K}): "
                           "minutes to hours; its cost is estimated before it starts")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N test images only")
    evaluate.add_argument("--batch-size", type=int, default=100)
    evaluate.add_argument("--chunk-size", type=int, default=500, help="particles traced at once")
    evaluate.add_argument("--root", help="override the data folder saved in the checkpoint")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--output", help="write the results as JSON here too")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.add_argument("--data", help="a model trained with --data: its error, log-loss and uncertainty on the labelled "
                          "rows of this CSV, .npz or image folder (instead of the IWAE bound on a test set)")
    evaluate.add_argument("--label-column", help="the CSV's label column (default: the one the model was trained with)")

    predict = commands.add_parser(
        "predict", parents=[debug], help="predict labels of your own data (a model trained with --data), as CSV",
        description="Write one row per example: its predicted label, the probability of every class (p_CLASS) and the "
                    "entropy of those probabilities in nats (the classifier's uncertainty: 0 when sure, log K at most).",
    )
    predict.add_argument("checkpoint", help="OUT/model.pt of `pyrodgm train MODEL --data ...`")
    predict.add_argument("--data", required=True, help="a CSV (the training features, any label column ignored), a .npz "
                         "with X, or a folder of images (flat, or in class sub-folders)")
    predict.add_argument("--out", required=True, help="the predictions CSV to write")
    predict.add_argument("--label-column", help="the CSV's label column, if it has one (default: the training's)")
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    plot = commands.add_parser("plot", parents=[debug], help="class-conditional samples and 2-D latent manifolds as PNGs")
    plot.add_argument("checkpoint")
    plot.add_argument("--out", help="folder (default: beside the checkpoint)")
    plot.add_argument("--steps", type=int, default=20, help="manifold points along each direction (default 20)")
    plot.add_argument("--images", type=int, default=1000,
                      help="training images whose posterior means give the manifold's two principal directions (default 1000)")
    plot.add_argument("--root", help="override the data folder saved in the checkpoint")

    # max-margin DGMs: the impute command
    impute = commands.add_parser("impute", parents=[debug], help="missing-data imputation of test images: MSE on missing pixels, error, strips")
    impute.add_argument("checkpoint")
    impute.add_argument("--mask", choices=("rand-drop", "rect"), required=True, help="Rand-Drop(p) or Rect(k x k)")
    impute.add_argument("--p", type=float, help="rand-drop: probability that a pixel is missing")
    impute.add_argument("--k", type=int, help="rect: side of the missing square")
    impute.add_argument("--position", choices=("center", "random"), default="center", help="rect: where the square is (paper: center)")
    impute.add_argument("--iterations", type=int, default=100, help="rounds of inference and reconstruction (paper: 100)")
    impute.add_argument("--limit", type=int, help="impute the first N test images only")
    impute.add_argument("--batch-size", type=int, default=1000)
    impute.add_argument("--seed", type=int, default=0, help="seed of the masks, the initial noise and the latents")
    impute.add_argument("--root", help="override the data folder saved in the checkpoint")
    impute.add_argument("--device", default="cpu")
    impute.add_argument("--out", help="folder for the image strip (Fig. 5); none drawn if omitted")
    impute.add_argument("--output", help="write the results as JSON here too")
    models = commands.add_parser("models", parents=[debug], help="list the models: name, paper, what it is")
    models.add_argument("--json", action="store_true", help="as JSON, name -> description")
    return parser


def _train_config(args: argparse.Namespace):
    from .training import TrainConfig
    from .zoo import recipe

    fields = train_options(TrainConfig) + train_options(recipe(args.model).config)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainConfig.paper(args.model, **{"out": f"runs/{args.model}", **given, "dataset": args.dataset or "digits"})


#: ``pyrodgm train``'s options for ``--engine lightning`` (:class:`pyrodgm.lightning.LightningOptions`' fields).
LIGHTNING_OPTIONS = ("devices", "num_nodes", "strategy", "precision")


def _train(args: argparse.Namespace) -> dict:
    from .training import train

    lightning = {name: getattr(args, name) for name in LIGHTNING_OPTIONS if getattr(args, name) is not None}
    if args.data is not None:
        if args.engine != "native" or lightning:
            raise ValueError("--engine lightning trains a named data set; --data trains the estimator in one process")
        return _train_own_data(args)
    _refuse_data_options(args)
    if args.engine == "native":
        if lightning:
            flags = ", ".join("--" + name.replace("_", "-") for name in lightning)
            raise ValueError(f"{flags}: Lightning's options, for --engine lightning (the native loop runs one process)")
        return train(_train_config(args), resume=args.resume, progress=not args.quiet, overwrite=args.overwrite, baseline=args.baseline)
    from .lightning import LightningOptions, train_lightning
    from .training import add_baseline

    options = LightningOptions(**lightning)
    result = train_lightning(_train_config(args), options, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    return result if "rank" in result or not args.baseline else add_baseline(result)


#: The models ``pyrodgm train MODEL --data PATH`` trains (the estimator's).
OWN_DATA_MODELS: tuple[str, ...] = ("m2", "adgm", "sdgm", "adgm-deterministic", "m1m2", "cagem", "conv-mmcva", "gmvae")

#: ``pyrodgm train`` options that choose or split a named data set, or drive its run, and do
#: not apply to ``--data`` (the option, and what takes its place).
_NOT_WITH_DATA = {
    "dataset": ("--dataset", "--data is the data set"),
    "root": ("--root", "--data is the data set"),
    "download": ("--no-download", "--data is read, never downloaded"),
    "labels": ("--labels", "the labels are the data's own: its unlabelled rows have an empty label cell"),
    "validation": ("--validation", "use --early-stopping --validation-fraction F"),
    "binarize": ("--no-binarize", "--likelihood gaussian keeps values as they are"),
    "labelled_per_batch": ("--labelled-per-batch", "half of every --batch-size is labelled"),
    "samples": ("--no-samples", "no sample grids are written"),
    "cuda_graph": ("--cuda-graph", "the estimator's step is not captured"),
    "time_limit": ("--time-limit", "use --epochs or --early-stopping"),
    "track_test": ("--track-test", "evaluate the model on a test file with `pyrodgm evaluate --data`"),
    "resume": ("--resume", "a --data run is not resumable: train it again"),
}

#: Options of the own-data group that a named data set does not take.
_DATA_ONLY = {
    "unlabelled": "--unlabelled", "image_size": "--image-size", "early_stopping": "--early-stopping",
    "validation_fraction": "--validation-fraction", "patience": "--patience",
}


def _refuse_data_options(args: argparse.Namespace) -> None:
    for name, flag in _DATA_ONLY.items():
        if getattr(args, name) not in (None, False):
            raise ValueError(f"{flag} goes with --data (your own data), not with --dataset")
    if args.label_column != "label":
        raise ValueError("--label-column goes with --data (your own data), not with --dataset")


def _train_own_data(args: argparse.Namespace) -> dict:
    """``pyrodgm train MODEL --data PATH``: :class:`pyrodgm.SemiSupervisedClassifier` on the
    file's rows, saved as ``OUT/model.pt`` (:func:`pyrodgm.owndata.save_model`) with
    ``OUT/metrics.json``."""
    import numpy as np

    from .estimator import SemiSupervisedClassifier, model_param_names
    from .owndata import MODEL_FILE, data_info, load_data, parse_image_size, save_model

    if args.model not in OWN_DATA_MODELS:
        raise ValueError(
            f"{args.model} does not train on --data: it is supervised, or unsupervised (no semi-supervised classifier); "
            f"with --data use one of {', '.join(OWN_DATA_MODELS)}"
        )
    for name, (flag, instead) in _NOT_WITH_DATA.items():
        value = getattr(args, name, None)  # store_false options are None unless given
        if value is not None and (value is not False or name in ("download", "binarize", "samples")):
            raise ValueError(f"{flag} does not apply with --data: {instead}")
    out = Path(args.out or f"runs/{args.model}")
    path = out / MODEL_FILE
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: give a folder for the model")
    if path.exists() and not args.overwrite:
        raise ValueError(f"{path} exists already: --overwrite replaces it, or give another --out")
    image_size = parse_image_size(args.image_size) if args.image_size else None
    data = load_data(args.data, label_column=args.label_column, unlabelled=args.unlabelled, image_size=image_size)
    if args.model in ("conv-mmcva", "gmvae") and data.image_shape is None:
        raise ValueError(f"{args.model} has conv networks and takes images: give --data a folder of images or a .npz of "
                         "images (n, H, W) or (n, C, H, W); the other models take table rows")
    params = {name: getattr(args, name) for name in model_param_names(args.model) if getattr(args, name, None) is not None}
    settings = {"epochs": "max_epochs", "batch_size": "batch_size", "lr": "lr", "seed": "random_state",
                "device": "device", "likelihood": "likelihood"}
    chosen = {key: getattr(args, name) for name, key in settings.items() if getattr(args, name, None) is not None}
    chosen.setdefault("random_state", 0)
    if (args.validation_fraction is not None or args.patience is not None) and not args.early_stopping:
        raise ValueError("--validation-fraction and --patience go with --early-stopping")
    classifier = SemiSupervisedClassifier(
        args.model, model_params=params or None, early_stopping=args.early_stopping,
        validation_fraction=args.validation_fraction or 0.1, n_iter_no_change=args.patience or 10,
        classes=list(range(len(data.classes))) or None, verbose=not args.quiet, image_shape=data.image_shape, **chosen,
    )
    started = time.perf_counter()
    classifier.fit(data.X, data.y)
    seconds = time.perf_counter() - started
    labelled = data.y != -1
    training_error = float(np.mean(classifier.predict(data.X[labelled]) != data.y[labelled]))
    info = data_info(data, image_size=image_size, label_column=args.label_column if data.feature_names is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    save_model(path, classifier, info)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": args.command_line,
        "out": str(path),
        "data": data.summary(),
        "model": args.model,
        "estimator": {key: (value if isinstance(value, (str, int, float, bool, type(None))) else repr(value))
                      for key, value in classifier.get_params(deep=False).items()},
        "likelihood": classifier.likelihood_,
        "epochs": classifier.n_iter_,
        "best_epoch": classifier.best_epoch_,
        "fit_seconds": seconds,
        "training_error": training_error,
        "train_loss_per_example": classifier.loss_curve_,
        "validation_accuracy": classifier.validation_scores_,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _predict(args: argparse.Namespace) -> dict:
    """``pyrodgm predict CHECKPOINT --data PATH --out FILE``."""
    from .owndata import entropy, load_model, read_like_training, write_predictions

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give the CSV file to write")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists already: --overwrite replaces it, or give another --out")
    classifier, info = load_model(args.checkpoint, args.device)
    data, _ = read_like_training(args.data, info, label_column=args.label_column)
    probabilities = classifier.predict_proba(data.X)
    write_predictions(out, data, probabilities, info["class_names"])
    predicted = probabilities.argmax(1)
    return {
        "out": str(out),
        "rows": int(len(data.X)),
        "predicted": {name: int((predicted == i).sum()) for i, name in enumerate(info["class_names"])},
        "mean_entropy": float(entropy(probabilities).mean()),
    }


def _evaluate_own_data(args: argparse.Namespace) -> dict:
    """``pyrodgm evaluate CHECKPOINT --data PATH``: the classifier on the labelled rows."""
    import numpy as np
    from sklearn.metrics import log_loss

    from .owndata import entropy, load_model, read_like_training

    if args.iwae_k is not None or args.paper or args.limit is not None or args.root is not None:
        raise ValueError("--iwae-k, --paper, --limit and --root evaluate a named data set's test set; with --data the "
                         "report is the classifier's error on the file's labelled rows")
    classifier, info = load_model(args.checkpoint, args.device)
    data, y = read_like_training(args.data, info, label_column=args.label_column, require_labels=True)
    labelled = y != -1
    if not labelled.any():
        raise ValueError(f"{args.data} has no labelled row to evaluate: every label is empty; `pyrodgm predict` predicts them")
    probabilities = classifier.predict_proba(data.X[labelled])
    truth, predicted = y[labelled], probabilities.argmax(1)
    names = info["class_names"]
    report = {
        "date": datetime.date.today().isoformat(),
        "command": args.command_line,
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "rows": int(len(data.X)),
        "labelled_rows": int(labelled.sum()),
        "error": float(np.mean(predicted != truth)),
        "log_loss": float(log_loss(truth, probabilities, labels=list(range(len(names))))),
        "mean_entropy": float(entropy(probabilities).mean()),
        "error_by_class": {name: float(np.mean(predicted[truth == i] != i)) for i, name in enumerate(names) if (truth == i).any()},
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _evaluate(args: argparse.Namespace) -> dict:
    from .evaluation import active_units, classification_error, continuous_latent_sites, iwae_evaluate, iwae_seconds_estimate
    from .training import build_from_checkpoint, device_description, load_test_data

    if args.data is not None:
        return _evaluate_own_data(args)
    if args.label_column is not None:
        raise ValueError("--label-column goes with --data")
    config, recipe_, model, guide, state = build_from_checkpoint(args.checkpoint, args.device)
    test = load_test_data(config, args.device, root=args.root, limit=args.limit)
    x = test.flat()
    trained_label_mode = getattr(guide, "label_mode", "enumerate")
    if trained_label_mode != "enumerate":
        # importance weights need log-densities: score the categorical model the relaxation trained
        guide.label_mode = "enumerate"
    k = PAPER_IWAE_K if args.paper else args.iwae_k or QUICK_IWAE_K
    estimate = iwae_seconds_estimate(model, guide, x, k, batch_size=args.batch_size, chunk_size=args.chunk_size)
    if not args.quiet:
        print(f"IWAE-{k} on {x.shape[0]} images: about {_duration(estimate)} ({_iwae_setting(k)})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = iwae_evaluate(model, guide, x, k, batch_size=args.batch_size, chunk_size=args.chunk_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    report = {
        "date": datetime.date.today().isoformat(),
        "command": args.command_line,
        "checkpoint": str(args.checkpoint),
        "model": config.model,
        "dataset": config.dataset,
        "epoch": state["epoch"],
        "device": device_description(torch.device(args.device)),
        "iwae_seconds": seconds,
        "iwae_seconds_estimated": estimate,
        "iwae_setting": _iwae_setting(k),
        **result.summary(),
    }
    if x.shape[0] >= 2:
        report["active_units"] = {
            site: active_units(guide, x, site, num_particles=config.eval_particles)[0] for site in continuous_latent_sites(guide, x[:2])
        }
    else:
        report["active_units"] = "n/a: a variance across the data needs at least 2 images"
    if trained_label_mode != "enumerate":
        report["label_mode_trained"] = trained_label_mode
    if recipe_.classifier_site(config):
        report["test_error"] = classification_error(guide, x, test.y, num_particles=config.eval_particles, label_site=recipe_.label_site)
    if recipe_.metrics is not None:
        report.update({f"test_{k}": v for k, v in recipe_.metrics(model, guide, test).items()})
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _plot(args: argparse.Namespace) -> dict:
    from .data import IMAGE_SHAPES
    from .plots import latent_directions, save_manifold, save_samples
    from .training import build_from_checkpoint

    for name in ("steps", "images"):
        if getattr(args, name) < (2 if name == "steps" else 3):
            raise ValueError(f"--{name} must be at least {2 if name == 'steps' else 3}, got {getattr(args, name)}")
    config, recipe_, model, guide, _ = build_from_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "plots"
    image_shape = IMAGE_SHAPES[config.dataset]
    num_classes = getattr(model, "num_classes", None) if recipe_.label_site else None
    site = recipe_.latent_site
    directions = latent_directions(guide, _training_sample(config, args.images, args.root), site, seed=config.seed)
    written = [out / "samples.png"]
    save_samples(model, written[0], image_shape, num_classes=num_classes)
    labels = range(num_classes) if num_classes else [None]
    for label in labels:
        name = "manifold.png" if label is None else f"manifold_class{label}.png"
        latent_dim = directions.center.shape[0]
        save_manifold(model, out / name, image_shape, latent_dim, site=site, label=label, steps=args.steps, directions=directions)
        written.append(out / name)
    if directions.explained is None:
        swept = f"{site}'s two units over the prior's 5%..95% quantiles (a 2-D latent)"
    else:
        shares = " and ".join(f"{100 * share:.1f}%" for share in directions.explained)
        swept = (f"the two principal directions of {site}'s posterior means over {args.images} training images "
                 f"({shares} of their variance), 5%..95% normal quantiles of their spread")
    return {"written": [str(p) for p in written], "manifold": swept}


def _training_sample(config, count: int, root: Optional[str]) -> torch.Tensor:
    """``count`` training images drawn with the run's seed, as the run evaluates them
    (binarised once when it trained on binarised images), flattened."""
    from .data import load_dataset
    from .training import evaluation_data

    data = load_dataset(config.dataset, root=root or config.root, train=True, download=config.download)
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:count].sort().values
    return evaluation_data(data.subset(index), config).flat()


def _impute(args: argparse.Namespace) -> dict:
    from .imputation import impute_checkpoint

    if args.mask == "rand-drop" and (args.p is None or args.k is not None):
        raise ValueError("--mask rand-drop takes --p (and no --k)")
    if args.mask == "rect" and (args.k is None or args.p is not None):
        raise ValueError("--mask rect takes --k (and no --p)")
    report = impute_checkpoint(
        args.checkpoint, args.mask, p=args.p, k=args.k, iterations=args.iterations, limit=args.limit, out=args.out,
        position=args.position, seed=args.seed, device=args.device, root=args.root, batch_size=args.batch_size,
    )
    report = {"date": datetime.date.today().isoformat(), "command": args.command_line, **report}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _models(args: argparse.Namespace) -> dict:
    from .zoo import RECIPES

    return {name: r.description for name, r in RECIPES.items()}


def split_description(description: str) -> tuple[str, str]:
    """A recipe's description as (paper, what it is): its first parenthesised part, which
    every description gives, e.g. ``(Kingma et al. 2014)``, is the paper."""
    match = re.search(r"\s*\(([^()]*\d{4}[^()]*|[^()]*et al\.[^()]*)\)", description)
    if match is None:
        return "", description
    return match.group(1), (description[: match.start()] + description[match.end() :]).strip()


def models_table(descriptions: dict[str, str], width: Optional[int] = None) -> str:
    """The models as a text table: name, paper, what it is (wrapped to ``width`` columns)."""
    rows = [("model", "paper", "what it is")] + [(name, *split_description(text)) for name, text in descriptions.items()]
    name_width, paper_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    width = width or shutil.get_terminal_size((120, 24)).columns
    text_width = max(30, width - name_width - paper_width - 4)
    lines = []
    for name, paper, text in rows:
        wrapped = textwrap.wrap(text, text_width, break_on_hyphens=False) or [""]
        lines.append(f"{name:<{name_width}}  {paper:<{paper_width}}  {wrapped[0]}".rstrip())
        lines += [" " * (name_width + paper_width + 4) + more for more in wrapped[1:]]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _iwae_setting(k: int) -> str:
    if k == PAPER_IWAE_K:
        return f"k = {k}, as the papers report"
    if k == QUICK_IWAE_K:
        return f"k = {k}, the quick default: a looser bound than the papers' k = {PAPER_IWAE_K} (--paper)"
    return f"k = {k}; the papers report k = {PAPER_IWAE_K} (--paper)"


def _one_line(error: BaseException) -> str:
    """The first line of an error's message (Pyro appends a table of shapes to some)."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def _unknown_options_message(args: argparse.Namespace, unknown: list[str]) -> str:
    """argparse's message, and for ``train`` the models an unknown option belongs to."""
    from .configs import option_flag
    from .zoo import RECIPES

    message = f"unrecognized arguments: {' '.join(unknown)}"
    if getattr(args, "command", None) != "train":
        return message
    for flag in (u.split("=")[0] for u in unknown if u.startswith("--")):
        owners = [name for name, r in RECIPES.items() if any(flag == option_flag(r.config, f) for f in train_options(r.config))]
        if owners:
            return (
                f"{flag} is not an option of {args.model} (it is {', '.join(owners)}'s); "
                f"'pyrodgm train {args.model} --help' lists {args.model}'s options"
            )
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_options_message(args, unknown))
    args.command_line = "pyrodgm " + " ".join(sys.argv[1:] if argv is None else argv)
    tune_glibc_malloc()  # an application's choice: freed CPU tensor memory stays in the process
    flush_denormals()  # and subnormal floats read as 0 (pyrodgm.denormals)
    handler = {
        "train": _train, "evaluate": _evaluate, "plot": _plot, "models": _models, "impute": _impute, "predict": _predict,
    }[args.command]
    try:
        result = handler(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as error:  # the input's problem
        if args.debug:
            raise
        print(f"pyrodgm {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # pyrodgm's (or a library's) problem: still one line, the traceback on request
        if args.debug:
            raise
        print(f"pyrodgm {args.command}: internal error: {type(error).__name__}: {_one_line(error)} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1
    if args.command == "train" and "rank" in result:
        pass  # a data-parallel run's other processes: process 0 reports
    elif args.command == "train" and "data" in result:
        print(json.dumps({key: result[key] for key in ("out", "data", "epochs", "fit_seconds", "training_error")}, indent=2,
                         ensure_ascii=False))
    elif args.command == "train":
        summary = {"out": result["config"]["out"], "best_validation": result["best_validation"], "test": result.get("test")}
        if "baseline" in result:
            summary["baseline"] = result["baseline"]
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    elif args.command == "models" and not args.json:
        print(models_table(result))
    else:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
