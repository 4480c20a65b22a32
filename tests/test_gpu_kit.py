"""The GPU kit (experiments/gpu_kit.py) rehearsed on the CPU: pack offline (pyrodgm's own
wheel and a tiny MNIST in torchvision's layout), then ``run --device cpu --smoke``, which
installs the kit into a folder of its own, unpacks and checks its MNIST and runs every
stage as the GPU would (training on the 8x8 digits)."""

import gzip
import json
import struct
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "experiments" / "gpu_kit.py"


def _import_kit():
    sys.path.insert(0, str(KIT.parent))
    try:
        return __import__("gpu_kit")
    finally:
        sys.path.remove(str(KIT.parent))


def write_tiny_mnist(root: Path, train: int = 600, test: int = 100) -> None:
    """MNIST's four IDX files (torchvision's raw layout) with random images and balanced labels."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = (generator.random((count, 28, 28)) < 0.2).astype(np.uint8) * 255
        labels = (np.arange(count) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.tobytes())


def _kit(*args, cwd):
    return subprocess.run([sys.executable, str(KIT), *args], check=True, cwd=cwd, timeout=900, capture_output=True, text=True)


@pytest.mark.slow
def test_pack_and_the_cpu_rehearsal_of_the_whole_run(tmp_path):
    write_tiny_mnist(tmp_path / "mnist")
    kit, out = tmp_path / "kit", tmp_path / "out"
    _kit("pack", "--kit", str(kit), "--no-download", "--mnist-root", str(tmp_path / "mnist"), cwd=tmp_path)
    manifest = json.loads((kit / "manifest.json").read_text())
    assert [name.split("-")[0] for name in manifest["wheels"]] == ["pyrodgm"]
    assert manifest["sources_digest"] == _import_kit().sources_digest()
    with gzip.open(kit / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz") as packed:
        assert packed.read() == (tmp_path / "mnist" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()

    done = _kit("run", "--kit", str(kit), "--out", str(out), "--device", "cpu", "--smoke", cwd=tmp_path)
    assert "every stage ok" in done.stdout, done.stdout
    report = json.loads((out / "kit.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["env", "cuda_tests", "bench", "adgm", "iwae_probe", "iwae"]
    assert all(s["status"] == "ok" for s in stages.values()), {k: s["output_tail"][-800:] for k, s in stages.items()}
    # the stages ran the kit's pyrodgm wheel, installed for the run, not this checkout
    assert report["environment"]["pyrodgm_from"] != str(ROOT / "pyrodgm")
    assert report["kit"]["sources_digest"] == manifest["sources_digest"]

    suite = ElementTree.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= 20 and int(suite.get("failures")) == int(suite.get("errors")) == 0  # CPU against CPU

    bench = json.loads((out / "bench_speed_cpu.json").read_text())
    assert set(bench["models"]) == {"m2"} and bench["models"]["m2"]["step_validation_off"]["ratio"] > 0

    assert report["mnist"] == "unpacked and verified"
    (result_file,) = out.glob("adgm_1mc_100_labels_digits_seed0.json")  # the rehearsal trains on the digits
    result = json.loads(result_file.read_text())
    assert result["epochs_completed"] == 2
    assert all(0 <= r["test_error"] <= 1 and r["train_seconds"] > 0 for r in result["history"])
    assert (out / "adgm_1mc_100_labels_digits_seed0_test_curve.png").stat().st_size > 0

    (iwae_file,) = out.glob("iwae20_adgm_test_set_cpu.json")
    iwae = json.loads(iwae_file.read_text())
    assert iwae["num_examples"] == 297 and iwae["iwae_log_likelihood"] < 0
    assert report["iwae_probe"]["images_per_second"] > 0
    assert len(list(out.iterdir())) <= 8  # what a device call brings back

    sys.path.insert(0, str(KIT.parent))
    try:
        row = __import__("results_table").gpu_kit_rows([("kit.json", report)])[2]
    finally:
        sys.path.remove(str(KIT.parent))
    assert "adgm ok" in row and "iwae ok" in row and "--smoke" in row


@pytest.mark.slow
def test_run_with_some_stages_only(tmp_path):
    """``--stages`` runs those alone (here the training without the IWAE: it takes the whole budget)."""
    kit, out = tmp_path / "kit", tmp_path / "out"
    _kit("pack", "--kit", str(kit), "--no-download", cwd=tmp_path)
    _kit("run", "--kit", str(kit), "--out", str(out), "--device", "cpu", "--smoke", "--stages", "env", "adgm", "--adgm-mc", "2",
         cwd=tmp_path)
    report = json.loads((out / "kit.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["env", "adgm"] and report["mnist"] == "not in the kit"
    assert json.loads((out / "adgm_2mc_100_labels_digits_seed0.json").read_text())["mc_samples"] == 2


def test_run_refuses_a_kit_packed_from_other_sources(tmp_path):
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "manifest.json").write_text(json.dumps({"sources_digest": "0" * 64, "commit": "abc"}))
    done = subprocess.run([sys.executable, str(KIT), "run", "--kit", str(kit), "--out", str(tmp_path / "out"), "--smoke",
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "packed from other pyrodgm sources" in done.stderr
    missing = subprocess.run([sys.executable, str(KIT), "run", "--kit", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "run 'python experiments/gpu_kit.py pack' first" in missing.stderr


def test_the_kits_test_set_sizes_are_pyrodgms():
    from pyrodgm.data import load_dataset

    kit = _import_kit()
    assert kit.DIGITS_TEST_IMAGES == len(load_dataset("digits", train=False))
    assert kit.MNIST_TEST_IMAGES == 10_000


def test_sources_digest_follows_the_sources(tmp_path):
    kit = _import_kit()
    for name in ("pyrodgm", "models", "guides"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    before = kit.sources_digest(tmp_path)
    (tmp_path / "models" / "a.py").write_text("x = 2\n")
    assert kit.sources_digest(tmp_path) != before
    (tmp_path / "models" / "a.py").write_text("x = 1\n")
    (tmp_path / "guides" / "notes.txt").write_text("not a source")
    assert kit.sources_digest(tmp_path) == before


def test_collect_copies_a_runs_files_for_the_results_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "kit.json").write_text(json.dumps({"date": "2026-11-30", "device": "cuda", "stages": []}))
    (run / "bench_speed_cuda.json").write_text("{}")
    (run / "cuda_tests.xml").write_text("<testsuites/>")
    _kit("collect", str(run), "--results", str(tmp_path / "results"), cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "bench_speed_cuda.json", "cuda_tests.xml", "gpu_kit_2026-11-30_cuda.json"]


@pytest.mark.slow
def test_the_lightning_stage_runs_when_named(tmp_path):
    """The optional ``lightning`` stage: lightning_throughput.py's native and one-process rows."""
    pytest.importorskip("lightning", reason='the lightning extra is not installed (pip install -e ".[lightning]")')
    kit, out = tmp_path / "kit", tmp_path / "out"
    _kit("pack", "--kit", str(kit), "--no-download", cwd=tmp_path)
    _kit("run", "--kit", str(kit), "--out", str(out), "--device", "cpu", "--smoke", "--stages", "lightning", cwd=tmp_path)
    (stage,) = json.loads((out / "kit.json").read_text())["stages"]
    assert stage["stage"] == "lightning" and stage["status"] == "ok", stage["output_tail"][-2000:]
    rows = json.loads((out / "lightning_throughput_cpu.json").read_text())["rows"]
    assert [(r["engine"], r["processes"]) for r in rows] == [("native", 1), ("lightning", 1)]
