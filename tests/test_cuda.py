"""The CUDA kernels against their NumPy twins (forward and backward), on a GPU or under the CPU
emulator of CuPy (../shared/tools/fakecupy first on PYTHONPATH, as .ci/run does).

float64 must agree to 1e-10 (relative), float32 to 1e-4; max-pool's tie and NaN rules exactly.
Every kernel also gets non-contiguous inputs (``strided``), since a kernel reads dense memory.
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
    """Largest difference relative to b's largest value; NaN must sit at the same places in both."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    nan = np.isnan(b)
    if (np.isnan(a) != nan).any():
        return np.inf
    a, b = a[~nan], b[~nan]
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.size else 0.0


def host(a):
    return cp.asnumpy(a) if cp is not None and isinstance(a, cp.ndarray) else np.asarray(a)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def strided(a):
    """``a`` on the device as a view that is not C-contiguous: every other column of a wider array
    (for 4-D: also with H and W swapped in memory), so a kernel that reads it as dense memory fails."""
    a = np.asarray(a)
    if a.ndim == 4:  # transposed storage, then a column stride of 2
        wide = np.zeros(a.shape[:2] + (2 * a.shape[3], a.shape[2]), a.dtype)
        wide[:, :, ::2] = a.swapaxes(2, 3)
        out = cp.asarray(wide)[:, :, ::2].swapaxes(2, 3)
    else:
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        out = cp.asarray(wide)[..., ::2]
    assert a.size <= 1 or not out.flags.c_contiguous
    np.testing.assert_array_equal(host(out), a)
    return out


def both(fn, arrays, dtype=np.float64, grads=None, seed=0, upstream=None, tol=None, to_gpu=None):
    """Run ``fn`` on CPU tensors and on CUDA tensors made from the same arrays, backward with the same
    upstream gradient; compare the outputs and every gradient. ``to_gpu`` makes the device arrays
    (``strided`` for non-contiguous inputs and upstream gradient). Returns (cpu tensors, cuda tensors, y_cpu, y_gpu)."""
    tol = TOL[dtype] if tol is None else tol
    to_gpu = cp.asarray if to_gpu is None else to_gpu
    grads = [True] * len(arrays) if grads is None else grads
    cpu = [tr.Tensor(np.array(a, dtype=dtype), requires_grad=g) for a, g in zip(arrays, grads)]
    gpu = [tr.Tensor(to_gpu(np.array(a, dtype=dtype)), requires_grad=g) for a, g in zip(arrays, grads)]
    y_cpu, y_gpu = fn(*cpu), fn(*gpu)
    assert y_gpu.device == "cuda" and y_cpu.device == "cpu"
    assert y_gpu.dtype == y_cpu.dtype == dtype
    assert rel_err(host(y_gpu.data), y_cpu.data) <= tol
    u = np.random.default_rng(seed).standard_normal(y_cpu.shape) if upstream is None else upstream
    y_cpu.backward(u.astype(dtype))
    y_gpu.backward(to_gpu(u.astype(dtype)))
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


# =========================================================================== numpy scalars (weak, any device)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scalar", [np.float32(2), np.float64(2), np.int64(2), np.int32(3), 2, 2.5], ids=repr)
def test_numpy_scalars_follow_a_cuda_tensor(scalar, dtype):
    x = tr.Tensor(cp.asarray(randn(2, 3).astype(dtype)), requires_grad=True)
    for y in (x * scalar, scalar * x, x + scalar, scalar - x, x - scalar, x / scalar, scalar / x):
        assert y.device == "cuda" and y.dtype == dtype
    (x * scalar + np.float64(1)).sum().backward()
    assert isinstance(x.grad, cp.ndarray) and x.grad.dtype == dtype
    np.testing.assert_array_equal(host(x.grad), np.full((2, 3), float(scalar), dtype))


# =========================================================================== max-pool: NaN as torch
def test_max_pool2d_nan_anywhere_in_the_window_propagates():
    x = np.array([[1, 5, 2], [np.nan, 3, 0], [4, 1, 2]], dtype=np.float32)[None, None]
    cpu, gpu, y_cpu, y_gpu = both(lambda x: F.max_pool2d(x, 3, 1, 1), [x], np.float32, upstream=np.ones((1, 1, 3, 3)))
    assert np.isnan(y_cpu.data).sum() == 6
    np.testing.assert_array_equal(host(y_gpu.data), y_cpu.data)                 # NaN where the CPU has NaN
    np.testing.assert_array_equal(host(gpu[0].grad), cpu[0].grad)               # the NaN got the 6 gradients
    assert cpu[0].grad[0, 0, 1, 0] == 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, k, s, p", POOL_CASES)
