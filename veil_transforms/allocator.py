"""The process's CPU memory allocator, tuned for the veil loop (glibc only).

PyTorch has no caching allocator on the CPU: every tensor of a step comes from
malloc, and glibc serves blocks above its (adaptive) mmap threshold with a
fresh ``mmap`` and returns them with ``munmap`` when freed, and hands the free
top of its heap back to the kernel. A step of the veil allocates the same
blocks again, so each step page-faults tens of megabytes in anew: measured
16-21% of the loop's CPU time as kernel time on a 2-core VM (LeNet-5), and the amount
swings with the heap's history (``python benchmarks/cpu_allocator.py``;
``benchmarks/results/cpu_allocator.md``).

:func:`tune_cpu_allocator` fixes glibc's mmap threshold at 32 MiB (its
maximum) and keeps up to ``trim_threshold`` bytes of free heap instead of
returning it, so the blocks of one step serve the next. It is process-wide and
cannot be undone. :func:`veil_transforms.functional.veil` applies it (through
:func:`tune_for_cpu_veil`) the first time it veils on the CPU, unless the
environment sets ``VEIL_TUNE_ALLOCATOR=0``, the process tuned it already, or
glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are set;
nothing happens on import or for GPU veils. The values are glibc's own: its
adaptive threshold climbs to 32 MiB by itself after enough large frees (and its
trim threshold to 64 MiB); this starts there, with a trim threshold large
enough for a CPU batch's working set. The same setting for any process,
without the library: ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456`` in its environment. Setting only one of the
two is worse than neither: glibc then stops adapting the other (a one-off check
here, not in the benchmark: twice the CPU time with the trim threshold alone).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 << 20
ENV = "VEIL_TUNE_ALLOCATOR"  # "0" (or false/no/off): veil() leaves the allocator alone
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own settings, read at start

log = logging.getLogger(__name__)

_TUNED: tuple[int, int] | None = None


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Have glibc keep freed blocks for reuse instead of returning them to the kernel (see the module
    docstring). Returns True when applied (or already applied with these values), False where the C
    library is not glibc (macOS, Windows, musl): nothing changes there.

    Costs memory the process keeps rather than returns: up to ``trim_threshold`` of free heap, plus
    the blocks each thread's arena holds. Raises ValueError for thresholds glibc would refuse."""
    global _TUNED
    if not 0 < mmap_threshold <= MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD}] bytes, got {mmap_threshold}")
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be > 0 bytes, got {trim_threshold}")
    if _TUNED == (mmap_threshold, trim_threshold):
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # both or neither: with the values checked above glibc accepts both (it refuses only an mmap
    # threshold above its maximum)
    if not (mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold)):
        return False
    _TUNED = (mmap_threshold, trim_threshold)
    return True


def tune_for_cpu_veil() -> bool:
    """What ``veil()`` calls before veiling on the CPU: :func:`tune_cpu_allocator` with its defaults,
    once per process, unless ``VEIL_TUNE_ALLOCATOR=0``, the process tuned the allocator already
    (with any values), or the environment sets glibc's own thresholds (the user's choice stands).
    Returns whether this module tuned the allocator."""
    if _TUNED is not None:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in os.environ for k in GLIBC_ENV):
        return False
    ok = tune_cpu_allocator()
    if ok:
        log.info("tuned glibc's allocator for the CPU veil (mmap threshold %d MiB, trim threshold %d MiB; "
                 "%s=0 leaves it alone)", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20, ENV)
    return ok


@functools.cache
def _glibc_mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn
