"""Print the results tables of README.md from experiments/results/*.json, so that every
number in the README comes from a recorded run: training runs (written by the experiment
scripts), IWAE evaluations (``pyrodgm evaluate ... --output``), speed benchmarks
(``bench_speed.py``, ``lightning_throughput.py``), GPU kit runs (``gpu_kit.py collect``), the
classical baselines on the runs' own splits (``baselines.py``), whose errors also stand
beside each semi-supervised run, the same command over seeds (``seeds.py``), and the
scikit-learn estimator against scikit-learn's semi-supervised classifiers
(``estimator_benchmark.py``).

    python experiments/results_table.py            # print the markdown tables
    python experiments/results_table.py --write    # replace them in README.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: Commands of the results recorded before the scripts wrote their own command line.
COMMANDS = {
    "m2_100_labels": "python experiments/m2_mnist_100.py --root ../shared/data --no-download --epochs {epochs} --threads 1",
    "m1m2_100_labels": "python experiments/m1m2_mnist_100.py --root ../shared/data --no-download --m1-epochs {m1_epochs} --epochs {epochs} --threads 1",
    "adgm_1mc_100_labels": "python experiments/adgm_mnist_100.py --root ../shared/data --no-download --mc 1 --epochs {epochs} --eval-particles {eval_particles} --threads 1",
    "adgm_10mc_100_labels": "python experiments/adgm_mnist_100.py --root ../shared/data --no-download --mc 10 --epochs {epochs} --eval-particles {eval_particles} --threads 1",
    "sdgm_1mc_100_labels": "python experiments/adgm_mnist_100.py --root ../shared/data --no-download --model sdgm --mc 1 --epochs {epochs} --eval-particles {eval_particles} --threads 1",
}


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _units(counts) -> str:
    return "n/a" if not counts else ", ".join(f"{site}: {count}" for site, count in counts.items())


def _load(results_dir: Path) -> list[tuple[str, dict]]:
    return [(path.name, json.loads(path.read_text())) for path in sorted(results_dir.glob("*.json"))]


#: The metrics a training experiment may report: key in ``paper`` (the target) -> key in
#: ``test`` (what we measured), label and format.
METRICS = {
    "test_error": ("error", "test error", "percent"),
    "p_error": ("p_error", "p(y|x) error", "percent"),
    "log_likelihood": ("log_likelihood", "log p(x)", "nats"),
    "cluster_acc": ("cluster_acc", "clustering ACC", "percent"),
    "nmi": ("nmi", "NMI", "plain"),
    "mse": ("mse", "MSE", "plain"),
}


def _format(value, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "percent":
        return _percent(value)
    if kind == "nats":
        return f"{value:.2f} nats"
    return f"{value:.4g}"


def _metric_cells(test: dict, paper: dict) -> tuple[str, str]:
    """``(measured, paper)`` cells: ``label value`` for every metric measured, and for
    every metric the paper reports."""
    measured, targets = [], []
    for paper_key, (test_key, label, kind) in METRICS.items():
        label = label.replace("|", "\\|")  # a table cell
        if test.get(test_key) is not None:
            value = f"{label} {_format(test[test_key], kind)}"
            if paper_key == "log_likelihood" and test.get("iwae_k"):
                images = test.get("iwae_images") or test.get("num_examples")
                value += f" (IWAE-{test['iwae_k']}, {images} test images)"
            measured.append(value)
        if paper.get(paper_key) is not None:
            target = _format(paper[paper_key], kind)
            if paper_key == "test_error" and paper.get("std") is not None:
                target += f" ± {_percent(paper['std'])}"
            targets.append(f"{label} {target}")
    return "; ".join(measured) or "n/a", "; ".join(targets) or "n/a"


#: The baselines' methods (keys of ``baselines.py``'s JSON) and their names in the tables.
BASELINE_METHODS = {
    "label_spreading": "LabelSpreading (k-NN, 10 neighbours)",
    "self_training": "self-training (logistic regression)",
    "labelled_only": "logistic regression, labelled images only",
}


def _validation_size(result: dict, model: str) -> int:
    """The validation size a run trained with: its config's, its command's ``--validation``,
    else its recipe's default for the dataset (the GMVAE's 12,000 on MNIST), else
    :class:`~pyrodgm.training.TrainConfig`'s (10,000; 300 for the digits)."""
    from pyrodgm.training import TrainConfig
    from pyrodgm.zoo import RECIPES, defaults

    config = result.get("config") or {}
    validation = config.get("validation")
    if validation is None and not config:
        match = re.search(r"--validation[ =](\d+)", result.get("command") or "")
        validation = int(match.group(1)) if match else None
        if validation is None and model in RECIPES:
            validation = defaults(model, result["dataset"]).get("validation")
    return TrainConfig(dataset=result["dataset"], validation=validation).num_validation


