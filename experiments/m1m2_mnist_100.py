"""Kingma et al. (2014), Table 1, stacked M1+M2 with 100 labels on MNIST (paper: 3.33% +-
0.14 test error).  M1 (z1 50, 2x600 softplus) is trained first without labels, then frozen;
M2 (z2 50, 1x500 softplus, Gaussian likelihood on z1, alpha = 0.1 N) is trained on samples
z1 ~ q(z1|x), as in the paper.  ``--end-to-end`` trains the stack jointly instead.

    python experiments/m1m2_mnist_100.py --root ../shared/data --no-download --m1-epochs 300 --epochs 1000
"""

from pathlib import Path

from common import parser, run_options, setup, write_result

from pyrodgm.training import TrainConfig, train


def _started(out: str) -> bool:
    """Whether a stage has a checkpoint to resume: ``--resume`` continues the stage it was
    in and starts the stages after it."""
    return (Path(out) / "checkpoint.pt").is_file()


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0], epochs=1000)
    p.add_argument("--m1-epochs", type=int, default=300)
    p.add_argument("--end-to-end", action="store_true")
    args = p.parse_args(argv)
    started = setup(args)
    base = args.out or f"runs/experiments/m1m2_{args.dataset}_100_seed{args.seed}"
    common = dict(dataset=args.dataset, root=args.root, download=args.download, validation=args.validation,
                  lr=3e-4, seed=args.seed, device=args.device, activation="softplus")
    m1_metrics = None
    m1_checkpoint = None
    if not args.end_to_end:
        m1 = TrainConfig.for_model(model="m1", labels=0, labelled_per_batch=0, batch_size=100, epochs=args.m1_epochs,
                                   z_dim=50, hidden=(600, 600), out=f"{base}/m1", **common)
        m1_metrics = train(m1, resume=args.resume and _started(m1.out), progress=not args.quiet, overwrite=args.overwrite)
        m1_checkpoint = f"{base}/m1/best.pt"
    stack = TrainConfig.for_model(model="m1m2", labels=100, batch_size=200, labelled_per_batch=100, epochs=args.epochs,
                                  z_dim=50, hidden=(500,), alpha_factor=0.1, eval_particles=10, m1_checkpoint=m1_checkpoint,
                                  end_to_end=args.end_to_end, out=f"{base}/m1m2", **common, **run_options(args))
    metrics = train(stack, resume=args.resume and _started(stack.out), progress=not args.quiet, overwrite=args.overwrite, baseline=True)
    extra = {"m1_epochs_completed": m1_metrics["epochs_completed"] if m1_metrics else None,
             "m1_train_seconds": m1_metrics["train_seconds_total"] if m1_metrics else None,
             "m1_best_validation": m1_metrics["best_validation"] if m1_metrics else None,
             "end_to_end": args.end_to_end}
    write_result(args, "m1m2_100_labels", metrics, {"test_error": 0.0333, "std": 0.0014, "source": "Kingma et al. 2014, Table 1"}, started, extra)
    return metrics


if __name__ == "__main__":
    main()
