"""Tests of pyrodgm.training on scikit-learn's digits (offline): exact resume, checkpoints
and metrics, the plain training step, config errors, and the m1 -> m1m2 pipeline.

Training runs use float32 (the data's dtype) with tiny networks and 1-3 epochs."""

import dataclasses
import json
import shutil
from pathlib import Path

import pyro
import pytest
import torch
from pyro.optim import Adam

from pyrodgm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyrodgm.guides import M2Guide, VAEGuide
from pyrodgm.losses import SemiSupervisedELBO
from pyrodgm.models import M2, VAE
from pyrodgm.nets import MLPSpec
from pyrodgm.training import TrainConfig, build_from_checkpoint, train, training_step
from pyrodgm.zoo import recipe

pytestmark = pytest.mark.usefixtures("clean_param_store", "pyro_validation", "single_thread")

# Pyro warns for each frozen M1 parameter while training m1m2 (see tests/test_models.py,
# test_frozen_m1m2_svi_emits_no_warnings); ignored where the test is about something else.
FROZEN_PARAM_WARNING = "ignore:.*was not registered in the param store because requires_grad=False:UserWarning"

SMALL = dict(
    dataset="digits",
    validation=300,
    batch_size=100,
    labelled_per_batch=50,
    hidden=(32,),
    z_dim=4,
    eval_particles=2,
    lr=1e-3,
)


def config(out, **overrides):
    values = {"model": "m2", "labels": 100, "epochs": 1, "samples": False, **SMALL, **overrides}
    return TrainConfig.for_model(out=str(out), **values)