def _split_of(result: dict) -> tuple[str, int | None, int, int]:
    """``(dataset, labels, validation size, seed)``: what decides a training run's split
    (labels from its config, else its experiment's name)."""
    config = result.get("config") or {}
    labels = config.get("labels")
    if labels is None:
        match = re.search(r"(?:^|_)(\d+)_labels", result["experiment"])
        labels = int(match.group(1)) if match else None
    model = config.get("model") or result.get("model") or result["experiment"].split("_")[0]
    return result["dataset"], labels, _validation_size(result, model), result["seed"]


def baseline_results(results: list[tuple[str, dict]]) -> list[dict]:
    """The results of ``baselines.py``, by dataset, labels, validation size, grey pixels first."""
    found = [result for _, result in results if str(result.get("experiment", "")).startswith("baselines_") and "methods" in result]
    return sorted(found, key=lambda r: (r["dataset"], r["labels"], r["validation"], r["pixels"] != "grey"))


def _baseline_cell(result: dict, baselines: list[dict]) -> str:
    """The grey-level baselines' test errors on the split of ``result`` (same dataset,
    labels, validation size and seed), ``LabelSpreading / self-training / labelled only``."""
    baseline = _grey_baseline(result, baselines)
    if baseline is None:
        return "n/a"
    return " / ".join(_percent(baseline["methods"][name]["test_error"][str(result["seed"])]) for name in BASELINE_METHODS)


def _grey_baseline(result: dict, baselines: list[dict]) -> dict | None:
    """The grey-level ``baselines.py`` result of the split of ``result`` (same dataset,
    labels, validation size) that ran its seed, or ``None``."""
    dataset, labels, validation, seed = _split_of(result)
    for baseline in baselines:
        if (baseline["dataset"], baseline["labels"], baseline["validation"], baseline["pixels"]) == (dataset, labels, validation, "grey") \
                and seed in baseline["seeds"]:
            return baseline
    return None


def _run_baseline_cell(result: dict, baselines: list[dict]) -> str:
    """The baseline computed with the run itself (``train(baseline=True)``: LabelSpreading
    on its split and pixels), else the recorded baselines of its split."""
    own = result.get("baseline")
    if own:
        return f"LabelSpreading {_percent(own['test_error'])} ({own['pixels']} pixels, with the run)"
    return _baseline_cell(result, baselines)


def authors_curves() -> dict[str, dict]:
    """Experiment name prefix -> the authors' published curve of test error by epoch."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from adgm_mnist_100 import AUTHORS_CURVES
    finally:
        sys.path.pop(0)
    return {f"{model}_{mc}mc_100_labels": curve for (model, mc), curve in AUTHORS_CURVES.items()} | {
        "m2_100_labels": AUTHORS_CURVES[("m2", 1)],
    }


def curve_at(curve: dict, epoch: int) -> str:
    """The authors' curve at ``epoch``, linearly between its points; ``n/a`` outside them."""
    points = sorted(curve["points"])
    for (e0, v0), (e1, v1) in zip(points, points[1:]):
        if e0 <= epoch <= e1:
            return f"{_percent(v0 + (v1 - v0) * (epoch - e0) / (e1 - e0))} (epoch {epoch})"
    if epoch == points[-1][0]:
        return f"{_percent(points[-1][1])} (epoch {epoch})"
    return f"n/a (read from epoch {points[0][0]} to {points[-1][0]})"


