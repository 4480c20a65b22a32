"""The GPU kit: everything pyrodgm measures on a GPU, in one prepared call on an offline machine.

A GPU machine may be lent for a few minutes, with no network and an image that has torch
but not pyro-ppl.  ``pack`` (here, online) fills a git-ignored folder with what that image
lacks; ``run`` (there) installs it offline and runs the stages, each time-boxed so that a
slow one cannot eat the rest, each leaving its results in ``--out`` as it finishes:

1. ``env``: the GPU, torch, CUDA and the versions actually imported;
2. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (every model's loss and gradients
   on CUDA against the CPU's, SVI steps, IWAE, checkpoints across devices, the CUDA-graph
   step against the eager one), as JUnit XML;
3. ``bench``: ``bench_speed.py`` on CUDA, eager and with the step in a CUDA graph;
4. ``adgm``: ADGM (1 MC) on MNIST with 100 labels, stopped by a time limit, the test error
   recorded after every epoch against training seconds (``--track-test``);
5. ``iwae``: IWAE-5000 of that ADGM on 200 test images, then on the whole 10k test set if
   the measured rate says it fits the time left;
6. ``lightning`` (only when ``--stages`` names it): ``lightning_throughput.py``, the native
   loop's step against one Lightning process in float32 and in bf16 autocast (the kit
   carries the lightning extra when it is installed where it was packed).

``kit.json`` (written after every stage) holds the manifest of the kit, the environment,
each stage's command, status, time and the end of its output.  ``collect`` copies a run's
files into ``experiments/results`` for the results table.  ``--stages`` runs some stages
only, so a later call can give a whole budget to one: ``run --stages env adgm --adgm-mc 10``
for Maaløe et al.'s 10-sample ADGM.

    python experiments/gpu_kit.py pack --mnist-root ../shared/data     # here: fills .gpu-kit/
    python3 experiments/gpu_kit.py run --out "$OUT"                    # there, in one call
    python experiments/gpu_kit.py collect FOLDER                       # here, with what came back

``run --device cpu --smoke`` is the rehearsal: the same stages with tiny settings on the
CPU, training on scikit-learn's 8x8 digits (the kit's MNIST is still unpacked and checked);
the test suite runs it, so the kit cannot rot while no GPU is lent.

This file imports only the standard library: ``run`` must start before anything is installed.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
DEFAULT_KIT = ROOT / ".gpu-kit"
#: What the lent machine's image lacks of pyrodgm's runtime needs (its image lists torch,
#: torchvision, numpy, scipy, scikit-learn, matplotlib, tqdm, pandas, xarray, h5py,
#: opt-einsum and pytest, as read on 2026-11-17): carried as wheels, at the versions
#: installed here, where they are tested.
CARRIED = ("pyro-ppl", "pyro-api", "arviz", "xarray-einstats", "h5netcdf")
#: The lightning extra (for the ``lightning`` stage), carried when it is installed here.
CARRIED_LIGHTNING = ("lightning", "pytorch-lightning", "lightning-utilities", "torchmetrics", "fsspec", "PyYAML")
#: What the pyrodgm wheel is built from (its digest tells a stale kit).
SOURCES = ("pyproject.toml", "pyrodgm", "models", "guides")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: What one device call may carry (the working tree and the kit together).
CARRY_LIMIT_BYTES = 64 * 2**20
PYTHON_FOR_THE_GPU = "3.12"


# --------------------------------------------------------------------------------------
# pack (here)
# --------------------------------------------------------------------------------------
def sources_digest(root: Path = ROOT) -> str:
    """SHA-256 over the pyrodgm sources' paths and bytes (``*.py`` and ``pyproject.toml``)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        for file in files:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _download_wheels(wheels: Path) -> None:
    """The :data:`CARRIED` packages' wheels, at the versions installed here."""
    requirements = []
    for name in CARRIED:
        try:
            requirements.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"pack: {name} is not installed here; install pyrodgm first (pip install -e .)") from None
    try:
        requirements += [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED_LIGHTNING]
    except importlib.metadata.PackageNotFoundError:
        print('pack: the lightning extra is not installed here (pip install -e ".[lightning]"): the kit cannot run its lightning stage')
    for old in wheels.glob("*.whl"):
        if not old.name.startswith("pyrodgm-"):
            old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--only-binary=:all:", "--python-version", PYTHON_FOR_THE_GPU, "--dest", str(wheels), *requirements],
        check=True,
    )


