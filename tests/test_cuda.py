"""The CUDA kernels against their NumPy twins (forward and backward), on the GPU machine only.

float64 must agree to 1e-10 (relative), float32 to 1e-4; max-pool's tie rule exactly.
"""
import numpy as np
import pytest

import tinyrefine
import tinyrefine as tr
import tinyrefine.functional as F

pytestmark = pytest.mark.skipif(not tinyrefine.cuda_available(),
                                reason="CuPy with a GPU is not available: CUDA kernels are checked on the GPU machine")

cp = tinyrefine.backend._cupy if tinyrefine.cuda_available() else None

TOL = {np.float64: 1e-10, np.float32: 1e-4}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.size else 0.0


def host(a):
    return cp.asnumpy(a) if cp is not None and isinstance(a, cp.ndarray) else np.asarray(a)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def both(fn, arrays, dtype=np.float64, grads=None, seed=0, upstream=None, tol=None):
    """Run ``fn`` on CPU tensors and on CUDA tensors made from the same arrays, backward with the same
    upstream gradient; compare the outputs and every gradient. Returns (cpu tensors, cuda tensors, y_cpu, y_gpu)."""
    tol = TOL[dtype] if tol is None else tol
    grads = [True] * len(arrays) if grads is None else grads
    cpu = [tr.Tensor(np.array(a, dtype=dtype), requires_grad=g) for a, g in zip(arrays, grads)]
    gpu = [tr.Tensor(cp.asarray(np.array(a, dtype=dtype)), requires_grad=g) for a, g in zip(arrays, grads)]
    y_cpu, y_gpu = fn(*cpu), fn(*gpu)
    assert y_gpu.device == "cuda" and y_cpu.device == "cpu"
    assert y_gpu.dtype == y_cpu.dtype == dtype
    assert rel_err(host(y_gpu.data), y_cpu.data) <= tol
    u = np.random.default_rng(seed).standard_normal(y_cpu.shape) if upstream is None else upstream
    y_cpu.backward(u.astype(dtype))
    y_gpu.backward(cp.asarray(u.astype(dtype)))
    for a, b, g in zip(cpu, gpu, grads):
        if g:
            assert isinstance(b.grad, cp.ndarray) and b.grad.dtype == dtype
            assert rel_err(host(b.grad), a.grad) <= tol, f"gradient differs by {rel_err(host(b.grad), a.grad)}"
    return cpu, gpu, y_cpu, y_gpu


DTYPES = [np.float64, np.float32]


# =========================================================================== conv2d
CONV_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), dict(stride=1, padding=1)),
    ((2, 3, 7, 6), (4, 3, 3, 3), dict(stride=2, padding=1)),
    ((2, 2, 9, 8), (3, 2, 3, 3), dict(stride=1, padding=2, dilation=2)),
    ((3, 4, 5, 5), (2, 4, 1, 1), dict()),
    ((2, 3, 8, 7), (5, 3, 1, 1), dict(stride=2)),
    ((2, 2, 6, 7), (3, 2, 3, 1), dict(stride=(2, 1), padding=(1, 0))),
    ((2, 2, 7, 9), (3, 2, 2, 4), dict(stride=(1, 3), padding=(1, 2), dilation=(2, 1))),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, ws, kw", CONV_CASES)
def test_conv2d(xs, ws, kw, dtype):
    arrays = [randn(*xs, seed=1), randn(*ws, seed=2), randn(ws[0], seed=3)]
    both(lambda x, w, b: F.conv2d(x, w, b, **kw), arrays, dtype)


def test_conv2d_without_bias_and_frozen_input():
    both(lambda x, w: F.conv2d(x, w, stride=2, padding=1), [randn(2, 3, 7, 6, seed=4), randn(4, 3, 3, 3, seed=5)],
         grads=[False, True])


@pytest.mark.parametrize("kernel, stride, padding, dilation", [((3, 3), (1, 1), (1, 1), (1, 1)),
                                                               ((3, 2), (2, 1), (1, 0), (1, 2))])
def test_im2col_col2im_match_numpy(kernel, stride, padding, dilation):
    x = randn(2, 3, 7, 6, seed=6)
    cols = F.im2col(x, kernel, stride, padding, dilation).copy()
    cols_gpu = F.im2col(cp.asarray(x), kernel, stride, padding, dilation)
    np.testing.assert_array_equal(host(cols_gpu), cols)
    c = randn(*cols.shape, seed=7)
    back = F.col2im(c, x.shape, kernel, stride, padding, dilation)
    assert rel_err(host(F.col2im(cp.asarray(c), x.shape, kernel, stride, padding, dilation)), back) <= 1e-12


