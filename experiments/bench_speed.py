"""Speed of pyrodgm's SVI step against a hand-written PyTorch loss of the same maths.

For each model, at the paper's sizes (M2: 784-500-50; ADGM: 784-500-500, a and z of 100,
with 1 particle and, as ``adgm10``, 10; CaGeM: App. C's ``CAGEM_DEFAULTS``, z1 64, z2 32,
2x1024 / 2x512 ReLU + batch-norm, K = 10; a batch of 100 labelled + 100 unlabelled rows;
Conv-MMCVA: the ``conv-mmcva`` recipe's CNNs, z 100, 100 labelled + 500 unlabelled rows; the
GMVAE: the ``gmvae`` recipe's MNIST settings, 100 + 100 rows), it first checks that the
reference (``references.py``) and pyrodgm's loss (:class:`pyrodgm.losses.SemiSupervisedELBO`;
CaGeM, Conv-MMCVA, the GMVAE: the recipe's loss, a :class:`~pyrodgm.losses.WeightedSum` for
the last two) compute the same loss for the same noise, then
times whole optimisation steps (loss, backward, Adam: torch's, with the kernel
:class:`~pyrodgm.optim.FusedAdam` picks, fused where torch has it, in both) of both, interleaved (which of the two
goes first alternates step by step), and reports the median of each and their ratio, with
Pyro's input validation on (the default) and off (``pyro.enable_validation(False)``, the
like-for-like comparison); the quartiles of the ratio of the two steps of each round show
how much the machine's noise moves it.  Like the ``pyrodgm`` command it first keeps freed
CPU memory in the process (:func:`pyrodgm.allocator.tune_glibc_malloc`;
``--glibc-malloc-defaults`` does not).  It also times the IWAE evaluation (test images per second at
``--iwae-k``, networks in eval mode; not for Conv-MMCVA and the GMVAE, whose recipes evaluate
the bound: the row says why) and records peak memory.

With ``--cuda-graph`` (CUDA only) it also times pyrodgm's step captured in a CUDA graph
(:class:`pyrodgm.graphs.CapturedStep`) against the same eager reference.

    python experiments/bench_speed.py --device cpu --threads 2
    python experiments/bench_speed.py --device cuda --cuda-graph
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import resource
import statistics
import time
from pathlib import Path

import pyro
import torch
from references import adgm_loss, cagem_loss_and_grads, m2_loss
from references import cagem_loss as cagem_reference
from references import conv_mmcva_loss as conv_mmcva_reference
from references import gmvae_loss as gmvae_reference

from pyrodgm.allocator import tune_glibc_malloc
from pyrodgm.evaluation import iwae_log_likelihood
from pyrodgm.graphs import CapturedStep
from pyrodgm.guides import ADGMGuide, M2Guide
from pyrodgm.losses import SemiSupervisedELBO
from pyrodgm.models import ADGM, M2
from pyrodgm.nets import AuxiliarySpec, MLPSpec
from pyrodgm.optim import FusedAdam, adam_arguments
from pyrodgm.recipes.cagem import CAGEM_DEFAULTS, build_cagem, cagem_loss, cagem_warmup
from pyrodgm.recipes.gmvae import build_gmvae, gmvae_loss
from pyrodgm.recipes.mmcva import WEIGHT_DECAY, build_conv_mmcva, conv_mmcva_loss
from pyrodgm.recipes.warmup import kl_warmup_weight
from pyrodgm.training import TrainConfig, device_description
from pyrodgm.zoo import defaults

RESULTS = Path(__file__).resolve().parent / "results"


def _setup(model, guide, reference, device: torch.device, batch: int, num_particles: int = 1, alpha: float = 50.0,
           loss=None, reference_grads=None, unlabelled: int | None = None) -> dict:
    """A synthetic binary batch of ``batch`` labelled rows followed by ``unlabelled`` ones
    (default: as many), with the loss (default: :class:`SemiSupervisedELBO`) and its
    hand-written ``reference(model, guide, x, y, alpha)``; alpha 50 is 0.1 N / N_l for
    MNIST's 50,000 training images and 100 labels.  ``reference_grads(model, guide, x, y,
    alpha)`` accumulates the reference's gradients and returns its loss (default:
    ``reference(...).backward()``)."""
    model, guide = model.to(device), guide.to(device)
    unlabelled = batch if unlabelled is None else unlabelled
    x = torch.rand(batch + unlabelled, 784, device=device).bernoulli()
    y = torch.cat([torch.randint(0, 10, (batch,), device=device), torch.full((unlabelled,), -1, device=device)])
    if loss is None:
        loss = SemiSupervisedELBO(alpha=alpha, num_particles=num_particles, max_plate_nesting=1)
    if reference_grads is None:
        def reference_grads(model, guide, x, y, alpha):
            value = reference(model, guide, x, y, alpha)
            value.backward()
            return value

    return {
        "model": model,
        "guide": guide,
        "x": x,
        "y": y,
        "num_labelled": batch,  # the labelled rows come first, as CapturedStep needs
        "loss": loss,
        "reference": lambda: reference(model, guide, x, y, alpha),
        "reference_grads": lambda: reference_grads(model, guide, x, y, alpha),
    }


def m2_setup(device: torch.device, batch: int) -> dict:
    """M2 at Kingma et al.'s MNIST sizes (784-500-50)."""
    spec = MLPSpec(784, 10, 50, (500,))
    return _setup(M2(spec), M2Guide(spec), m2_loss, device, batch)


