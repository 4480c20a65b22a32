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

``--authors-code`` runs what the authors' released code runs instead (:data:`AUTHORS_CODE`,
100 epochs unless ``--epochs`` says otherwise; results file ``..._authors_code``).

    python experiments/gmvae_mnist_100.py --root ../shared/data --no-download --epochs 200
    python experiments/gmvae_mnist_100.py --root ../shared/data --no-download --authors-code
"""

from pathlib import Path

from common import parser, run_options, run_training, setup, write_result

from pyrodgm.data import IMAGE_SHAPES
from pyrodgm.plots import plot_history, save_embedding, save_samples
from pyrodgm.training import TrainConfig, build_from_checkpoint, load_test_data
from pyrodgm.zoo import defaults

TARGETS = {
    "fashion-mnist": {"test_error": 0.2688, "std": 0.0086, "source": "Arias Figueroa & Rivera 2019, Table 1 (Fashion-MNIST, 100 labels)"},
    "mnist": {"test_error": 0.0194, "std": 0.0049, "source": "Arias Figueroa & Rivera 2019, Table 1 (MNIST, 100 labels)"},
}


#: What the authors' released code (github.com/jariasf/semisupervised-vae-metric-embedding:
#: ``run.sh``'s MNIST line, ``main.py``, ``model/SSVAE.py``, ``networks/CatVAENetwork.py``,
#: ``utils/assignment.py``) runs beyond the paper's text (``--authors-code``): Adam 1e-2
#: halved every 30 epochs; w_G = 1.1 on the Gaussian KL, w_C = 1.2 on the categorical KL,
#: w_A = 4.7 on the assignment cross-entropy, w_M = 0.85 on the lifted structured loss (the
#: reconstruction's weight 1); k = 7 neighbours voting by majority; margin 0.5 (``main.py``'s
#: default, which ``run.sh`` keeps); fsz 200, gsz 150; the temperature decayed by
#: exp(-0.00693) an epoch, reaching 0.5 at epoch 100; every training image trained on (no
#: validation set: the last epoch is evaluated); and its networks: p(z) = N(0, I) with a
#: decoder of z and y, q(z|x_hat) linear, logits linear in x_hat, ReLU convolutions, a dense
#: output layer; the binary cross-entropy of the grey pixels as reconstruction loss; and
#: TensorFlow's Glorot-uniform weights and batch-norm (momentum 0.99, eps 1e-3).  It trains
#: 100 epochs (:data:`AUTHORS_EPOCHS`).
AUTHORS_CODE = dict(
    lr=1e-2, lr_decay=0.5, lr_decay_every=30, w_gaussian=1.1, w_categorical=1.2, w_assign=4.7, w_metric=0.85,
    knn=7, knn_weighting="uniform", metric_margin=0.5, feature_dim=200, z_dim=150, temperature_epochs=100, validation=0,
    z_prior="standard", z_encoder="linear", classifier_layers=0, conv_activation="relu", decoder_head="dense",
    likelihood="cross-entropy", init="xavier", batch_norm="tensorflow",
)
AUTHORS_EPOCHS = 100


def config_for(args) -> TrainConfig:
    """The paper's recipe for ``args.dataset`` with the script's overrides (and the
    authors' code's settings with ``--authors-code``)."""
    values = defaults("gmvae", args.dataset)
    values.update(
        model="gmvae", dataset=args.dataset, root=args.root, download=args.download, labels=args.labels,
        epochs=epochs(args), seed=args.seed, device=args.device, label_mode=args.label_mode,
        out=args.out or f"runs/experiments/{name(args)}_{args.dataset}_seed{args.seed}",
        validate_inputs=not args.no_validate_inputs, **run_options(args), **authors_code_options(args),
    )
    if args.validation is not None:
        values["validation"] = args.validation
    return TrainConfig.for_model(**values)


def authors_code_options(args) -> dict:
    """The :class:`TrainConfig` fields of :data:`AUTHORS_CODE` with ``--authors-code``, else none."""
    return dict(AUTHORS_CODE) if args.authors_code else {}


def epochs(args) -> int:
    """``--epochs``, else the paper's 200 or the authors' code's 100."""
    if args.epochs is not None:
        return args.epochs
    return AUTHORS_EPOCHS if args.authors_code else 200


def name(args) -> str:
    """The results' name: ``gmvae_LABELS_labels``, ``_authors_code`` appended for that variant."""
    return f"gmvae_{args.labels}_labels" + ("_authors_code" if args.authors_code else "")


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


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0], epochs=None)
    p.add_argument("--labels", type=int, default=100)
    p.add_argument("--authors-code", action="store_true", help="the authors' released code's settings (AUTHORS_CODE)")
    add_gmvae_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.epochs = epochs(args)
    started = setup(args)
    config = config_for(args)
    metrics = run_training(args, config, baseline=True)
    target = TARGETS.get(args.dataset, TARGETS["mnist"])
    stem = result_stem(args, name(args))
    figures = save_figures(Path(config.out) / "best.pt", stem, args.embedding, args.embedding_limit, args.device)
    plot_history(metrics["history"], stem.with_name(stem.name + "_curves.png"), keys=("valid_error", "valid_elbo"))
    extra = {"label_mode": args.label_mode, "out": config.out, "authors_code_options": authors_code_options(args), **figures}
    write_result(args, name(args), metrics, target, started, extra)
    return metrics


if __name__ == "__main__":
    main()