def _curve_for(result: dict, curves: dict[str, dict]) -> dict | None:
    """The authors' curve of the run's experiment (its name or a prefix of it), if any."""
    name = result["experiment"]
    return curves.get(name) or next((c for prefix, c in curves.items() if name.startswith(prefix + "_")), None)


def _curve_cell(result: dict, curves: dict[str, dict]) -> str:
    curve, epoch = _curve_for(result, curves), (result.get("test") or {}).get("epoch")
    return "n/a" if curve is None or epoch is None else curve_at(curve, epoch)


def _published_reference(result: dict, curves: dict[str, dict]) -> str:
    """Where the authors' code (at the run's epoch, or where its curve begins) and the paper got to."""
    cell, paper = _curve_cell(result, curves), _metric_cells(result["test"], result["paper"])[1]
    if not cell.startswith("n/a"):
        return f"the authors' code was at {cell}"
    curve, parts = _curve_for(result, curves), []
    if curve is not None and result["test"].get("epoch", 0) < min(curve["points"])[0]:
        first_epoch, first_error = min(curve["points"])
        parts.append(f"the authors' code's curve begins later: {_percent(first_error)} at epoch {first_epoch}")
    if paper != "n/a":
        parts.append(f"the paper's {paper} comes after its full schedule")
    return "; ".join(parts) or f"no published number to compare ({result['paper'].get('source', 'no source')})"


