"""Arias Figueroa & Rivera (2019), Table 1: the semi-supervised GMVAE on MNIST with 100 labels
(paper: 1.94% +- 0.49 test error, 5 seeds).

Hyper-parameters (Sec. 5.2, App. A; :data:`pyrodgm.recipes.gmvae.GMVAE_DEFAULTS`, per data set
:data:`~pyrodgm.recipes.gmvae.GMVAE_DATASETS`): conv features of size 100 (Table 4), Gaussian
size 100, learned mixture prior p(z|y), transposed-conv decoder (Table 5) with a sigmoid and
the squared error; Gumbel-softmax y whose temperature goes from 1 to 0.5 over the first 50
epochs; w_G = w_C = 1; assignment loss with the 5 distance-weighted nearest labelled
neighbours (w_A = 1, the labelled rows' cross-entropy included) and lifted structured loss
with margin 2 (w_M = 1); Adam 1e-3, 200 epochs, batches of 200 with 100 labelled; 20% of the
training set for validation.  The test error is that of the checkpoint with the best
validation error.  Beside the results JSON: the per-class generations (Fig. 3) and a
t-SNE (or PCA) of the test set's features (Fig. 4).  ``--dataset fashion-mnist`` runs
Table 1's Fashion-MNIST column with its presets (paper: 26.88% +- 0.86).

    python experiments/gmvae_mnist_100.py --root ../shared/data --no-download --epochs 200
"""

from pathlib import Path

from common import parser, run_options, setup, write_result

from pyrodgm.data import IMAGE_SHAPES
from pyrodgm.plots import plot_history, save_embedding, save_samples
from pyrodgm.training import TrainConfig, build_from_checkpoint, load_test_data, train
from pyrodgm.zoo import defaults

TARGETS = {
    "fashion-mnist": {"test_error": 0.2688, "std": 0.0086, "source": "Arias Figueroa & Rivera 2019, Table 1 (Fashion-MNIST, 100 labels)"},
    "mnist": {"test_error": 0.0194, "std": 0.0049, "source": "Arias Figueroa & Rivera 2019, Table 1 (MNIST, 100 labels)"},
}


def config_for(args) -> TrainConfig:
    """The paper's recipe for ``args.dataset`` with the script's overrides."""
    values = defaults("gmvae", args.dataset)
    values.update(
        model="gmvae", dataset=args.dataset, root=args.root, download=args.download, labels=args.labels,
        epochs=args.epochs, seed=args.seed, device=args.device, label_mode=args.label_mode,
        out=args.out or f"runs/experiments/gmvae_{args.dataset}_{args.labels}_seed{args.seed}",
        validate_inputs=not args.no_validate_inputs, **run_options(args),
    )
    if args.validation is not None:
        values["validation"] = args.validation
    return TrainConfig.for_model(**values)


def save_figures(checkpoint: Path, stem: Path, method: str, limit: int, device: str) -> dict:
    """Fig. 3 (a row of generations per class, ``STEM_samples.png``) and Fig. 4 (the first
    ``limit`` test images' features in 2-D, ``STEM.png``) of the checkpoint."""
    config, _, model, guide, _ = build_from_checkpoint(checkpoint, device)
    samples, embedding = stem.with_name(stem.name + "_samples.png"), stem.with_suffix(".png")
    save_samples(model, samples, IMAGE_SHAPES[config.dataset], num_classes=model.num_classes)
    test = load_test_data(config, device, limit=limit)
    features = guide.feature_vectors(test.flat())
    save_embedding(features, test.y, embedding, method=method, title=f"GMVAE features ({method.upper()}, test)", seed=config.seed)
    return {"samples_png": samples.name, "embedding_png": embedding.name, "embedding": method, "embedding_points": len(test)}


def result_stem(args, name: str) -> Path:
    """The results JSON's path without its suffix (as :func:`common.write_result` names it)."""
    return Path(args.results) / f"{name}_{args.dataset}_seed{args.seed}"


def add_gmvae_arguments(p) -> None:
    """The options both GMVAE scripts take: the label mode and the feature-embedding plot."""
    p.add_argument("--label-mode", choices=("relaxed", "straight-through", "enumerate"), default="relaxed")
    p.add_argument("--embedding", choices=("tsne", "pca"), default="tsne", help="2-D map of the test features")
    p.add_argument("--embedding-limit", type=int, default=2000, help="test images in the embedding plot")
    p.add_argument("--no-validate-inputs", action="store_true", help="skip per-step input checks, for speed")


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], epochs=200)
    p.add_argument("--labels", type=int, default=100)
    add_gmvae_arguments(p)
    args = p.parse_args(argv)
    started = setup(args)
    config = config_for(args)
    metrics = train(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    name = f"gmvae_{args.labels}_labels"
    target = TARGETS.get(args.dataset, TARGETS["mnist"])
    stem = result_stem(args, name)
    figures = save_figures(Path(config.out) / "best.pt", stem, args.embedding, args.embedding_limit, args.device)
    plot_history(metrics["history"], stem.with_name(stem.name + "_curves.png"), keys=("valid_error", "valid_elbo"))
    write_result(args, name, metrics, target, started, {"label_mode": args.label_mode, "out": config.out, **figures})
    return metrics


if __name__ == "__main__":
    main()