# =========================================================================== max-pool
POOL_CASES = [((2, 3, 7, 6), 5, 1, 2), ((2, 3, 7, 8), 3, 2, 1), ((2, 2, 8, 6), 2, 2, 0), ((1, 2, 9, 7), 3, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, k, s, p", POOL_CASES)
def test_max_pool2d(shape, k, s, p, dtype):
    both(lambda x: F.max_pool2d(x, k, s, p), [randn(*shape, seed=8)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, k, s, p", POOL_CASES)
def test_max_pool2d_ties_follow_the_cpu_rule_exactly(shape, k, s, p, dtype):
    x = np.round(randn(*shape, seed=9))  # many ties
    u = np.random.default_rng(10).integers(1, 9, size=(shape[0], shape[1], (shape[2] + 2 * p - k) // s + 1,
                                                      (shape[3] + 2 * p - k) // s + 1)).astype(np.float64)
    cpu, gpu, y_cpu, y_gpu = both(lambda x: F.max_pool2d(x, k, s, p), [x], dtype, upstream=u)
    np.testing.assert_array_equal(host(y_gpu.data), y_cpu.data)
    np.testing.assert_array_equal(host(gpu[0].grad), cpu[0].grad)  # integer sums: exact in any order


def test_max_pool2d_constant_input_and_negative_input():
    x = np.full((2, 2, 5, 6), -3.0)
    cpu, gpu, _, y_gpu = both(lambda x: F.max_pool2d(x, 3, 1, 1), [x], upstream=np.ones((2, 2, 5, 6)))
    np.testing.assert_array_equal(host(gpu[0].grad), cpu[0].grad)
    assert (host(y_gpu.data) == -3.0).all()


# =========================================================================== interpolate
INTERP_CASES = [dict(size=(11, 9)), dict(size=(3, 2)), dict(size=(1, 1)), dict(scale_factor=2), dict(scale_factor=2.5),
                dict(scale_factor=0.6), dict(scale_factor=1.7), dict(scale_factor=(2.5, 0.6))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kw", INTERP_CASES, ids=str)
def test_interpolate(kw, align_corners, dtype):
    both(lambda x: F.interpolate(x, align_corners=align_corners, **kw), [randn(2, 3, 5, 4, seed=11)], dtype)


# =========================================================================== relu, batch norm, softmax, loss
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu(dtype):
    x = randn(2, 3, 5, 4, seed=12)
    x[0, 0, 0, :2] = 0.0
    both(F.relu, [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(training, affine, dtype):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 4, 5, 3)) * 2 + 0.5
    rm, rv = rng.standard_normal(4).astype(dtype), (0.5 + rng.random(4)).astype(dtype)
    rm_cpu, rv_cpu, rm_gpu, rv_gpu = rm.copy(), rv.copy(), cp.asarray(rm), cp.asarray(rv)
    arrays = [x] + ([rng.standard_normal(4), rng.standard_normal(4)] if affine else [])

    def fn(x, *wb):
        on_gpu = x.device == "cuda"
        return F.batch_norm(x, rm_gpu if on_gpu else rm_cpu, rv_gpu if on_gpu else rv_cpu, *wb,
                            training=training, momentum=0.2)
    both(fn, arrays, dtype)
    assert rel_err(host(rm_gpu), rm_cpu) <= TOL[dtype] and rel_err(host(rv_gpu), rv_cpu) <= TOL[dtype]


def test_batch_norm_weight_without_bias():
    rm, rv = np.zeros(3), np.ones(3)
    both(lambda x, w: F.batch_norm(x, None, None, w, None, training=True), [randn(2, 3, 4, 5, seed=14), randn(3, seed=15)])
    both(lambda x, w: F.batch_norm(x, cp.asarray(rm) if x.device == "cuda" else rm,
                                   cp.asarray(rv) if x.device == "cuda" else rv, w, training=False),
         [randn(2, 3, 4, 5, seed=16), randn(3, seed=17)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(reduction, dtype):
    rng = np.random.default_rng(18)
    t = rng.integers(0, 5, size=(2, 4, 3))
    t[rng.random(t.shape) < 0.3] = 255
    both(lambda x: F.cross_entropy(x, cp.asarray(t) if x.device == "cuda" else t, reduction=reduction),
         [rng.standard_normal((2, 5, 4, 3))], dtype)


def test_cross_entropy_all_ignored_on_gpu():
    x = tr.Tensor(cp.asarray(randn(2, 3, 2, 2, seed=19)), requires_grad=True)
    loss = F.cross_entropy(x, cp.full((2, 2, 2), 255))
    assert float(loss.data) == 0.0
    loss.backward()
    assert float(cp.abs(x.grad).max()) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_log_softmax_pad_concat(dtype):
    x = randn(2, 4, 3, 5, seed=20)
    both(lambda x: F.softmax(x, axis=1), [x], dtype)
    both(lambda x: F.log_softmax(x, axis=1), [x], dtype)
    both(lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), [x], dtype)
    both(lambda a, b: F.concat([a, b], axis=1), [x, randn(2, 2, 3, 5, seed=21)], dtype)


def test_dropout_on_gpu():
    x = tr.Tensor(cp.asarray(randn(2, 3, 8, 8, seed=22) + 5.0), requires_grad=True)  # no zeros in x
    y = F.dropout(x, 0.5)
    kept = y.data != 0
    assert isinstance(y.data, cp.ndarray)
    assert bool(cp.allclose(y.data[kept], 2 * x.data[kept]))
    y.backward(cp.ones(y.shape))
    assert bool(cp.all(x.grad == 2.0 * kept))


# =========================================================================== gradcheck on the GPU
def cuda_tensor(*shape, seed=0, distinct=False):
    if distinct:
        n = int(np.prod(shape))
        data = ((np.random.default_rng(seed).permutation(n) - n / 2) * 0.1).reshape(shape)
    else:
        data = randn(*shape, seed=seed)
    return tr.Tensor(cp.asarray(data), requires_grad=True)


def test_gradcheck_conv2d_on_gpu():
    x, w, b = cuda_tensor(2, 2, 5, 4, seed=23), cuda_tensor(3, 2, 3, 3, seed=24), cuda_tensor(3, seed=25)
    assert tr.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [x, w, b])
    assert tr.gradcheck(lambda x, w, b: F.conv2d(x, w, b, padding=2, dilation=2), [x, w, b])


def test_gradcheck_max_pool2d_on_gpu():
    x = cuda_tensor(2, 2, 6, 5, seed=26, distinct=True)
    assert tr.gradcheck(lambda x: F.max_pool2d(x, 5, 1, 2), [x])
    assert tr.gradcheck(lambda x: F.max_pool2d(x, 3, 2, 1), [x])


@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck_interpolate_on_gpu(align_corners):
    x = cuda_tensor(2, 2, 4, 5, seed=27)
    assert tr.gradcheck(lambda x: F.interpolate(x, size=(7, 3), align_corners=align_corners), [x])
    assert tr.gradcheck(lambda x: F.interpolate(x, scale_factor=1.7, align_corners=align_corners), [x])


# =========================================================================== devices
@pytest.mark.parametrize("dtype", DTYPES)
def test_to_cuda_and_back_roundtrip(dtype):
    a = randn(2, 3, seed=28).astype(dtype)
    x = tr.Tensor(a, requires_grad=True)
    g = x.to("cuda")
    assert g.device == "cuda" and isinstance(g.data, cp.ndarray) and g.dtype == dtype and g.requires_grad
    assert g.to("cuda") is g
    back = g.to("cpu")
    assert back.device == "cpu" and isinstance(back.data, np.ndarray) and back.dtype == dtype
    np.testing.assert_array_equal(back.data, a)
    np.testing.assert_array_equal(g.numpy(), a)
    assert isinstance(g.numpy(), np.ndarray)


def test_mixing_cpu_and_cuda_tensors_raises_naming_both_devices():
    a = tr.Tensor(randn(2, 3))
    b = a.to("cuda")
    with pytest.raises(ValueError, match=r"cpu.*cuda"):
        a + b
    with pytest.raises(ValueError, match=r"cuda.*cpu"):
        b * a
    with pytest.raises(ValueError, match=r"cpu.*cuda"):
        F.conv2d(tr.Tensor(randn(1, 2, 4, 4)), tr.Tensor(randn(3, 2, 3, 3)).to("cuda"))


def test_mixing_a_numpy_array_with_a_cuda_tensor_raises():
    b = tr.Tensor(randn(2, 3)).to("cuda")
    with pytest.raises(ValueError, match=r"cpu.*cuda"):
        b + np.ones((2, 3))
    with pytest.raises(ValueError, match=r"logits on cuda but target on cpu"):
        F.cross_entropy(tr.Tensor(randn(2, 3, 2, 2)).to("cuda"), np.zeros((2, 2, 2), dtype=np.int64))


def test_python_scalars_follow_a_cuda_tensor():
    x = tr.Tensor(randn(2, 3).astype(np.float32)).to("cuda")
    y = 2.0 * x + 1
    assert y.device == "cuda" and y.dtype == np.float32
