"""Memory the library keeps between calls, and how to give it back.

Three caches outlive a training step, each for speed:
- scratch buffers (host): im2col columns and their gradients, one per role and thread, grown
  to the largest layer seen (~600 MB after one RefineNet-101 step at 512x512);
- interpolation tables: the bilinear matrices per (size, dtype, device), small;
- CuPy's memory pool (device): freed arrays' blocks, kept for reuse.
``empty_cache()`` releases all three (as ``torch.cuda.empty_cache()`` does the last). train()
calls it when it returns; call it yourself after ``del model`` in a notebook. Nothing is lost: the next call simply allocates again.

``retain_freed_memory()`` is the other direction, for the C library's heap: it asks glibc's malloc to keep
what a training step frees for the next step, rather than hand it back to the OS and fault it in again.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Dict

from . import backend
from .functional import common, upsample

GLIBC_MAX_MMAP_THRESHOLD = 32 << 20   # glibc refuses a larger M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (malloc.h)


def cache_nbytes() -> Dict[str, int]:
    """Bytes held now: host scratch buffers (every thread) and CuPy's pool (0 without CUDA)."""
    return {"scratch": common.scratch_nbytes(), "device_pool": backend.device_pool_bytes()}


def empty_cache() -> Dict[str, int]:
    """Release the scratch buffers of every thread, the interpolation tables and CuPy's unused blocks.

    Returns the bytes released per cache ({'scratch': ..., 'device': ...})."""
    released = {"scratch": common.release_scratch()}
    upsample.interpolation_tables.cache_clear()
    released["device"] = backend.free_device_cache()
    return released


def retain_freed_memory(mmap_threshold: int = GLIBC_MAX_MMAP_THRESHOLD, trim_threshold: int = 64 << 20) -> bool:
    """Ask glibc's malloc to keep freed memory in the process for reuse; True if it took the settings.

    A training step frees most of what it allocated (the graph's activations and gradients), and the next
    step allocates the same again. With glibc's defaults part of that goes back to the OS every step and
    returns as fresh pages, one page fault each, zeroed by the kernel: ~1900 faults and 5-9 ms of system
    time per step of the demo network on a 2-core VM (ours, issue 13). Blocks below ``mmap_threshold``
    bytes then come from the heap, and up to ``trim_threshold`` bytes of free heap stay in the process
    (glibc's mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; setting them also stops glibc's own sliding
    threshold): then ~1 fault per step (getrusage), and the demo step 5-10% faster in three paired runs of
    ``benchmarks/contention.py --heap-ab``, which does what the CLI does.

    The setting is process-wide, as malloc is, so importing tinyrefine never makes it: ``python -m
    tinyrefine`` calls this, and a script or notebook may. The cost: up to ``trim_threshold`` bytes of freed
    memory stay counted in this process's RSS. Returns False, changing nothing, where the C library is not
    glibc (macOS, Windows, musl)."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"retain_freed_memory: {name} must be a positive number of bytes, got {value!r}")
    if mmap_threshold > GLIBC_MAX_MMAP_THRESHOLD:
        raise ValueError(f"retain_freed_memory: mmap_threshold {mmap_threshold} is above glibc's largest, "
                         f"{GLIBC_MAX_MMAP_THRESHOLD} bytes (32 MiB)")
    if trim_threshold >= 1 << 31:
        raise ValueError(f"retain_freed_memory: trim_threshold {trim_threshold} does not fit mallopt's int (< 2 GiB)")
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def glibc_mallopt():
    """glibc's ``mallopt`` from the C library this process runs on, or None where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version                    # glibc's own symbol: musl has mallopt but ignores it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt
