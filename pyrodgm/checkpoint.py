"""Checkpoints that load with ``torch.load(weights_only=True)``, are written atomically and
are checked before they are read.

A checkpoint holds only tensors and plain Python values: the model's and guide's
``state_dict``, the Pyro optimiser's state, the random number generators' states, the
training configuration as a dict, the number of completed epochs and the metrics so far.
It is written to a temporary file in the same folder and moved into place with
:func:`os.replace`, so a run killed mid-write leaves the previous checkpoint intact; with
``keep_previous`` the checkpoint it replaces stays beside it as ``NAME.prev.pt``.

``torch.save`` writes a zip archive whose every record carries the CRC-32 of its bytes, but
``torch.load`` does not check them: a checkpoint with a few kilobytes zeroed inside loads
silently, with a damaged tensor.  :func:`load_checkpoint` first checks every record against
its CRC-32 (:meth:`zipfile.ZipFile.testzip`), and reports an empty, truncated, damaged or
foreign file as :class:`CheckpointError`, naming it.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "copy_checkpoint", "previous_checkpoint",
           "verify_checkpoint", "rng_state", "set_rng_state"]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not an intact, readable pyrodgm checkpoint."""


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` with ``keep_previous`` keeps the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically; with ``keep_previous`` the file it replaces
    is kept as :func:`previous_checkpoint` (``path`` is a complete checkpoint at every moment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT_VERSION, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if keep_previous and path.is_file():
        copy_checkpoint(path, previous_checkpoint(path))
    os.replace(tmp, path)


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``target`` becomes a copy of ``source``, atomically (a hard link where the file
    system has them: later checkpoints replace ``source``'s name, not its bytes)."""
    source, target = Path(source), Path(target)
    staging = target.with_name(target.name + ".tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:
        shutil.copyfile(source, staging)
    os.replace(staging, target)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete archive whose every
    record matches the CRC-32 written with it."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint: an interrupted copy or write?")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a pyrodgm checkpoint: it is not a complete archive ({error}); it is truncated or another kind of file"
        ) from None
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupted: its record '{damaged}' no longer matches the checksum written with it")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU, after
    :func:`verify_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}" + (" (a folder: give the .pt file in it)" if path.is_dir() else ""))
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not a pyrodgm checkpoint: it holds Python objects other than tensors and plain values, "
            "which pyrodgm never writes and does not unpickle"
        ) from None
    except (RuntimeError, EOFError, KeyError) as error:
        raise CheckpointError(f"{path} is not a pyrodgm checkpoint: torch cannot read it ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a pyrodgm checkpoint (format {FORMAT_VERSION}): a file torch wrote, but not pyrodgm")
    return state


def rng_state() -> dict[str, Any]:
    """The states of torch's (CPU and CUDA), Python's and NumPy's generators."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