def test_max_pool2d_nans_follow_the_cpu_rule_exactly(shape, k, s, p, dtype):
    rng = np.random.default_rng(40)
    x = np.round(randn(*shape, seed=41))
    x[rng.random(shape) < 0.15] = np.nan           # windows with no NaN, one NaN and several
    u = rng.integers(1, 9, size=(shape[0], shape[1], (shape[2] + 2 * p - k) // s + 1,
                                 (shape[3] + 2 * p - k) // s + 1)).astype(np.float64)
    y_cpu = F.max_pool2d(tr.Tensor(x.astype(dtype)), k, s, p)
    assert np.isnan(y_cpu.data).any() and not np.isnan(y_cpu.data).all()
    cpu, gpu, y_cpu, y_gpu = both(lambda x: F.max_pool2d(x, k, s, p), [x], dtype, upstream=u)
    np.testing.assert_array_equal(host(y_gpu.data), y_cpu.data)
    np.testing.assert_array_equal(host(gpu[0].grad), cpu[0].grad)


# =========================================================================== non-contiguous inputs, every kernel
STRIDED_CASES = {
    "conv3x3": lambda x, w: F.conv2d(x, w, padding=1),
    "conv3x3 s2 d2": lambda x, w: F.conv2d(x, w, stride=2, padding=2, dilation=2),
    "conv1x1": lambda x, w: F.conv2d(x, w[:, :, :1, :1]),
    "max_pool": lambda x, w: F.max_pool2d(x, 3, 2, 1) * w.sum(),
    "interpolate up": lambda x, w: F.interpolate(x, scale_factor=2.5) * w.sum(),
    "interpolate down": lambda x, w: F.interpolate(x, size=(3, 2), align_corners=True) * w.sum(),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(STRIDED_CASES))
def test_kernels_take_non_contiguous_inputs_and_gradients(case, dtype):
    """x, the weight and the upstream gradient are all strided views: forward and backward must match."""
    both(STRIDED_CASES[case], [randn(2, 3, 7, 6, seed=42), randn(4, 3, 3, 3, seed=43)], dtype, to_gpu=strided)


def test_im2col_col2im_take_non_contiguous_arrays():
    x = randn(2, 3, 7, 6, seed=44)
    geometry = ((3, 2), (2, 1), (1, 0), (1, 2))
    cols = F.im2col(x, *geometry).copy()
    np.testing.assert_array_equal(host(F.im2col(strided(x), *geometry)), cols)
    c = randn(*cols.shape, seed=45)
    c_gpu = strided(c.reshape(-1, cols.shape[-1])).reshape(cols.shape)     # reshape of a strided view: still strided
    assert not c_gpu.flags.c_contiguous
    back = F.col2im(c, x.shape, *geometry)
    assert rel_err(host(F.col2im(c_gpu, x.shape, *geometry)), back) <= 1e-12


def test_launch_refuses_non_contiguous_arrays():
    """The guard every kernel goes through: a strided view would be read as dense memory (garbage)."""
    kernel = tr.backend.raw_kernel(F.conv._COL2IM_CUDA, "col2im", np.float64)
    view = cp.zeros((4, 6))[:, ::2]
    with pytest.raises(ValueError, match="argument 0 .* not C-contiguous"):
        tr.backend.launch(kernel, 4, (view, cp.zeros(4), np.int64(4)))


# =========================================================================== one batched GEMM per conv
def test_conv2d_is_one_batched_gemm_each_way(monkeypatch):
    calls = []
    matmul = cp.matmul

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return matmul(*args, **kwargs)
    monkeypatch.setattr(cp, "matmul", counting)
    x, w = cuda_tensor(3, 2, 5, 4, seed=46), cuda_tensor(4, 2, 3, 3, seed=47)
    y = F.conv2d(x, w, padding=1)
    assert len(calls) == 1 and len(calls[0]) == 3            # forward: all 3 images in one call
    y.backward(cp.ones(y.shape))
    assert len(calls) == 3                                     # backward: one for dW, one for dcols


# =========================================================================== interpolation tables on the device
@pytest.mark.parametrize("n_in, n_out, align_corners, scale", [(5, 11, False, None), (5, 11, True, None),
                                                                (9, 4, False, None), (7, 17, False, 2.5),
                                                                (10, 6, False, 0.6), (4, 1, True, None), (1, 5, False, None)])
def test_interpolation_tables_are_cached_on_the_device(n_in, n_out, align_corners, scale):
    tables = F.interpolation_tables(n_in, n_out, align_corners, scale, np.dtype(np.float64), "cuda")
    assert F.interpolation_tables(n_in, n_out, align_corners, scale, np.dtype(np.float64), "cuda") is tables
    assert all(isinstance(t, cp.ndarray) and t.flags.c_contiguous for t in tables)
    i0, i1, lam, A, lo, hi = (host(t) for t in tables)
    np.testing.assert_array_equal(A, F.interpolation_matrix(n_in, n_out, align_corners, scale))
    for h in range(n_in):  # the gather's run of outputs is exactly those that read h
        readers = [o for o in range(n_out) if h in (i0[o], i1[o])]
        assert list(range(lo[h], hi[h])) == readers, (h, lo[h], hi[h], readers)


def test_a_second_forward_uploads_no_interpolation_taps(monkeypatch):
    x = cuda_tensor(1, 2, 5, 4, seed=48)
    F.interpolate(x, size=(13, 7)).sum().backward()
    uploads, asarray = [], cp.asarray

    def watched(a, *args, **kwargs):
        if isinstance(a, np.ndarray):
            uploads.append(a.shape)
        return asarray(a, *args, **kwargs)
    monkeypatch.setattr(cp, "asarray", watched)
    F.interpolate(x, size=(13, 7)).sum().backward()
    assert uploads == []


# =========================================================================== deterministic backward
@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_backward_gives_the_same_bits_every_run(dtype):
    """No atomics: the gather sums in a fixed order (atomicAdd's order changes run to run)."""
    x = tr.Tensor(cp.asarray(randn(2, 8, 24, 20, seed=49).astype(dtype)), requires_grad=True)
    u = cp.asarray(randn(2, 8, 60, 50, seed=50).astype(dtype))
    grads = []
    for _ in range(3):
        x.grad = None
        F.interpolate(x, scale_factor=2.5).backward(u)
        grads.append(host(x.grad))
    for g in grads[1:]:
        np.testing.assert_array_equal(g.view(np.uint8), grads[0].view(np.uint8))


# =========================================================================== the loss does not sync
def test_cross_entropy_bad_label_on_gpu_gives_nan_not_a_sync():
    """On CUDA a label outside 0..C-1 makes the loss NaN (the trainer stops on it); the CPU raises."""
    t = np.zeros((2, 2, 2), dtype=np.int64)
    t[0, 1, 1], t[1, 0, 0] = 7, 255
    x = tr.Tensor(cp.asarray(randn(2, 3, 2, 2, seed=51)), requires_grad=True)
    loss = F.cross_entropy(x, cp.asarray(t))
    assert np.isnan(loss.item())
    loss.backward()
    g = host(x.grad)
    assert np.isnan(g[0, :, 1, 1]).all() and np.isfinite(np.delete(g.reshape(2, 3, 4), 3, axis=2)[0]).all()
    per_pixel = host(F.cross_entropy(x, cp.asarray(t), reduction="none").data)
    assert np.isnan(per_pixel[0, 1, 1]) and np.isfinite(np.delete(per_pixel.ravel(), 3)).all()
    with pytest.raises(ValueError, match=r"values \[7\] outside 0..2"):
        F.cross_entropy(tr.Tensor(randn(2, 3, 2, 2)), t)


# =========================================================================== state loading on the device
def test_load_state_dict_on_gpu_copies_without_sharing():
    from tinyrefine.nn import Conv2d
    a, b = Conv2d(2, 3, 3).to("cuda"), Conv2d(2, 3, 3, rng=np.random.default_rng(5)).to("cuda")
    state = b.state_dict()
    a.load_state_dict(state)
    assert isinstance(a.weight.data, cp.ndarray) and a.weight.data is not state["weight"]
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    state["weight"] += 1                                   # the model does not alias the state dict
    assert not np.array_equal(a.weight.numpy(), b.weight.numpy())
    a.load_state_dict({k: host(v).astype(np.float64) for k, v in b.state_dict().items()})   # host, other dtype
    assert a.weight.dtype == np.float32 and isinstance(a.weight.data, cp.ndarray)
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())


@pytest.mark.parametrize("optimizer", ["Adam", "SGD"])
def test_optimizer_resume_on_gpu_is_exact(optimizer):
    """A resumed optimizer continues bit for bit; Adam's step counter comes back as a host int."""
    from tinyrefine import optim
    from tinyrefine.nn import Parameter

    def run(steps, resume_at=None):
        p = Parameter(cp.asarray(randn(3, 4, seed=52).astype(np.float32)))
        opt = getattr(optim, optimizer)([p], lr=0.1)
        for i in range(steps):
            if i == resume_at:
                saved = {k: host(v) for k, v in opt.state_dict().items()}   # as a checkpoint holds it
                opt = getattr(optim, optimizer)([p], lr=0.1)
                opt.load_state_dict(saved)
                if optimizer == "Adam":
                    assert type(opt.state[0]["t"]) is int and isinstance(opt.state[0]["m"], cp.ndarray)
            p.grad = cp.asarray(randn(3, 4, seed=60 + i).astype(np.float32))
            opt.step()
        return host(p.data)
    np.testing.assert_array_equal(run(5, resume_at=2), run(5))
