"""Kingma et al. (2014), Table 1, M2 with 100 labels on MNIST (paper: 11.97% +- 1.71 test
error).  Paper architecture: z 50, one hidden layer of 500 softplus units, alpha = 0.1 N;
batches of 200 with 100 labelled (the ADGM recipe), Adam 3e-4, dynamic binarisation.
The test error is that of the checkpoint with the best validation error.  With
``--track-test`` the test error by epoch and by training second is drawn beside the M2
curve of the ADGM authors' code (``_test_curve.png``; no curve of Kingma et al.'s own code
was published).

    python experiments/m2_mnist_100.py --root ../shared/data --no-download --epochs 1000
"""

from adgm_mnist_100 import AUTHORS_CURVES
from common import parser, run_options, setup, write_result

from pyrodgm.training import TrainConfig, train


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0], epochs=1000).parse_args(argv)
    started = setup(args)
    out = args.out or f"runs/experiments/m2_{args.dataset}_100_seed{args.seed}"
    config = TrainConfig.for_model(
        model="m2", dataset=args.dataset, root=args.root, download=args.download, labels=100,
        validation=args.validation, epochs=args.epochs, batch_size=200, labelled_per_batch=100,
        lr=3e-4, seed=args.seed, device=args.device, out=out, z_dim=50, hidden=(500,),
        activation="softplus", alpha_factor=0.1, eval_particles=1, **run_options(args),
    )
    metrics = train(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite, baseline=True)
    write_result(args, "m2_100_labels", metrics, {"test_error": 0.1197, "std": 0.0171, "source": "Kingma et al. 2014, Table 1"}, started,
                 reference=AUTHORS_CURVES[("m2", 1)])
    return metrics


if __name__ == "__main__":
    main()