def training_rows(results: list[tuple[str, dict]]) -> list[str]:
    baselines = baseline_results(results)
    curves = authors_curves()
    lines = [
        "| experiment | measured (checkpoint chosen on validation; without a validation set, the last epoch) "
        "| baselines on the same split: LabelSpreading / self-training / labelled only | authors' code, test error at that epoch "
        "| paper | epochs run | train time | hardware | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        if "epochs_completed" not in result or "experiment" not in result or "active_units" in result:
            continue
        if "table_4_mse" in result["paper"]:  # imputation: a table of its own
            continue
        name = result["experiment"]
        eval_particles = result.get("eval_particles") or (result.get("config") or {}).get("eval_particles")
        command = result.get("command") or COMMANDS.get(name, "").format(
            epochs=result["epochs_completed"], m1_epochs=result.get("m1_epochs_completed"), eval_particles=eval_particles,
        )
        epochs = f"{result['epochs_completed']}"
        if result.get("m1_epochs_completed"):
            epochs += f" (+{result['m1_epochs_completed']} M1)"
        seconds = result["train_seconds"] + (result.get("m1_train_seconds") or 0)
        test = result.get("test") or {}
        measured, target = _metric_cells(test, result["paper"])
        lines.append(
            f"| {name} ({result['dataset']}, seed {result['seed']}) | {measured} (epoch {test.get('epoch')}) "
            f"| {_run_baseline_cell(result, baselines)} | {_curve_cell(result, curves)} | {target} "
            f"| {epochs} | {seconds / 60:.0f} min | {result['device']} | {result['date']} | `{command}` |"
        )
    return lines


def _label_spreading_error(result: dict, baselines: list[dict]) -> float | None:
    """LabelSpreading's test error on a run's split: the one computed with the run, else
    the recorded grey-level one of its split and seed."""
    own = result.get("baseline")
    if own:
        return own["test_error"]
    baseline = _grey_baseline(result, baselines)
    return None if baseline is None else baseline["methods"]["label_spreading"]["test_error"][str(result["seed"])]


def _trend(history: list[dict]) -> str:
    """How the run's error moved by epoch (its test curve when tracked, else validation's)."""
    key = "test_error" if any(h.get("test_error") is not None for h in history) else "valid_error"
    points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    if len(points) < 2:
        return "no per-epoch record of its error"
    which = "test" if key == "test_error" else "validation"
    (first, start), (last, end) = points[0], points[-1]
    best_epoch, best = min(points, key=lambda point: point[1])
    back_epoch, back = points[max(0, len(points) - 6)]
    moved = "fell" if end < back else "did not fall"
    lowest = "its lowest" if best_epoch == last else f"after its lowest, {_percent(best)} at epoch {best_epoch}"
    return (f"{which} error {_percent(start)} at epoch {first}, {_percent(end)} at epoch {last} ({lowest}); it {moved} over "
            f"the last {_epochs(last - back_epoch)} ({_percent(back)} at epoch {back_epoch})")


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def above_baseline_notes(results: list[tuple[str, dict]]) -> list[str]:
    """A note for every training run whose test error is above LabelSpreading's on its
    split: the budget it had, how its error moved by epoch, and where the authors' code
    (when it published a curve) or the paper got to."""
    baselines, curves = baseline_results(results), authors_curves()
    notes = []
    for _, result in results:
        test = result.get("test") or {}
        if "epochs_completed" not in result or test.get("error") is None or "table_4_mse" in result.get("paper", {}):
            continue
        spreading = _label_spreading_error(result, baselines)
        if spreading is None or test["error"] <= spreading:
            continue
        name, history = result["experiment"], result.get("history") or []
        trend = _trend(history) if history else "no per-epoch record (recorded before the scripts kept the history)"
        reference = _published_reference(result, curves)
        notes.append(
            f"- {name} ({result['dataset']}, seed {result['seed']}): {_percent(test['error'])} against LabelSpreading's "
            f"{_percent(spreading)} after {_epochs(result['epochs_completed'])} ({result['train_seconds'] / 60:.0f} CPU-minutes); "
            f"{trend}; {reference}."
        )
    if not notes:
        return []
    return ["Runs above LabelSpreading, and why: the CPU budget each had, and its curve.", "", *notes]


def seed_rows(results: list[tuple[str, dict]]) -> list[str]:
    """One row per ``seeds.py`` result: the test error by seed and its mean ± sd, beside
    LabelSpreading's on each seed's split."""
    lines = [
        "| command | dataset | test error by seed | mean ± sd | LabelSpreading by seed (same split and pixels) | mean ± sd | train time by seed | hardware | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        if not str(result.get("experiment", "")).startswith("seeds_"):
            continue
        seeds = result["seeds"]

        def by_seed(key: str) -> str:
            return ", ".join(f"{seed}: {_percent(record[key])}" for seed, record in seeds.items())

        def mean_sd(summary: dict) -> str:
            return _percent(summary["mean"]) + ("" if summary["sd"] is None else f" ± {_percent(summary['sd'])}")

        times = ", ".join(f"{record['train_seconds']:.0f} s" for record in seeds.values())
        lines.append(
            f"| `{result['train_command']}` | {result['dataset']} | {by_seed('test_error')} | {mean_sd(result['test_error'])} "
            f"| {by_seed('baseline_test_error')} | {mean_sd(result['baseline_test_error'])} | {times} | {result['device']} | {result['date']} |"
        )
    return lines


def baseline_rows(results: list[tuple[str, dict]]) -> list[str]:
    """One row per method of every ``baselines.py`` result: test error per seed, mean ± sd,
    seconds per seed (fit and test prediction, the PCA apart)."""
    lines = [
        "| dataset, labels (validation) | pixels | method | test error by seed | mean ± sd | seconds by seed | hardware | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in baseline_results(results):
        for name, label in BASELINE_METHODS.items():
            method = result["methods"][name]
            errors = ", ".join(f"{seed}: {_percent(error)}" for seed, error in method["test_error"].items())
            spread = "" if method["sd"] is None else f" ± {_percent(method['sd'])}"
            seconds = ", ".join(f"{value:.1f}" for value in method["seconds"].values())
            lines.append(
                f"| {result['dataset']}, {result['labels']} ({result['validation']}) | {result['pixels']} | {label} | {errors} "
                f"| {_percent(method['mean'])}{spread} | {seconds} | {result['device']} | {result['date']} | `{result['command']}` |"
            )
    return lines


def _estimator_settings(settings: dict, model: str) -> str:
    """The estimator's networks and schedule, as the benchmark ran them."""
    hidden = ",".join(str(h) for h in settings["hidden"])
    parts = [f"hidden {hidden}", f"z {settings['z_dim']}"]
    if model in ("adgm", "sdgm", "adgm-deterministic"):
        parts.append(f"a {settings['a_dim']}")
    if model not in ("m2", "adgm-deterministic"):
        parts.append(f"{settings['eval_particles']} classifier samples")
    parts += [f"{settings['epochs']} epochs", f"lr {settings['lr']:g}", f"likelihood {settings.get('likelihood', 'auto')}"]
    if settings.get("alpha_factor") is not None:
        parts.append(f"alpha {settings['alpha_factor']:g} N")
    return ", ".join(parts)


def estimator_rows(results: list[tuple[str, dict]]) -> list[str]:
    """One row per method of every ``estimator_benchmark.py`` result: the task, test error
    per seed, mean ± sd, mean fit seconds (the estimator's whole ``fit``; the image tasks'
    peers as ``baselines.py`` times them, prediction included, the PCA apart)."""
    lines = [
        "| task | method | test error by seed | mean ± sd | fit seconds (mean) | settings | hardware | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    found = [result for _, result in results if str(result.get("experiment", "")).startswith("estimator_benchmark_")]
    shown = set()  # a peer's row appears once per task and seeds, not again beside every run of the estimator
    for result in sorted(found, key=lambda r: (r["task"], r["experiment"])):
        pca = "pca_seconds" in next(iter(result["sizes"].values()))
        for name, method in result["methods"].items():
            if name.startswith("pyrodgm_"):
                model = name[len("pyrodgm_"):]
                label, settings = f"pyrodgm.SemiSupervisedClassifier('{model}')", _estimator_settings(result["estimator_settings"], model)
            else:
                key = (result["task"], name, tuple(method["test_error"].items()))
                if key in shown:
                    continue
                shown.add(key)
                label = BASELINE_METHODS[name] if pca else BASELINE_METHODS[name].replace("images", "rows")
                settings = "50 PCA components, as baselines.py" if pca else "standardised features (StandardScaler)"
            errors = ", ".join(f"{seed}: {_percent(error)}" for seed, error in method["test_error"].items())
            spread = "" if method["sd"] is None else f" ± {_percent(method['sd'])}"
            seconds = list(method["fit_seconds"].values())
            lines.append(
                f"| {result['task']} | {label} | {errors} | {_percent(method['mean'])}{spread} | {sum(seconds) / len(seconds):.2f} "
                f"| {settings} | {result['device']} | {result['date']} | `{result['command']}` |"
            )
    return lines


def iwae_rows(results: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| model | test images | k | IWAE log p(x) | PSIS k-hat mean (share > 0.7) | ESS mean | test error | active units | time | hardware | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        if "iwae_log_likelihood" not in result:
            continue
        khat = "n/a" if result["pareto_k_mean"] is None else f"{result['pareto_k_mean']:.2f}"
        lines.append(
            f"| {result['model']} (epoch {result['epoch']}) | {result['num_examples']} | {result['iwae_k']} "
            f"| {result['iwae_log_likelihood']:.2f} nats | {khat} ({100 * result['pareto_k_frac_above_0.7']:.0f}%) "
            f"| {result['ess_mean']:.0f} | {_percent(result.get('test_error'))} | {_units(result.get('active_units'))} "
            f"| {result['iwae_seconds'] / 60:.1f} min | {result['device']} | {result['date']} | `{result['command']}` |"
        )
    return lines


def active_unit_rows(results: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| model (checkpoint epoch) | test images | active by KL > threshold | active by Cov_x E_q[u] > threshold | total KL | paper | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        counts = result.get("active_units")
        if not isinstance(counts, dict) or "experiment" not in result:
            continue
        by_kl = ", ".join(f"{site}: {c['active_by_kl']}/{c['units']}" for site, c in counts.items())
        by_var = ", ".join(f"{site}: {c['active_by_variance']}/{c['units']}" for site, c in counts.items())
        total = ", ".join(f"{site}: {c['kl_total']:.3g} nats" for site, c in counts.items())
        paper = result["paper"]
        command = (
            f"python experiments/adgm_active_units.py --checkpoint {result['checkpoint']} --dataset {result['dataset']} "
            f"--root ../shared/data --no-download --limit {result['num_examples']} --threads 1"
        )
        lines.append(
            f"| {result['model']} ({result['checkpoint_epoch']}) | {result['num_examples']} | {by_kl} | {by_var} | {total} "
            f"| a: {paper.get('active_a')}; z: {paper.get('active_z')} | {result['date']} | `{command}` |"
        )
    return lines


def _iwae_rate(timing: dict) -> str:
    """``images/s (k)`` of an IWAE timing."""
    return f"{timing['images_per_second']:.2f} ({timing['iwae_k']})"


def speed_rows(results: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| model | reference s/step | pyrodgm s/step | ratio, validation off (quartiles of the per-round ratio) | ratio, validation on | ratio, step in a CUDA graph | IWAE images/s (k) | hardware | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        if "models" not in result or "command" not in result:
            continue
        for name, row in result["models"].items():
            off, on, iwae = row["step_validation_off"], row["step_validation_on"], row["iwae"]
            spread = off.get("paired_ratio_quartiles")
            ratio = f"{off['ratio']:.3f}" + (f" ({spread[0]:.3f}-{spread[2]:.3f})" if spread else "")
            hardware = result["device"] + (f"; malloc: {result['malloc']}" if "malloc" in result else "")
            graphed = row.get("step_cuda_graph")
            if graphed is None:
                graphed = "n/a"
            elif "error" in graphed:
                graphed = "capture failed (the JSON has the error)"
            else:
                graphed = f"{graphed['ratio']:.3f} ({graphed['pyrodgm_s']:.4f} s/step)"
            rate = "n/a (skipped: the JSON says why)" if "skipped" in iwae else _iwae_rate(iwae)
            lines.append(
                f"| {name} | {off['reference_s']:.4f} | {off['pyrodgm_s']:.4f} | {ratio} | {on['ratio']:.3f} | {graphed} "
                f"| {rate} | {hardware} | {result['date']} | `{result['command']}` |"
            )
    return lines


#: Names of Li et al.'s Tables 4-5 columns for the recipes that train those models.
PAPER_MODEL_NAMES = {"mmva": "MMVA", "conv-mmva": "Conv-MMVA", "va-pegasos": "VA", "conv-va-pegasos": "Conv-VA"}


def imputation_rows(results: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| model (checkpoint epoch) | mask | MSE on missing pixels | paper MSE (Table 4) | error on imputed images | paper error (Table 5) | test images, iterations | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        if "table_4_mse" not in result.get("paper", {}):
            continue
        test, paper = result["test"], result["paper"]
        column = PAPER_MODEL_NAMES.get(result["model"])
        for mask, mse in test["mse"].items():
            paper_mse = (paper["table_4_mse"].get(column) or {}).get(mask)
            paper_error = (paper["table_5_error"].get(column) or {}).get(mask)
            error = (test.get("classification_error") or {}).get(mask)
            lines.append(
                f"| {result['model']} ({test['checkpoint_epoch']}) | {mask} | {mse:.4f} | {_format(paper_mse, 'plain')} "
                f"| {_percent(error)} | {_percent(paper_error)} | {test['num_examples']}, {test['iterations']} "
                f"| {result['date']} | `{result['command']}` |"
            )
    return lines


def lightning_rows(results: list[tuple[str, dict]]) -> list[str]:
    """One row per engine of a ``lightning_throughput.py`` run: images per second of the
    training step (median step time; all processes' rows of a step together)."""
    lines = [
        "| model, data | engine | processes | precision | images per step | median s/step | images/s | hardware | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        if result.get("experiment") != "lightning_throughput":
            continue
        for row in result["rows"]:
            lines.append(
                f"| {result['model']}, {result['dataset']} | {row['engine']} | {row['processes']} | {row['precision']} "
                f"| {row['images_per_step']} | {row['median_step_seconds']:.4f} | {row['images_per_second']:.0f} "
                f"| {result['device']} | {result['date']} | `{result['command']}` |"
            )
    return lines


def gpu_kit_rows(results: list[tuple[str, dict]]) -> list[str]:
    """One row per GPU kit run (``gpu_kit.py collect`` saves its ``kit.json``): the machine,
    each stage's outcome and time, the IWAE rate measured."""
    lines = [
        "| date | GPU | torch, CUDA | stages (status, seconds) | IWAE images/s (k) | command |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        if "stages" not in result or "budget_seconds" not in result:
            continue
        environment = result.get("environment") or {}
        gpu = (environment.get("gpu") or {}).get("name", result["device"])
        stages = ", ".join(f"{s['stage']} {s['status']}" + (f" {s['seconds']:.0f}" if "seconds" in s else "") for s in result["stages"])
        probe = result.get("iwae_probe")
        rate = "n/a" if not probe else _iwae_rate(probe)
        lines.append(
            f"| {result['date']} | {gpu} | {environment.get('torch', 'n/a')}, {environment.get('torch_cuda', 'n/a')} "
            f"| {stages} | {rate} | `{result['command']}` |"
        )
    return lines


def tables(results_dir: Path) -> list[str]:
    """The tables, each under its heading; a table with no rows is left out."""
    results = _load(results_dir)
    lines: list[str] = []
    for heading, table in (
        ("Training runs (MNIST)", training_rows(results)),
        ("Training runs above the baseline (notes)", above_baseline_notes(results)),
        ("One command over seeds (experiments/seeds.py)", seed_rows(results)),
        ("Classical baselines on the runs' splits (scikit-learn, experiments/baselines.py)", baseline_rows(results)),
        ("Your own data: SemiSupervisedClassifier against scikit-learn's semi-supervised classifiers (experiments/estimator_benchmark.py)",
         estimator_rows(results)),
        ("Importance-weighted log-likelihood", iwae_rows(results)),
        ("Active stochastic units (threshold 0.01)", active_unit_rows(results)),
        ("Missing-data imputation (Li et al., Tables 4-5)", imputation_rows(results)),
        ("Speed: pyrodgm's SVI step against hand-written PyTorch of the same loss", speed_rows(results)),
        ("Data-parallel step throughput (experiments/lightning_throughput.py)", lightning_rows(results)),
        ("GPU kit runs (experiments/gpu_kit.py)", gpu_kit_rows(results)),
    ):
        if len(table) > 2:
            lines += ["", f"### {heading}", "", *table]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--write", action="store_true", help="replace the tables between the markers in README.md")
    args = parser.parse_args(argv)
    block = "\n".join(tables(Path(args.results)))
    if not args.write:
        print(block)
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + block + "\n" + text[end:])


if __name__ == "__main__":
    main()
