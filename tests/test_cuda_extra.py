"""Issue 12's kernels on CUDA against their NumPy twins (forward and backward, float64 and float32, and
non-contiguous inputs), on a GPU or under the CPU emulator of CuPy, with test_cuda.py's helpers."""
import numpy as np
import pytest

import tinyrefine
import tinyrefine.functional as F

pytestmark = pytest.mark.skipif(not tinyrefine.cuda_available(),
                                reason="CuPy with a GPU is not available: CUDA kernels are checked on the GPU machine")

from test_cuda import DTYPES, both, cp, host, randn, strided  # noqa: E402  (the helpers need cupy, hence after the skip mark)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size", [((2, 3, 7, 7), (3, 3)), ((2, 2, 5, 6), (4, 4)), ((2, 2, 3, 4), (5, 5)),
                                         ((1, 2, 7, 5), 1)], ids=str)
def test_adaptive_avg_pool2d(shape, size, dtype):
    both(lambda x: F.adaptive_avg_pool2d(x, size), [randn(*shape, seed=1)], dtype)


def test_adaptive_avg_pool2d_strided_input():
    both(lambda x: F.adaptive_avg_pool2d(x, (3, 2)), [randn(2, 3, 7, 5, seed=2)], to_gpu=strided)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, args", [((2, 2, 7, 6), (3, 2, 1, False, True, None)), ((2, 2, 8, 9), (3, 2, 1, True, False, None)),
                                         ((2, 2, 7, 6), ((3, 2), (2, 1), (1, 0), False, True, 5))], ids=str)
def test_avg_pool2d(shape, args, dtype):
    both(lambda x: F.avg_pool2d(x, *args), [randn(*shape, seed=3)], dtype)


def test_avg_pool2d_strided_input():
    both(lambda x: F.avg_pool2d(x, 3, 2, 1), [randn(2, 3, 7, 5, seed=4)], to_gpu=strided)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, ws, kw", [((2, 3, 4, 5), (3, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
                                        ((2, 2, 3, 4), (2, 2, 2, 3), dict(stride=(3, 1), padding=(0, 1), dilation=(1, 2))),
                                        ((2, 2, 4, 3), (2, 3, 3, 3), dict(padding=1, output_padding=1, dilation=2)),
                                        ((1, 3, 3, 4), (3, 2, 1, 1), dict())], ids=str)
def test_conv_transpose2d(xs, ws, kw, dtype):
    arrays = [randn(*xs, seed=5), randn(*ws, seed=6), randn(ws[1], seed=7)]
    both(lambda x, w, b: F.conv_transpose2d(x, w, b, **kw), arrays, dtype)


def test_conv_transpose2d_strided_inputs_and_weight_gradient_only():
    both(lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1), [randn(2, 3, 4, 5, seed=8), randn(3, 2, 4, 4, seed=9)],
         to_gpu=strided)
    both(lambda x, w: F.conv_transpose2d(x, w, stride=2), [randn(2, 3, 4, 5, seed=10), randn(3, 2, 3, 3, seed=11)],
         grads=[False, True])


@pytest.mark.parametrize("values", ["distinct", "ties", "nan"])
@pytest.mark.parametrize("shape, k, s, p", [((2, 3, 7, 6), 3, 2, 1), ((2, 2, 8, 9), 2, 2, 0), ((2, 2, 9, 7), (3, 2), (2, 1), (1, 0))],
                         ids=str)
def test_max_pool2d_indices_equal_the_cpus(shape, k, s, p, values):
    x = randn(*shape, seed=12)
    if values != "distinct":
        x = np.round(x)
    if values == "nan":
        x[np.random.default_rng(13).random(shape) < 0.15] = np.nan
    _, indices = F.max_pool2d(tinyrefine.Tensor(x), k, s, p, return_indices=True)
    _, indices_gpu = F.max_pool2d(tinyrefine.Tensor(cp.asarray(x)), k, s, p, return_indices=True)
    assert isinstance(indices_gpu.data, cp.ndarray) and indices_gpu.dtype == np.int64
    np.testing.assert_array_equal(host(indices_gpu.data), indices.data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, k, s, p, size", [((2, 3, 8, 6), 2, 2, 0, None), ((2, 2, 7, 6), 3, 2, 1, (7, 6)),
                                                  ((1, 2, 6, 7), (2, 3), (2, 3), (1, 0), (6, 7))], ids=str)
def test_max_unpool2d(shape, k, s, p, size, dtype):
    """Including repeated indices (stride < kernel): the same winner on both devices."""
    _, indices = F.max_pool2d(tinyrefine.Tensor(randn(*shape, seed=14)), k, s, p, return_indices=True)
    pooled = randn(*indices.shape, seed=15)   # other values than the pooled ones: a wrong winner shows

    def unpool(x):
        index = cp.asarray(indices.data) if x.device == "cuda" else indices
        return F.max_unpool2d(x, index, k, s, p, size)
    both(unpool, [pooled], dtype)
    both(unpool, [pooled], dtype, to_gpu=strided)


def test_max_unpool2d_drops_out_of_range_indices_on_cuda():
    """The CPU raises; CUDA does not stop to check (a sync), and such an input reaches no output."""
    index = cp.asarray(np.array([[[[0, 99], [-1, 15]]]]))
    x = tinyrefine.Tensor(cp.asarray(np.array([[[[1.0, 2.0], [3.0, 4.0]]]])), requires_grad=True)
    y = F.max_unpool2d(x, index, 2)
    expected = np.zeros(16)
    expected[[0, 15]] = 1.0, 4.0
    np.testing.assert_array_equal(host(y.data).reshape(-1), expected)
    y.backward(cp.ones(y.shape))
    np.testing.assert_array_equal(host(x.grad), [[[[1.0, 0.0], [0.0, 1.0]]]])