def _build_pyrodgm_wheel(wheels: Path) -> None:
    for old in wheels.glob("pyrodgm-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as build:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-build-isolation", "--wheel-dir", str(wheels), str(ROOT)],
            check=True, cwd=build,
        )
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' leftovers


def _pack_mnist(mnist_root: Path, data: Path) -> dict:
    """MNIST's four raw files from ``mnist_root/MNIST/raw`` gzipped into ``data/MNIST/raw``."""
    raw = mnist_root / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        raise SystemExit(f"pack: no MNIST at {raw} (missing {', '.join(missing)}); give --mnist-root the folder holding MNIST/raw")
    target = data / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in MNIST_FILES:
        packed = target / f"{name}.gz"
        with open(raw / name, "rb") as source, open(packed, "wb") as file:
            with gzip.GzipFile(fileobj=file, mode="wb", compresslevel=9, mtime=0) as sink:  # the same bytes every time
                shutil.copyfileobj(source, sink)
        files[name] = {"sha256": _sha256(raw / name), "gz_bytes": packed.stat().st_size}
    return files


def _tree_bytes() -> int:
    """Bytes of the working tree a device call sends (tracked and untracked-not-ignored files)."""
    listing = _git("ls-files", "-co", "--exclude-standard", "-z")
    if listing is None:
        return 0
    return sum((ROOT / name).stat().st_size for name in listing.split("\0") if name and (ROOT / name).is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack(args: argparse.Namespace) -> dict:
    kit = Path(args.kit).resolve()
    wheels, data = kit / "wheels", kit / "data"
    wheels.mkdir(parents=True, exist_ok=True)
    if args.download:
        _download_wheels(wheels)
    _build_pyrodgm_wheel(wheels)
    mnist = None
    if args.mnist_root:
        shutil.rmtree(data, ignore_errors=True)
        mnist = _pack_mnist(Path(args.mnist_root), data)
    elif data.exists():
        mnist = json.loads((kit / "manifest.json").read_text()).get("mnist") if (kit / "manifest.json").exists() else None
    manifest = {
        "packed": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "sources_digest": sources_digest(),
        "wheels": {w.name: _sha256(w) for w in sorted(wheels.glob("*.whl"))},
        "mnist": mnist,
    }
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=2))
    kit_bytes, tree_bytes = _folder_bytes(kit), _tree_bytes()
    manifest["kit_bytes"], manifest["tree_bytes"] = kit_bytes, tree_bytes
    print(f"pack: {kit} holds {len(manifest['wheels'])} wheels{' and MNIST' if mnist else ''}: {kit_bytes / 2**20:.1f} MiB; "
          f"with the working tree ({tree_bytes / 2**20:.1f} MiB) a device call carries {(kit_bytes + tree_bytes) / 2**20:.1f} MiB "
          f"of {CARRY_LIMIT_BYTES // 2**20}")
    if kit_bytes + tree_bytes > CARRY_LIMIT_BYTES:
        raise SystemExit("pack: the kit and the working tree are over what one device call carries")
    return manifest


# --------------------------------------------------------------------------------------
# run (there)
# --------------------------------------------------------------------------------------
class Runner:
    """Runs the stages in order within one time budget, recording each in ``kit.json``."""

    def __init__(self, out: Path, work: Path, budget: float, report: dict) -> None:
        self.out, self.work, self.report = out, work, report
        self.deadline = time.monotonic() + budget
        self.env = dict(os.environ)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        (self.out / "kit.json").write_text(json.dumps(self.report, indent=2))

    def stage(self, name: str, command: list[str], timeout: float, extra_env: Optional[dict] = None) -> dict:
        """Run ``command`` for at most ``timeout`` seconds (and never past the budget)."""
        timeout = min(timeout, self.left())
        record = {"stage": name, "command": shlex.join(command), "timeout_seconds": round(timeout, 1)}
        if timeout < 5:
            return self.skip(name, "no time left in the budget")
        log = self.work / f"{name}.log"
        started = time.monotonic()
        print(f"[gpu kit] {name}: {record['command']} (at most {timeout:.0f} s)", flush=True)
        with open(log, "wb") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=self.work,
                                       env={**self.env, **(extra_env or {})}, start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout)
                record.update(status="ok" if returncode == 0 else "failed", returncode=returncode)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                record.update(status="timeout", returncode=None)
        record["seconds"] = round(time.monotonic() - started, 2)
        record["output_tail"] = log.read_text(errors="replace")[-4000:]
        return self._finish(record)

    def skip(self, name: str, reason: str) -> dict:
        return self._finish({"stage": name, "status": "skipped", "reason": reason})

    def _finish(self, record: dict) -> dict:
        self.report["stages"].append(record)
        self.save()
        print(f"[gpu kit] {record['stage']}: {record['status']}" + (f" in {record['seconds']} s" if "seconds" in record else ""),
              flush=True)
        return record


