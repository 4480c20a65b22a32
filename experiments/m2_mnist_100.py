"""Kingma et al. (2014), Table 1, M2 with 100 labels on MNIST (paper: 11.97% +- 1.71 test
error).  Paper architecture: z 50, one hidden layer of 500 softplus units, alpha = 0.1 N;
batches of 200 with 100 labelled (the ADGM recipe), Adam 3e-4, dynamic binarisation.
The test error is that of the checkpoint with the best validation error.  With
``--track-test`` the test error by epoch and by training second is drawn beside the M2
curve of the ADGM authors' code (``_test_curve.png``; no curve of Kingma et al.'s own code
was published).  ``--authors-code`` takes what Kingma et al.'s code (``nips14-ssl``) does
beyond the paper's text (:data:`AUTHORS_CODE`).

    python experiments/m2_mnist_100.py --root ../shared/data --no-download --epochs 1000
"""

from adgm_mnist_100 import AUTHORS_CURVES
from common import parser, run_options, run_training, setup, write_result

from pyrodgm.training import TrainConfig


#: What Kingma et al.'s code did beyond the paper's text (``--authors-code``): every weight
#: drawn from N(0, 0.001^2) with zero biases, an N(0, 1) prior on the weights, and batches of
#: 1 labelled and 499 unlabelled rows.  Measured (experiments/README.md): on the digits the
#: first two made no difference over 3 seeds; on MNIST the batch layout alone was far worse.
AUTHORS_CODE = dict(init="small-normal", weight_prior_std=1.0, batch_size=500, labelled_per_batch=1)


def config_for(args) -> TrainConfig:
    """The paper's M2 (with ``--authors-code``, its code's differences)."""
    values = {"batch_size": 200, "labelled_per_batch": 100, **(AUTHORS_CODE if args.authors_code else {})}
    return TrainConfig.for_model(
        model="m2", dataset=args.dataset, root=args.root, download=args.download, labels=100,
        validation=args.validation, epochs=args.epochs, lr=3e-4, seed=args.seed, device=args.device,
        out=args.out or f"runs/experiments/m2{'_authors_code' if args.authors_code else ''}_{args.dataset}_100_seed{args.seed}",
        z_dim=50, hidden=(500,),
        activation="softplus", alpha_factor=0.1, eval_particles=1, **values, **run_options(args),
    )


def name(args) -> str:
    return "m2_100_labels" + ("_authors_code" if args.authors_code else "")


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0], epochs=1000)
    p.add_argument("--authors-code", action="store_true", help="Kingma et al.'s code's differences (AUTHORS_CODE)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = setup(args)
    config = config_for(args)
    metrics = run_training(args, config, baseline=True)
    write_result(args, name(args), metrics, {"test_error": 0.1197, "std": 0.0171, "source": "Kingma et al. 2014, Table 1"}, started,
                 {"authors_code_options": AUTHORS_CODE if args.authors_code else {}}, reference=AUTHORS_CURVES[("m2", 1)])
    return metrics


if __name__ == "__main__":
    main()
