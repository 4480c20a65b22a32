"""Maaløe et al. (2017), Table 1 and Table 3: CaGeM on permutation-invariant MNIST.

Trains CaGeM (``--labels 0`` for the unsupervised CaGeM-0 with ``--clusters K``; 100 labels
by default, CaGeM-100) with App. C's recipe (:data:`pyrodgm.recipes.cagem.CAGEM_DEFAULTS`: z1 64,
z2 32, 2x1024 / 2x512 ReLU + batch-norm, Adam 1e-3 x0.75 every 50 epochs, KL warm-up over
100 epochs, beta 0.1, dynamic binarisation), then evaluates the checkpoint chosen on
validation (the error of q(y|x) with labels, the ELBO without) on the test set: the IWAE
log-likelihood with ``--iwae-k`` samples (5000 in the paper) on the first
``--iwae-images`` test images, and, with labels, the test error of both classifiers
(``test.error`` is q(y|x)'s, ``test.p_error`` the model's p(y|x), which Table 3 reports).
Writes the results JSON, the z2 PCA plot of the test set (Fig. 2b; ``E_q[z2|x]`` coloured
by the true label), random samples (y ~ p(y|z2)) and cluster-conditional samples.

Paper targets: CaGeM-0 -81.92 (K=20), -81.86 (K=5), -81.60 (K=10); CaGeM-100 -79.38 and
1.16% test error.

    python experiments/cagem_mnist.py --root ../shared/data --no-download --labels 100
    python experiments/cagem_mnist.py --root ../shared/data --no-download --labels 0 --clusters 10
"""

from pathlib import Path

from common import parser, run_options, run_training, setup, write_result

from pyrodgm.data import IMAGE_SHAPES
from pyrodgm.evaluation import iwae_evaluate, posterior_mean
from pyrodgm.plots import save_embedding, save_samples
from pyrodgm.training import TrainConfig, build_from_checkpoint, load_test_data
from pyrodgm.recipes.cagem import CAGEM_DEFAULTS

#: Table 1 (IWAE-5000 log-likelihood) and Table 3 (test error) of Maaløe et al. (2017).
LOG_LIKELIHOOD = {(0, 5): -81.86, (0, 10): -81.60, (0, 20): -81.92, (20, 10): -81.47, (50, 10): -80.49, (100, 10): -79.38}
TEST_ERROR = {20: 0.1586, 50: 0.0242, 100: 0.0116}


def target(labels: int, clusters: int) -> dict:
    return {
        "log_likelihood": LOG_LIKELIHOOD.get((labels, clusters)),
        "iwae_k": 5000,
        "p_error": TEST_ERROR.get(labels),
        "source": "Maaløe et al. 2017, Table 1 (log-likelihood, IWAE 5000) and Table 3 (error of p(y|x))",
    }


def name(args) -> str:
    return f"cagem_{args.labels}_labels_k{args.clusters}"


def config_for(args) -> TrainConfig:
    values = dict(CAGEM_DEFAULTS)
    values.update(
        model="cagem", dataset=args.dataset, root=args.root, download=args.download, labels=args.labels,
        num_clusters=args.clusters, validation=args.validation, epochs=args.epochs, seed=args.seed, device=args.device,
        out=args.out or f"runs/experiments/{name(args)}_{args.dataset}_seed{args.seed}",
        eval_particles=args.eval_particles, validate_inputs=not args.no_validate_inputs, **run_options(args),
    )
    if args.kl_warmup_epochs is not None:
        values["kl_warmup_epochs"] = args.kl_warmup_epochs
    if args.gaussian_scale is not None:
        values["gaussian_scale"] = args.gaussian_scale
    if args.dataset == "digits":
        values["lr"] = 3e-3  # pyrodgm.zoo.DATASET_PRESETS: 12 steps an epoch
    return TrainConfig.for_model(**values)


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], epochs=1000)
    p.add_argument("--labels", type=int, default=100, help="0 (CaGeM-0), 20, 50 or 100")
    p.add_argument("--clusters", type=int, default=10, help="K; must be the number of classes when labelled")
    p.add_argument("--iwae-k", type=int, default=5000, help="importance samples of the test log-likelihood")
    p.add_argument("--iwae-images", type=int, default=10000, help="test images the log-likelihood is averaged over")
    p.add_argument("--iwae-chunk", type=int, default=500, help="particles traced at once")
    p.add_argument("--eval-particles", type=int, default=10, help="samples q(y|x) is averaged over")
    p.add_argument("--no-validate-inputs", action="store_true", help="skip per-step input checks, for speed")
    p.add_argument("--gaussian-scale", choices=("exp", "softplus"), default=None,
                   help="sigma = exp(Linear) (the paper's, default) or softplus(Linear), which cannot overflow")
    p.add_argument("--kl-warmup-epochs", type=int, default=None,
                   help="epochs of KL warm-up (paper 100; shorten it for a short run)")
    args = p.parse_args(argv)
    started = setup(args)
    config = config_for(args)
    metrics = run_training(args, config, baseline=config.labels > 0)
    _, _, model, guide, _ = build_from_checkpoint(Path(config.out) / "best.pt", args.device)
    test = load_test_data(config, args.device)
    subset = test.flat()[: args.iwae_images]
    iwae = iwae_evaluate(model, guide, subset, args.iwae_k, chunk_size=args.iwae_chunk, progress=not args.quiet).summary()
    metrics["test"] = {**(metrics.get("test") or {}), "log_likelihood": iwae["iwae_log_likelihood"],
                       "iwae_k": args.iwae_k, "iwae_images": iwae["num_examples"]}
    extra = {"labels": args.labels, "clusters": args.clusters, "iwae": iwae, "out": config.out, "config": config.to_dict()}
    path = write_result(args, name(args), metrics, target(args.labels, args.clusters), started, extra)
    z2 = posterior_mean(guide, test.flat()[:5000], "z2")
    save_embedding(z2, test.y[:5000], path.with_name(path.stem + "_z2_pca.png"), "pca", f"CaGeM-{args.labels} z2 (PCA)")
    shape = IMAGE_SHAPES[args.dataset]
    save_samples(model, path.with_name(path.stem + "_samples.png"), shape)
    save_samples(model, path.with_name(path.stem + "_cluster_samples.png"), shape, num_classes=model.num_clusters)
    print(f"IWAE-{args.iwae_k} log-likelihood on {iwae['num_examples']} test images: {iwae['iwae_log_likelihood']:.2f}")
    return metrics


if __name__ == "__main__":
    main()