def _install(kit: Path, site: Path) -> dict:
    """Install the kit's wheels into ``site``, offline; refuse a kit packed from other sources."""
    manifest_path = kit / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"run: no kit at {kit} (no manifest.json): run 'python experiments/gpu_kit.py pack' first")
    manifest = json.loads(manifest_path.read_text())
    if manifest["sources_digest"] != sources_digest():
        raise SystemExit(
            f"run: the kit at {kit} was packed from other pyrodgm sources than this tree's (commit "
            f"{manifest.get('commit')}): run 'python experiments/gpu_kit.py pack' again"
        )
    wheels = sorted(str(w) for w in (kit / "wheels").glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore", "--no-index", "--no-deps",
         "--no-compile", "--no-cache-dir", "--target", str(site), *wheels],
        check=True,
    )
    return manifest


def _unpack_mnist(kit: Path, data: Path, manifest: dict) -> bool:
    """The kit's MNIST unzipped into ``data/MNIST/raw`` (torchvision's layout), each file
    checked against the digest ``pack`` recorded; ``False`` if the kit has none."""
    packed = kit / "data" / "MNIST" / "raw"
    if not manifest.get("mnist") or not all((packed / f"{name}.gz").is_file() for name in MNIST_FILES):
        return False
    raw = data / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        with gzip.open(packed / f"{name}.gz", "rb") as source, open(raw / name, "wb") as sink:
            shutil.copyfileobj(source, sink)
        if _sha256(raw / name) != manifest["mnist"][name]["sha256"]:
            raise SystemExit(f"run: the kit's {name}.gz does not unpack to the file pack read: pack again")
    return True


STAGES = ("env", "cuda_tests", "bench", "adgm", "iwae")
#: Stages run only when ``--stages`` names them.
OPTIONAL_STAGES = ("lightning",)
#: Seconds each stage may take at most in a full run (the ADGM gets what is left, minus the IWAE's share).
STAGE_LIMITS = {"env": 60, "cuda_tests": 150, "bench": 150, "lightning": 300}
IWAE_RESERVE, IWAE_PROBE_IMAGES = 120, 200
MNIST_TEST_IMAGES, DIGITS_TEST_IMAGES = 10_000, 297  # pyrodgm tests on the digits' last 297 images


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out or os.environ.get("OUT") or "gpu-kit-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pyrodgm-gpu-kit-"))
    kit = Path(args.kit).resolve()
    started = time.monotonic()
    report = {"date": datetime.date.today().isoformat(), "device": args.device, "smoke": args.smoke,
              "budget_seconds": args.budget, "command": "python3 experiments/gpu_kit.py " + shlex.join(sys.argv[1:]),
              "stages": []}
    runner = Runner(out, work, args.budget, report)
    site, data = work / "site", work / "data"
    report["kit"] = _install(kit, site)
    has_mnist = _unpack_mnist(kit, data, report["kit"])
    report["mnist"] = "unpacked and verified" if has_mnist else "not in the kit"
    report["setup_seconds"] = round(time.monotonic() - started, 2)
    runner.env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                      PYTHONUNBUFFERED="1", MPLBACKEND="Agg", PYRODGM_TEST_DEVICE=args.device)
    runner.save()
    stages = set(args.stages)
    if "env" in stages:
        env = runner.stage("env", _python(str(EXPERIMENTS / "gpu_kit.py"), "env", "--output", str(work / "env.json")),
                           STAGE_LIMITS["env"])
        if env["status"] == "ok":
            report["environment"] = json.loads((work / "env.json").read_text())
            runner.save()
    if "cuda_tests" in stages:
        runner.stage("cuda_tests", _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                                           str(ROOT / "tests" / "test_cuda.py"), "--junitxml", str(out / "cuda_tests.xml")),
                     STAGE_LIMITS["cuda_tests"])
    if "bench" in stages:
        runner.stage("bench", _python(*_bench_command(args, out)), STAGE_LIMITS["bench"])
    use_mnist = has_mnist and not args.smoke  # the rehearsal trains on the 8x8 digits: seconds, not minutes
    if "lightning" in stages:
        runner.stage("lightning", _python(*_lightning_command(args, data if use_mnist else None, out)), STAGE_LIMITS["lightning"])
    if "adgm" in stages:
        checkpoint = _adgm_stage(runner, args, data if use_mnist else None, out, reserve=IWAE_RESERVE if "iwae" in stages else 0)
        if "iwae" in stages and checkpoint.is_file():
            _iwae_stages(runner, checkpoint, args.device, args.smoke, data if use_mnist else None, out)
        elif "iwae" in stages:
            runner.skip("iwae_probe", "the ADGM stage left no checkpoint to evaluate")
    report["seconds"] = round(time.monotonic() - started, 2)
    runner.save()
    shutil.rmtree(work, ignore_errors=True)
    failed = [s["stage"] for s in report["stages"] if s["status"] != "ok"]
    print(f"[gpu kit] done in {report['seconds']} s" + (f"; not ok: {', '.join(failed)}" if failed else "; every stage ok"))
    return report


