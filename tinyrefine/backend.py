"""Where arrays live: NumPy on the CPU, CuPy on CUDA.

This is the only module that imports cupy. Everything else asks
``get_array_module(x)`` and writes code once for both libraries (DeZero's idea).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

try:  # cupy is optional: the [cuda] extra
    import cupy as _cupy
    try:
        _GPU_COUNT = _cupy.cuda.runtime.getDeviceCount()
    except Exception:  # cupy installed but no driver / no GPU
        _GPU_COUNT = 0
except Exception:  # ImportError, or a broken CUDA install
    _cupy = None
    _GPU_COUNT = 0

DEVICES = ("cpu", "cuda")


def cuda_available() -> bool:
    """True when cupy imports and sees at least one GPU."""
    return _cupy is not None and _GPU_COUNT > 0


def is_cupy_array(x: Any) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def get_array_module(x: Any):
    """numpy for host data, cupy for device data (``xp = get_array_module(x)``)."""
    return _cupy if is_cupy_array(x) else np


def device_of(x: Any) -> str:
    return "cuda" if is_cupy_array(x) else "cpu"


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    if device == "cuda" and not cuda_available():
        why = "cupy is not installed (pip install 'tinyrefine[cuda]')" if _cupy is None else "cupy sees no GPU"
        raise RuntimeError(f"device 'cuda' requested but {why}")
    return device


def to_device(array: Any, device: str, copy: bool = False):
    """Copy ``array`` to ``device`` ('cpu' or 'cuda'); if it is already there, the same array
    unless ``copy`` (then a new one that shares no memory with ``array``)."""
    check_device(device)
    if device == "cpu":
        out = _cupy.asnumpy(array) if is_cupy_array(array) else np.asarray(array)
    else:
        out = _cupy.asarray(array)
    return out.copy() if copy and out is array else out


def as_numpy(array: Any) -> np.ndarray:
    return _cupy.asnumpy(array) if is_cupy_array(array) else np.asarray(array)


def raw_kernel(code: str, name: str, dtype):
    """Compile (once per dtype) a CUDA C kernel written next to its NumPy twin.

    The source uses ``T`` for its floating-point type; a typedef fixes it here."""
    return _compile(code, name, _c_type(dtype))


@functools.lru_cache(maxsize=None)
def _compile(code: str, name: str, c_type: str):
    if _cupy is None:
        raise RuntimeError("CUDA kernels need cupy")
    return _cupy.RawKernel(f"typedef {c_type} T;\n" + code, name)


def _c_type(dtype) -> str:
    """'float' for float32, 'double' for float64."""
    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"CUDA kernels support float32 and float64, got {dtype}")


def launch(kernel, n: int, args: tuple, block: int = 256) -> None:
    """Launch a 1-D grid covering ``n`` threads.

    Every array argument must be C-contiguous: a kernel indexes raw pointers as dense
    row-major memory, and a strided view would be read as garbage without any error."""
    for i, a in enumerate(args):
        if is_cupy_array(a) and not a.flags.c_contiguous:
            raise ValueError(f"kernel {getattr(kernel, 'name', kernel)!r}: argument {i} (shape {a.shape}, strides "
                             f"{a.strides}) is not C-contiguous; pass xp.ascontiguousarray(...) to the launch")
    if n == 0:
        return
    kernel(((n + block - 1) // block,), (block,), args)


def synchronize() -> None:
    """Wait until the GPU has finished the work queued so far (timers need it; CuPy runs asynchronously)."""
    if cuda_available():
        _cupy.cuda.Device().synchronize()


def device_pool_bytes() -> int:
    """Bytes CuPy's memory pool holds on the GPU (arrays in use plus cached blocks); 0 without CUDA."""
    return int(_cupy.get_default_memory_pool().total_bytes()) if _cupy is not None else 0


def free_device_cache() -> int:
    """Hand CuPy's cached, unused device blocks back to the driver; returns the bytes freed (0 without CUDA).

    CuPy keeps freed arrays' memory in a pool for reuse, so nvidia-smi shows it as used."""
    if _cupy is None:
        return 0
    pool = _cupy.get_default_memory_pool()
    before = pool.total_bytes()
    pool.free_all_blocks()
    _cupy.get_default_pinned_memory_pool().free_all_blocks()
    return before - pool.total_bytes()


def is_out_of_memory(error: BaseException) -> bool:
    """True for CuPy's out-of-memory errors (so callers can give advice without importing cupy)."""
    if _cupy is None:
        return False
    oom_types = tuple(t for t in (getattr(_cupy.cuda.memory, "OutOfMemoryError", None),) if t is not None)
    return isinstance(error, oom_types) or "out of memory" in str(error).lower() and "cuda" in type(error).__module__
