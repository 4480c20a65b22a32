"""Data-parallel training through Lightning (pyrodgm.lightning, pyrodgm.distributed) on the
CPU: the shards of the batches, one process against the native loop, two gloo processes
against one process on their combined batch, exact resume of a two-process run, the
checkpoints in the native loop and the CLI, and bf16 autocast.

The two-process runs start tests/lightning_worker.py as a command of its own (Lightning's
``ddp`` launcher runs it again for process 1), with a timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyrodgm.data import SemiSupervisedBatches
from pyrodgm.distributed import ShardedBatches
from pyrodgm.training import TrainConfig, _prepare, build_from_checkpoint, learning_rate, train, training_step

pytestmark = pytest.mark.usefixtures("clean_param_store", "pyro_validation", "single_thread")

pytest.importorskip("lightning", reason='the lightning extra is not installed (pip install -e ".[lightning]")')

from pyrodgm.lightning import Float32Products, LightningOptions, native_batch_epoch, train_lightning  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lightning_worker import config as worker_config, noise_free  # noqa: E402

WORKER = Path(__file__).parent / "lightning_worker.py"
TIMING = ("epoch_seconds", "train_seconds", "test_seconds")


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("model", "guide"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name}"


# --------------------------------------------------------------------------------------
# the shards
# --------------------------------------------------------------------------------------
def _data(num_labelled=20, num_unlabelled=100):
    generator = torch.Generator().manual_seed(1)
    x_l, x_u = torch.rand(num_labelled, 5, generator=generator), torch.rand(num_unlabelled, 5, generator=generator)
    return x_l, torch.arange(num_labelled) % 3, x_u


def test_one_shard_is_the_native_batches():
    native = SemiSupervisedBatches(*_data(), batch_size=10, labelled_per_batch=4, seed=3, binarize=True)
    shard = ShardedBatches.shard(native, rank=0, world_size=1)
    batches = list(zip(native, shard))
    assert len(batches) == len(native) == 16
    for (x1, y1), (x2, y2) in batches:
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_shards_split_the_unlabelled_rows_and_take_the_labelled_rows_as_the_recipe_says():
    # ADGM's layout: as many labelled rows per batch as there are labels, so every batch holds all of them
    x_l, y_l, x_u = _data(num_labelled=10, num_unlabelled=90)
    shards = [ShardedBatches(x_l, y_l, x_u, batch_size=20, labelled_per_batch=10, seed=0, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # 90 unlabelled rows, 30 a global batch (10 a process)
    seen = []
    for batches in zip(*shards):
        for x, y in batches:
            assert x.shape == (20, 5) and (y[:10] >= 0).all() and (y[10:] == -1).all()
            assert sorted(x[:10].sum(1).tolist()) == sorted(x_l.sum(1).tolist())  # all 10 labelled rows
            seen += x[10:].sum(1).tolist()
    assert sorted(seen) == sorted(x_u.sum(1).tolist())  # every unlabelled row once in the epoch, on one process


def test_bad_shard():
    with pytest.raises(ValueError, match="rank 2 of 2"):
        ShardedBatches(*_data(), batch_size=10, labelled_per_batch=4, rank=2, world_size=2)


# --------------------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_and_native(tmp_path_factory):
    """Two epochs of the same run in the native loop and in one Lightning process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("one")
        native = train(worker_config(str(root / "native"), 2), progress=False)
        pyro.clear_param_store()
        light = train_lightning(worker_config(str(root / "lightning"), 2), LightningOptions(), progress=False)
    finally:
        torch.set_num_threads(threads)
        pyro.clear_param_store()
    return root, native, light


