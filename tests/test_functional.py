"""The kernels in tinyrefine.functional: float64 gradchecks (random upstream gradient), tie rules,
adjoint identities and small loop references. Shapes are tiny, odd and non-square, batch > 1."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F


def T(array, requires_grad=True):
    return tr.Tensor(np.array(array, dtype=np.float64), requires_grad=requires_grad)


def randn(*shape, seed=0, requires_grad=True):
    return T(np.random.default_rng(seed).standard_normal(shape), requires_grad)


def distinct(*shape, seed=0, spacing=0.1, requires_grad=True):
    """A random permutation of well-separated values: no ties, far from finite-difference steps."""
    n = int(np.prod(shape))
    values = (np.random.default_rng(seed).permutation(n) - n / 2) * spacing
    return T(values.reshape(shape), requires_grad)


def away_from_zero(*shape, seed=0, margin=0.1, requires_grad=True):
    rng = np.random.default_rng(seed)
    magnitude = margin + rng.random(shape)
    return T(np.where(rng.random(shape) < 0.5, -magnitude, magnitude), requires_grad)


# =========================================================================== conv2d
def conv2d_reference(x, w, b, stride, padding, dilation):
    """Direct loops over output positions (float64)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((N, O, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            patch = xpad[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            y[:, :, i, j] = np.einsum("ncpq,ocpq->no", patch, w)
    return y + (0 if b is None else b.reshape(1, -1, 1, 1))


CONV_CASES = [
    # (x shape, w shape, bias, kwargs)
    ((2, 3, 7, 6), (4, 3, 3, 3), True, dict(stride=2, padding=1)),
    ((2, 2, 5, 7), (3, 2, 3, 3), False, dict(stride=1, padding=2)),
    ((2, 2, 7, 8), (3, 2, 3, 3), True, dict(stride=1, padding=2, dilation=2)),
    ((3, 3, 5, 4), (2, 3, 1, 1), True, dict()),
    ((2, 3, 5, 4), (2, 3, 1, 1), False, dict(stride=2)),
    ((2, 2, 6, 5), (3, 2, 3, 1), True, dict(stride=(2, 1), padding=(1, 0))),
    ((2, 2, 5, 7), (2, 2, 2, 3), False, dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1))),
]


@pytest.mark.parametrize("xs, ws, bias, kw", CONV_CASES)
def test_conv2d_gradcheck(xs, ws, bias, kw):
    x, w = randn(*xs, seed=1), randn(*ws, seed=2)
    inputs = [x, w] + ([randn(ws[0], seed=3)] if bias else [])
    assert tr.gradcheck(lambda x, w, *b: F.conv2d(x, w, b[0] if b else None, **kw), inputs)


@pytest.mark.parametrize("xs, ws, bias, kw", CONV_CASES)
def test_conv2d_forward_matches_loops(xs, ws, bias, kw):
    x, w = randn(*xs, seed=1), randn(*ws, seed=2)
    b = randn(ws[0], seed=3) if bias else None
    y = F.conv2d(x, w, b, **kw)
    pair = lambda v, d: (v, v) if isinstance(v, int) else v  # noqa: E731
    ref = conv2d_reference(x.data, w.data, None if b is None else b.data, pair(kw.get("stride", 1), 1),
                           pair(kw.get("padding", 0), 0), pair(kw.get("dilation", 1), 1))
    np.testing.assert_allclose(y.data, ref, rtol=1e-12, atol=1e-12)


def test_conv2d_gradient_only_for_weight_and_only_for_input():
    x, w = randn(2, 2, 5, 4, seed=1, requires_grad=False), randn(3, 2, 3, 3, seed=2)
    assert tr.gradcheck(lambda w: F.conv2d(x, w, padding=1), [w])
    x, w = randn(2, 2, 5, 4, seed=1), randn(3, 2, 3, 3, seed=2, requires_grad=False)
    assert tr.gradcheck(lambda x: F.conv2d(x, w, stride=2, padding=1), [x])


def test_conv2d_float32_stays_float32():
    x = tr.Tensor(np.ones((1, 2, 4, 4), dtype=np.float32), requires_grad=True)
    w = tr.Tensor(np.ones((3, 2, 3, 3), dtype=np.float32), requires_grad=True)
    y = F.conv2d(x, w, padding=1)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


@pytest.mark.parametrize("kernel, stride, padding, dilation, shape", [
    ((3, 3), (1, 1), (1, 1), (1, 1), (2, 3, 5, 6)),
    ((3, 2), (2, 1), (1, 0), (1, 2), (2, 2, 7, 6)),
    ((2, 3), (2, 3), (2, 1), (2, 1), (1, 3, 6, 9)),
])
def test_im2col_col2im_are_adjoint(kernel, stride, padding, dilation, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    cols = F.im2col(x, kernel, stride, padding, dilation).copy()
    c = rng.standard_normal(cols.shape)
    back = F.col2im(c, shape, kernel, stride, padding, dilation)
    lhs, rhs = float((cols * c).sum()), float((x * back).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


# =========================================================================== max-pool
def max_pool_reference(x, k, s, p):
    """Loops: -inf padding, ties to the first element of the window in row-major order."""
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    y = np.empty((N, C, Ho, Wo))
    where = np.empty((N, C, Ho, Wo, 2), dtype=int)
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    best, at = -np.inf, None
                    for a in range(k):
                        for b in range(k):
                            h, w = i * s - p + a, j * s - p + b
                            if 0 <= h < H and 0 <= w < W and (at is None or x[n, c, h, w] > best):
                                best, at = x[n, c, h, w], (h, w)
                    y[n, c, i, j], where[n, c, i, j] = best, at
    return y, where


def max_pool_reference_grad(x_shape, where, gy):
    gx = np.zeros(x_shape)
    N, C, Ho, Wo = gy.shape
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    h, w = where[n, c, i, j]
                    gx[n, c, h, w] += gy[n, c, i, j]
    return gx


@pytest.mark.parametrize("shape, k, s, p", [
    ((2, 2, 7, 6), 5, 1, 2),     # CRP's pool
    ((2, 3, 7, 8), 3, 2, 1),
    ((2, 1, 6, 5), 2, 2, 0),
])
def test_max_pool2d_gradcheck(shape, k, s, p):
    x = distinct(*shape, seed=5)
    assert tr.gradcheck(lambda x: F.max_pool2d(x, k, s, p), [x])


@pytest.mark.parametrize("shape, k, s, p", [((2, 2, 7, 6), 5, 1, 2), ((2, 3, 7, 8), 3, 2, 1), ((1, 2, 5, 5), 3, 1, 1),
                                            ((2, 1, 6, 5), 2, 2, 0)])
@pytest.mark.parametrize("kind", ["distinct", "ties"])
def test_max_pool2d_matches_loops_exactly(shape, k, s, p, kind):
    rng = np.random.default_rng(6)
    data = rng.standard_normal(shape) if kind == "distinct" else np.round(rng.standard_normal(shape))
    x = T(data)
    y = F.max_pool2d(x, k, s, p)
    ref, where = max_pool_reference(data, k, s, p)
    np.testing.assert_array_equal(y.data, ref)
    # small integer upstream gradients: sums are exact whatever the order, so routing must match exactly
    gy = rng.integers(1, 9, size=y.shape).astype(np.float64)
    y.backward(gy)
    np.testing.assert_array_equal(x.grad, max_pool_reference_grad(shape, where, gy))


def test_max_pool2d_tie_goes_to_first_element_in_row_major_order():
    x = T(np.full((2, 1, 4, 6), 3.0))
    y = F.max_pool2d(x, 2, 2)
    y.backward(np.ones(y.shape))
    expected = np.zeros((2, 1, 4, 6))
    expected[:, :, ::2, ::2] = 1.0
    np.testing.assert_array_equal(x.grad, expected)


def test_max_pool2d_tie_inside_padded_window():
    # 3x3, stride 3, padding 1 on a constant 5x5 input: window (i, j) starts at row 3i-1, col 3j-1;
    # its first in-bounds element in row-major order is (max(3i-1, 0), max(3j-1, 0))
    x = T(np.full((1, 2, 5, 5), -2.0))
    y = F.max_pool2d(x, 3, 3, 1)
    assert y.shape == (1, 2, 2, 2)
    y.backward(np.ones(y.shape))
    expected = np.zeros((1, 2, 5, 5))
    for h in (0, 2):
        for w in (0, 2):
            expected[:, :, h, w] = 1.0
    np.testing.assert_array_equal(x.grad, expected)


def test_max_pool2d_tie_in_a_row_then_column():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 0] = x[0, 0, 0, 2] = x[0, 0, 2, 1] = 5.0  # three maxima: (0, 2) is first in row-major order
    t = T(x)
    F.max_pool2d(t, 3).backward(np.ones((1, 1, 1, 1)))
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 0, 2] = 1.0
    np.testing.assert_array_equal(t.grad, expected)


def test_max_pool2d_pads_with_minus_infinity():
    x = T(-1.0 - np.random.default_rng(7).random((2, 3, 5, 4)))
    y = F.max_pool2d(x, 5, 1, 2)
    assert (y.data < 0).all() and not (y.data == 0).any()
    np.testing.assert_array_equal(y.data, max_pool_reference(x.data, 5, 1, 2)[0])
    assert np.isfinite(y.data).all()


# =========================================================================== interpolate
INTERP_CASES = [
    dict(size=(9, 7)), dict(size=(3, 2)), dict(size=(5, 9)), dict(size=(1, 1)),
    dict(scale_factor=1.7), dict(scale_factor=0.6), dict(scale_factor=2), dict(scale_factor=(2.5, 0.6)),
]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kw", INTERP_CASES, ids=lambda kw: str(kw))
def test_interpolate_gradcheck(kw, align_corners):
    x = randn(2, 2, 5, 4, seed=8)
    assert tr.gradcheck(lambda x: F.interpolate(x, align_corners=align_corners, **kw), [x])


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("kw", INTERP_CASES, ids=lambda kw: str(kw))
def test_interpolate_is_exactly_adjoint(kw, align_corners):
    rng = np.random.default_rng(9)
    x = T(rng.standard_normal((2, 3, 5, 4)))
    y = F.interpolate(x, align_corners=align_corners, **kw)
    u = rng.standard_normal(y.shape)
    y.backward(u)
    lhs, rhs = float((y.data * u).sum()), float((x.data * x.grad).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


@pytest.mark.parametrize("align_corners", [False, True])
def test_interpolate_output_sizes_and_constant_preserved(align_corners):
    x = T(np.full((2, 1, 5, 4), 1.25))
    assert F.interpolate(x, scale_factor=1.7, align_corners=align_corners).shape == (2, 1, 8, 6)
    assert F.interpolate(x, scale_factor=0.6, align_corners=align_corners).shape == (2, 1, 3, 2)
    y = F.interpolate(x, size=(7, 3), align_corners=align_corners)
    np.testing.assert_allclose(y.data, 1.25, rtol=1e-15)


@pytest.mark.parametrize("n_in, n_out", [(5, 9), (9, 5), (4, 4), (1, 3), (3, 1)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_interpolation_matrix_rows_sum_to_one(n_in, n_out, align_corners):
    A = F.interpolation_matrix(n_in, n_out, align_corners)
    assert A.shape == (n_out, n_in)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=1e-15)
    assert (A >= 0).all()


def test_interpolate_align_corners_keeps_corners():
    x = randn(1, 2, 4, 5, requires_grad=False)
    y = F.interpolate(x, size=(7, 9), align_corners=True)
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        np.testing.assert_allclose(y.data[..., i, j], x.data[..., i, j], rtol=1e-14)


# =========================================================================== relu, add
def test_relu_gradcheck():
    assert tr.gradcheck(F.relu, [away_from_zero(2, 3, 5, 4, seed=10)])


def test_relu_kink_gets_zero_gradient():
    x = T([[-1.0, 0.0, 2.0]])
    F.relu(x).backward(np.ones((1, 3)))
    np.testing.assert_array_equal(x.grad, [[0.0, 0.0, 1.0]])


def test_residual_add_gradcheck_and_shape_check():
    a, b = randn(2, 3, 4, 5, seed=11), randn(2, 3, 4, 5, seed=12)
    assert tr.gradcheck(F.add, [a, b])
    with pytest.raises(ValueError, match="equal shapes"):
        F.add(a, randn(2, 3, 4, 1))


# =========================================================================== batch norm
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_training_gradcheck(affine):
    x = randn(3, 2, 4, 5, seed=13)
    rm, rv = np.zeros(2), np.ones(2)
    if affine:
        w, b = randn(2, seed=14), randn(2, seed=15)
        fn = lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True)  # noqa: E731
        assert tr.gradcheck(fn, [x, w, b])
    else:
        assert tr.gradcheck(lambda x: F.batch_norm(x, rm, rv, training=True), [x])


def test_batch_norm_training_without_running_stats_gradcheck():
    x, w = randn(2, 3, 3, 5, seed=16), randn(3, seed=17)
    assert tr.gradcheck(lambda x, w: F.batch_norm(x, None, None, w, None, training=True), [x, w])


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval_gradcheck(affine):
    rng = np.random.default_rng(18)
    x = randn(2, 3, 4, 3, seed=19)
    rm, rv = rng.standard_normal(3), 0.5 + rng.random(3)
    if affine:
        w, b = randn(3, seed=20), randn(3, seed=21)
        assert tr.gradcheck(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=False), [x, w, b])
    else:
        assert tr.gradcheck(lambda x: F.batch_norm(x, rm, rv, training=False), [x])


def test_batch_norm_bias_only_gradcheck():
    x, b = randn(2, 3, 2, 3, seed=22), randn(3, seed=23)
    assert tr.gradcheck(lambda x, b: F.batch_norm(x, None, None, None, b, training=True), [x, b])


def test_batch_norm_forward_formula_and_running_stats_update():
    rng = np.random.default_rng(24)
    x = rng.standard_normal((3, 2, 4, 5)) * 2 + 1
    w, b = rng.standard_normal(2), rng.standard_normal(2)
    rm0, rv0 = rng.standard_normal(2), 0.5 + rng.random(2)
    rm, rv = rm0.copy(), rv0.copy()
    momentum, eps = 0.3, 1e-5
    y = F.batch_norm(T(x), rm, rv, T(w), T(b), training=True, momentum=momentum, eps=eps)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    M = x.size // 2
    expected = (x - mean.reshape(1, 2, 1, 1)) / np.sqrt(var.reshape(1, 2, 1, 1) + eps) * w.reshape(1, 2, 1, 1) + b.reshape(1, 2, 1, 1)
    np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, (1 - momentum) * rm0 + momentum * mean, rtol=1e-14)
    np.testing.assert_allclose(rv, (1 - momentum) * rv0 + momentum * var * M / (M - 1), rtol=1e-14)
    # eval uses the running statistics and leaves them alone
    rm1, rv1 = rm.copy(), rv.copy()
    y = F.batch_norm(T(x), rm, rv, T(w), T(b), training=False, eps=eps)
    expected = (x - rm1.reshape(1, 2, 1, 1)) / np.sqrt(rv1.reshape(1, 2, 1, 1) + eps) * w.reshape(1, 2, 1, 1) + b.reshape(1, 2, 1, 1)
    np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(rm, rm1)
    np.testing.assert_array_equal(rv, rv1)