def _bench_command(args: argparse.Namespace, out: Path) -> list[str]:
    command = [str(EXPERIMENTS / "bench_speed.py"), "--device", args.device, "--output", str(out / f"bench_speed_{args.device}.json")]
    if args.smoke:
        return command + ["--models", "m2", "--threads", "1", "--steps", "2", "--warmup", "1", "--batch", "20",
                          "--iwae-k", "20", "--iwae-images", "2", "--iwae-chunk", "10"]
    command += ["--steps", "50", "--warmup", "10", "--iwae-k", "5000", "--iwae-images", "100", "--iwae-chunk", "1000"]
    return command + (["--cuda-graph"] if args.device.startswith("cuda") else [])


def _lightning_command(args: argparse.Namespace, data: Optional[Path], out: Path) -> list[str]:
    """``lightning_throughput.py``: the native loop, and one Lightning process in float32 and
    in bf16 autocast (on CUDA), ADGM at the paper's size on MNIST (the digits without ``data``)."""
    command = [str(EXPERIMENTS / "lightning_throughput.py"), "--device", args.device, "--processes", "1",
               "--output", str(out / f"lightning_throughput_{args.device}.json")]
    if args.smoke:
        return command + ["--model", "m2", "--hidden", "16", "--warmup", "1", "--timeout", "120"]
    command += ["--model", "adgm", "--warmup", "20", "--timeout", "140"]
    command += ["--dataset", "mnist", "--root", str(data), "--no-download"] if data is not None else ["--dataset", "digits"]
    return command + (["--precisions", "32-true", "bf16-mixed"] if args.device.startswith("cuda") else [])


def _adgm_stage(runner: Runner, args: argparse.Namespace, data: Optional[Path], out: Path, reserve: float) -> Path:
    """ADGM with ``--adgm-mc`` samples on MNIST (the digits without ``data``), its test error
    after every epoch, stopped by a time limit that leaves ``reserve`` seconds; on CUDA with
    the step in a CUDA graph, and eagerly with the time left if the graph fails.  Returns
    the run's ``best.pt``."""
    run_dir = runner.work / "runs" / "adgm"
    data_args = ["--root", str(data), "--no-download"] if data else ["--dataset", "digits"]
    command = [str(EXPERIMENTS / "adgm_mnist_100.py"), *data_args, "--mc", str(args.adgm_mc), "--device", args.device,
               "--out", str(run_dir), "--results", str(out), "--track-test", "--quiet", "--no-validate-inputs"]
    if args.smoke:
        runner.stage("adgm", _python(*command, "--epochs", "2", "--validation", "300", "--eval-particles", "2",
                                     "--threads", "1"), 600)
        return run_dir / "best.pt"
    graphed = args.device.startswith("cuda")
    for name, extra in (("adgm", ["--cuda-graph"] if graphed else []), ("adgm_eager", [])):
        timeout = runner.left() - reserve
        limit = max(timeout - 60, 1)  # the last epoch may end at the limit; then the test evaluation and the plots
        record = runner.stage(name, _python(*command, "--epochs", "1000", "--time-limit", f"{limit:.0f}", *extra), timeout)
        if not (graphed and name == "adgm" and record["status"] == "failed"):
            break
        shutil.rmtree(run_dir, ignore_errors=True)  # the graph did not hold: the eager step, with the time left
    return run_dir / "best.pt"


