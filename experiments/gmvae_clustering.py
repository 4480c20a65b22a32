"""Arias Figueroa & Rivera (2019), Table 3: unsupervised clustering with the GMVAE (paper,
average of 5 seeds: MNIST ACC 92.46%, NMI 88.16%; Fashion-MNIST ACC 55.97%, NMI 54.55%).

The model is trained without labels (Sec. 5.3.1; :data:`pyrodgm.recipes.gmvae.GMVAE_CLUSTERING_DEFAULTS`):
batches of 64, feature size 100 (200 for Fashion-MNIST), Gaussian size 150 (50), w_G = 5,
binary cross-entropy reconstruction (on dynamically binarised pixels), the Gumbel-softmax
temperature from 1 to 0.5 over 50 epochs, Adam 1e-3, 10 clusters.  The paper does not give
the number of epochs; 200 as in its semi-supervised runs.  No label is seen in training or
in choosing the checkpoint (the best validation ELBO); the test set's clustering accuracy
(Hungarian matching) and NMI are reported under ``"test"``.  Beside the results JSON: the
generations of each cluster and a t-SNE (or PCA) of the test features.

    python experiments/gmvae_clustering.py --root ../shared/data --no-download
    python experiments/gmvae_clustering.py --root ../shared/data --no-download --dataset fashion-mnist
"""

from pathlib import Path

from common import parser, run_options, run_training, setup, write_result
from gmvae_mnist_100 import add_gmvae_arguments, result_stem, save_figures

from pyrodgm.plots import plot_history
from pyrodgm.training import TrainConfig
from pyrodgm.zoo import defaults

TARGETS = {
    "mnist": {"cluster_acc": 0.9246, "nmi": 0.8816, "best_cluster_acc": 0.9736, "best_nmi": 0.9344,
              "source": "Arias Figueroa & Rivera 2019, Table 3 (MNIST, average of 5 seeds)"},
    "fashion-mnist": {"cluster_acc": 0.5597, "nmi": 0.5455, "best_cluster_acc": 0.5905, "best_nmi": 0.5756,
                      "source": "Arias Figueroa & Rivera 2019, Table 3 (Fashion-10, average of 5 seeds)"},
}


def config_for(args) -> TrainConfig:
    """The paper's clustering recipe for ``args.dataset`` with the script's overrides."""
    values = defaults("gmvae-clustering", args.dataset)
    values.update(
        model="gmvae-clustering", dataset=args.dataset, root=args.root, download=args.download, labels=0,
        labelled_per_batch=0, epochs=args.epochs, seed=args.seed, device=args.device, label_mode=args.label_mode,
        out=args.out or f"runs/experiments/gmvae_clustering_{args.dataset}_seed{args.seed}",
        validate_inputs=not args.no_validate_inputs, **run_options(args),
    )
    if args.validation is not None:
        values["validation"] = args.validation
    return TrainConfig.for_model(**values)


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], epochs=200)
    add_gmvae_arguments(p)
    args = p.parse_args(argv)
    started = setup(args)
    config = config_for(args)
    metrics = run_training(args, config)
    name = "gmvae_clustering"
    stem = result_stem(args, name)
    figures = save_figures(Path(config.out) / "best.pt", stem, args.embedding, args.embedding_limit, args.device)
    plot_history(metrics["history"], stem.with_name(stem.name + "_curves.png"), keys=("valid_cluster_acc", "valid_nmi", "valid_elbo"))
    target = TARGETS.get(args.dataset, TARGETS["mnist"])
    write_result(args, name, metrics, target, started, {"label_mode": args.label_mode, "out": config.out, **figures})
    return metrics


if __name__ == "__main__":
    main()