def assert_same(a, b, path="state"):
    """Exact (bitwise for tensors) equality of nested checkpoint values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


TIMING = ("epoch_seconds", "train_seconds", "test_seconds")


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def one_thread_run(cfg, **kwargs):
    """``train`` with one torch thread and Pyro's validation restored afterwards, for
    module-scoped fixtures (which run before the function-scoped ones)."""
    from pyro.infer.util import is_validation_enabled

    threads, validation = torch.get_num_threads(), is_validation_enabled()
    torch.set_num_threads(1)
    try:
        return train(cfg, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)
        pyro.enable_validation(validation)
        pyro.clear_param_store()


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    """Two epochs of m2 with sample grids; returns (out folder, metrics)."""
    out = tmp_path_factory.mktemp("m2")
    return out, one_thread_run(config(out, epochs=2, samples=True))


@pytest.fixture(scope="module")
def m1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("m1")
    return out, one_thread_run(config(out, model="m1", labels=0, labelled_per_batch=0, samples=True))


# --------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------
def check_resume_equals_uninterrupted(tmp_path, samples):
    uninterrupted = train(config(tmp_path / "a", epochs=3, samples=samples), progress=False)
    train(config(tmp_path / "b", epochs=2, samples=samples), progress=False)
    # a run killed while writing epoch 3's checkpoint leaves a partial temporary file
    (tmp_path / "b" / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 partial checkpoint")
    resumed = train(config(tmp_path / "b", epochs=3, samples=samples), resume=True, progress=False)

    assert not (tmp_path / "b" / "checkpoint.pt.tmp").exists()
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert_same(a["model"], b["model"], "model")
    assert_same(a["guide"], b["guide"], "guide")
    assert a["optim"], "the optimiser state is empty"
    assert_same(a["optim"], b["optim"], "optim")
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    assert without_timing(uninterrupted["history"]) == without_timing(resumed["history"])
    assert uninterrupted["test"] == resumed["test"]


def test_resume_equals_uninterrupted(tmp_path):
    check_resume_equals_uninterrupted(tmp_path, samples=False)


def test_resume_equals_uninterrupted_with_sample_grids(tmp_path):
    check_resume_equals_uninterrupted(tmp_path, samples=True)


def test_resume_of_finished_run_trains_no_more(m2_run, tmp_path):
    out, metrics = m2_run
    shutil.copy(out / "checkpoint.pt", tmp_path / "checkpoint.pt")
    shutil.copy(out / "best.pt", tmp_path / "best.pt")
    again = train(config(tmp_path, epochs=2, samples=True), resume=True, progress=False)
    assert without_timing(again["history"]) == without_timing(metrics["history"])
    assert_same(load_checkpoint(tmp_path / "checkpoint.pt")["model"], load_checkpoint(out / "checkpoint.pt")["model"])


@pytest.mark.parametrize(
    "field, value",
    [("labels", 200), ("lr", 3e-4), ("hidden", (16,)), ("seed", 1), ("z_dim", 5)],
)
def test_resume_with_different_config(m2_run, tmp_path, field, value):
    out, _ = m2_run
    shutil.copy(out / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=rf"cannot resume.*different {field}\b"):
        train(config(tmp_path, epochs=3, samples=True, **{field: value}), resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


# --------------------------------------------------------------------------------------
# checkpoints, metrics, samples
# --------------------------------------------------------------------------------------
def test_checkpoint_files(m2_run):
    out, metrics = m2_run
    for name in ("checkpoint.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)
        assert {"config", "epoch", "model", "guide", "optim", "rng", "history", "best"} <= set(state)
        assert state["config"]["model"] == "m2" and state["config"]["labels"] == 100
        assert all(torch.is_tensor(v) for v in state["model"].values())
        assert any(k.startswith("decoder.") for k in state["model"])
        assert any(k.startswith("classifier.") for k in state["guide"])
    last = torch.load(out / "checkpoint.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert last["history"] == metrics["history"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == metrics["best_validation"]["epoch"]
    # the checkpoint rebuilds the model and guide
    cfg, recipe_, model, guide, _ = build_from_checkpoint(out / "checkpoint.pt")
    assert cfg == config(out, epochs=2, samples=True)
    assert isinstance(model, M2) and isinstance(guide, M2Guide) and not model.training
    assert_same(model.state_dict(), last["model"])


def test_metrics_json(m2_run):
    out, metrics = m2_run
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    history = written["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    for record in history:
        assert record["epoch_seconds"] > 0
        assert 0 <= record["valid_error"] <= 1
        assert record["valid_elbo"] < 0
        assert record["train_loss_per_example"] > 0
    best = written["best_validation"]
    assert best["epoch"] in (1, 2)
    assert best["error"] == min(r["valid_error"] for r in history)
    assert best["error"] == history[best["epoch"] - 1]["valid_error"]
    test = written["test"]
    assert test["num_examples"] == 297 and test["epoch"] == best["epoch"]
    assert 0 <= test["error"] <= 1 and test["elbo"] < 0
    assert isinstance(written["device"], str) and "CPU" in written["device"]
    assert written["epochs_completed"] == 2
    assert written["train_seconds_total"] == pytest.approx(sum(r["epoch_seconds"] for r in history))
    assert written["wall_seconds_this_session"] >= written["train_seconds_total"] > 0
    assert written["config"]["out"] == str(out)


def test_sample_grids_per_epoch(m2_run):
    from PIL import Image

    from pyrodgm.plots import MIN_IMAGE_PIXELS

    out, _ = m2_run
    pngs = sorted(p.name for p in (out / "samples").iterdir())
    assert pngs == ["epoch_0001.png", "epoch_0002.png"]
    with Image.open(out / "samples" / "epoch_0002.png") as image:
        assert min(image.size) >= 10 * MIN_IMAGE_PIXELS  # 10 classes x 10 samples of 8x8 digits, drawn large


def test_no_sample_grids_when_disabled(tmp_path):
    train(config(tmp_path), progress=False)
    assert not (tmp_path / "samples").exists()
    assert {"checkpoint.pt", "best.pt", "metrics.json"} <= {p.name for p in tmp_path.iterdir()}


# --------------------------------------------------------------------------------------
# training_step
# --------------------------------------------------------------------------------------
def test_training_step_semi_supervised():
    pyro.set_rng_seed(0)
    spec = MLPSpec(16, 3, 2, (8,))
    model, guide = M2(spec), M2Guide(spec)
    x = torch.rand(10, 16).bernoulli()
    y = torch.tensor([0, 1, 2, 0, -1, -1, -1, -1, -1, -1])
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *guide.named_parameters()]}
    optim = Adam({"lr": 0.01})
    loss = training_step(model, guide, SemiSupervisedELBO(alpha=1.0), optim, (x, y))
    assert type(loss) is float and loss > 0
    after = dict([*model.named_parameters(), *guide.named_parameters()])
    assert all(not torch.equal(before[k], after[k]) for k in before)
    # the optimiser carries its state across calls
    second = training_step(model, guide, SemiSupervisedELBO(alpha=1.0), optim, (x, y))
    assert type(second) is float
    assert all(int(state["state"][0]["step"]) == 2 for state in optim.get_state().values())


def test_training_step_unsupervised():
    pyro.set_rng_seed(0)
    spec = MLPSpec(16, z_dim=2, hidden=(8,))
    model, guide = VAE(spec), VAEGuide(spec)
    x = torch.rand(10, 16).bernoulli()
    before = [p.detach().clone() for p in guide.parameters()]
    loss = training_step(model, guide, SemiSupervisedELBO(), Adam({"lr": 0.01}), (x, None))
    assert type(loss) is float and loss > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, guide.parameters()))


# --------------------------------------------------------------------------------------
# bad configurations stop with a clear message
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(labels=0), r"--labels 0 gives an empty labelled set"),
        (dict(model="m1m2", end_to_end=True, labels=0), r"empty labelled set"),
        (dict(labels=5000), r"more labels than data"),
        (dict(labels=105), r"not divisible by num_classes=10"),
        (dict(labels=-10), r"labels must be non-negative"),
        (dict(epochs=0), r"epochs must be at least 1"),
        (dict(batch_size=0), r"batch_size must be at least 1"),
        (dict(labelled_per_batch=100), r"labelled_per_batch=100 must be smaller than batch_size=100"),
        (dict(likelihood="bernoulli", binarize=False), r"Bernoulli likelihood needs binary pixels"),
        (dict(model="m3"), r"unknown model 'm3'; choose one of m1, m2, m1m2"),
        (dict(dataset="cifar"), r"unknown dataset 'cifar'; valid names are digits, mnist"),
        (dict(validation=1500), r"num_validation=1500 leaves no training data"),
    ],
)
def test_bad_config(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(config(tmp_path / "run", **overrides), progress=False)
    assert not (tmp_path / "run").exists()  # a failed start leaves no folder behind


def test_a_corrupted_checkpoint_is_named_and_the_epoch_before_is_kept(tmp_path):
    """A checkpoint with 4 KB zeroed inside used to load silently (a damaged Adam state)."""
    uninterrupted = train(config(tmp_path / "a", epochs=2), progress=False)
    train(config(tmp_path / "b", epochs=2), progress=False)
    checkpoint, previous = tmp_path / "b" / "checkpoint.pt", tmp_path / "b" / "checkpoint.prev.pt"
    assert load_checkpoint(previous)["epoch"] == 1 and load_checkpoint(checkpoint)["epoch"] == 2
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupted: its record .* no longer matches the checksum"
                                              r".*kept as .*checkpoint\.prev\.pt: copy it over checkpoint\.pt"):
        train(config(tmp_path / "b", epochs=3), resume=True, progress=False)
    shutil.copyfile(previous, checkpoint)  # what the message says: the run goes on from epoch 1, exactly
    resumed = train(config(tmp_path / "b", epochs=2), resume=True, progress=False)
    assert without_timing(resumed["history"]) == without_timing(uninterrupted["history"])
    assert_same(load_checkpoint(checkpoint)["model"], load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"])


def test_a_run_is_refused_into_a_folder_that_holds_one(tmp_path):
    train(config(tmp_path / "a"), progress=False)
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    with pytest.raises(ValueError, match=r"holds a run already .*--resume continues it, --overwrite replaces it"):
        train(config(tmp_path / "a"), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == written
    with pytest.raises(FileNotFoundError, match=r"nothing to resume: .*holds no checkpoint\.pt"):
        train(config(tmp_path / "none"), resume=True, progress=False)
    assert not (tmp_path / "none").exists()
    assert train(config(tmp_path / "a"), overwrite=True, progress=False)["epochs_completed"] == 1


def test_time_limit_stops_between_epochs_and_the_run_resumes_exactly(tmp_path):
    """A run stopped by its time limit (here: after its first epoch, since any epoch is
    longer than a microsecond) writes its metrics and test result, and resuming it without
    the limit ends where an uninterrupted run ends."""
    stopped = train(config(tmp_path / "a", epochs=3, time_limit=1e-6), progress=False)
    assert stopped["epochs_completed"] == 1 and stopped["stopped_by_time_limit"] == 1e-6
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["test"]["epoch"] == 1
    resumed = train(config(tmp_path / "a", epochs=3), resume=True, progress=False)
    uninterrupted = train(config(tmp_path / "b", epochs=3, time_limit=1e6), progress=False)
    assert "stopped_by_time_limit" not in uninterrupted and "stopped_by_time_limit" not in resumed
    assert without_timing(resumed["history"]) == without_timing(uninterrupted["history"])
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert_same(a["model"], b["model"]) and assert_same(a["guide"], b["guide"])


def test_track_test_records_a_test_curve_without_changing_the_run(tmp_path):
    tracked = train(config(tmp_path / "a", epochs=2, track_test=True), progress=False)
    plain = train(config(tmp_path / "b", epochs=2), progress=False)
    seconds = [r["train_seconds"] for r in tracked["history"]]
    assert 0 < seconds[0] < seconds[1]
    assert seconds[1] == pytest.approx(tracked["history"][0]["epoch_seconds"] + tracked["history"][1]["epoch_seconds"])
    for record in tracked["history"]:
        assert 0 <= record["test_error"] <= 1 and record["test_elbo"] < 0 and record["test_seconds"] > 0
    assert all("test_error" not in r for r in plain["history"])
    # the curve is drawn in its own random stream: the run itself is the untracked one
    strip = lambda history: [{k: v for k, v in r.items() if not k.startswith("test_")} for r in history]  # noqa: E731
    assert without_timing(strip(tracked["history"])) == without_timing(plain["history"])
    assert tracked["test"] == plain["test"]


def test_cuda_graph_needs_a_cuda_device(tmp_path):
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        config(tmp_path, cuda_graph=True)
    with pytest.raises(ValueError, match="time_limit must be a positive number"):
        config(tmp_path, time_limit=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_gpu(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda' was asked for but CUDA is not available"):
        config(tmp_path, device="cuda")


# --------------------------------------------------------------------------------------
# m1 (unsupervised) and m1m2
# --------------------------------------------------------------------------------------
def test_m1_trains_without_labels(m1_run):
    out, metrics = m1_run
    assert [r["epoch"] for r in metrics["history"]] == [1]
    record = metrics["history"][0]
    assert record["valid_elbo"] < 0 and "valid_error" not in record
    assert set(metrics["best_validation"]) == {"epoch", "elbo"}
    assert metrics["test"]["elbo"] < 0 and "error" not in metrics["test"]
    assert (out / "samples" / "epoch_0001.png").is_file()
    _, _, model, guide, _ = build_from_checkpoint(out / "best.pt")
    assert isinstance(model, VAE) and isinstance(guide, VAEGuide) and model.z_dim == 4


@pytest.mark.filterwarnings(FROZEN_PARAM_WARNING)
def test_m1m2_with_frozen_m1_checkpoint(m1_run, tmp_path):
    m1_out, _ = m1_run
    m1_state = load_checkpoint(m1_out / "best.pt")
    metrics = train(config(tmp_path, model="m1m2", m1_checkpoint=str(m1_out / "best.pt")), progress=False)
    assert 0 <= metrics["test"]["error"] <= 1 and metrics["test"]["elbo"] < 0
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    # M1 was loaded from its checkpoint and stayed frozen: bit-identical after training
    m1_in_stack = {k[len("m1.") :]: v for k, v in state["model"].items() if k.startswith("m1.")}
    m1_guide_in_stack = {k[len("m1_guide.") :]: v for k, v in state["guide"].items() if k.startswith("m1_guide.")}
    assert_same(m1_in_stack, m1_state["model"], "m1")
    assert_same(m1_guide_in_stack, m1_state["guide"], "m1_guide")
    # M2 sits on M1's 4-d latent and was trained
    assert state["model"]["m2.decoder.hidden_layers.0.0.weight"].shape == (32, 4 + 10)
    _, recipe_, model, _, _ = build_from_checkpoint(tmp_path / "checkpoint.pt")
    assert recipe_.latent_site == "z2" and model.freeze_m1


def test_m1m2_refuses_a_non_m1_checkpoint(m2_run, tmp_path):
    out, _ = m2_run
    with pytest.raises(ValueError, match=r"holds a 'm2' model, not 'm1'"):
        train(config(tmp_path, model="m1m2", m1_checkpoint=str(out / "best.pt")), progress=False)


def test_m1m2_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(config(tmp_path / "a", model="m1m2", m1_checkpoint=str(tmp_path / "missing.pt")), progress=False)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a pyrodgm checkpoint"):
        train(config(tmp_path / "b", model="m1m2", m1_checkpoint=str(tmp_path / "foreign.pt")), progress=False)


def test_m1m2_needs_m1_checkpoint_or_end_to_end(tmp_path):
    with pytest.raises(ValueError, match=r"needs --m1-checkpoint \(or --end-to-end\)"):
        train(config(tmp_path, model="m1m2"), progress=False)


@pytest.mark.filterwarnings(FROZEN_PARAM_WARNING)
def test_m1m2_checkpoint_is_self_contained(m1_run, tmp_path):
    m1_out, _ = m1_run
    m1_copy = tmp_path / "m1.pt"
    shutil.copy(m1_out / "best.pt", m1_copy)
    train(config(tmp_path / "stack", model="m1m2", m1_checkpoint=str(m1_copy)), progress=False)
    m1_copy.unlink()
    _, _, model, _, state = build_from_checkpoint(tmp_path / "stack" / "best.pt")
    assert_same(model.state_dict(), state["model"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_m1_checkpoint_trained_on_gpu_stacks_on_cpu(m1_run, tmp_path):
    m1_out, _ = m1_run
    state = load_checkpoint(m1_out / "best.pt")
    del state["format"]
    state["config"]["device"] = "cuda"
    save_checkpoint(tmp_path / "m1_gpu.pt", state)
    cfg = config(tmp_path, model="m1m2", m1_checkpoint=str(tmp_path / "m1_gpu.pt"))
    model, _ = recipe("m1m2").create(cfg, 64, 10)
    assert_same(model.m1.state_dict(), state["model"])


#: The config of a checkpoint written before the typed configs: the flat dict of every
#: model's fields that ``TrainConfig(model="m2", ...).to_dict()`` saved (pyrodgm at 3bf0764,
#: ``pyrodgm train m2`` on the digits).
FLAT_M2_CONFIG = {
    'model': 'm2', 'dataset': 'digits', 'root': None, 'download': True, 'labels': 100, 'validation': None, 'epochs': 10,
    'batch_size': 200, 'labelled_per_batch': 100, 'lr': 0.003, 'betas': (0.9, 0.999), 'lr_decay': 1.0, 'lr_decay_every': 0,
    'seed': 0, 'device': 'cpu', 'out': 'runs/m2', 'num_particles': 1, 'eval_particles': 10, 'alpha_factor': 0.1,
    'binarize': True, 'z_dim': 50, 'a_dim': None, 'auxiliary_prior': None, 'm1_z_dim': 50, 'm1_hidden': (600, 600),
    'hidden': (500,), 'activation': 'softplus', 'likelihood': 'bernoulli', 'm1_checkpoint': None, 'end_to_end': False,
    'margin_C': 15.0, 'margin_sigma': None, 'margin_cost': 1.0, 'mmcva_alpha': 0.1, 'alpha_u': 0.3, 'alpha_b': 0.001,
    'label_mode': 'enumerate', 'temperature': 1.0, 'temperature_min': 0.5, 'temperature_epochs': 50,
    'temperature_decay': 'exponential', 'feature_dim': 100, 'w_gaussian': 1.0, 'w_categorical': 1.0, 'knn': 5,
    'w_assign': 1.0, 'w_metric': 1.0, 'metric_margin': 2.0, 'gaussian_scale': None, 'min_scale': 0.0,
    'num_clusters': None, 'iw_samples': 1, 'kl_warmup_epochs': 0, 'top_z_dim': 50, 'top_hidden': (100, 100),
    'samples': True, 'validate_inputs': True, 'cuda_graph': False, 'time_limit': None, 'track_test': False,
}


def _flat_config(config: TrainConfig) -> dict:
    """``config`` as the flat TrainConfig of before the typed configs saved it."""
    values = config.to_dict()
    return {**FLAT_M2_CONFIG, **{k: v for k, v in values.items() if k != "params"}, **values["params"]}


def test_an_old_flat_checkpoint_config_is_migrated():
    """Every field routed to the training options or the model's own; other models' fields,
    at their defaults, dropped; fields that the checkpoint predates at their defaults."""
    from pyrodgm.zoo import ADGMConfig, M2Config

    config = TrainConfig.from_dict(FLAT_M2_CONFIG)
    assert config == TrainConfig.paper("m2")
    assert config.params == M2Config(z_dim=50, hidden=(500,), activation="softplus", alpha_factor=0.1)
    adgm = {**FLAT_M2_CONFIG, "model": "adgm", "z_dim": 100, "a_dim": 100, "hidden": (500, 500), "activation": "relu"}
    del adgm["auxiliary_prior"]  # older than auxiliary_prior
    expected = ADGMConfig(z_dim=100, a_dim=100, hidden=(500, 500), activation="relu", auxiliary_prior=None)
    assert TrainConfig.from_dict(adgm).params == expected
    assert TrainConfig.from_dict(TrainConfig.from_dict(adgm).to_dict()).params == expected


def test_an_old_flat_checkpoint_with_another_models_setting_is_refused():
    with pytest.raises(ValueError, match=r"sets knn=3, a hyper-parameter of gmvae, gmvae-clustering, not of its model 'm2'"):
        TrainConfig.from_dict({**FLAT_M2_CONFIG, "knn": 3})
    with pytest.raises(ValueError, match="a field 'colour' that no model has"):
        TrainConfig.from_dict({**FLAT_M2_CONFIG, "colour": "red"})


def test_resume_accepts_an_old_flat_checkpoint_written_before_a_config_field_existed(tmp_path):
    """A checkpoint of the flat TrainConfig resumes; a field added later (here: a_dim,
    another model's, and label_mode, m2's own) is absent from it and compares as its default."""
    cfg = config(tmp_path, epochs=1)
    train(cfg, progress=False)
    path = Path(cfg.out) / "checkpoint.pt"
    state = load_checkpoint(path)
    del state["format"]
    state["config"] = {k: v for k, v in _flat_config(cfg).items() if k not in ("a_dim", "label_mode")}
    save_checkpoint(path, state)
    metrics = train(dataclasses.replace(cfg, epochs=2), resume=True, progress=False)
    assert metrics["epochs_completed"] == 2
    assert load_checkpoint(path)["config"]["params"]["label_mode"] == "enumerate"  # saved in the new form


def test_new_checkpoints_save_the_composed_config(tmp_path):
    cfg = config(tmp_path, epochs=1)
    train(cfg, progress=False)
    saved = load_checkpoint(Path(cfg.out) / "checkpoint.pt")["config"]
    assert saved["params"] == dataclasses.asdict(cfg.params) and "hidden" not in saved
    assert TrainConfig.from_dict(saved) == cfg


def test_for_model_routes_keywords_and_refuses_another_models():
    config = TrainConfig.for_model("adgm", epochs=5, a_dim=7, hidden=(8,))
    assert (config.epochs, config.params.a_dim, config.params.hidden) == (5, 7, (8,))
    with pytest.raises(TypeError, match=r"margin_C is not a hyper-parameter of adgm \(it is mmva, conv-mmva's\)"):
        TrainConfig.for_model("adgm", margin_C=3.0)
    with pytest.raises(TypeError, match="the params of .sdgm. must be its AuxiliaryConfig, got ADGMConfig"):
        TrainConfig(model="sdgm", params=TrainConfig.for_model("adgm").params)


def test_the_m2_recipe_builds_its_networks_with_the_configured_initialisation():
    config = TrainConfig.for_model("m2", init="small-normal", hidden=(300,), z_dim=4)
    model, guide = recipe("m2").build(config, 200, 10)
    assert model.spec.init == guide.spec.init == "small-normal"
    assert guide.classifier_head.logits_layer.weight.std().item() == pytest.approx(1e-3, rel=0.1)
    assert TrainConfig.from_dict(dataclasses.asdict(config)).params.init == "small-normal"


def test_recipe_schedule_and_metrics_hooks(tmp_path, monkeypatch):
    """A recipe's schedule runs before every epoch with the 0-based epoch (also after a
    resume), and its metrics join the validation record and the test metrics."""
    import dataclasses as dc

    from pyrodgm import zoo

    calls = []

    def schedule(cfg, epoch, model, guide, loss):
        calls.append(epoch)
        loss.latent_weights = {"z": min(1.0, (epoch + 1) / 2)}

    def metrics(model, guide, data):
        return {"num_examples_seen": float(len(data))}

    hooked = dc.replace(zoo.RECIPES["m2"], name="m2-hooked", schedule=schedule, metrics=metrics)
    monkeypatch.setitem(zoo.RECIPES, "m2-hooked", hooked)
    train(config(tmp_path, model="m2-hooked", epochs=2), progress=False)
    result = train(config(tmp_path, model="m2-hooked", epochs=3), resume=True, progress=False)
    assert calls == [0, 1, 2]
    assert [r["valid_num_examples_seen"] for r in result["history"]] == [300.0] * 3
    assert result["test"]["num_examples_seen"] > 0


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_its_last_checkpoint(tmp_path, monkeypatch):
    from pyrodgm import training

    train(config(tmp_path, epochs=1), progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    real_step = training.training_step
    calls = []

    def step_that_diverges(*args):
        calls.append(1)
        return real_step(*args) if len(calls) < 3 else float("nan")

    monkeypatch.setattr(training, "training_step", step_that_diverges)
    with pytest.raises(training.TrainingDiverged, match="loss became nan at epoch 2, step 3.*last checkpoint \\(epoch 1\\) is intact"):
        train(config(tmp_path, epochs=2), resume=True, progress=False)
    assert_same(saved, torch.load(tmp_path / "checkpoint.pt", weights_only=True))


@pytest.mark.parametrize("rows", [(100, 100), (3, 5)])
def test_prior_and_clipping_take_the_adgm_authors_step(rows):
    """pyrodgm's loss sums the batch's rows; the ADGM authors' code (Dec 2015) steps on the
    batch's sum over its B rows minus ``log p(W) / n``, n = N B / U their rows with the
    replicated labelled ones, clipped (norm 5, then each element to 1).  With their values
    the gradient that reaches Adam is theirs times B."""
    from pyrodgm.training import optimiser

    num_labelled, num_unlabelled = rows
    batch, num_data = num_labelled + num_unlabelled, 60_000
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 5))
    bias = torch.nn.Parameter(torch.randn(4))
    x = torch.randn(batch, 5)

    def row_losses():
        return (x @ weight.T + bias).tanh().pow(2).sum(-1) * 40  # large enough for the clips to act

    config = TrainConfig(batch_size=batch, labelled_per_batch=num_labelled, weight_prior_std=1.0, grad_clip_norm=5.0, grad_clip_value=1.0)
    optim = optimiser(config, num_data=num_data, labelled_per_batch=num_labelled)
    weight.grad, bias.grad = torch.autograd.grad(row_losses().sum(), (weight, bias))
    optim._prepare_gradients([weight, bias])
    ours = [weight.grad.clone(), bias.grad.clone()]

    their_rows = num_data * batch / num_unlabelled
    theirs = row_losses().sum() / batch - pyro.distributions.Normal(0.0, 1.0).log_prob(weight).sum() / their_rows
    weight.grad, bias.grad = torch.autograd.grad(theirs, (weight, bias))
    assert torch.sqrt(weight.grad.pow(2).sum() + bias.grad.pow(2).sum()) > 5  # the norm clip acts
    torch.nn.utils.clip_grad_norm_([weight, bias], 5.0)
    torch.nn.utils.clip_grad_value_([weight, bias], 1.0)
    torch.testing.assert_close(ours[0] / batch, weight.grad)
    torch.testing.assert_close(ours[1] / batch, bias.grad)


def test_authors_variants_are_off_by_default_and_reach_the_run(tmp_path):
    """Defaults leave Adam plain; the options reach a run's optimiser, scaled by the
    run's rows (clipping) and unlabelled rows (prior) per batch and its unlabelled set."""
    from pyrodgm.training import _prepare, optimiser

    plain = optimiser(TrainConfig(), num_data=1000, labelled_per_batch=100)
    assert (plain.weight_prior_precision, plain.max_grad_norm, plain.max_grad_value) == (None, None, None)
    config = TrainConfig.for_model("m2", dataset="digits", batch_size=60, labelled_per_batch=20, hidden=(8,), z_dim=2,
                         out=str(tmp_path / "run"), weight_prior_std=0.5, grad_clip_norm=5.0, grad_clip_value=1.0)
    run = _prepare(config)
    num_data = len(run.batches.x_unlabelled)
    assert run.optim.weight_prior_precision == pytest.approx(40 / (num_data * 0.25))
    assert (run.optim.max_grad_norm, run.optim.max_grad_value) == (300.0, 60.0)
    supervised = optimiser(TrainConfig(batch_size=50, labelled_per_batch=50, weight_prior_std=2.0, grad_clip_value=0.5),
                           num_data=1000, labelled_per_batch=50)
    assert supervised.weight_prior_precision == pytest.approx(50 / (1000 * 4.0)) and supervised.max_grad_value == 25.0


