"""Rules the kernels keep on every machine (their CUDA side is checked in test_cuda.py):
NumPy scalars are weak, NaN goes through max-pool as in torch, CUDA sources use no atomics,
interpolation matrices are built once."""
import importlib
import pkgutil
import re

import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F


# --------------------------------------------------------------------------- weak scalars
@pytest.mark.parametrize("scalar", [np.float32(2), np.float64(2), np.int64(2), np.int32(3), np.uint8(2), 2, 2.5],
                         ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_scalars_keep_the_tensor_dtype(scalar, dtype):
    x = tr.Tensor(np.ones((2, 3), dtype), requires_grad=True)
    for y in (x * scalar, scalar * x, x + scalar, scalar - x, x - scalar, x / scalar, scalar / x):
        assert y.dtype == dtype, (type(scalar), y.dtype)
    (x * scalar).sum().backward()
    assert x.grad.dtype == dtype
    np.testing.assert_array_equal(x.grad, np.full((2, 3), float(scalar), dtype))


def test_a_numpy_array_beside_a_tensor_is_still_strong():
    x = tr.Tensor(np.ones(3, np.float32))
    assert (x * np.ones(3, np.float64)).dtype == np.float64   # an array is data, not a constant


# --------------------------------------------------------------------------- NaN through max-pool
def test_max_pool2d_nan_anywhere_in_the_window_propagates():
    x = tr.Tensor(np.array([[1, 5, 2], [np.nan, 3, 0], [4, 1, 2]], dtype=np.float32)[None, None], requires_grad=True)
    y = F.max_pool2d(x, 3, 1, 1)
    assert np.isnan(y.data).sum() == 6                        # every window that holds the NaN
    y.backward(np.ones(y.shape, np.float32))
    expected = np.zeros((3, 3), np.float32)
    expected[1, 0], expected[0, 1], expected[1, 1] = 6, 2, 1  # NaN windows send their gradient to the NaN
    np.testing.assert_array_equal(x.grad[0, 0], expected)


@pytest.mark.parametrize("shape, k, s, p", [((2, 3, 7, 6), 5, 1, 2), ((2, 3, 7, 8), 3, 2, 1), ((2, 2, 8, 6), 2, 2, 0)])
def test_max_pool2d_nans_match_torch(shape, k, s, p):
    """Values and gradients as torch: a NaN wins its window, the last NaN in row-major order."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal(shape))
    x[rng.random(shape) < 0.15] = np.nan
    ours = tr.Tensor(x, requires_grad=True)
    y = F.max_pool2d(ours, k, s, p)
    u = rng.integers(1, 9, y.shape).astype(np.float64)
    y.backward(u)
    theirs = torch.tensor(x, requires_grad=True)
    y_t = torch.nn.functional.max_pool2d(theirs, k, s, p)
    y_t.backward(torch.tensor(u))
    np.testing.assert_array_equal(y.data, y_t.detach().numpy())
    np.testing.assert_array_equal(ours.grad, theirs.grad.numpy())


# --------------------------------------------------------------------------- CUDA sources
def cuda_sources() -> dict:
    """Every CUDA C source in tinyrefine.functional's modules (module strings and the ops' _CUDA attributes)."""
    found = {}
    for info in pkgutil.iter_modules(F.__path__):
        module = importlib.import_module(f"{F.__name__}.{info.name}")
        found.update({name: v for name, v in vars(module).items() if isinstance(v, str) and "__global__" in v})
        found.update({name: v._CUDA for name, v in vars(module).items() if isinstance(getattr(v, "_CUDA", None), str)})
    return found


def test_cuda_kernels_use_no_atomics():
    """Atomics sum in a different order each run (not bit-reproducible), and double atomicAdd needs sm_60."""
    sources = cuda_sources()
    assert {"_IM2COL_CUDA", "_COL2IM_CUDA", "MaxPool2dFunction", "Bilinear"} <= set(sources)
    for name, source in sources.items():
        assert not re.search(r"\batomic[A-Z]\w*\s*\(", source), f"{name} uses an atomic operation"


# --------------------------------------------------------------------------- interpolation tables
def test_interpolation_tables_are_cached_and_read_only():
    (A,) = F.interpolation_tables(5, 9, False, None, np.dtype(np.float32), "cpu")
    assert F.interpolation_tables(5, 9, False, None, np.dtype(np.float32), "cpu")[0] is A
    assert A.dtype == np.float32 and not A.flags.writeable
    np.testing.assert_array_equal(A, F.interpolation_matrix(5, 9, False).astype(np.float32))
    x = tr.Tensor(np.ones((1, 1, 5, 5), np.float32), requires_grad=True)
    F.interpolate(x, size=(9, 9)).sum().backward()            # backward does not write into the shared table
    np.testing.assert_array_equal(A, F.interpolation_matrix(5, 9, False).astype(np.float32))