def test_batch_norm_float32_statistics_stay_accurate_on_large_maps():
    """The CPU sums per channel run in float32 (einsum): over 32k values a channel, mean 100 and std 1, the
    output, the gradients and the running statistics stay near the float64 computation (a one-pass variance,
    E[x^2] - mean^2, fails here)."""
    rng = np.random.default_rng(25)
    x64 = rng.standard_normal((2, 3, 128, 128)) + 100
    w64, b64, gy64 = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(x64.shape)
    results = {}
    for dtype in (np.float32, np.float64):
        x, w, b = (tr.Tensor(a.astype(dtype), requires_grad=True) for a in (x64, w64, b64))
        rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
        y = F.batch_norm(x, rm, rv, w, b, training=True)
        y.backward(gy64.astype(dtype))
        results[dtype] = [y.data, x.grad, w.grad, rm, rv]
    for low, high in zip(results[np.float32], results[np.float64]):
        assert low.dtype == np.float32
        np.testing.assert_allclose(low, high, rtol=2e-4, atol=2e-4 * np.abs(high).max())


# =========================================================================== softmax and cross-entropy
def ce_target(shape, n_classes, seed, ignore_fraction=0.3):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, n_classes, size=shape)
    t[rng.random(shape) < ignore_fraction] = 255
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gradcheck_with_ignored_pixels(reduction):
    x = randn(2, 4, 3, 5, seed=25)
    t = ce_target((2, 3, 5), 4, seed=26)
    assert (t == 255).any() and (t != 255).any()
    assert tr.gradcheck(lambda x: F.cross_entropy(x, t, reduction=reduction), [x])