def test_without_a_validation_set_the_last_epoch_is_kept_and_evaluated(tmp_path):
    """``validation=0`` (the papers' protocol: every training image used): no validation
    metrics, ``best.pt`` is the last epoch's checkpoint, the test set is evaluated on it,
    and the learning curve shows the tracked test error."""
    metrics = train(config(tmp_path / "run", validation=0, epochs=2, track_test=True), progress=False)
    assert metrics["best_validation"] == {"epoch": 2}
    assert not any(key.startswith("valid_") for record in metrics["history"] for key in record)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert best["epoch"] == 2
    assert_same(best["guide"], last["guide"], "guide")
    assert metrics["test"]["error"] == metrics["history"][-1]["test_error"]
    from pyrodgm.plots import learning_curve_panels

    assert learning_curve_panels(metrics["history"]) == [("train_loss_per_example",), ("test_error",)]


def test_learning_rate_decays_from_lr_decay_start_on():
    from pyrodgm.training import learning_rate

    adgm = TrainConfig.for_model(model="m2", lr=1.0, lr_decay=0.5, lr_decay_every=2)
    assert [learning_rate(adgm, e) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]  # start 0: as before
    # the Conv-MMCVA authors' lr *= 0.995 after every epoch from the 1500th (1-based) on: with
    # start 1499, 0-based epoch 1500 (their 1501st) runs at 0.995 and epoch 1499 still at 1
    authors = TrainConfig.for_model(model="conv-mmcva", lr=1.0, lr_decay=0.995, lr_decay_every=1, lr_decay_start=1499)
    assert learning_rate(authors, 1499) == 1.0 and learning_rate(authors, 1500) == 0.995
    assert learning_rate(authors, 2999) == pytest.approx(0.995 ** 1500)