def test_one_process_equals_the_native_loop(lightning_and_native):
    root, native, light = lightning_and_native
    a = torch.load(root / "native" / "checkpoint.pt", weights_only=True)
    b = torch.load(root / "lightning" / "checkpoint.pt", weights_only=True)
    assert_same_state(a, b)
    assert without_timing(native["history"]) == without_timing(light["history"])
    assert native["test"] == light["test"]
    assert light["engine"]["name"] == "lightning" and light["engine"]["processes"] == 1
    assert (root / "lightning" / "best.pt").is_file() and (root / "lightning" / "learning_curve.png").is_file()
    logged = (root / "lightning" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(logged) == 3 and "valid_error" in logged[0]  # a header and a row per epoch


def test_a_lightning_checkpoint_resumes_in_the_native_loop_and_loads_for_evaluation(lightning_and_native, tmp_path):
    root, native, _ = lightning_and_native
    config, _, model, guide, state = build_from_checkpoint(root / "lightning" / "best.pt")
    assert state["epoch"] >= 1 and config.model == "m2"
    # the Lightning run's checkpoint of epoch 2, continued natively, equals the native run continued
    for name in ("native", "lightning"):
        (tmp_path / name).mkdir()
        for file in ("checkpoint.pt", "best.pt", "metrics.json"):
            (tmp_path / name / file).write_bytes((root / name / file).read_bytes())
        pyro.clear_param_store()
        train(worker_config(str(tmp_path / name), 3), resume=True, progress=False)
    assert_same_state(torch.load(tmp_path / "native" / "checkpoint.pt", weights_only=True),
                      torch.load(tmp_path / "lightning" / "checkpoint.pt", weights_only=True))


def test_the_native_loops_checkpoint_resumes_under_lightning(lightning_and_native, tmp_path):
    root, _, _ = lightning_and_native
    (tmp_path / "run").mkdir()
    for file in ("checkpoint.pt", "best.pt", "metrics.json"):
        (tmp_path / "run" / file).write_bytes((root / "native" / file).read_bytes())
    resumed = train_lightning(worker_config(str(tmp_path / "run"), 3), LightningOptions(), resume=True, progress=False)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]


def test_bf16_autocast_keeps_the_loss_in_float32_and_close_to_it():
    cfg = worker_config("unused", 1)
    run = _prepare(cfg)
    run.batches.set_epoch(0)
    x, y = next(iter(run.batches))
    full = run.loss.differentiable_loss(run.model, run.guide, x, y=y)
    with torch.autocast("cpu", dtype=torch.bfloat16), Float32Products():
        mixed = run.loss.differentiable_loss(run.model, run.guide, x, y=y)
        with torch.no_grad():
            product = run.model.decoder(torch.zeros(3, 4 + 10))
    assert mixed.dtype == torch.float32 and product.dtype == torch.float32
    # the sampling noise differs between the two evaluations; bf16's 8-bit mantissa does the rest
    assert abs(mixed.item() - full.item()) / abs(full.item()) < 0.02


