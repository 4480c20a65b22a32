"""Every experiment script runs end to end with tiny arguments (Pyro's test_examples
pattern), so none can rot.  They use the offline digits data instead of MNIST."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = {
    "m2_mnist_100.py": ["--epochs", "1", "--track-test"],
    "m1m2_mnist_100.py": ["--epochs", "1", "--m1-epochs", "1"],
    "m1_svm_mnist.py": ["--epochs", "1", "--threads", "1"],
    "adgm_mnist_100.py": ["--epochs", "1", "--eval-particles", "10", "--threads", "1"],
    "adgm_active_units.py": ["--epochs", "1", "--limit", "100", "--particles", "2", "--threads", "1"],
    # max-margin DGMs
    "conv_mmcva_mnist.py": ["--epochs", "1", "--threads", "1"],
    "mmva_mnist.py": ["--epochs", "1", "--threads", "1"],  # MMVA; the Pegasos path: tests/test_margin.py
    # semi-supervised GMVAE
    "gmvae_mnist_100.py": ["--epochs", "1", "--threads", "1", "--embedding", "pca"],
    # CaGeM and hierarchical baselines
    "cagem_mnist.py": ["--epochs", "1", "--iwae-k", "10", "--iwae-images", "20", "--eval-particles", "2", "--threads", "1"],
}

#: The semi-supervised scripts: each runs LabelSpreading on its split (``train(baseline=True)``).
WITH_BASELINE = {"m2_mnist_100.py", "m1m2_mnist_100.py", "adgm_mnist_100.py", "conv_mmcva_mnist.py", "gmvae_mnist_100.py", "cagem_mnist.py"}

# helpers imported by the scripts and the tests below, and scripts with a test of their own
NOT_TRAINING_SCRIPTS = {"common.py", "seeds.py", "results_table.py", "baselines.py", "references.py", "bench_speed.py", "gpu_kit.py", "hierarchical_mnist.py", "gmvae_clustering.py", "imputation_mnist.py",
                        "estimator_benchmark.py",  # tested in tests/test_estimator.py
                        "lightning_throughput.py",
                        "compare_curves.py"}  # tested below


def _import_experiment(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(EXPERIMENTS))


def test_every_experiment_script_is_covered():
    scripts = {p.name for p in EXPERIMENTS.glob("*.py")} - NOT_TRAINING_SCRIPTS
    assert scripts == set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_experiment_runs_and_writes_results(script, tmp_path):
    args = [sys.executable, str(EXPERIMENTS / script), "--dataset", "digits", "--validation", "300", "--device", "cpu",
            "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--quiet", *SCRIPTS[script]]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    (result_file,) = (tmp_path / "results").glob("*.json")
    result = json.loads(result_file.read_text())
    assert result["epochs_completed"] == 1
    assert result["device"] and result["wall_seconds"] > 0
    assert 0.0 <= result["test"]["error"] <= 1.0
    assert (result["paper"].get("test_error") or result["paper"].get("p_error")) > 0
    assert result["command"].startswith(f"python {EXPERIMENTS / script}")
    if "--track-test" in SCRIPTS[script]:  # the test error by epoch, drawn beside the authors' curve
        assert (tmp_path / "results" / result["test_curve_png"]).stat().st_size > 0 and result["authors_curve"]["points"]
        assert [h["test_error"] is not None for h in result["history"]] == [True]
    else:
        assert result.get("test_curve_png") is None
    if script in WITH_BASELINE:  # LabelSpreading on the run's own split, beside its error
        assert 0.0 <= result["baseline"]["test_error"] <= 1.0 and result["baseline"]["pixels"] in ("binarised", "grey")


@pytest.mark.parametrize("seed", [0, 3])
def test_baselines_use_the_split_and_test_images_of_a_training_run(seed, monkeypatch, tmp_path, clean_param_store, pyro_validation, single_thread):
    import torch

    import pyrodgm.training as training
    from pyrodgm.data import load_dataset

    baselines = _import_experiment("baselines")
    splits = []

    def spy(*args, **kwargs):
        splits.append(split_function(*args, **kwargs))
        return splits[-1]

    split_function = training.semi_supervised_split
    monkeypatch.setattr(training, "semi_supervised_split", spy)
    run = training._prepare(training.TrainConfig.for_model(model="m2", dataset="digits", labels=100, seed=seed, out=str(tmp_path)))
    (trained,) = splits

    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    ours = baselines.pyrodgm_split(train, baselines.train_config("digits", 100, None, seed, binarized=False))
    for part in ("labelled", "unlabelled", "validation"):
        assert torch.equal(getattr(ours, part), getattr(trained, part))
    grey = baselines.problem(train, test, baselines.train_config("digits", 100, None, seed, binarized=False))
    rows = grey.labelled_rows
    assert torch.equal(torch.from_numpy(grey.x_fit[rows]), train.flat()[trained.labelled])
    assert torch.equal(torch.from_numpy(grey.y_fit[rows]), train.y[trained.labelled])
    assert (grey.y_fit != -1).sum() == 100 and torch.equal(torch.from_numpy(grey.x_test), test.flat())
    # --binarized: the very images the run validates and tests on
    binary = baselines.problem(train, test, baselines.train_config("digits", 100, None, seed, binarized=True))
    assert torch.equal(torch.from_numpy(binary.x_validation), run.validation.flat())
    assert torch.equal(torch.from_numpy(binary.x_test), training.load_test_data(run.config).flat())


def test_baselines_on_the_digits_are_sane(single_thread):
    from pyrodgm.data import load_dataset

    baselines = _import_experiment("baselines")
    config = baselines.train_config("digits", 100, None, 0, binarized=False)
    record = baselines.run_seed(load_dataset("digits"), load_dataset("digits", train=False), config)
    assert record["num_test"] == 297 and record["num_fit_images"] == 1200 and record["num_validation"] == 300
    assert record["label_spreading"]["test_error"] < 0.15  # 7.1% when written
    assert record["label_spreading"]["test_without_label_mass"] == 0
    for name in ("self_training", "labelled_only"):
        assert record[name]["test_error"] < 0.3  # 13-15%: far better than chance (90%)
    assert record["label_spreading"]["test_error"] < record["labelled_only"]["test_error"]


def test_baselines_script_writes_results(tmp_path):
    script = str(EXPERIMENTS / "baselines.py")
    args = [sys.executable, script, "--dataset", "digits", "--seeds", "0", "1", "--threads", "1", "--results", str(tmp_path), "--quiet"]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=120, capture_output=True)
    (result_file,) = tmp_path.glob("*.json")
    assert result_file.name == "baselines_100_labels_digits.json"
    result = json.loads(result_file.read_text())
    assert result["seeds"] == [0, 1] and result["validation"] == 300 and result["pixels"] == "grey"
    assert result["command"].startswith(f"python {script} --dataset digits")
    for method in result["methods"].values():
        errors = list(method["test_error"].values())
        assert len(errors) == 2 and method["mean"] == pytest.approx(sum(errors) / 2) and method["sd"] >= 0
        assert all(seconds >= 0 for seconds in method["seconds"].values())
    assert [len(indices) for indices in result["labelled_indices"].values()] == [100, 100]


@pytest.mark.parametrize("argv, message", [
    (["--labels", "105"], "not divisible"),
    (["--labels", "0"], "--labels must be positive"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--dataset", "mnist", "--root", "no-such-folder", "--no-download"], "mnist is not in"),
])
def test_baselines_refuse_bad_input_in_one_line(argv, message, tmp_path, capsys):
    baselines = _import_experiment("baselines")
    with pytest.raises(SystemExit) as exit_:
        baselines.main(["--dataset", "digits", "--results", str(tmp_path / "results"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "results").exists()


def test_results_table_puts_the_baseline_of_the_same_split_beside_a_run():
    results_table = _import_experiment("results_table")

    def baseline(validation, pixels, error):
        methods = {name: {"test_error": {"0": error, "1": 0.5}} for name in results_table.BASELINE_METHODS}
        return {"experiment": "baselines_100_labels", "dataset": "mnist", "labels": 100, "validation": validation,
                "pixels": pixels, "seeds": [0, 1], "methods": methods}

    baselines = [baseline(10000, "binarized", 0.3), baseline(10000, "grey", 0.1), baseline(12000, "grey", 0.2)]
    m2 = {"experiment": "m2_100_labels", "dataset": "mnist", "seed": 0, "command": "python experiments/m2_mnist_100.py"}
    assert results_table._baseline_cell(m2, baselines) == "10.00% / 10.00% / 10.00%"
    assert results_table._baseline_cell({**m2, "seed": 1}, baselines) == "50.00% / 50.00% / 50.00%"
    assert results_table._baseline_cell({**m2, "seed": 2}, baselines) == "n/a"  # a seed the baselines did not run
    assert results_table._baseline_cell({**m2, "command": "x.py --validation 12000"}, baselines).startswith("20.00%")
    gmvae = {"experiment": "gmvae_100_labels", "dataset": "mnist", "seed": 0}  # its recipe carves 12,000
    assert results_table._baseline_cell(gmvae, baselines).startswith("20.00%")
    conv = {"experiment": "conv_mmcva_1000_labels", "dataset": "mnist", "seed": 0, "config": {"labels": 1000, "validation": None}}
    assert results_table._baseline_cell(conv, baselines) == "n/a"
    supervised = {"experiment": "mmva_full_labels", "dataset": "mnist", "seed": 0, "model": "mmva"}
    assert results_table._baseline_cell(supervised, baselines) == "n/a"


def test_results_table_notes_why_each_run_above_the_baseline_stays_there():
    table = _import_experiment("results_table")
    history = [{"epoch": e, "test_error": err} for e, err in [(1, 0.3), (2, 0.25), (3, 0.2), (4, 0.22), (5, 0.18), (6, 0.19), (7, 0.17)]]

    def run(name, error, spreading, history=None):
        return (name, {"experiment": name, "dataset": "mnist", "seed": 0, "epochs_completed": 7, "train_seconds": 600.0,
                       "test": {"error": error, "epoch": 7}, "paper": {"test_error": 0.02}, "history": history,
                       "baseline": {"test_error": spreading, "pixels": "binarised"}})

    notes = table.above_baseline_notes([run("adgm_1mc_100_labels_x", 0.17, 0.1, history), run("m2_100_labels", 0.05, 0.1),
                                        run("sdgm_1mc_100_labels", 0.3, 0.1)])
    assert len(notes) == 4 and notes[0].startswith("Runs above LabelSpreading")
    adgm, sdgm = notes[2:]
    assert adgm.startswith("- adgm_1mc_100_labels_x (mnist, seed 0): 17.00% against LabelSpreading's 10.00% after 7 epochs (10 CPU-minutes)")
    assert "test error 30.00% at epoch 1, 17.00% at epoch 7 (its lowest); it fell over the last 5 epochs (25.00% at epoch 2)" in adgm
    assert adgm.endswith("the authors' code's curve begins later: 17.00% at epoch 20; the paper's test error 2.00% comes after its full schedule.")
    late = run("adgm_1mc_100_labels_x", 0.17, 0.1, history)[1] | {"test": {"error": 0.17, "epoch": 20}}
    assert table.above_baseline_notes([("x", late)])[2].endswith("the authors' code was at 17.00% (epoch 20).")
    assert "no per-epoch record" in sdgm and "the paper's test error 2.00% comes after its full schedule" in sdgm
    assert table.above_baseline_notes([run("m2_100_labels", 0.05, 0.1)]) == []
    curve_only = run("m2_1mc_100_labels", 0.17, 0.1)[1] | {"paper": {"test_error": None, "source": "Fig. 2a (a curve only)"}}
    assert table.above_baseline_notes([("x", curve_only)])[2].endswith("the authors' code's curve begins later: 18.00% at epoch 50.")
    no_curve = run("adgm-deterministic_1mc_100_labels", 0.17, 0.1)[1] | {"paper": {"test_error": None, "source": "Fig. 2a (a curve only)"}}
    assert table.above_baseline_notes([("x", no_curve)])[2].endswith("no published number to compare (Fig. 2a (a curve only)).")


def test_results_table_renders_the_estimator_benchmark_once_per_peer():
    results_table = _import_experiment("results_table")

    def result(suffix, models, pca, alpha_factor=None):
        methods = {name: {"test_error": {"0": 0.25}, "mean": 0.25, "sd": None, "fit_seconds": {"0": 1.0}}
                   for name in [*results_table.BASELINE_METHODS, *(f"pyrodgm_{m}" for m in models)]}
        settings = {"hidden": [8], "z_dim": 2, "a_dim": 2, "epochs": 1, "lr": 0.01, "eval_particles": 2, "batch_size": 200,
                    "alpha_factor": alpha_factor}
        return (f"estimator_benchmark_digits{suffix}.json",
                {"experiment": f"estimator_benchmark_digits{suffix}", "task": "digits", "methods": methods, "device": "cpu",
                 "estimator_settings": settings, "sizes": {"0": {"pca_seconds": 0.1} if pca else {}}, "date": "d",
                 "command": f"python estimator_benchmark.py{suffix}"})

    rows = results_table.estimator_rows([result("", ["m2", "adgm"], True), result("_big", ["m2"], True, alpha_factor=2.0)])[2:]
    assert len(rows) == 3 + 2 + 1  # the peers once, then every estimator run
    assert "| 50 PCA components, as baselines.py |" in rows[0] and "25.00%" in rows[0]
    assert "pyrodgm.SemiSupervisedClassifier('adgm')" in rows[4] and "hidden 8, z 2, a 2, 2 classifier samples" in rows[4]
    assert "alpha" not in rows[4]  # the model's own default weight is not named
    assert "likelihood auto, alpha 2 N" in rows[5] and "estimator_benchmark.py_big" in rows[5]


def test_readme_results_table_is_generated_from_the_results_json():
    results_table = _import_experiment("results_table")
    readme = (EXPERIMENTS.parent / "README.md").read_text()
    block = "\n".join(results_table.tables(EXPERIMENTS / "results"))
    assert results_table.BEGIN + "\n" + block + "\n" + results_table.END in readme


def test_speed_reference_computes_the_same_loss_as_pyrodgm(pyro_test_env):
    import pyro
    import torch

    from pyrodgm.guides import M2Guide
    from pyrodgm.losses import SemiSupervisedELBO
    from pyrodgm.models import M2
    from pyrodgm.nets import MLPSpec

    references = _import_experiment("references")
    spec = MLPSpec(20, 4, 3, (16,))
    model, guide = M2(spec), M2Guide(spec)
    x = torch.rand(10, 20).bernoulli()
    y = torch.tensor([0, 1, 2, 3, 1, -1, -1, -1, -1, -1])
    pyro.set_rng_seed(5)
    ours = SemiSupervisedELBO(alpha=3.0, max_plate_nesting=1).differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(5)
    reference = references.m2_loss(model, guide, x, y, 3.0)
    assert torch.allclose(ours, reference, rtol=1e-12)
    pyro.set_rng_seed(6)  # other noise, other value: the agreement is not a coincidence
    assert not torch.allclose(references.m2_loss(model, guide, x, y, 3.0), reference)


@pytest.mark.parametrize("num_particles", [1, 3])
def test_speed_reference_computes_the_same_adgm_loss_as_pyrodgm(pyro_test_env, num_particles):
    import pyro
    import torch

    from pyrodgm.guides import ADGMGuide
    from pyrodgm.losses import SemiSupervisedELBO
    from pyrodgm.models import ADGM
    from pyrodgm.nets import AuxiliarySpec

    references = _import_experiment("references")
    spec = AuxiliarySpec(20, 4, 3, (16, 8), a_dim=5)
    model, guide = ADGM(spec), ADGMGuide(spec)  # p(a) = N(0, I), the default
    x = torch.rand(10, 20).bernoulli()
    y = torch.tensor([0, -1, 2, 3, -1, 1, -1, -1, 3, -1])  # labelled and unlabelled rows interleaved
    loss_fn = SemiSupervisedELBO(alpha=3.0, num_particles=num_particles, max_plate_nesting=1)
    pyro.set_rng_seed(5)
    ours = loss_fn.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(5)
    reference = references.adgm_loss(model, guide, x, y, 3.0, num_particles)
    assert torch.allclose(ours, reference, rtol=1e-10, atol=0)
    # the same gradients too, as the benchmark's steps assume
    params = list(model.parameters()) + list(guide.parameters())
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    pyro.set_rng_seed(6)  # other noise, other value: the agreement is not a coincidence
    assert not torch.allclose(references.adgm_loss(model, guide, x, y, 3.0, num_particles), reference)


@pytest.mark.parametrize("num_particles", [1, 3])
def test_speed_reference_computes_the_same_cagem_loss_and_gradients_as_pyrodgm(pyro_test_env, num_particles):
    import pyro
    import torch

    from pyrodgm.guides.cagem import CaGeMGuide
    from pyrodgm.losses.cagem import cagem_objective
    from pyrodgm.models.cagem import CaGeM, CaGeMSpec

    references = _import_experiment("references")
    spec = CaGeMSpec(20, 4, 3, (16, 8), z2_dim=2, hidden2=(8, 6))  # batch-norm on, the paper's
    model, guide = CaGeM(spec), CaGeMGuide(spec)
    x = torch.rand(10, 20).bernoulli()
    y = torch.tensor([0, -1, 2, 3, -1, 1, -1, -1, 3, -1])  # labelled and unlabelled rows interleaved
    weight = 0.5  # mid KL warm-up
    loss_fn = cagem_objective(3.0, num_particles, latent_weights={"z1": weight, "y": weight, "z2": weight})
    pyro.set_rng_seed(5)
    ours = loss_fn.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(5)
    reference = references.cagem_loss(model, guide, x, y, 3.0, num_particles, weight)
    assert torch.allclose(ours, reference, rtol=1e-10, atol=0)
    pyro.set_rng_seed(6)  # other noise, other value: the agreement is not a coincidence
    assert not torch.allclose(references.cagem_loss(model, guide, x, y, 3.0, num_particles, weight), reference)

    # the same restricted gradients (autograd.grad per cross-entropy) and the same batch-norm
    # running statistics afterwards (collected on the unlabelled pass only)
    modules = (model, guide)
    buffers = [b for m in modules for b in m.buffers()]
    params = [p for m in modules for p in m.parameters()]
    start = [b.clone() for b in buffers]

    def run(step):
        for b, value in zip(buffers, start):
            b.copy_(value)
        for p in params:
            p.grad = None
        pyro.set_rng_seed(7)
        value = step()
        return value, [p.grad.clone() for p in params], [b.clone() for b in buffers]

    ours = run(lambda: loss_fn.loss_and_grads(model, guide, x, y=y))
    reference = run(lambda: references.cagem_loss_and_grads(model, guide, x, y, 3.0, num_particles, weight))
    assert reference[0].item() == pytest.approx(ours[0], rel=1e-10)
    for a, b in zip(ours[1], reference[1]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    for a, b, before in zip(ours[2], reference[2], start):
        # to rounding: a single particle has no particle dim in pyrodgm, [1, B, D] in the reference
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert any(not torch.equal(a, before) for a, before in zip(ours[2], start))  # the unlabelled pass moved them
    # the cross-entropies' restriction matters: without it the gradients differ
    pyro.set_rng_seed(7)
    for p in params:
        p.grad = None
    references.cagem_loss(model, guide, x, y, 3.0, num_particles, weight).backward()
    assert not all(torch.allclose(p.grad, g) for p, g in zip(params, reference[1]))


def _same_loss_and_gradients(loss_fn, reference, model, guide, x, y):
    """pyrodgm's loss and the reference's for the same seed: equal values and gradients,
    and another seed gives another value (the agreement is not a coincidence)."""
    import pyro
    import torch

    pyro.set_rng_seed(5)
    ours = loss_fn.differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(5)
    value = reference()
    assert torch.allclose(ours, value, rtol=1e-10, atol=0)
    params = list(model.parameters()) + list(guide.parameters())
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(value, params)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    pyro.set_rng_seed(6)
    assert not torch.allclose(reference(), value)


def test_speed_reference_computes_the_same_conv_mmcva_loss_and_gradients_as_pyrodgm(pyro_test_env):
    import torch

    from pyrodgm.guides.mmcva import ConvMMCVAGuide
    from pyrodgm.losses import SemiSupervisedELBO
    from pyrodgm.losses.margin import max_margin_objective
    from pyrodgm.models.mmcva import ConvMMCVA, ConvMMCVASpec

    references = _import_experiment("references")
    shape = (1, 8, 8)  # dropout and batch-norm in the CNN, as the paper's
    spec = ConvMMCVASpec(shape, 4, 3, (4, 4, 3, 3), classifier_channels=(3, 4, 4, 5, 5), encoder_channels=(3, 3, 4, 4, 4))
    model, guide = ConvMMCVA(spec), ConvMMCVAGuide(spec)
    x = torch.rand(12, 64).bernoulli()
    y = torch.tensor([0, -1, 2, 3, -1, 1, -1, -1, 3, -1, -1, 0])  # labelled and unlabelled rows interleaved
    weights = dict(alpha=0.1, alpha_u=0.5, alpha_b=0.2, C=3.0, sigma=2.0)
    loss_fn = max_margin_objective(SemiSupervisedELBO(alpha=0.0, max_plate_nesting=1), **weights)
    _same_loss_and_gradients(loss_fn, lambda: references.conv_mmcva_loss(model, guide, x, y, **weights), model, guide, x, y)


def test_speed_reference_computes_the_same_gmvae_loss_and_gradients_as_pyrodgm(pyro_test_env):
    import torch

    from pyrodgm.guides.gmvae import GMVAEGuide
    from pyrodgm.losses import AssignmentLoss, LiftedStructuredLoss, SemiSupervisedELBO, WeightedSum, WithoutLabels
    from pyrodgm.models.gmvae import GMVAE, GMVAESpec

    references = _import_experiment("references")
    sizes = dict(num_classes=4, z_dim=3, feature_dim=5, geometry=((2, 3, 3, 4), (3, 3, 2, 2, 2), (1, 1, 1, 1, 1)))
    spec = GMVAESpec((1, 8, 8), **sizes)
    model, guide = GMVAE(spec), GMVAEGuide(spec, label_mode="relaxed", temperature=0.7)
    x = torch.rand(12, 64)
    y = torch.tensor([0, -1, 2, 3, -1, 1, -1, -1, 3, -1, -1, 0])
    weights = dict(w_gaussian=2.0, w_categorical=0.5, w_assign=1.5, w_metric=0.3, k=2, margin=2.0)
    loss_fn = WeightedSum(  # as pyrodgm.recipes.gmvae.gmvae_loss builds it
        elbo=WithoutLabels(SemiSupervisedELBO(max_plate_nesting=1, latent_weights={"z": 2.0, "y": 0.5})),
        assignment=(1.5, AssignmentLoss(k=2, include_labelled=True, max_plate_nesting=1)),
        metric=(0.3, LiftedStructuredLoss(margin=2.0, k=2, max_plate_nesting=1)),
    )
    _same_loss_and_gradients(loss_fn, lambda: references.gmvae_loss(model, guide, x, y, **weights), model, guide, x, y)
    assert loss_fn.last_components["metric"] > 0  # the k-NN and metric terms are not trivially zero here


@pytest.mark.slow
def test_bench_speed_runs_and_writes_json(tmp_path):
    output = tmp_path / "bench.json"
    models = ["m2", "adgm", "cagem", "conv-mmcva", "gmvae"]
    args = [sys.executable, str(EXPERIMENTS / "bench_speed.py"), "--models", *models, "--threads", "1",
            "--device", "cpu", "--steps", "2", "--warmup", "1",
            "--batch", "20", "--iwae-k", "30", "--iwae-images", "4", "--iwae-chunk", "16", "--output", str(output)]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    report = json.loads(output.read_text())
    for row in report["models"].values():
        assert abs(row["loss_pyrodgm"] - row["loss_reference"]) <= 1e-4 * abs(row["loss_reference"])
        assert row["step_validation_off"]["ratio"] > 0
        assert row["iwae"]["images_per_second"] > 0 if "skipped" not in row["iwae"] else row["iwae"]["skipped"]
        low, middle, high = row["step_validation_off"]["paired_ratio_quartiles"]
        assert 0 < low <= middle <= high
    assert "batch-norm" in report["models"]["cagem"]["note"]
    assert list(report["models"]) == models


def test_adgm_experiment_takes_the_authors_code_differences_one_by_one_or_together():
    adgm = _import_experiment("adgm_mnist_100")
    plain = adgm.config_for(adgm.parse_args([]))
    assert (plain.weight_prior_std, plain.grad_clip_norm, plain.params.fixed_auxiliary, plain.validation) == (None, None, False, None)
    together = adgm.parse_args(["--authors-code"])
    config = adgm.config_for(together)
    assert (config.weight_prior_std, config.grad_clip_norm, config.grad_clip_value, config.params.fixed_auxiliary, config.validation) == (1.0, 5.0, 1.0, True, 0)
    assert config.params.alpha_factor == 2.0 and plain.params.alpha_factor == 0.1
    assert adgm.config_for(adgm.parse_args(["--authors-code", "--alpha-factor", "0.5"])).params.alpha_factor == 0.5
    assert adgm.name(together) == "adgm_1mc_100_labels_authors_code"
    assert adgm.name(adgm.parse_args(["--authors-code", "--alpha-factor", "0.1"])) == "adgm_1mc_100_labels_authors_code_alpha0.1"
    one = adgm.parse_args(["--grad-clip-norm", "5", "--validation", "100"])
    config = adgm.config_for(one)
    assert (config.grad_clip_norm, config.weight_prior_std, config.params.fixed_auxiliary, config.validation) == (5.0, None, False, 100)
    assert adgm.name(one) == "adgm_1mc_100_labels_clip"
    turned_off = {  # a flag that turns an option off takes it out of the name
        ("--weight-prior-std", "inf", "--grad-clip-value", "1"): "adgm_1mc_100_labels_clip",
        ("--weight-prior-std", "1", "--grad-clip-norm", "0"): "adgm_1mc_100_labels_prior",
        ("--authors-code", "--weight-prior-std", "inf"): "adgm_1mc_100_labels_authors_code_no_prior",
        ("--authors-code", "--grad-clip-norm", "0", "--grad-clip-value", "0"): "adgm_1mc_100_labels_authors_code_no_clip",
        ("--authors-code", "--grad-clip-norm", "0"): "adgm_1mc_100_labels_authors_code",  # still clips each element
    }
    assert {flags: adgm.name(adgm.parse_args(list(flags))) for flags in turned_off} == turned_off
    m2 = adgm.config_for(adgm.parse_args(["--model", "m2", "--authors-code"]))
    assert not hasattr(m2.params, "fixed_auxiliary") and m2.weight_prior_std == 1.0  # M2 has no q(a|x)
    assert m2.params.init == "xavier"  # Glorot, like the ADGM (the paper's "Implementation details")


def test_conv_mmcva_experiment_takes_the_authors_code_options():
    conv = _import_experiment("conv_mmcva_mnist")
    plain = conv.config_for(conv.parse_args(["--epochs", "4"]))
    assert (plain.params.straight_through, plain.validation, plain.lr_decay_every) == (0.0, None, 0)
    together = conv.parse_args(["--authors-code"])
    config = conv.config_for(together)
    assert (config.batch_size, config.labelled_per_batch, config.lr, config.validation) == (600, 100, 3e-4, 0)
    assert config.params.straight_through == 3e-4 and (config.params.alpha_u, config.params.alpha_b) == (0.3, 1e-3)
    assert (config.lr_decay_every, config.lr_decay_start) == (1, 1499) and config.lr_decay == pytest.approx(0.995)
    assert conv.name(together) == "conv_mmcva_100_labels_authors_code" != conv.name(conv.parse_args([]))
    short = conv.config_for(conv.parse_args(["--authors-code", "--epochs", "100", "--straight-through", "0", "--validation", "50"]))
    assert (short.lr_decay_start, short.params.straight_through, short.validation) == (49, 0.0, 50)  # the flags win
    assert short.lr_decay ** 50 == pytest.approx(0.995 ** 1500)  # the same final factor over the second half



def test_gmvae_experiment_takes_the_authors_code_settings():
    gmvae = _import_experiment("gmvae_mnist_100")
    authors = gmvae.parse_args(["--dataset", "digits", "--authors-code"])
    config = gmvae.config_for(authors)
    for key, value in gmvae.AUTHORS_CODE.items():
        assert getattr(config.params if hasattr(config.params, key) else config, key) == value, key
    assert (config.lr, config.lr_decay, config.lr_decay_every, config.validation, config.epochs) == (1e-2, 0.5, 30, 0, 100)
    p = config.params
    assert (p.w_gaussian, p.w_categorical, p.w_assign, p.w_metric, p.knn, p.knn_weighting, p.metric_margin) == (1.1, 1.2, 4.7, 0.85, 7, "uniform", 0.5)
    assert (p.z_prior, p.z_encoder, p.classifier_layers, p.conv_activation, p.decoder_head) == ("standard", "linear", 0, "relu", "dense")
    assert p.likelihood == "cross-entropy" and not config.binarize and (p.init, p.batch_norm) == ("xavier", "tensorflow")
    plain = gmvae.config_for(gmvae.parse_args(["--dataset", "digits"]))
    assert (plain.lr, plain.params.knn, plain.params.knn_weighting, plain.params.z_prior, plain.validation, plain.epochs) == (
        3e-3, 5, "distance", "mixture", None, 200)
    assert gmvae.name(authors) == "gmvae_100_labels_authors_code" and gmvae.name(gmvae.parse_args([])) == "gmvae_100_labels"
    tiny = gmvae.config_for(gmvae.parse_args(["--dataset", "digits", "--authors-code", "--epochs", "1", "--validation", "300"]))
    assert (tiny.epochs, tiny.validation, tiny.params.knn, tiny.lr) == (1, 300, 7, 1e-2)  # explicit flags win


@pytest.mark.slow
def test_gmvae_experiment_with_the_authors_code_writes_its_own_results(tmp_path):
    args = [sys.executable, str(EXPERIMENTS / "gmvae_mnist_100.py"), "--dataset", "digits", "--authors-code", "--epochs", "1",
            "--threads", "1", "--embedding", "pca", "--device", "cpu", "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "results"), "--quiet"]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    (result_file,) = (tmp_path / "results").glob("*.json")
    assert result_file.name == "gmvae_100_labels_authors_code_digits_seed0.json"
    result = json.loads(result_file.read_text())
    assert result["authors_code_options"]["knn"] == 7 and result["epochs_completed"] == 1

def test_m2_experiment_takes_kingmas_code_options():
    m2 = _import_experiment("m2_mnist_100")
    plain, authors = m2.config_for(m2.parse_args([])), m2.config_for(m2.parse_args(["--authors-code"]))
    assert (plain.params.init, plain.weight_prior_std, plain.batch_size, plain.labelled_per_batch) == ("default", None, 200, 100)
    assert (authors.params.init, authors.weight_prior_std, authors.batch_size, authors.labelled_per_batch) == ("small-normal", 1.0, 500, 1)
    assert (authors.params.hidden, authors.params.z_dim, authors.params.alpha_factor) == ((500,), 50, 0.1)  # the paper's
    assert m2.name(m2.parse_args(["--authors-code"])) == "m2_100_labels_authors_code" and plain.out != authors.out


def test_the_library_baseline_is_the_experiments_label_spreading(single_thread, tmp_path):
    """``pyrodgm.baselines.run_baseline`` (what ``pyrodgm train`` prints) computes the
    LabelSpreading row of ``experiments/baselines.py`` on the same split and pixels."""
    from pyrodgm.baselines import run_baseline
    from pyrodgm.data import load_dataset
    from pyrodgm.training import TrainConfig

    baselines = _import_experiment("baselines")
    for binarized in (True, False):
        config = baselines.train_config("digits", 100, None, 1, binarized=binarized)
        record = baselines.run_seed(load_dataset("digits"), load_dataset("digits", train=False), config)
        ours = run_baseline(config)
        assert ours["test_error"] == record["label_spreading"]["test_error"]
        assert ours["pixels"] == ("binarised" if binarized else "grey")
    with pytest.raises(ValueError, match="needs labelled images"):
        run_baseline(TrainConfig(model="m1", labels=0, out=str(tmp_path)))


def test_results_table_reads_the_authors_curve_at_the_runs_epoch():
    table = _import_experiment("results_table")
    curve = {"points": [(50, 0.11), (20, 0.17)]}
    assert table.curve_at(curve, 35) == "14.00% (epoch 35)"
    assert table.curve_at(curve, 50) == "11.00% (epoch 50)"
    assert table.curve_at(curve, 10).startswith("n/a")
    row = {"experiment": "adgm_1mc_100_labels_authors_code", "test": {"epoch": 20}}
    assert table._curve_cell(row, table.authors_curves()) == "17.00% (epoch 20)"
    own = {"baseline": {"test_error": 0.1191, "pixels": "binarised"}}
    assert table._run_baseline_cell(own, []) == "LabelSpreading 11.91% (binarised pixels, with the run)"


def test_seeds_script_repeats_a_train_command_with_the_baseline_of_each_seed(tmp_path, single_thread, clean_param_store):
    seeds = _import_experiment("seeds")
    result = seeds.main(["--seeds", "0", "1", "--out", str(tmp_path / "runs"), "--results", str(tmp_path),
                         "--", "m2", "--dataset", "digits", "--labels", "100", "--epochs", "1", "--hidden", "16", "--z-dim", "4"])
    assert set(result["seeds"]) == {0, 1}
    for seed, record in result["seeds"].items():
        metrics = json.loads((tmp_path / "runs" / f"seed{seed}" / "metrics.json").read_text())
        assert metrics["config"]["seed"] == seed and metrics["config"]["params"]["hidden"] == [16]
        assert record["test_error"] == metrics["test"]["error"] and record["baseline_test_error"] == metrics["baseline"]["test_error"]
    errors = [r["test_error"] for r in result["seeds"].values()]
    assert result["test_error"]["mean"] == pytest.approx(sum(errors) / 2)
    assert result["train_command"] == "pyrodgm train m2 --dataset digits --labels 100 --epochs 1 --hidden 16 --z-dim 4"
    table = _import_experiment("results_table")
    (row,) = table.seed_rows(table._load(tmp_path))[2:]
    assert row.startswith("| `pyrodgm train m2 --dataset digits") and f"0: {table._percent(errors[0])}" in row
    other = ["--seeds", "0", "--out", str(tmp_path / "other"), "--results", str(tmp_path),
             "--", "m2", "--dataset", "digits", "--labels", "100", "--epochs", "1", "--hidden", "8", "--z-dim", "4"]
    with pytest.raises(SystemExit, match="another command"):
        seeds.main(other)
    seeds.main(["--suffix", "_narrow", *other])
    assert json.loads((tmp_path / "seeds_m2_100_labels_digits.json").read_text())["train_command"] == result["train_command"]
    assert json.loads((tmp_path / "seeds_m2_100_labels_narrow_digits.json").read_text())["experiment"] == "seeds_m2_100_labels_narrow"


@pytest.mark.slow
def test_lightning_throughput_runs_and_writes_json(tmp_path):
    pytest.importorskip("lightning", reason='the lightning extra is not installed (pip install -e ".[lightning]")')
    output = tmp_path / "throughput.json"
    args = [sys.executable, str(EXPERIMENTS / "lightning_throughput.py"), "--model", "m2", "--hidden", "16", "--batch-size", "100",
            "--labelled-per-batch", "50", "--warmup", "1", "--timeout", "240", "--output", str(output)]
    subprocess.run(args, check=True, cwd=tmp_path, timeout=600)
    report = json.loads(output.read_text())
    assert [(r["engine"], r["processes"]) for r in report["rows"]] == [("native", 1), ("lightning", 1), ("lightning", 2)]
    assert all(r["images_per_second"] > 0 and r["steps_timed"] >= 2 for r in report["rows"])
    assert [r["images_per_step"] for r in report["rows"]] == [100, 100, 200]


def _tracked_result(tmp_path, name: str, errors: list[float], baseline: float, curve: dict | None) -> Path:
    history = [{"epoch": e + 1, "train_seconds": 60.0 * (e + 1), "test_error": error} for e, error in enumerate(errors)]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"experiment": name, "history": history, "authors_curve": curve,
                                "baseline": {"test_error": baseline, "pixels": "binarised"}}))
    return path


def test_compare_curves_draws_every_run_with_the_first_runs_authors_curve_and_baseline(tmp_path, drawn_figures):
    curve = {"label": "authors' code", "points": [[1, 0.3], [2, 0.2]]}
    first = _tracked_result(tmp_path, "adgm_prior", [0.25, 0.15], 0.0964, curve)
    second = _tracked_result(tmp_path, "adgm_alpha2", [0.24, 0.14, 0.12], 0.0964, None)
    _import_experiment("compare_curves").main([str(first), str(second), "--out", str(tmp_path / "c.png")])
    by_epoch, _ = drawn_figures[0].axes
    assert [line.get_label() for line in by_epoch.lines] == [
        "adgm_prior", "adgm_alpha2", "authors' code", "LabelSpreading (binarised pixels) 9.64%"]
    assert list(by_epoch.lines[1].get_ydata()) == pytest.approx([24.0, 14.0, 12.0])


def test_compare_curves_refuses_an_untracked_run_and_mismatched_labels(tmp_path):
    compare = _import_experiment("compare_curves")
    tracked = _tracked_result(tmp_path, "tracked", [0.2], 0.1, None)
    untracked = tmp_path / "untracked.json"
    untracked.write_text(json.dumps({"experiment": "untracked", "history": [{"epoch": 1, "train_seconds": 1.0}]}))
    with pytest.raises(SystemExit, match="'untracked' has no 'test_error'"):
        compare.main([str(tracked), str(untracked), "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="1 labels for 2 results files"):
        compare.main([str(tracked), str(untracked), "--labels", "a", "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="share a label"):
        compare.main([str(tracked), str(tracked), "--out", str(tmp_path / "c.png")])


def test_estimator_benchmark_passes_its_alpha_factor_to_the_estimator_and_only_when_given():
    benchmark = _import_experiment("estimator_benchmark")
    parser = benchmark.build_parser()
    given = benchmark.estimator("adgm", parser.parse_args(["--alpha-factor", "2"]), seed=0)
    assert given.model_params["alpha_factor"] == 2.0
    assert "alpha_factor" not in benchmark.estimator("m2", parser.parse_args([]), seed=0).model_params