def _iwae_stages(runner: Runner, checkpoint: Path, device: str, smoke: bool, data: Optional[Path], out: Path) -> None:
    """IWAE-k on a few test images (the rate), then on the whole test set if that fits."""
    k, chunk = ("20", "10") if smoke else ("5000", "1000")
    base = ["-m", "pyrodgm.cli", "evaluate", str(checkpoint), "--iwae-k", k, "--device", device, "--batch-size", "100",
            "--chunk-size", chunk, "--quiet", *(["--root", str(data)] if data else [])]
    probe_file = runner.work / "iwae_probe.json"
    probe = runner.stage("iwae_probe", _python(*base, "--limit", str(IWAE_PROBE_IMAGES), "--output", str(probe_file)),
                         runner.left() - 5)
    if probe["status"] != "ok":
        return
    measured = json.loads(probe_file.read_text())
    rate = measured["num_examples"] / measured["iwae_seconds"]
    projected = (MNIST_TEST_IMAGES if data else DIGITS_TEST_IMAGES) / rate
    runner.report["iwae_probe"] = {"images": measured["num_examples"], "iwae_k": measured["iwae_k"],
                                   "iwae_seconds": measured["iwae_seconds"], "images_per_second": rate,
                                   "projected_seconds_for_the_test_set": projected,
                                   "iwae_log_likelihood": measured["iwae_log_likelihood"]}
    runner.save()
    if projected * 1.3 + 30 > runner.left():
        runner.skip("iwae", f"the whole test set would take about {projected:.0f} s, {runner.left():.0f} s are left")
        return
    output = out / f"iwae{k}_{measured['model']}_test_set_{device}.json"
    runner.stage("iwae", _python(*base, "--output", str(output)), runner.left() - 2)


# --------------------------------------------------------------------------------------
# env (a stage) and collect (here)
# --------------------------------------------------------------------------------------
def env(args: argparse.Namespace) -> dict:
    """What this machine runs: the GPU, torch, CUDA, and where each package was imported from."""
    import numpy
    import pyro
    import torch

    import pyrodgm

    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
        "pyrodgm_from": str(Path(pyrodgm.__file__).parent),
    }
    try:
        import arviz

        report["arviz"] = arviz.__version__
    except ImportError as error:  # pyrodgm evaluate needs it: say so here rather than in a later stage
        report["arviz"] = f"not importable: {error}"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                         "memory_gib": round(properties.total_memory / 2**30, 1), "multiprocessors": properties.multi_processor_count}
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                                   capture_output=True, text=True)
            report["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


def collect(args: argparse.Namespace) -> list[Path]:
    """Copy a kit run's result files into the results folder (``kit.json`` as
    ``gpu_kit_DATE_DEVICE.json``); then ``results_table.py --write`` shows them."""
    source, results = Path(args.folder), Path(args.results)
    kit_file = source / "kit.json"
    if not kit_file.is_file():
        raise SystemExit(f"collect: {source} holds no kit.json: give the folder a 'run' wrote (files_at)")
    kit = json.loads(kit_file.read_text())
    results.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copyfile(kit_file, results / f"gpu_kit_{kit['date']}_{kit['device']}.json"))]
    for path in sorted(source.iterdir()):
        if path.suffix in (".json", ".png", ".xml") and path.name != "kit.json":
            copied.append(Path(shutil.copyfile(path, results / path.name)))
    for path in copied:
        print(f"collect: {path}")
    return copied


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="fill the kit folder (here, online)")
    p.add_argument("--kit", default=str(DEFAULT_KIT), help="the kit folder (git-ignored; name it in the device call's carry)")
    p.add_argument("--mnist-root", help="folder holding MNIST/raw (torchvision's layout), e.g. ../shared/data")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="no wheels from the package index: only pyrodgm's own wheel (the offline rehearsal)")
    r = commands.add_parser("run", help="install the kit offline and run the stages (there, in one call)")
    r.add_argument("--kit", default=str(DEFAULT_KIT))
    r.add_argument("--out", help="where the results go (default $OUT)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--smoke", action="store_true", help="tiny settings: the rehearsal")
    r.add_argument("--budget", type=float, default=540, help="seconds for the whole run (a device call may take 600)")
    r.add_argument("--stages", nargs="+", choices=STAGES + OPTIONAL_STAGES, default=list(STAGES),
                   help="the stages to run, in their fixed order (iwae needs adgm); default all but lightning "
                        "(the throughput of lightning_throughput.py, with the lightning extra in the kit)")
    r.add_argument("--adgm-mc", type=int, default=1, help="Monte Carlo samples per step of the ADGM stage (the paper: 1 or 10)")
    e = commands.add_parser("env", help="print the environment as JSON (a stage of run)")
    e.add_argument("--output")
    c = commands.add_parser("collect", help="copy a run's files into experiments/results")
    c.add_argument("folder")
    c.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    args = parser.parse_args(argv)
    {"pack": pack, "run": run, "env": env, "collect": collect}[args.command](args)


if __name__ == "__main__":
    main()