def test_cross_entropy_2d_logits_gradcheck():
    x = randn(5, 3, seed=27)
    assert tr.gradcheck(lambda x: F.cross_entropy(x, np.array([0, 2, 255, 1, 2])), [x])


def test_cross_entropy_values_and_ignored_pixels():
    rng = np.random.default_rng(28)
    x = rng.standard_normal((2, 3, 2, 3))
    t = ce_target((2, 2, 3), 3, seed=29)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    valid = t != 255
    n, h, w = np.nonzero(valid)
    picked = -logp[n, t[valid], h, w]
    np.testing.assert_allclose(F.cross_entropy(T(x), t).data, picked.mean(), rtol=1e-13)
    np.testing.assert_allclose(F.cross_entropy(T(x), t, reduction="sum").data, picked.sum(), rtol=1e-13)
    none = F.cross_entropy(T(x), t, reduction="none").data
    assert none.shape == (2, 2, 3)
    np.testing.assert_array_equal(none[~valid], 0.0)
    np.testing.assert_allclose(none[valid], picked, rtol=1e-13)
    xt = T(x)
    F.cross_entropy(xt, t).backward()
    np.testing.assert_array_equal(xt.grad.transpose(0, 2, 3, 1)[~valid], 0.0)


def test_cross_entropy_other_ignore_index():
    x = randn(2, 3, 2, 2, seed=30)
    t = np.array([[[0, -1], [2, 1]], [[-1, -1], [1, 0]]])
    assert tr.gradcheck(lambda x: F.cross_entropy(x, t, ignore_index=-1), [x])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored_is_zero_with_zero_gradient(reduction):
    x = randn(2, 3, 2, 4, seed=31)
    loss = F.cross_entropy(x, np.full((2, 2, 4), 255), reduction=reduction)
    np.testing.assert_array_equal(loss.data, 0.0)
    assert np.isfinite(loss.data).all()
    loss.backward(np.ones(loss.shape))
    np.testing.assert_array_equal(x.grad, 0.0)


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_softmax_and_log_softmax_gradcheck(axis):
    x = randn(2, 3, 4, 5, seed=32)
    assert tr.gradcheck(lambda x: F.softmax(x, axis=axis), [x])
    assert tr.gradcheck(lambda x: F.log_softmax(x, axis=axis), [x])


