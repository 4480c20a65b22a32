"""Several ``--track-test`` runs' test error against epoch and training time on one figure.

Each argument is a results JSON an experiment script wrote (its ``history`` holds the test
error after every epoch); the first run's authors' curve (``authors_curve``) and its own
LabelSpreading baseline (``baseline``) are drawn with them.  For instance the ADGM's
MNIST-100 options, side by side::

    python experiments/compare_curves.py \\
        experiments/results/adgm_1mc_100_labels_authors_code_mnist_seed0.json \\
        experiments/results/adgm_1mc_100_labels_prior_clip_alpha2_mnist_seed0.json \\
        experiments/results/adgm_1mc_100_labels_alpha2_mnist_seed0.json \\
        --out experiments/results/adgm_mnist_100_options_test_curves.png
"""

import argparse
import json
from pathlib import Path

from common import baseline_line

from pyrodgm.plots import plot_test_curves


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results JSON files of --track-test runs")
    p.add_argument("--labels", nargs="+", default=None, help="a legend label per file (default: each run's experiment name)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    return p.parse_args(argv)


def load_runs(paths: list[Path], labels: list[str] | None) -> list[tuple[str, dict]]:
    """``(label, result)`` per results file, in order; refuses repeated labels, which would
    merge two runs' lines in the legend."""
    if labels is not None and len(labels) != len(paths):
        raise SystemExit(f"--labels gave {len(labels)} labels for {len(paths)} results files")
    results = [json.loads(path.read_text()) for path in paths]
    names = labels or [result.get("experiment", path.stem) for result, path in zip(results, paths)]
    if len(set(names)) != len(names):
        raise SystemExit(f"two runs share a label ({', '.join(names)}): give --labels")
    return list(zip(names, results))


def main(argv=None) -> Path:
    args = parse_args(argv)
    runs = load_runs(args.results, args.labels)
    first = runs[0][1]
    try:
        plot_test_curves({name: result.get("history") or [] for name, result in runs}, args.out,
                         reference=first.get("authors_curve"), baseline=baseline_line(first))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
