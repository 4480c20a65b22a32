"""The ``pyrodgm`` command: ``train``, ``evaluate``, ``plot`` and ``models``.

Examples::

    pyrodgm train m2 --dataset digits --labels 100 --epochs 20 --out runs/m2
    pyrodgm train m2 --dataset mnist --root ../shared/data --labels 100 --epochs 1000 --device cuda
    pyrodgm train m2 ... --resume          # continue exactly where the last checkpoint was
    pyrodgm evaluate runs/m2/best.pt            # IWAE-100: seconds
    pyrodgm evaluate runs/m2/best.pt --paper    # IWAE-5000, as the papers report (minutes)
    pyrodgm models                              # a table; --json for JSON
"""

from __future__ import annotations

import argparse
import dataclasses
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

__all__ = ["main", "build_parser", "models_table", "split_description", "QUICK_IWAE_K", "PAPER_IWAE_K"]

#: ``pyrodgm evaluate``'s importance samples: a quick default, and the papers' (``--paper``).
QUICK_IWAE_K, PAPER_IWAE_K = 100, 5000


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 500,500, got '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .zoo import RECIPES

    parser = argparse.ArgumentParser(prog="pyrodgm", description="Deep generative models for semi-supervised learning, in Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)  # every command takes --debug
    debug.add_argument("--debug", action="store_true", help="show the whole traceback of an error instead of one line")

    train = commands.add_parser("train", parents=[debug], help="train a model (writes checkpoints, metrics.json, sample grids)")
    train.add_argument("model", choices=sorted(RECIPES))
    train.add_argument("--dataset", choices=DATASETS, default="digits")
    train.add_argument("--root", help="data folder (torchvision layout); downloads there unless --no-download")
    train.add_argument("--no-download", dest="download", action="store_false", default=None)
    train.add_argument("--labels", type=int, help="labelled examples, balanced over classes (default 100)")
    train.add_argument("--validation", type=int, help="validation examples carved from the training set")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--labelled-per-batch", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--lr-decay", type=float)
    train.add_argument("--lr-decay-every", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="cpu or cuda (default cpu)")
    train.add_argument("--out", help="output folder (default runs/MODEL)")
    train.add_argument("--num-particles", type=int, help="Monte Carlo samples per step (vectorised)")
    train.add_argument("--eval-particles", type=int, help="samples the classifier is averaged over when evaluating")
    train.add_argument("--alpha-factor", type=float, help="Kingma et al.'s alpha = FACTOR * N (default 0.1)")
    train.add_argument("--z-dim", type=int)
    train.add_argument("--a-dim", type=int, help="auxiliary dimension (adgm, sdgm)")
    train.add_argument("--auxiliary-prior", choices=("standard", "conditional"), help="ADGM: p(a) (default) or p(a|x,y,z)")
    train.add_argument("--hidden", type=_int_tuple, help="hidden widths, e.g. 500 or 600,600")
    train.add_argument("--activation")
    train.add_argument("--likelihood", choices=("bernoulli", "gaussian"))
    train.add_argument("--no-binarize", dest="binarize", action="store_false", default=None)
    train.add_argument("--m1-checkpoint", help="m1m2: a trained m1 checkpoint (frozen)")
    train.add_argument("--end-to-end", action="store_true", default=None, help="m1m2: train M1 and M2 jointly")
    # max-margin DGMs
    train.add_argument("--margin-C", type=float, help="mmva, conv-mmva: C, the weight of the hinge loss (15; 1e3 for conv-mmva)")
    train.add_argument("--margin-sigma", type=float, help="mmva, conv-mmva: prior std sigma of lambda (default: no prior term)")
    train.add_argument("--margin-cost", type=float, help="mmva, conv-mmva: the cost ell of a wrong label in the hinge loss (3; 1)")
    train.add_argument("--mmcva-alpha", type=float, help="conv-mmcva: alpha of eq. 16, weight of the max-margin terms (0.1)")
    train.add_argument("--alpha-u", type=float, help="conv-mmcva: alpha_U, weight of the hat loss (0.3, the authors' script; the paper's text says 3)")
    train.add_argument("--alpha-b", type=float, help="conv-mmcva: alpha_B, weight of the label-balance term (0.001)")
    # semi-supervised GMVAE
    train.add_argument("--label-mode", choices=("enumerate", "relaxed", "straight-through"),
                       help="gmvae: how the guide samples y (default relaxed: Gumbel-softmax)")
    train.add_argument("--temperature", type=float, help="gmvae: initial Gumbel-softmax temperature (1)")
    train.add_argument("--temperature-min", type=float, help="gmvae: final temperature (0.5)")
    train.add_argument("--temperature-epochs", type=int, help="gmvae: epochs of temperature annealing (50)")
    train.add_argument("--temperature-decay", choices=("exponential", "linear"))
    train.add_argument("--feature-dim", type=int, help="gmvae: feature size fsz (100 MNIST, 200 Fashion-MNIST)")
    train.add_argument("--w-gaussian", type=float, help="gmvae: w_G, weight of the Gaussian KL (1; 5 for clustering)")
    train.add_argument("--w-categorical", type=float, help="gmvae: w_C, weight of the categorical KL (1)")
    train.add_argument("--knn", type=int, help="gmvae: neighbours of the label assignment (5 MNIST, 3 SVHN/Fashion)")
    train.add_argument("--w-assign", type=float, help="gmvae: w_A, weight of the assignment loss")
    train.add_argument("--w-metric", type=float, help="gmvae: w_M, weight of the metric embedding loss")
    train.add_argument("--metric-margin", type=float, help="gmvae: margin of the lifted structured loss")
    # CaGeM and hierarchical baselines
    train.add_argument("--gaussian-scale", choices=("exp", "softplus"), help="cagem: sigma = exp(Linear) (the paper's) or softplus(Linear)")
    train.add_argument("--min-scale", type=float, help="cagem: floor of the Gaussian scales (default 1e-3; 0: none)")
    train.add_argument("--num-clusters", type=int, help="cagem: K clusters of y (default: the number of classes; any K with --labels 0)")
    train.add_argument("--iw-samples", type=int, help="iwae, lvae: importance samples k of the IWAE bound (iwae: 50)")
    train.add_argument("--kl-warmup-epochs", type=int, help="vae2, lvae: KL weight rises linearly from 0 to 1 over N epochs (lvae: 200)")
    train.add_argument("--top-z-dim", type=int, help="vae2, iwae, lvae: units of the top latent z2 (--z-dim is z1)")
    train.add_argument("--top-hidden", type=_int_tuple, help="vae2, iwae, lvae: widths between z1 and z2, e.g. 100,100")
    train.add_argument("--no-samples", dest="samples", action="store_false", default=None)
    train.add_argument("--no-validate-inputs", dest="validate_inputs", action="store_false", default=None,
                       help="skip per-step NaN/range checks (pyro.enable_validation(False)), for speed")
    train.add_argument("--cuda-graph", action="store_true", default=None,
                       help="capture the training step in a CUDA graph and replay it (--device cuda; m1, m2, m1m2, the ADGMs, "
                            "cagem and the VAE baselines)")
    train.add_argument("--time-limit", type=float, help="seconds: start no epoch that would end after this (resume later)")
    train.add_argument("--track-test", action="store_true", default=None,
                       help="record the test set's metrics after every epoch (a curve; the checkpoint is still chosen on validation)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (its checkpoints, metrics, samples)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

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
    from .zoo import defaults

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values = {**defaults(args.model, args.dataset), **given, "model": args.model}
    values.setdefault("out", f"runs/{args.model}")
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> dict:
    from .training import train

    return train(_train_config(args), resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    if args.command == "train":
        summary = {"out": result["config"]["out"], "best_validation": result["best_validation"], "test": result.get("test")}
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    elif args.command == "models" and not args.json:
        print(models_table(result))
    else:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