def test_softmax_values_are_stable_and_normalised():
    x = T(np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]]))
    y = F.softmax(x, axis=1).data
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(y[1], 1 / 3, rtol=1e-15)
    np.testing.assert_allclose(np.exp(F.log_softmax(x, axis=1).data), y, rtol=1e-14)


# =========================================================================== concat, pad, dropout
def test_concat_gradcheck():
    a, b, c = randn(2, 1, 3, 4, seed=33), randn(2, 3, 3, 4, seed=34), randn(2, 2, 3, 4, seed=35)
    assert tr.gradcheck(lambda a, b, c: F.concat([a, b, c], axis=1), [a, b, c])
    d = randn(2, 1, 2, 4, seed=36)
    assert tr.gradcheck(lambda a, d: F.concat([a, d], axis=2), [a, d])
    assert tr.gradcheck(lambda a, d: F.concat([a, d], axis=-2), [a, d])


def test_concat_with_a_constant_input():
    a, b = randn(2, 1, 3, 4, seed=37), randn(2, 2, 3, 4, seed=38, requires_grad=False)
    assert tr.gradcheck(lambda a: F.concat([b, a], axis=1), [a])


@pytest.mark.parametrize("padding", [(1, 2), (1, 2, 0, 3), (0, 1, 2, 0, 1, 1)])
def test_pad_gradcheck(padding):
    x = randn(2, 3, 3, 4, seed=39)
    assert tr.gradcheck(lambda x: F.pad(x, padding, value=0.5), [x])


