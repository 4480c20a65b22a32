"""The ``pyrodgm`` command: ``train``, ``evaluate``, ``plot`` and ``models``.

Examples::

    pyrodgm train m2 --dataset digits --labels 100 --epochs 20 --out runs/m2
    pyrodgm train m2 --dataset mnist --root ../shared/data --labels 100 --epochs 1000 --device cuda
    pyrodgm train m2 ... --resume          # continue exactly where the last checkpoint was
    pyrodgm train adgm ... --engine lightning --devices 2   # data-parallel, two processes (pyrodgm[lightning])
    pyrodgm evaluate runs/m2/best.pt            # IWAE-100: seconds
    pyrodgm evaluate runs/m2/best.pt --paper    # IWAE-5000, as the papers report (minutes)
    pyrodgm models                              # a table; --json for JSON
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
    digits, and on the data sets where its paper's differs; empty for a switch and where
    the field has no fixed default (the model decides)."""
    from .configs import field_defaults, option_kwargs
    from .data import DATASETS
    from .zoo import defaults

    base = field_defaults(config_class)
    if field in ("dataset", "out") or "action" in option_kwargs(config_class, field):
        return ""
    value = defaults(model, "digits").get(field, base[field])
    if value is None:
        return ""
    others = [
        f"{dataset}: {_format_default(other)}"
        for dataset in DATASETS
        if dataset != "digits" and (other := defaults(model, dataset).get(field, base[field])) != value
    ]
    return f" (default: {_format_default(value)}" + ("; " + "; ".join(others) if others else "") + ")"


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
                group.add_argument(flag, choices=DATASETS, default="digits", **{**kwargs, "help": kwargs["help"] + " (default: digits)"})
            else:
                group.add_argument(flag, default=None, **kwargs)
    engine = parser.add_argument_group('data-parallel (pip install "pyrodgm[lightning]")')
    engine.add_argument("--engine", choices=("native", "lightning"), default="native", help="the training loop (default native)")
    engine.add_argument("--devices", type=int, metavar="N", help="lightning: processes per machine (default 1)")
    engine.add_argument("--num-nodes", type=int, metavar="M", help="lightning: machines (default 1)")
    engine.add_argument("--strategy", choices=("ddp", "ddp_spawn"), help="lightning: how processes start (default ddp)")
    engine.add_argument("--precision", choices=("32-true", "bf16-mixed"), help="lightning: float32, or bf16 autocast (default 32-true)")
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
    debug.add_argument("--debug", action="store_true", help="show the whole traceback of an error instead of one line")

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
    return TrainConfig.paper(args.model, **{"out": f"runs/{args.model}", **given})


#: ``pyrodgm train``'s options for ``--engine lightning`` (:class:`pyrodgm.lightning.LightningOptions`' fields).
LIGHTNING_OPTIONS = ("devices", "num_nodes", "strategy", "precision")


def _train(args: argparse.Namespace) -> dict:
    from .training import train

    lightning = {name: getattr(args, name) for name in LIGHTNING_OPTIONS if getattr(args, name) is not None}
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


def _evaluate(args: argparse.Namespace) -> dict:
    from .evaluation import active_units, classification_error, continuous_latent_sites, iwae_evaluate, iwae_seconds_estimate
    from .training import build_from_checkpoint, device_description, load_test_data

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
    handler = {"train": _train, "evaluate": _evaluate, "plot": _plot, "models": _models, "impute": _impute}[args.command]
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
