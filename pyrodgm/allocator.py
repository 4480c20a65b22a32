"""Keep the CPU's freed tensor memory in the process instead of faulting it in every step.

torch allocates CPU tensors with the C library's ``malloc``.  glibc's defaults suit
programs whose memory use shrinks: a freed block over a threshold that glibc moves
between 128 KiB and 32 MiB goes back to the OS (``munmap``, or trimming the top of the
heap), and the next step's allocation of the same size faults every page of it in
again, zero-filled by the kernel.  A training step allocates and frees the same
megabytes of activations each time: on the 2-core VM of the speed benchmark an M2 step
(pyrodgm's or the hand-written reference's) faulted 2,800-4,500 pages in when glibc had
trimmed its heap (not every run does), none with the settings below, and the step took
5-20 ms (10-30 %) less in the runs where the faults had occurred.

:func:`tune_glibc_malloc` sets the two thresholds once for the process (``mallopt``,
the same as the ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` environment
variables): blocks up to ``mmap_threshold`` come from the heap, and the heap is not
trimmed below ``trim_threshold`` of free space.  The cost is that the process keeps its
peak heap size.  The ``pyrodgm`` command, the experiments and the speed benchmark call
it; the library never does on import.  jemalloc or tcmalloc through ``LD_PRELOAD`` (as
PyTorch's CPU performance guide suggests) do the same job where they are installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_glibc_malloc"]

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_glibc_malloc(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**30) -> bool:
    """Set glibc's mmap and trim thresholds for this process (module docstring).

    Nothing is changed, and ``False`` returned, off Linux, with a C library other than
    glibc, or when the environment already chose these settings (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` or a
    ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``): the user's choice wins.

    :param int mmap_threshold: blocks larger than this are mapped on their own (glibc
        caps it at 32 MiB on 64-bit machines).
    :param int trim_threshold: free space at the top of the heap kept before trimming.
    :returns: whether both settings were applied.
    """
    if mmap_threshold <= 0 or trim_threshold <= 0:
        raise ValueError(f"thresholds must be positive, got mmap {mmap_threshold} and trim {trim_threshold}")
    user_chose = any(k in os.environ for k in _USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or user_chose:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _glibc():
    """The process's C library if it is glibc, else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None
