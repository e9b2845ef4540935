"""What the kernels share: argument checks, output sizes, the thread pool over planes, scratch buffers."""
from __future__ import annotations

import itertools
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Tuple, Union

import numpy as np

from .. import threads
from ..engine import Tensor

IntPair = Union[int, Tuple[int, int]]


_plane_pool = None   # (threads, ThreadPoolExecutor), remade when the thread count changes
PARALLEL_MIN_VALUES = 1 << 20   # smaller jobs run inline: there the threads cost more than they save


def over_planes(n_planes: int, work, plane_size: int, chunks_per_core: int = 4) -> None:
    """Run ``work(a, b)`` over plane ranges covering [0, n_planes), on ``threads.get_num_threads()`` threads.

    NumPy runs an elementwise loop on one core (torch uses them all); numpy's loops
    release the GIL, so threads over disjoint planes scale, and smaller chunks stay in cache.
    Small jobs (under PARALLEL_MIN_VALUES values) run inline.
    BLAS is held at 1 thread meanwhile, so ``work`` may call it without oversubscribing.
    """
    small = n_planes < 2 or n_planes * plane_size < PARALLEL_MIN_VALUES
    n_threads = 1 if small else threads.get_num_threads()   # (the lookup costs ~10 us: small jobs skip it)
    if n_threads == 1:
        work(0, n_planes)
        return
    over_ranges(n_planes, work, min(n_planes, n_threads * chunks_per_core), n_threads)


def range_bounds(n_items: int, n_ranges: int) -> list:
    """Where n_ranges contiguous ranges of [0, n_items) start and end, as even as whole numbers allow."""
    return [n_items * i // n_ranges for i in range(n_ranges + 1)]


def over_ranges(n_items: int, work, n_ranges: int, n_threads: int) -> list:
    """``[work(a, b) for each of n_ranges contiguous ranges (a, b) of [0, n_items)]`` on ``n_threads`` threads:
    the caller and n_threads - 1 pool workers each take the next range not yet taken until none is left (a
    slow core takes fewer), BLAS held at 1 thread meanwhile. The results in range order; a worker's exception
    is re-raised here, once every thread has stopped. The caller decides whether the job is worth the threads
    (see over_planes)."""
    global _plane_pool
    if _plane_pool is None or _plane_pool[0] != n_threads:
        if _plane_pool is not None:
            _plane_pool[1].shutdown(wait=False)
        _plane_pool = (n_threads, ThreadPoolExecutor(max(1, n_threads - 1), thread_name_prefix="tinyrefine"))
    bounds = range_bounds(n_items, n_ranges)
    results = [None] * n_ranges
    next_range = itertools.count()   # next() on a count is atomic under the GIL: each range is taken once

    def take_ranges() -> None:
        for i in iter(next_range.__next__, None):
            if i >= n_ranges:
                return
            results[i] = work(bounds[i], bounds[i + 1])
    with threads.blas_single_threaded():
        workers = [_plane_pool[1].submit(take_ranges) for _ in range(min(n_threads, n_ranges) - 1)]
        try:
            take_ranges()
        finally:   # a worker not yet started is dropped (a hand-off costs 40-65 us here: conv_floor.py); the rest are
            errors = [w.exception() for w in workers if not w.cancel()]   # waited for: never left writing into our arrays
    for error in errors:
        if error is not None:
            raise error
    return results


def _pair(value: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    if type(value) is int and value >= minimum:   # the common case, first: every conv call passes three
        return value, value
    pair = (value, value) if isinstance(value, (int, np.integer)) else \
        tuple(value) if isinstance(value, (tuple, list)) else (value,)  # (value,): a float fails below, clearly
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_input(x: Tensor, op: str, ndim: int = 4) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{op} expects a {ndim}-D input (N, C, H, W), got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"{op} needs a floating-point input, got dtype {x.dtype}")


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class _Buffers:
    """One thread's scratch buffers, by role, and the views already handed out, by (role, shape, dtype)."""
    __slots__ = ("by_role", "views", "__weakref__")

    def __init__(self) -> None:
        self.by_role: dict = {}
        self.views: dict = {}


_scratch = threading.local()        # each thread its own buffers: two threads never share one
_scratch_lock = threading.Lock()
_scratch_by_thread = weakref.WeakSet()  # every live thread's buffers, so that empty_cache() reaches them all


def scratch(role: str, shape: tuple, dtype) -> np.ndarray:
    """A reusable host array for short-lived work (im2col columns and their gradient), borrowed.

    A fresh 100 MB array costs more in page faults than filling it does, so each role
    keeps one buffer per thread, grown when a larger one is asked for. Only valid until
    the next call with the same role in the same thread: never return it to the caller.
    ``empty_cache()`` lets them go.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = _Buffers()   # freed with its thread
        with _scratch_lock:
            _scratch_by_thread.add(buffers)
    key = (role, shape, dtype)
    cached = buffers.views.get(key)   # a small conv asks for ~18 buffers: making each view cost 2-3 us (ours, issue 13)
    if cached is not None and buffers.by_role.get(role) is cached[1]:   # (not if empty_cache() let it go)
        return cached[0]
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize   # math.prod: np.prod costs ~13 us a call
    buffer = buffers.by_role.get(role)
    if buffer is None or buffer.nbytes < nbytes:
        with _scratch_lock:
            buffer = buffers.by_role[role] = np.empty(nbytes, dtype=np.uint8)
            buffers.views = {k: v for k, v in buffers.views.items() if k[0] != role}   # they hold the old buffer
    view = buffer[:nbytes].view(dtype).reshape(shape)
    if len(buffers.views) >= 512:     # many shapes (images of every size): start again rather than grow
        buffers.views = {}
    buffers.views[key] = (view, buffer)
    return view


def scratch_nbytes() -> int:
    """Bytes held by the scratch buffers of every thread."""
    with _scratch_lock:
        return sum(b.nbytes for buffers in _scratch_by_thread for b in list(buffers.by_role.values()))


def release_scratch() -> int:
    """Drop every thread's scratch buffers (a kernel running now keeps its own until it returns).

    Returns the bytes released."""
    with _scratch_lock:
        released = sum(b.nbytes for buffers in _scratch_by_thread for b in list(buffers.by_role.values()))
        for buffers in _scratch_by_thread:
            buffers.by_role.clear()
            buffers.views = {}
    return released
