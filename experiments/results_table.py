"""Print the results table of README.md from experiments/results/*.json, so that every
number in the README comes from a recorded run.

    python experiments/results_table.py            # print the markdown table
    python experiments/results_table.py --write    # replace the table in README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COMMANDS = {
    "m2_100_labels": "python experiments/m2_mnist_100.py --root ../shared/data --no-download --epochs {epochs} --threads 1",
    "m1m2_100_labels": "python experiments/m1m2_mnist_100.py --root ../shared/data --no-download --m1-epochs {m1_epochs} --epochs {epochs} --threads 1",
    "adgm_1mc_100_labels": "python experiments/adgm_mnist_100.py --root ../shared/data --no-download --mc 1 --epochs {epochs} --threads 1",
    "adgm_10mc_100_labels": "python experiments/adgm_mnist_100.py --root ../shared/data --no-download --mc 10 --epochs {epochs} --threads 1",
    "sdgm_1mc_100_labels": "python experiments/adgm_mnist_100.py --root ../shared/data --no-download --model sdgm --mc 1 --epochs {epochs} --threads 1",
}


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def rows(results_dir: Path) -> list[str]:
    lines = [
        "| experiment | test error | paper | epochs run (of paper's schedule) | train time | hardware | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        name = result["experiment"]
        command = COMMANDS.get(name, "").format(epochs=result["epochs_completed"], m1_epochs=result.get("m1_epochs_completed"))
        epochs = f"{result['epochs_completed']}"
        if result.get("m1_epochs_completed"):
            epochs += f" (+{result['m1_epochs_completed']} M1)"
        seconds = result["train_seconds"] + (result.get("m1_train_seconds") or 0)
        test = result.get("test") or {}
        paper = result["paper"]
        lines.append(
            f"| {name} ({result['dataset']}, seed {result['seed']}) | {_percent(test.get('error'))} "
            f"(epoch {test.get('epoch')}, chosen on validation) | {_percent(paper['test_error'])} ± {_percent(paper.get('std'))} "
            f"| {epochs} | {seconds / 60:.0f} min | {result['device']} | {result['date']} | `{command}` |"
        )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--write", action="store_true", help="replace the table between the markers in README.md")
    args = parser.parse_args(argv)
    table = "\n".join(rows(Path(args.results)))
    if not args.write:
        print(table)
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