def adgm_setup(device: torch.device, batch: int, num_particles: int = 1) -> dict:
    """The ADGM at Maaløe et al.'s MNIST sizes (2x500 ReLU MLPs, a and z of 100, p(a) = N(0, I))."""
    def reference(model, guide, x, y, alpha):
        return adgm_loss(model, guide, x, y, alpha, num_particles)

    spec = AuxiliarySpec(784, 10, 100, (500, 500), a_dim=100)
    model, guide = ADGM(spec), ADGMGuide(spec)
    return _setup(model, guide, reference, device, batch, num_particles)


def cagem_setup(device: torch.device, batch: int) -> dict:
    """CaGeM at Maaløe et al.'s (2017) MNIST sizes (App. C, ``CAGEM_DEFAULTS``: z1 64, z2 32,
    2x1024 / 2x512 ReLU MLPs with batch-norm, K = 10) and the recipe's loss (App. B) for 100
    labels of 50,000 (alpha = 0.1 N / N_l = 50), at the middle of the KL warm-up (weight 0.5;
    every weight costs the same).  The reference reproduces the restricted gradients of the
    two cross-entropies (``torch.autograd.grad``) and their frozen batch-norm statistics."""
    config = TrainConfig.for_model(**CAGEM_DEFAULTS, model="cagem", labels=100)
    model, guide = build_cagem(config, 784, 10)
    loss = cagem_loss(config, 50_000, 100)
    epoch = config.params.kl_warmup_epochs // 2
    cagem_warmup(config, epoch, model, guide, loss)
    weight, particles = kl_warmup_weight(epoch, config.params.kl_warmup_epochs), config.num_particles
    alpha = config.params.alpha_factor * 50_000 / 100
    setup = _setup(
        model, guide, lambda *a: cagem_reference(*a, particles, weight), device, batch, particles, alpha, loss=loss,
        reference_grads=lambda *a: cagem_loss_and_grads(*a, particles, weight),
    )
    setup["note"] = (
        f"CaGeM with batch-norm (the paper's), K=10, alpha={alpha:g}, KL warm-up weight {weight:g}, {particles} particle; "
        "the reference runs the same networks, so the same batch-norm batch statistics, freezes the running statistics "
        "for the two cross-entropies as pyrodgm does, and applies their parameter restriction with torch.autograd.grad"
    )
    return setup


def conv_mmcva_setup(device: torch.device, batch: int) -> dict:
    """Conv-MMCVA at Li et al.'s MNIST sizes (the ``conv-mmcva`` recipe,
    ``CONV_MMCVA_DEFAULTS``: z 100, the authors' CNNs) and the recipe's loss (eq. 16 summed,
    :func:`~pyrodgm.recipes.mmcva.conv_mmcva_loss`), in the recipe's batch layout: ``batch``
    labelled rows and five times as many unlabelled ones (100 + 500 by default: batches of
    600 with 100 labelled).  The reference's weights are worked out here from the config as
    the recipe's docstring states them, so a change to either shows as a loss mismatch."""
    recipe_defaults = defaults("conv-mmcva", "mnist")
    ratio = recipe_defaults["batch_size"] // recipe_defaults["labelled_per_batch"]
    config = TrainConfig.for_model(**{**recipe_defaults, "batch_size": ratio * batch, "labelled_per_batch": batch},
                                   model="conv-mmcva", dataset="mnist", labels=100)
    model, guide = build_conv_mmcva(config, 784, 10)
    loss = conv_mmcva_loss(config, 50_000, 100)
    size, labelled, p = config.batch_size, config.labelled_per_batch, config.params
    weights = dict(
        alpha=p.mmcva_alpha, alpha_u=p.alpha_u * size / (size - labelled), alpha_b=p.alpha_b * size,
        C=size / labelled, sigma=(2 * WEIGHT_DECAY * size) ** -0.5,
    )
    setup = _setup(model, guide, lambda m, g, x, y, alpha: conv_mmcva_reference(m, g, x, y, **weights), device, batch,
                   loss=loss, unlabelled=size - labelled)
    setup["note"] = (
        f"Conv-MMCVA, batches of {size} with {labelled} labelled, alpha={weights['alpha']:g}, alpha_U={p.alpha_u:g}, "
        f"alpha_B={p.alpha_b:g}; both run the max-margin CNN on the labelled rows and on the unlabelled rows inside "
        "the bound (the guide records its scores; the reference without a graph, its output unused or argmaxed) and once "
        "more on the whole batch for the hinge, hat and balance terms"
    )
    setup["iwae_skipped"] = (
        "the recipe evaluates the bound (eval_particles 1); IWAE-k would run both CNNs on k copies of every image"
    )
    return setup


def gmvae_setup(device: torch.device, batch: int) -> dict:
    """The semi-supervised GMVAE at Arias Figueroa & Rivera's MNIST sizes (the ``gmvae``
    recipe: ``GMVAE_DEFAULTS`` with MNIST's, conv features fsz 100, z 100, Gumbel-softmax
    ``y`` at the schedule's last temperature 0.5, MSE) and the recipe's loss
    (:func:`~pyrodgm.recipes.gmvae.gmvae_loss`: the bound of every row, the k-NN assignment
    and lifted structured losses), ``batch`` labelled rows and as many unlabelled ones (200
    with 100 labelled, the paper's)."""
    config = TrainConfig.for_model(**{**defaults("gmvae", "mnist"), "batch_size": 2 * batch, "labelled_per_batch": batch},
                                   model="gmvae", dataset="mnist", labels=100)
    model, guide = build_gmvae(config, 784, 10)
    loss = gmvae_loss(config, 48_000, 100)
    p = config.params
    weights = dict(w_gaussian=p.w_gaussian, w_categorical=p.w_categorical, w_assign=p.w_assign,
                   w_metric=p.w_metric, k=p.knn, margin=p.metric_margin)
    setup = _setup(model, guide, lambda m, g, x, y, alpha: gmvae_reference(m, g, x, y, **weights), device, batch, loss=loss)
    setup["note"] = (
        f"GMVAE ({p.likelihood} likelihood, Gumbel-softmax temperature {guide.temperature:g}), "
        f"w_A={p.w_assign:g}, w_M={p.w_metric:g}, k={p.knn}, margin {p.metric_margin:g}; one feature pass a step in both"
    )
    setup["iwae_skipped"] = (
        "a relaxed (Gumbel-softmax) label has no discrete log-density to weigh; the recipe evaluates the bound"
    )
    return setup


SETUPS = {
    "m2": m2_setup,
    "adgm": adgm_setup,
    "adgm10": functools.partial(adgm_setup, num_particles=10),
    "cagem": cagem_setup,
    "conv-mmcva": conv_mmcva_setup,
    "gmvae": gmvae_setup,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_same_loss(setup: dict, seed: int = 0) -> tuple[float, float]:
    """The two losses for the same noise (they must agree)."""
    pyro.set_rng_seed(seed)
    ours = setup["loss"].loss(setup["model"], setup["guide"], setup["x"], y=setup["y"])
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        reference = float(setup["reference"]())
    return ours, reference


def time_steps(setup: dict, device: torch.device, steps: int, warmup: int, validate: bool, cuda_graph: bool = False) -> dict:
    """Median seconds per step of the reference and of pyrodgm, interleaved, their ratio,
    and the quartiles of the per-round ratios.  ``cuda_graph``: pyrodgm's step is
    :class:`~pyrodgm.graphs.CapturedStep` (the reference stays eager), timed after its
    warm-up steps and its capture."""
    pyro.clear_param_store()
    pyro.enable_validation(validate)
    model, guide = setup["model"], setup["guide"]
    params = list(model.parameters()) + list(guide.parameters())
    reference_optim = torch.optim.Adam(params, **adam_arguments({"lr": 1e-4}, params))  # the same Adam kernel as FusedAdam's
    if cuda_graph:
        captured = CapturedStep(model, guide, setup["loss"], FusedAdam({"lr": 1e-4, "capturable": True}), setup["num_labelled"])
        warmup = max(warmup, captured.warmup_steps + 1)  # the capture happens in the warm-up

        def pyro_step() -> None:
            captured(setup["x"], setup["y"])
    else:
        svi = pyro.infer.SVI(model, guide, FusedAdam({"lr": 1e-4}), setup["loss"])

        def pyro_step() -> None:
            svi.step(setup["x"], y=setup["y"])

    def reference_step() -> None:
        reference_optim.zero_grad()
        setup["reference_grads"]()
        reference_optim.step()

    times: dict[str, list[float]] = {"reference": [], "pyrodgm": []}
    order = (("reference", reference_step), ("pyrodgm", pyro_step))
    for step in range(warmup + steps):
        # alternate which goes first: the allocator state one step leaves behind (glibc
        # trimming and re-faulting freed pages) changes the next step's time, so a fixed
        # order would favour whichever runs second
        for name, fn in order if step % 2 == 0 else order[::-1]:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    pyro.enable_validation(True)
    reference, ours = statistics.median(times["reference"]), statistics.median(times["pyrodgm"])
    paired = [o / r for o, r in zip(times["pyrodgm"], times["reference"])]  # the two steps of one round
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    return {
        "reference_s": reference,
        "pyrodgm_s": ours,
        "ratio": ours / reference,
        "paired_ratio_quartiles": quartiles,
        "adam_fused": bool(reference_optim.param_groups[0]["fused"]),
    }


def time_graphed_steps(setup: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """:func:`time_steps` with the step in a CUDA graph, or the error that stopped the
    capture (recorded, so the benchmark's other rows survive it)."""
    try:
        return time_steps(setup, device, steps, warmup, validate=False, cuda_graph=True)
    except (RuntimeError, ValueError) as error:
        pyro.enable_validation(True)
        return {"error": f"{type(error).__name__}: {error}"}


def time_iwae(setup: dict, device: torch.device, k: int, images: int, chunk: int) -> dict:
    """IWAE-k of the first ``images`` rows, in eval mode (batch-norm with its running
    statistics, as at test time)."""
    x = setup["x"][:images]
    model, guide = setup["model"], setup["guide"]
    model.eval(), guide.eval()
    _sync(device)
    start = time.perf_counter()
    iwae_log_likelihood(model, guide, x, num_particles=k, chunk_size=chunk)
    _sync(device)
    seconds = time.perf_counter() - start
    model.train(), guide.train()
    return {"iwae_k": k, "images": images, "chunk_size": chunk, "seconds": seconds, "images_per_second": images / seconds}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(SETUPS), choices=sorted(SETUPS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=100,
                        help="labelled rows (and as many unlabelled; conv-mmcva: five times as many) per step")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--iwae-images", type=int, default=20)
    parser.add_argument("--iwae-chunk", type=int, default=500)
    parser.add_argument("--output", default=None, help="JSON file (default results/bench_speed_DEVICE.json)")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="keep glibc's malloc thresholds (default: pyrodgm.allocator.tune_glibc_malloc, as the CLI)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time pyrodgm's step captured in a CUDA graph (pyrodgm.graphs.CapturedStep; CUDA only)")
    args = parser.parse_args(argv)
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error("--cuda-graph needs --device cuda")
    malloc_tuned = False if args.glibc_malloc_defaults else tune_glibc_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_description(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "malloc": "glibc thresholds tuned (pyrodgm.allocator)" if malloc_tuned else "the C library's defaults",
        "command": "python experiments/bench_speed.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "models": {},
    }
    output = Path(args.output) if args.output else RESULTS / f"bench_speed_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        pyro.set_rng_seed(0)
        setup = SETUPS[name](device, args.batch)
        ours, reference = check_same_loss(setup)
        if abs(ours - reference) > 1e-4 * abs(reference):
            raise AssertionError(f"{name}: pyrodgm loss {ours} != reference {reference}")
        report["models"][name] = {
            "loss_pyrodgm": ours,
            "loss_reference": reference,
            "step_validation_off": time_steps(setup, device, args.steps, args.warmup, validate=False),
            "step_validation_on": time_steps(setup, device, args.steps, args.warmup, validate=True),
            **({"step_cuda_graph": time_graphed_steps(setup, device, args.steps, args.warmup)} if args.cuda_graph else {}),
            "iwae": {"skipped": setup["iwae_skipped"]} if "iwae_skipped" in setup
            else time_iwae(setup, device, args.iwae_k, args.iwae_images, args.iwae_chunk),
            "peak_memory_mb": peak_memory_mb(device),
        }
        if "note" in setup:
            report["models"][name]["note"] = setup["note"]
        output.write_text(json.dumps(report, indent=2))  # model by model: a run stopped midway keeps what it measured
    print(f"{'model':10} {'reference s/step':>17} {'pyrodgm s/step':>15} {'ratio':>6} {'ratio (validated)':>18} "
          f"{'ratio (CUDA graph)':>19} {'IWAE img/s':>11}")
    for name, row in report["models"].items():
        off, on = row["step_validation_off"], row["step_validation_on"]
        graphed = row.get("step_cuda_graph", {}).get("ratio")
        graphed = f"{graphed:19.3f}" if graphed is not None else f"{'failed' if 'step_cuda_graph' in row else '-':>19}"
        iwae = f"{row['iwae']['images_per_second']:11.2f}" if "images_per_second" in row["iwae"] else f"{'-':>11}"
        print(f"{name:10} {off['reference_s']:17.4f} {off['pyrodgm_s']:15.4f} {off['ratio']:6.3f} {on['ratio']:18.3f} "
              f"{graphed} {iwae}")
    output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
