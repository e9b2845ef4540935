"""How many CPU threads tinyrefine uses: for BLAS (numpy's matrix products) and for its own plane pool.

    import tinyrefine as tr
    tr.set_num_threads(1)            # fixed from now on (None: back to automatic)
    with tr.num_threads(2): ...      # for a block
    tr.get_num_threads()             # the number in effect now

Who decides, first match wins:
  1. ``set_num_threads(n)`` / ``num_threads(n)``;
  2. the environment: ``TINYREFINE_NUM_THREADS``, then ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
     ``MKL_NUM_THREADS``;
  3. automatic (ours): the cores this process may run on, minus the cores other processes kept
     busy since the last look (a core they used a quarter of is not free), at least 1. Measured from /proc/stat (Linux) less this process's own
     CPU time; elsewhere from the 1-minute load average. Looked at again at most every
     ``RECHECK_SECONDS`` when a kernel asks, so a training run backs off when a neighbour starts.

Why: on 2 cores with one other busy process, BLAS and the plane pool at 2 threads each ran a
training step 5.6x slower than one thread (issue 13): a thread that waits for a core holds up
the others at every barrier. One count serves both pools: they never run at once (the caller
waits for the plane pool, and BLAS is held at 1 thread inside it: ``blas_single_threaded``).
BLAS is limited through threadpoolctl (made for this; a declared dependency: without it, a warning
and BLAS keeps its own count).
This is process-wide state on purpose, as torch.set_num_threads is; only the CPU path uses it.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from typing import Iterator, Optional

RECHECK_SECONDS = 2.0        # how often the automatic count looks at the other processes again
FREE_CORE_MARGIN = 0.25      # others may use this much of a core that still counts as free
ENV_VARS = ("TINYREFINE_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_lock = threading.Lock()
_user_threads: Optional[int] = None    # set_num_threads
_auto_threads: Optional[int] = None    # the last automatic choice
_last_check = -float("inf")
_blas_threads: Optional[int] = None    # what BLAS was last set to
_controller = None


def _check_count(n, origin: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{origin} must be a whole number of threads >= 1, got {n!r}")
    return n


def _env_threads() -> Optional[int]:
    for name in ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"environment variable {name}={value!r}: expected a whole number of threads >= 1")
            return int(value)
    return None


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _busy_seconds_on_our_cores() -> Optional[float]:
    """CPU seconds spent busy (not idle or iowait) since boot on the cores in our affinity, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    ours = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = 0
    for line in lines:
        if not line.startswith("cpu") or line[3] == " ":   # per-core lines only ("cpu0 ...")
            continue
        name, *fields = line.split()
        if ours is not None and int(name[3:]) not in ours:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy += user + nice + system + irq + softirq + steal   # steal: the hypervisor ran someone else
    return busy / os.sysconf("SC_CLK_TCK")


def busy_cores_elsewhere(min_interval: float = 0.1) -> float:
    """About how many of our cores other processes kept busy since the previous call (or since
    import), without this process's own CPU time; waits until ``min_interval`` seconds have passed."""
    global _last_sample
    previous = _last_sample
    if previous[1] is None:                                # no /proc/stat (macOS, Windows): the load average
        try:
            return max(0.0, os.getloadavg()[0] - (_auto_threads or 1))
        except (AttributeError, OSError):
            return 0.0
    time.sleep(max(0.0, previous[0] + min_interval - time.monotonic()))
    sample = _last_sample = (time.monotonic(), _busy_seconds_on_our_cores(), time.process_time())
    wall = sample[0] - previous[0]
    others = (sample[1] - previous[1]) - (sample[2] - previous[2])
    return max(0.0, others / wall)


def _automatic() -> int:
    """The free cores; a core counts as free only if others used under FREE_CORE_MARGIN of it.

    Cautious on purpose (measured, issue 13): on 2 cores a second thread gained 10-50% when both
    were idle, but a neighbour on either core made 2 threads 3-5x slower than 1."""
    global _auto_threads, _last_check
    now = time.monotonic()
    if _auto_threads is None or now - _last_check >= RECHECK_SECONDS:
        _last_check = now
        free = cores_available() - busy_cores_elsewhere()
        _auto_threads = max(1, min(cores_available(), math.floor(free + FREE_CORE_MARGIN)))
    return _auto_threads


def get_num_threads() -> int:
    """The number of threads the CPU kernels use now (BLAS and the plane pool), and make BLAS use it."""
    with _lock:
        n = _user_threads or _env_threads() or _automatic()
        _set_blas_threads(n)
    return n


def set_num_threads(n: Optional[int]) -> None:
    """Use ``n`` threads for BLAS and the plane pool from now on; ``None`` goes back to the environment
    variables or the automatic choice."""
    global _user_threads
    with _lock:
        _user_threads = None if n is None else _check_count(n, "set_num_threads(n)")
    get_num_threads()


@contextlib.contextmanager
def num_threads(n: Optional[int]) -> Iterator[None]:
    """``with num_threads(1): ...`` runs the block with ``n`` threads, then restores the previous setting."""
    global _user_threads
    previous = _user_threads
    set_num_threads(n)
    try:
        yield
    finally:
        with _lock:
            _user_threads = previous
        get_num_threads()


def _blas():
    """threadpoolctl's view of the BLAS libraries loaded in this process (built once, after numpy)."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            warnings.warn("threadpoolctl is missing (a declared dependency of tinyrefine: pip install threadpoolctl); "
                          "BLAS keeps its own thread count, which can be several times slower on a busy machine",
                          RuntimeWarning, stacklevel=4)
            _controller = False
            return None
        import numpy  # noqa: F401  (its BLAS must be loaded before threadpoolctl looks)
        _controller = ThreadpoolController().select(user_api="blas")
    return _controller or None


def _set_blas_threads(n: int) -> None:
    global _blas_threads
    if n != _blas_threads:
        if _blas() is not None:
            _blas().limit(limits=n)    # applies now; never restored: the limit is the setting
        _blas_threads = n


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[None]:
    """BLAS at 1 thread for the block (the plane pool's workers: n workers x n BLAS threads would oversubscribe).

    The BLAS thread count is process-wide, so this is for blocks the calling thread waits on."""
    with _lock:
        if (_blas_threads or 1) == 1 or _blas() is None:
            limiter = None
        else:
            limiter = _blas().limit(limits=1)
    try:
        yield
    finally:
        if limiter is not None:
            with _lock:
                limiter.restore_original_limits()


_last_sample = (time.monotonic(), _busy_seconds_on_our_cores(), time.process_time())   # the first look's baseline
