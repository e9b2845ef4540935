"""Memory the library keeps between calls, and how to give it back.

Three caches outlive a training step, each for speed:
- scratch buffers (host): im2col columns and their gradients, one per role and thread, grown
  to the largest layer seen (~600 MB after one RefineNet-101 step at 512x512);
- interpolation tables: the bilinear matrices per (size, dtype, device), small;
- CuPy's memory pool (device): freed arrays' blocks, kept for reuse.
``empty_cache()`` releases all three (as ``torch.cuda.empty_cache()`` does the last). train()
calls it when it returns; call it yourself after ``del model`` in a notebook. Nothing is lost: the next call simply allocates again.
"""
from __future__ import annotations

from typing import Dict

from . import backend
from .functional import common, upsample


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
