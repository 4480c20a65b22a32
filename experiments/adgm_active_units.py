"""Maaløe et al. (2016), Fig. 3: the active stochastic units of an ADGM's a and z.

For each unit i of a and z: the KL divergence ``KL(q(u_i|.) || p(u_i|.))`` averaged over the
data (closed form per unit given the samples of its parents: ``p(z_i) = N(0, 1)``,
``p(a_i|x,y,z)`` at ``y, z ~ q``; the label summed with ``q(y|a,x)``, the rest averaged over
particles), and Burda et al.'s activity ``Cov_x E_q[u_i]``
(:func:`pyrodgm.evaluation.active_units`).  A unit with a KL near 0 is unused
(``q(.|x) ~ p``).  The paper finds about 20 active units in z and many more in a, which it
attributes to the up-weighted classification term.  (Fig. 3's caption writes the KL as
``KL[p||q]``; the bound, and the authors' code, use ``KL(q || p)``, as here.)

Loads a checkpoint (``--checkpoint runs/.../best.pt``, e.g. from ``adgm_mnist_100.py``), or
by default trains an ADGM briefly on scikit-learn's digits.  Writes a PNG of the per-unit
values and the results JSON with the counts.

    python experiments/adgm_active_units.py --checkpoint runs/experiments/adgm_10mc_100_labels_mnist_seed0/best.pt \\
        --dataset mnist --root ../shared/data --no-download
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from common import parser, run_options, run_training, setup, write_result
from torch.distributions import kl_divergence

import pyro.distributions as dist
from pyrodgm.evaluation import active_units
from pyrodgm.traces import TraceTerms, particle_traces
from pyrodgm.training import TrainConfig, build_from_checkpoint, device_description, load_test_data
from pyrodgm.zoo import ADGM_DEFAULTS

SITES = ("a", "z")
PAPER = {
    "active_z": "about 20 of 100",
    "active_a": "many more than z",
    "test_error": 0.0225,
    "source": "Maaløe et al. 2016, Fig. 3 (counts) and Table 1 (ADGM 1 MC, what this script trains by default)",
}


def _normal(fn: dist.Distribution) -> dist.Normal:
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    if not isinstance(fn, torch.distributions.Normal):
        raise TypeError(f"expected a diagonal Normal, got {type(fn).__name__}")
    return fn


@torch.no_grad()
def per_unit_kl(model, guide, x: torch.Tensor, num_particles: int = 10, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``E_x E_q[KL(q(u_i|.) || p(u_i|.))]`` per unit of every site in :data:`SITES` that the
    guide samples: closed form per unit, enumerated labels summed with their guide
    probabilities, particles averaged."""
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, x.shape[0], batch_size):
        batch = x[start : start + batch_size]
        model_trace, guide_trace = particle_traces(model, guide, (batch,), {}, num_particles, 1)
        weight = TraceTerms(model_trace, guide_trace, 1).enum_weight  # (K, P, B) or None
        for site in SITES:
            if site not in guide_trace.nodes:
                continue
            kl = kl_divergence(_normal(guide_trace.nodes[site]["fn"]), _normal(model_trace.nodes[site]["fn"]))
            kl = kl.reshape((1,) * max(0, 4 - kl.dim()) + tuple(kl.shape))  # (K or 1, P, B, dim)
            if kl.shape[0] > 1:
                kl = (weight.unsqueeze(-1) * kl).sum(0)
            else:
                kl = kl[0]
            kl = kl.expand(num_particles, batch.shape[0], kl.shape[-1])
            totals[site] = totals.get(site, 0.0) + kl.mean(0).sum(0)
    return {site: total / x.shape[0] for site, total in totals.items()}


def plot(values: dict, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for axis, key, label in ((axes[0], "kl", "KL(q(u_i|x) || p(u_i)) [nats]"), (axes[1], "variance", "Cov_x E_q[u_i]")):
        for site, color in zip(SITES, ("tab:orange", "tab:blue")):
            if site in values:
                sorted_values = torch.sort(values[site][key], descending=True).values.cpu()
                axis.bar(range(len(sorted_values)), sorted_values, color=color, alpha=0.6, label=site)
        axis.axhline(threshold, color="k", lw=0.8, ls="--")
        axis.set_yscale("log")
        axis.set_xlabel("unit (sorted)")
        axis.set_ylabel(label)
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _checkpoint_metrics(checkpoint: Path, state: dict, device: str) -> dict:
    """The run's ``metrics.json`` beside the checkpoint, or what the checkpoint itself holds."""
    path = checkpoint.parent / "metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    return {
        "device": device_description(torch.device(device)),
        "epochs_completed": state["epoch"],
        "train_seconds_total": sum(r["epoch_seconds"] for r in state["history"]),
        "best_validation": state["best"],
        "test": None,
    }


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], epochs=30)
    p.set_defaults(dataset="digits")
    p.add_argument("--checkpoint", help="a trained adgm/sdgm checkpoint (default: train an ADGM here)")
    p.add_argument("--model", choices=("adgm", "sdgm"), default="adgm", help="what to train without --checkpoint")
    p.add_argument("--limit", type=int, default=2000, help="test images the statistics are computed on")
    p.add_argument("--particles", type=int, default=10, help="samples of the parents of each unit")
    p.add_argument("--threshold", type=float, default=0.01)
    args = p.parse_args(argv)
    started = setup(args)
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        config, _, model, guide, state = build_from_checkpoint(checkpoint, args.device)
        metrics = _checkpoint_metrics(checkpoint, state, args.device)
        args.dataset, args.seed = config.dataset, config.seed
    else:
        out = args.out or f"runs/experiments/{args.model}_active_units_{args.dataset}_seed{args.seed}"
        config = TrainConfig.for_model(**{**ADGM_DEFAULTS, "model": args.model, "dataset": args.dataset, "root": args.root,
                                          "download": args.download, "validation": args.validation, "epochs": args.epochs,
                                          "seed": args.seed, "device": args.device, "out": out, **run_options(args)})
        metrics = run_training(args, config)
        checkpoint = Path(out) / "best.pt"
        config, _, model, guide, state = build_from_checkpoint(checkpoint, args.device)
    test = load_test_data(config, args.device, root=args.root, limit=args.limit, download=args.download and config.download)
    x = test.flat()
    kl = per_unit_kl(model, guide, x, num_particles=args.particles)
    values, counts = {}, {}
    for site in kl:
        count, variances = active_units(guide, x, site, threshold=args.threshold, num_particles=args.particles)
        values[site] = {"kl": kl[site], "variance": variances}
        counts[site] = {
            "units": int(kl[site].numel()),
            "active_by_kl": int((kl[site] > args.threshold).sum()),
            "active_by_variance": count,
            "kl_total": float(kl[site].sum()),
            "kl_per_unit": kl[site].tolist(),
            "variance_per_unit": variances.tolist(),
        }
    extra = {"model": config.model, "checkpoint": str(checkpoint), "checkpoint_epoch": state["epoch"],
             "num_examples": int(x.shape[0]), "particles": args.particles, "threshold": args.threshold,
             "active_units": counts}
    path = write_result(args, f"{config.model}_active_units", metrics, PAPER, started, extra)
    plot(values, args.threshold, path.with_suffix(".png"))
    print(json.dumps({site: {k: v for k, v in c.items() if not k.endswith("per_unit")} for site, c in counts.items()}, indent=2))
    return counts


if __name__ == "__main__":
    main()