def test_pad_values_follow_torch_order():
    x = T(np.ones((1, 1, 2, 3)), requires_grad=False)
    y = F.pad(x, (1, 2, 3, 0), value=-1.0)    # (left, right, top, bottom)
    assert y.shape == (1, 1, 5, 6)
    np.testing.assert_array_equal(y.data[0, 0, 3:, 1:4], 1.0)
    assert (y.data == -1.0).sum() == 30 - 6


def test_dropout_gradcheck_with_a_fixed_mask():
    x = randn(2, 3, 4, 5, seed=40)
    assert tr.gradcheck(lambda x: F.dropout(x, 0.3, rng=np.random.default_rng(0)), [x])


def test_dropout_gradient_is_mask_over_keep_probability():
    p = 0.4
    x = randn(2, 3, 5, 4, seed=41)
    y = F.dropout(x, p, rng=np.random.default_rng(1))
    mask = np.random.default_rng(1).random(x.shape) >= p
    np.testing.assert_allclose(y.data, x.data * mask / (1 - p), rtol=1e-15)
    u = np.random.default_rng(2).standard_normal(x.shape)
    y.backward(u)
    np.testing.assert_allclose(x.grad, u * mask / (1 - p), rtol=1e-15)


def test_dropout_eval_and_zero_probability_are_identity():
    x = randn(2, 3, seed=42)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="dropout probability"):
        F.dropout(x, 1.0)


def test_threaded_plane_split_matches_single_thread(monkeypatch):
    """Shapes large enough to be split over cores give exactly the one-core result
    (BLAS held at one thread: on two it may sum in another order)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from tinyrefine import threads
    monkeypatch.setattr(threads, "_set_blas_threads", lambda n: None)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 24, 80, 72)).astype(np.float32)
    w = rng.standard_normal((8, 24, 3, 3)).astype(np.float32)

    def run():
        xt, wt = tr.Tensor(x.copy(), requires_grad=True), tr.Tensor(w.copy(), requires_grad=True)
        y = F.conv2d(xt, wt, padding=1)
        z = F.max_pool2d(tr.Tensor(x.copy(), requires_grad=True), 5, 1, 2)
        y.backward(np.ones(y.shape, np.float32))
        return y.data, xt.grad, wt.grad, z.data

    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        with tr.num_threads(2):
            threaded = run()
        with tr.num_threads(1):
            single = run()
    for a, b in zip(threaded, single):
        np.testing.assert_array_equal(a, b)
