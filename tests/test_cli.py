"""Tests of the ``pyrodgm`` command (pyrodgm.cli.main, called in-process on scikit-learn's
digits): train, evaluate, plot, models, error exits and the console-script entry point."""

import contextlib
import importlib.metadata
import io
import json
import math
import re
import shutil

import pyro
import pytest
import torch
from PIL import Image

from pyrodgm.cli import main

pytestmark = pytest.mark.usefixtures("clean_param_store", "pyro_validation", "single_thread")

SMALL = [
    "--dataset", "digits",
    "--validation", "300",
    "--batch-size", "100",
    "--labelled-per-batch", "50",
    "--hidden", "32",
    "--z-dim", "4",
    "--eval-particles", "2",
    "--quiet",
]  # fmt: skip


def run_main(argv):
    """``main(argv)`` with one torch thread, capturing stdout and stderr (for module-scoped
    fixtures, which cannot use capsys)."""
    from pyro.infer.util import is_validation_enabled

    stdout, stderr = io.StringIO(), io.StringIO()
    threads, validation = torch.get_num_threads(), is_validation_enabled()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
        pyro.enable_validation(validation)
        pyro.clear_param_store()
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``pyrodgm train m2`` for one epoch; returns (out folder, exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("cli") / "m2"
    code, stdout, stderr = run_main(["train", "m2", "--labels", "100", "--epochs", "1", "--out", str(out), *SMALL])
    return out, code, stdout, stderr


def test_train(trained):
    out, code, stdout, stderr = trained
    assert code == 0, stderr
    assert {"checkpoint.pt", "best.pt", "metrics.json", "learning_curve.png"} <= {p.name for p in out.iterdir()}
    assert (out / "samples" / "epoch_0001.png").is_file()
    summary = json.loads(stdout)
    assert summary["out"] == str(out)
    assert summary["best_validation"]["epoch"] == 1
    assert 0 <= summary["test"]["error"] <= 1 and summary["test"]["elbo"] < 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["test"] == metrics["test"]
    # scikit-learn's LabelSpreading on the same split, printed beside the test error
    from pyrodgm.baselines import run_baseline
    from pyrodgm.training import TrainConfig

    assert summary["baseline"] == metrics["baseline"]
    expected = run_baseline(TrainConfig.from_dict(metrics["config"]))
    assert summary["baseline"]["test_error"] == expected["test_error"] and summary["baseline"]["pixels"] == "binarised"
    # the command line reached the config; the recipe filled in the rest
    config = metrics["config"]
    params = config["params"]
    assert (config["model"], config["labels"], config["epochs"], params["hidden"], params["z_dim"]) == ("m2", 100, 1, [32], 4)
    assert config["batch_size"] == 100 and config["labelled_per_batch"] == 50 and config["validation"] == 300
    assert params["alpha_factor"] == 0.1 and config["binarize"] is True and params["likelihood"] == "bernoulli"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["model"]["decoder.hidden_layers.0.0.weight"].shape == (32, 4 + 10)


def test_evaluate(trained, tmp_path, capsys):
    out, code, _, _ = trained
    assert code == 0
    report_path = tmp_path / "reports" / "f.json"
    argv = ["evaluate", str(out / "best.pt"), "--iwae-k", "20", "--limit", "30", "--output", str(report_path), "--quiet"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(report_path.read_text())
    assert report == printed
    assert report["model"] == "m2" and report["dataset"] == "digits" and report["epoch"] == 1
    assert report["iwae_k"] == 20 and report["num_examples"] == 30
    assert math.isfinite(report["iwae_log_likelihood"]) and report["iwae_log_likelihood"] < 0
    # with 20 particles ArviZ's PSIS tail has only 4 weights, too few for a Pareto fit:
    # k-hat is inf, written as null so that the JSON stays standard
    assert report["pareto_k_mean"] is None and report["pareto_k_frac_above_0.7"] == 1.0
    assert 1 <= report["ess_min"] <= report["ess_mean"] <= 20
    assert 0 <= report["test_error"] <= 1
    assert set(report["active_units"]) == {"z"} and 0 <= report["active_units"]["z"] <= 4  # z_dim 4 in these runs
    assert report["iwae_seconds"] > 0 and "CPU" in report["device"]


def test_evaluate_one_image_reports_no_active_units(trained, capsys):
    """``--limit 1`` used to stop with an internal error (the variance of one posterior
    mean; outside the tests a NaN counted as 0 active units)."""
    out, code, _, _ = trained
    assert main(["evaluate", str(out / "best.pt"), "--iwae-k", "5", "--limit", "1", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_examples"] == 1 and report["active_units"].startswith("n/a")


def test_evaluate_pareto_k_with_enough_particles(trained, tmp_path, capsys):
    out, code, _, _ = trained
    assert code == 0
    assert main(["evaluate", str(out / "best.pt"), "--iwae-k", "60", "--limit", "5", "--chunk-size", "25", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["iwae_k"] == 60 and report["num_examples"] == 5
    assert math.isfinite(report["pareto_k_mean"]) and math.isfinite(report["pareto_k_max"])
    assert math.isfinite(report["iwae_log_likelihood"]) and report["iwae_log_likelihood"] < 0
    assert 1 <= report["ess_min"] <= report["ess_mean"] <= 60


def reject_constant(name):
    raise ValueError(f"not standard JSON: {name}")


def test_evaluate_writes_standard_json(trained, tmp_path, capsys):
    out, code, _, _ = trained
    assert code == 0
    path = tmp_path / "f.json"
    assert main(["evaluate", str(out / "best.pt"), "--iwae-k", "20", "--limit", "5", "--output", str(path), "--quiet"]) == 0
    json.loads(path.read_text(), parse_constant=reject_constant)
    json.loads(capsys.readouterr().out, parse_constant=reject_constant)


def test_plot(trained, tmp_path, capsys):
    from pyrodgm.plots import MIN_IMAGE_PIXELS

    out, code, _, _ = trained
    assert code == 0
    assert main(["plot", str(out / "best.pt"), "--steps", "5", "--images", "200", "--out", str(tmp_path / "plots")]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = ["samples.png", *(f"manifold_class{k}.png" for k in range(10))]
    assert report["written"] == [str(tmp_path / "plots" / name) for name in expected]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(expected)
    # z has 4 units in these runs: the manifold sweeps its posterior means' two principal directions
    assert re.fullmatch(r"the two principal directions of z's posterior means over 200 training images "
                        r"\(\d+\.\d% and \d+\.\d% of their variance\), 5%\.\.95% normal quantiles of their spread",
                        report["manifold"]), report["manifold"]
    # 8x8 digits were drawn at 8 pixels (a 91 x 91 sample grid): now each is at least MIN_IMAGE_PIXELS
    with Image.open(tmp_path / "plots" / "samples.png") as image:
        assert image.size[0] >= 10 * MIN_IMAGE_PIXELS and image.size[1] >= 10 * MIN_IMAGE_PIXELS
    with Image.open(tmp_path / "plots" / "manifold_class3.png") as image:
        assert image.size[0] >= 5 * MIN_IMAGE_PIXELS and image.size[1] >= 5 * MIN_IMAGE_PIXELS


def test_learning_curve_on_resume_with_the_tracked_test_error(trained, tmp_path):
    """A run draws its learning curve when it ends, and a resumed run redraws it with the
    epochs it adds (here with the test error tracked)."""
    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy)
    curve = copy / "learning_curve.png"
    before = curve.stat().st_mtime_ns
    code, _, stderr = run_main(["train", "m2", "--labels", "100", "--epochs", "2", "--out", str(copy), "--resume", "--track-test", *SMALL])
    assert code == 0, stderr
    assert curve.stat().st_mtime_ns > before
    with Image.open(curve) as image:
        assert image.format == "PNG" and image.size[0] > 500
    history = json.loads((copy / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2] and "test_error" in history[1]


def test_models_prints_a_readable_table(capsys):
    from pyrodgm.zoo import RECIPES

    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "Maaløe et al. 2016" in text and "\\u00f8" not in text
    lines = text.splitlines()
    assert lines[0].split() == ["model", "paper", "what", "it", "is"]
    names = [line.split()[0] for line in lines[1:] if line and not line[0].isspace()]
    assert names == list(RECIPES)
    m2 = next(line for line in lines if line.startswith("m2 "))
    assert "Kingma et al. 2014" in m2 and "generative semi-supervised model M2:" in m2


def test_models_json(capsys):
    from pyrodgm.zoo import RECIPES

    assert main(["models", "--json"]) == 0
    text = capsys.readouterr().out
    assert "Maaløe" in text and "\\u00f8" not in text  # UTF-8, not escaped
    models = json.loads(text)
    assert models == {name: r.description for name, r in RECIPES.items()} and {"m1", "m2", "m1m2"} <= set(models)


def test_every_recipe_names_its_paper():
    from pyrodgm.cli import split_description
    from pyrodgm.zoo import RECIPES

    for name, r in RECIPES.items():
        paper, what = split_description(r.description)
        assert paper and what and "(" + paper + ")" not in what, name
    assert split_description("ladder VAE (Sønderby et al. 2016): top-down") == ("Sønderby et al. 2016", "ladder VAE: top-down")


def test_evaluate_defaults_to_a_quick_k_and_estimates_its_cost_first(trained, capsys):
    out, code, _, _ = trained
    assert code == 0
    assert main(["evaluate", str(out / "best.pt"), "--limit", "5"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["iwae_k"] == 100 and report["num_examples"] == 5
    assert report["iwae_setting"] == "k = 100, the quick default: a looser bound than the papers' k = 5000 (--paper)"
    first = captured.err.strip().splitlines()[0]  # before the progress bar
    assert re.fullmatch(r"IWAE-100 on 5 images: about \d+(\.\d)? s \(k = 100, the quick default: .*\(--paper\)\)", first), first
    assert report["iwae_seconds_estimated"] > 0


def test_evaluate_paper_is_iwae_5000(trained, capsys):
    out, code, _, _ = trained
    assert code == 0
    assert main(["evaluate", str(out / "best.pt"), "--paper", "--limit", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["iwae_k"] == 5000 and report["iwae_setting"] == "k = 5000, as the papers report"
    assert captured.err == ""  # --quiet: no estimate, no progress
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(out / "best.pt"), "--paper", "--iwae-k", "20"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "m2", "--labels", "7"], r"num_labels=7 is not divisible by num_classes=10"),
        (["train", "m2", "--labels", "0"], r"'m2' is semi-supervised: --labels 0 gives an empty labelled set"),
        (["train", "m2", "--labels", "100000"], r"num_labels=100000 is more labels than data"),
        (["train", "m2", "--epochs", "0"], r"epochs must be at least 1"),
        (["train", "m1m2", "--labels", "100"], r"needs --m1-checkpoint \(or --end-to-end\)"),
        (["train", "m2", "--likelihood", "bernoulli", "--no-binarize"], r"Bernoulli likelihood needs binary pixels"),
        (["evaluate", "missing.pt"], r"no checkpoint at missing\.pt"),
        (["plot", "missing.pt"], r"no checkpoint at missing\.pt"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        epochs = [] if "--epochs" in argv else ["--epochs", "1"]
        argv = [*argv, *epochs, "--out", str(tmp_path / "run"), *SMALL]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"pyrodgm {argv[0]}: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()  # a failed start leaves no folder behind


def _truncated(source, target):
    target.write_bytes(source.read_bytes()[:1000])


def _zeroed(source, target):
    data = bytearray(source.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # 4 KB of a tensor's bytes
    target.write_bytes(bytes(data))


#: (how to prepare ``tmp_path``, argv with {run} for the trained run's folder and {tmp} for tmp_path, message)
LOST_WORK_AND_BAD_FILES = [
    (None, ["train", "m2", "--out", "{tmp}/new", "--dataset", "mnist", "--root", "{tmp}/nothing", "--no-download"],
     r"mnist is not in .*nothing/MNIST/raw, or not whole .*drop --no-download .*--root"),
    (lambda run, tmp: (tmp / "file").write_text("x"), ["train", "m2", "--out", "{tmp}/file"], r"is a file, not a folder"),
    (None, ["train", "m2", "--out", "{run}"], r"holds a run already \(checkpoint\.pt, best\.pt, metrics\.json, samples, learning_curve\.png\): --resume continues it, --overwrite replaces it"),
    (None, ["train", "m2", "--out", "{tmp}/new", "--resume"], r"nothing to resume: .*new holds no checkpoint\.pt"),
    (None, ["train", "m2", "--out", "{run}", "--resume", "--overwrite"], r"give one of them"),
    (lambda run, tmp: _truncated(run / "best.pt", tmp / "t.pt"), ["evaluate", "{tmp}/t.pt"], r"t\.pt is not a pyrodgm checkpoint: it is not a complete archive"),
    (lambda run, tmp: (tmp / "e.pt").write_bytes(b""), ["plot", "{tmp}/e.pt"], r"e\.pt is empty \(0 bytes\)"),
    (lambda run, tmp: (tmp / "x.pt").write_text("hello"), ["evaluate", "{tmp}/x.pt"], r"x\.pt is not a pyrodgm checkpoint"),
    (lambda run, tmp: torch.save({"a": re.compile("x")}, tmp / "p.pt"), ["plot", "{tmp}/p.pt"], r"holds Python objects other than tensors"),
    (lambda run, tmp: _zeroed(run / "best.pt", tmp / "z.pt"), ["evaluate", "{tmp}/z.pt"], r"z\.pt is corrupted: its record '.*' no longer matches the checksum"),
    (lambda run, tmp: (shutil.copytree(run, tmp / "copy"), _zeroed(run / "checkpoint.pt", tmp / "copy" / "checkpoint.pt")),
     ["train", "m2", "--out", "{tmp}/copy", "--resume", "--epochs", "2"], r"checkpoint\.pt is corrupted"),
]


@pytest.mark.parametrize("prepare, argv, message", LOST_WORK_AND_BAD_FILES)
def test_lost_work_and_bad_files_exit_2_with_one_line(trained, tmp_path, capsys, prepare, argv, message):
    run = trained[0]
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    if prepare is not None:
        prepare(run, tmp_path)
    argv = [part.format(run=run, tmp=tmp_path) for part in argv]
    if argv[0] == "train" and "--epochs" not in argv:
        argv += ["--epochs", "1"]
    if argv[0] == "train":  # the case's own options after SMALL's, so that they win
        argv = [*argv[:2], *SMALL, *argv[2:]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "new").exists()
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # the earlier run untouched


def test_overwrite_replaces_a_run_and_its_stale_files(trained, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy)
    (copy / "samples" / "epoch_0099.png").write_bytes(b"stale")
    (copy / "notes.txt").write_text("the user's own file")
    assert main(["train", "m2", "--labels", "100", "--epochs", "1", "--out", str(copy), "--overwrite", *SMALL]) == 0
    assert sorted(p.name for p in (copy / "samples").iterdir()) == ["epoch_0001.png"]
    assert (copy / "notes.txt").read_text() == "the user's own file"  # only the run's own files go


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at missing.pt"):
        main(["evaluate", "missing.pt", "--debug"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "m3"], "invalid choice: 'm3'"),
        (["train", "m2", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["train", "m2", "--hidden", "5x"], "expected comma-separated integers"),
        (["train", "m2", "--labels", "ten"], "invalid int value: 'ten'"),
        ([], "required: command"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_entry_point():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    (entry,) = [e for e in scripts if e.name == "pyrodgm"]
    assert entry.value == "pyrodgm.cli:main"
    assert entry.load() is main


def test_digits_preset_learning_rate_unless_given():
    from pyrodgm.cli import _train_config, build_parser

    parse = build_parser().parse_args
    assert _train_config(parse(["train", "m2", "--dataset", "digits"])).lr == 3e-3
    assert _train_config(parse(["train", "m2", "--dataset", "digits", "--lr", "1e-4"])).lr == 1e-4
    assert _train_config(parse(["train", "m2", "--dataset", "mnist"])).lr == 3e-4  # the paper's


def test_evaluate_scores_a_relaxed_label_guide_by_enumeration(tmp_path, capsys):
    """IWAE needs log-densities, so a guide trained with a Gumbel-softmax label is scored
    as the categorical model it trains (exactly summed y), and the report says so."""
    out = tmp_path / "m2-relaxed"
    code, _, stderr = run_main(["train", "m2", "--labels", "100", "--epochs", "1", "--label-mode", "relaxed", "--out", str(out), *SMALL])
    assert code == 0, stderr
    assert main(["evaluate", str(out / "best.pt"), "--iwae-k", "4", "--limit", "10", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["label_mode_trained"] == "relaxed"
    assert math.isfinite(report["iwae_log_likelihood"]) and report["iwae_log_likelihood"] < 0


def test_evaluate_reports_a_recipes_own_metrics(tmp_path, capsys):
    """MMVA classifies with its margin classifier (no label site): its test error comes from
    the recipe's metrics."""
    out = tmp_path / "mmva"
    code, _, stderr = run_main(["train", "mmva", "--epochs", "1", "--out", str(out), "--dataset", "digits",
                                "--validation", "300", "--hidden", "32", "--z-dim", "4", "--quiet"])
    assert code == 0, stderr
    assert main(["evaluate", str(out / "best.pt"), "--iwae-k", "4", "--limit", "50", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["test_error"] <= 1.0
    assert "label_mode_trained" not in report


# --------------------------------------------------------------------------------------
# pyrodgm train MODEL: each model's own options, with their defaults
# --------------------------------------------------------------------------------------
def _train_help(model: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["train", model, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_the_models_own_options_with_their_defaults(capsys):
    """`pyrodgm train --help` was 138 lines mixing every paper's options, without defaults."""
    gmvae = _train_help("gmvae", capsys)
    assert "gmvae: its paper's hyper-parameters" in gmvae
    assert re.search(r"--knn KNN\s+neighbours of the k-NN label assignment \(default: 5;\s+fashion-mnist: 3; svhn: 3\)", gmvae)
    assert re.search(r"--epochs EPOCHS\s+passes over the unlabelled data \(default: 200\)", gmvae)
    m2 = _train_help("m2", capsys)
    assert "--knn" not in m2 and "--margin-C" not in m2
    assert re.search(r"--alpha-factor ALPHA_FACTOR\s+Kingma et al.'s alpha = FACTOR \* N, the classifier's\s+weight \(default: 0.1\)", m2)
    assert re.search(r"--hidden HIDDEN\s+hidden widths, e.g. 500 or 600,600 \(default: 500\)", m2)
    assert len(m2.splitlines()) < 140  # 138 lines mixing every paper's options, before; now in groups, with the data-parallel (10) and --data (13) ones


def test_an_option_of_another_model_is_refused_naming_its_models(capsys):
    """`pyrodgm train m2 --knn 3` used to be accepted and silently ignored."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "m2", "--knn", "3"])
    assert exit_.value.code == 2
    assert "--knn is not an option of m2 (it is gmvae, gmvae-clustering's); 'pyrodgm train m2 --help' lists" in capsys.readouterr().err


class _ReadFields:
    """A model's hyper-parameters that record which of them are read or set."""

    def __init__(self, params):
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._params, name)

    def __setattr__(self, name, value):
        self.read.add(name)
        setattr(self._params, name, value)


#: Hyper-parameters a recipe reads only away from its defaults: the clustering GMVAE's
#: assignment and metric losses are weighted 0 unless --w-assign / --w-metric are given.
UNREAD_BY_DEFAULT = {"gmvae-clustering": {"knn", "knn_weighting", "metric_margin"}}  # its w_A = w_M = 0: no k-NN


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_every_recipe_reads_only_its_own_config_and_all_of_it(dataset):
    """A recipe reads its paper's hyper-parameters from its typed config, whose fields are
    the options of `pyrodgm train MODEL` (a field of another model's config is an
    AttributeError), and every field of it is used (the recipe built, its loss made and its
    epoch-0 schedule run on params that record what is read)."""
    from pyrodgm.cli import train_options
    from pyrodgm.configs import config_fields
    from pyrodgm.training import TrainConfig
    from pyrodgm.zoo import RECIPES

    shape = {"digits": (64, 10), "mnist": (784, 10)}[dataset]
    for name, recipe_ in RECIPES.items():
        config = TrainConfig.paper(name, dataset, **({"end_to_end": True} if name == "m1m2" else {}))
        object.__setattr__(config, "params", _ReadFields(config.params))
        model, guide = recipe_.create(config, *shape)
        loss = recipe_.loss(config, 1000, 100 if config.labels else 0)
        if recipe_.schedule is not None:
            recipe_.schedule(config, 0, model, guide, loss)
        recipe_.loss(config, 1000, 100)  # the terms of labelled data (gmvae-clustering run with --labels)
        unread = set(config_fields(recipe_.config)) - config.params.read - UNREAD_BY_DEFAULT.get(name, set())
        assert not unread, f"{name} never reads {sorted(unread)}"
        assert set(train_options(recipe_.config)) <= set(config_fields(recipe_.config))


def test_a_recipe_reading_another_models_hyper_parameter_is_an_attribute_error():
    from pyrodgm.training import TrainConfig

    config = TrainConfig.for_model("m2")
    with pytest.raises(AttributeError, match="knn"):
        config.params.knn
    with pytest.raises(AttributeError, match="it is the model's, config.params.hidden"):
        config.hidden


def test_train_without_baseline_and_without_labels_prints_none(tmp_path):
    code, stdout, stderr = run_main(["train", "m2", "--epochs", "1", "--out", str(tmp_path / "m2"), "--no-baseline", *SMALL])
    assert code == 0, stderr
    assert "baseline" not in json.loads(stdout)
    code, stdout, stderr = run_main(["train", "m1", "--epochs", "1", "--out", str(tmp_path / "m1"), *SMALL])
    assert code == 0, stderr
    assert "baseline" not in json.loads(stdout)  # an unsupervised model: nothing to spread



def test_the_command_flushes_subnormal_floats_to_zero(tmp_path, monkeypatch):
    """A weight that only the weight prior moves decays through the subnormal range, where
    x86 arithmetic is many times slower (pyrodgm.denormals): the command flushes them."""
    import torch

    from pyrodgm.denormals import flush_denormals

    try:
        torch.set_flush_denormal(False)  # earlier tests' commands may have set it
        subnormal = torch.tensor([1e-39])
        assert (subnormal * 1.0).item() != 0.0
        if not flush_denormals():
            pytest.skip("this CPU cannot flush subnormal floats")
        assert (subnormal * 1.0).item() == 0.0
        torch.set_flush_denormal(False)
        assert main(["models"]) == 0
        assert (subnormal * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