# --------------------------------------------------------------------------------------
# two processes (gloo)
# --------------------------------------------------------------------------------------
def _two_processes(out: Path, *args: str, timeout: float = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(WORKER), str(out), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def _one_process_on_the_combined_batches(cfg: TrainConfig):
    """One process, noise-free, on the concatenation of the two processes' batches of epoch
    0 (labelled rows first): its gradients of the first step, and its run after the epoch."""
    run = noise_free(_prepare(cfg))
    run.optim.set_learning_rate(learning_rate(cfg, 0))
    run.model.train(), run.guide.train()
    shards = [ShardedBatches.shard(run.batches, r, 2) for r in range(2)]
    for shard in shards:
        shard.set_epoch(native_batch_epoch(0))
    first, values, labelled = None, [], cfg.labelled_per_batch
    for (x0, y0), (x1, y1) in zip(*shards):
        x, y = torch.cat([x0[:labelled], x1[:labelled], x0[labelled:], x1[labelled:]]), torch.cat([y0[:labelled], y1[:labelled], y0[labelled:], y1[labelled:]])
        if first is None:
            run.loss.differentiate(run.model, run.guide, x, y=y)
            named = [(f"{o}.{n}", p) for o, m in (("model", run.model), ("guide", run.guide)) for n, p in m.named_parameters()]
            first = {n: p.grad.clone() for n, p in named}
            for _, p in named:
                p.grad = None
        values.append(training_step(run.model, run.guide, run.loss, run.optim, (x, y)))
    return first, values, run


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_combined_batch(tmp_path):
    _two_processes(tmp_path / "two", "--noise-free", "--grads", str(tmp_path / "grads"))
    first, values, run = _one_process_on_the_combined_batches(worker_config(str(tmp_path / "one"), 1))
    # the summed gradients: equal on both processes, and the combined batch's (not half of it: the loss scale)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads.rank{rank}.pt", weights_only=True)
        assert grads.keys() == first.keys()
        for name in first:
            torch.testing.assert_close(grads[name], first[name], rtol=1e-4, atol=1e-5, msg=name)
    # the loss, and the parameters after the epoch's steps
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert len(values) == 12  # global batches of 100 unlabelled rows in the epoch
    assert metrics["history"][0]["train_loss_per_example"] == pytest.approx(sum(values) / len(values) / 200, rel=1e-5)
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    for part, module in (("model", run.model), ("guide", run.guide)):
        for name, value in module.state_dict().items():
            torch.testing.assert_close(state[part][name], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")
    assert state["engine"]["processes"] == 2 and len(state["rng_ranks"]) == 2


@pytest.mark.slow
def test_a_two_process_run_resumes_exactly(tmp_path):
    _two_processes(tmp_path / "a", "--epochs", "2")
    _two_processes(tmp_path / "b", "--epochs", "1")
    (tmp_path / "b" / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 partial checkpoint")  # killed while writing
    _two_processes(tmp_path / "b", "--epochs", "2", "--resume")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert_same_state(a, b)
    for rank in range(2):
        assert torch.equal(a["rng_ranks"][rank]["torch"], b["rng_ranks"][rank]["torch"])
    history = [json.loads((tmp_path / name / "metrics.json").read_text())["history"] for name in "ab"]
    assert without_timing(history[0]) == without_timing(history[1])


# --------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------
TINY_ADGM = ["--dataset", "digits", "--labels", "100", "--epochs", "1", "--hidden", "32", "--z-dim", "4", "--a-dim", "4",
             "--no-samples", "--quiet"]


def test_lightning_options_need_the_lightning_engine(tmp_path, capsys):
    from pyrodgm.cli import main

    assert main(["train", "adgm", *TINY_ADGM, "--devices", "2", "--out", str(tmp_path / "run")]) == 2
    assert "--devices: Lightning's options, for --engine lightning" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_lightning_engine_without_the_extra_is_one_line(tmp_path, capsys, monkeypatch):
    from pyrodgm.cli import main

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # as if not installed
    assert main(["train", "adgm", *TINY_ADGM, "--engine", "lightning", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        'pyrodgm train: error: --engine lightning needs the lightning extra: pip install "pyrodgm[lightning]"'
    )


@pytest.mark.slow
def test_the_readme_command_trains_adgm_on_two_processes(tmp_path):
    out = tmp_path / "adgm"
    command = [sys.executable, "-m", "pyrodgm.cli", "train", "adgm", *TINY_ADGM, "--engine", "lightning", "--devices", "2",
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["out"] == str(out)  # process 0 reports, once
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["engine"]["processes"] == 2 and metrics["config"]["labelled_per_batch"] == 100
    assert (out / "best.pt").is_file() and (out / "logs" / "version_0" / "metrics.csv").is_file()


def test_the_all_reduce_takes_the_weight_prior_and_clipping_of_the_combined_batch():
    """N processes with batch B sum the gradient of N·B rows: their optimiser clips and
    weighs the prior as one process with the combined batch does (a plain
    ``GradientAllReduce(optim_args)`` dropped both, silently)."""
    from pyrodgm.distributed import GradientAllReduce
    from pyrodgm.training import optimiser

    options = dict(weight_prior_std=0.5, grad_clip_norm=5.0, grad_clip_value=1.0)
    one_process = optimiser(TrainConfig(batch_size=200, labelled_per_batch=100, **options), num_data=50_000, labelled_per_batch=100)
    combined = optimiser(TrainConfig(batch_size=600, labelled_per_batch=300, **options), num_data=50_000, labelled_per_batch=300)
    reduced = GradientAllReduce.for_processes(one_process, [], world_size=3)
    for name in ("weight_prior_precision", "max_grad_norm", "max_grad_value"):
        assert getattr(reduced, name) == pytest.approx(getattr(combined, name)), name
    plain = GradientAllReduce.for_processes(optimiser(TrainConfig(), num_data=1000, labelled_per_batch=100), [], world_size=2)
    assert (plain.weight_prior_precision, plain.max_grad_norm, plain.max_grad_value) == (None, None, None)
