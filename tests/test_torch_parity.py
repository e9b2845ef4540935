"""Forward and backward of each kernel against torch (CPU, float64, the same random upstream gradient)."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional

TOL = 1e-10


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if a.size else 0.0


def compare(ours_fn, torch_fn, arrays, seed=0, grads=None, tol=TOL):
    """Run both on float64 copies of ``arrays`` with one random upstream gradient; compare y and each grad.

    ``grads`` lists which arrays need a gradient (all by default). Returns the worst relative error."""
    grads = [True] * len(arrays) if grads is None else grads
    ours = [tr.Tensor(np.array(a, dtype=np.float64), requires_grad=g) for a, g in zip(arrays, grads)]
    theirs = [torch.tensor(np.array(a, dtype=np.float64), requires_grad=g) for a, g in zip(arrays, grads)]
    y, ty = ours_fn(*ours), torch_fn(*theirs)
    worst = rel_err(y.data, ty.detach().numpy())
    u = np.random.default_rng(seed).standard_normal(y.shape)
    y.backward(u)
    ty.backward(torch.tensor(u))
    for a, b, g in zip(ours, theirs, grads):
        if g:
            worst = max(worst, rel_err(a.grad, b.grad.numpy()))
    assert worst <= tol, worst
    return worst


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# =========================================================================== conv2d
@pytest.mark.parametrize("xs, ws, kw", [
    ((2, 3, 7, 6), (4, 3, 3, 3), dict(stride=1, padding=1)),
    ((2, 3, 7, 6), (4, 3, 3, 3), dict(stride=2, padding=1)),
    ((2, 2, 9, 8), (3, 2, 3, 3), dict(stride=1, padding=2, dilation=2)),
    ((2, 2, 9, 8), (3, 2, 3, 3), dict(stride=2, padding=0, dilation=2)),
    ((3, 4, 5, 5), (2, 4, 1, 1), dict()),
    ((2, 3, 8, 7), (5, 3, 1, 1), dict(stride=2)),
    ((2, 2, 6, 7), (3, 2, 3, 1), dict(stride=(2, 1), padding=(1, 0))),
    ((2, 2, 7, 9), (3, 2, 2, 4), dict(stride=(1, 3), padding=(1, 2), dilation=(2, 1))),
    ((1, 3, 7, 7), (2, 3, 7, 7), dict(padding=3)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(xs, ws, kw, bias):
    arrays = [randn(*xs, seed=1), randn(*ws, seed=2)] + ([randn(ws[0], seed=3)] if bias else [])
    compare(lambda x, w, *b: F.conv2d(x, w, *b, **kw), lambda x, w, *b: TF.conv2d(x, w, *b, **kw), arrays)


def test_conv2d_float32_forward_close_to_torch():
    x, w, b = (a.astype(np.float32) for a in (randn(2, 3, 9, 8, seed=4), randn(4, 3, 3, 3, seed=5), randn(4, seed=6)))
    for kw in (dict(padding=1), dict(stride=2, padding=2, dilation=2)):
        y = F.conv2d(tr.Tensor(x), tr.Tensor(w), tr.Tensor(b), **kw)
        assert y.dtype == np.float32
        ty = TF.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), **kw).numpy()
        np.testing.assert_allclose(y.data, ty, rtol=1e-4, atol=1e-4 * np.abs(ty).max())


# =========================================================================== max-pool
@pytest.mark.parametrize("shape, k, s, p", [
    ((2, 3, 7, 6), 5, 1, 2),
    ((2, 3, 7, 8), 3, 2, 1),
    ((2, 2, 8, 6), 2, 2, 0),
    ((1, 2, 9, 7), 3, 1, 1),
    ((2, 1, 7, 7), 3, 3, 0),
])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool2d(shape, k, s, p, ties):
    x = randn(*shape, seed=7)
    if ties:
        x = np.round(x)  # many equal values: both libraries must route the gradient to the same element
    compare(lambda x: F.max_pool2d(x, k, s, p), lambda x: TF.max_pool2d(x, k, s, p), [x])
    if ties:
        # exact agreement, with an upstream gradient whose sums are exact in any order
        ours, theirs = tr.Tensor(x.copy(), requires_grad=True), torch.tensor(x.copy(), requires_grad=True)
        y, ty = F.max_pool2d(ours, k, s, p), TF.max_pool2d(theirs, k, s, p)
        u = np.random.default_rng(8).integers(1, 9, size=y.shape).astype(np.float64)
        y.backward(u)
        ty.backward(torch.tensor(u))
        np.testing.assert_array_equal(y.data, ty.detach().numpy())
        np.testing.assert_array_equal(ours.grad, theirs.grad.numpy())


def test_max_pool2d_all_negative_matches_torch():
    x = -1.0 - np.random.default_rng(9).random((2, 2, 6, 5))
    compare(lambda x: F.max_pool2d(x, 5, 1, 2), lambda x: TF.max_pool2d(x, 5, 1, 2), [x])


# =========================================================================== interpolate
@pytest.mark.parametrize("kw", [
    dict(size=(11, 9)), dict(size=(3, 2)), dict(size=(5, 12)), dict(size=(1, 1)), dict(size=(7, 1)),
    dict(scale_factor=2), dict(scale_factor=2.5), dict(scale_factor=0.6), dict(scale_factor=1.7),
    dict(scale_factor=(2.5, 0.6)), dict(scale_factor=0.5),
], ids=str)
@pytest.mark.parametrize("align_corners", [False, True])
def test_interpolate(kw, align_corners):
    x = randn(2, 3, 5, 4, seed=10)
    compare(lambda x: F.interpolate(x, align_corners=align_corners, **kw),
            lambda x: TF.interpolate(x, mode="bilinear", align_corners=align_corners, **kw), [x])


# =========================================================================== relu, softmax, pad
def test_relu():
    x = randn(2, 3, 5, 4, seed=11)
    x[0, 0, 0, :2] = 0.0  # the kink: both give gradient 0
    compare(F.relu, TF.relu, [x])


@pytest.mark.parametrize("axis", [1, -1])
def test_softmax_and_log_softmax(axis):
    x = randn(2, 4, 3, 5, seed=12) * 3
    compare(lambda x: F.softmax(x, axis=axis), lambda x: TF.softmax(x, dim=axis), [x])
    compare(lambda x: F.log_softmax(x, axis=axis), lambda x: TF.log_softmax(x, dim=axis), [x])


@pytest.mark.parametrize("padding, value", [((1, 2), 0.0), ((1, 2, 3, 0), 0.5), ((0, 1, 2, 1, 1, 0), -1.0)])
def test_pad(padding, value):
    compare(lambda x: F.pad(x, padding, value=value), lambda x: TF.pad(x, padding, value=value),
            [randn(2, 3, 4, 5, seed=13)])


# =========================================================================== batch norm
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(training, affine):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, 4, 5, 3)) * 2 + 0.5
    rm, rv = rng.standard_normal(4), 0.5 + rng.random(4)
    ours_rm, ours_rv = rm.copy(), rv.copy()
    torch_rm, torch_rv = torch.tensor(rm), torch.tensor(rv)
    arrays = [x] + ([rng.standard_normal(4), rng.standard_normal(4)] if affine else [])
    compare(lambda x, *wb: F.batch_norm(x, ours_rm, ours_rv, *wb, training=training, momentum=0.2, eps=1e-4),
            lambda x, *wb: TF.batch_norm(x, torch_rm, torch_rv, *wb, training=training, momentum=0.2, eps=1e-4),
            arrays)
    assert rel_err(ours_rm, torch_rm.numpy()) <= TOL
    assert rel_err(ours_rv, torch_rv.numpy()) <= TOL
    if not training:
        np.testing.assert_array_equal(ours_rm, rm)


# =========================================================================== cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_ignore_255(reduction):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 5, 4, 3)) * 2
    t = rng.integers(0, 5, size=(2, 4, 3))
    t[rng.random(t.shape) < 0.3] = 255
    assert (t == 255).any()
    compare(lambda x: F.cross_entropy(x, t, ignore_index=255, reduction=reduction),
            lambda x: TF.cross_entropy(x, torch.tensor(t), ignore_index=255, reduction=reduction), [x])


def test_cross_entropy_2d_logits():
    rng = np.random.default_rng(16)
    x, t = rng.standard_normal((6, 4)), np.array([0, 3, 255, 1, 1, 2])
    compare(lambda x: F.cross_entropy(x, t), lambda x: TF.cross_entropy(x, torch.tensor(t), ignore_index=255), [x])
