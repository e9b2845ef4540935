"""Small layers (issue 13): on the CPU a conv with a small output map folds the batch into one GEMM
(Conv2dFunction.fold_max_pixels), its columns laid out with the batch innermost. It must give what
the per-image path gives, for every geometry, and pass its gradcheck. Max pooling on narrow maps keeps the
N*C planes innermost in memory (MaxPool2dFunction.planes_last_max_width): the same bits either way."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine.functional.conv import Conv2dFunction
from tinyrefine.functional.pool import MaxPool2dFunction

GEOMETRIES = [  # (x shape, weight shape, stride, padding, dilation)
    ((3, 4, 6, 5), (5, 4, 3, 3), 1, 1, 1),
    ((2, 3, 7, 7), (4, 3, 3, 3), 2, 1, 1),
    ((2, 3, 9, 8), (2, 3, 3, 3), 1, 2, 2),
    ((1, 2, 8, 8), (3, 2, 7, 7), 2, 3, 1),
    ((3, 4, 5, 5), (6, 4, 1, 1), 1, 0, 1),
    ((2, 4, 6, 6), (3, 4, 1, 1), 2, 0, 1),
    ((2, 2, 5, 7), (3, 2, 2, 3), (1, 2), (0, 1), 1),
]


def run(x, w, b, geometry, fold_max_pixels, monkeypatch):
    monkeypatch.setattr(Conv2dFunction, "fold_max_pixels", fold_max_pixels)
    stride, padding, dilation = geometry
    xt, wt = tr.Tensor(x, requires_grad=True), tr.Tensor(w, requires_grad=True)
    bt = None if b is None else tr.Tensor(b, requires_grad=True)
    y = F.conv2d(xt, wt, bt, stride, padding, dilation, algorithm="im2col")
    upstream = np.random.default_rng(1).standard_normal(y.shape)
    y.backward(upstream)
    return [y.data, xt.grad, wt.grad] + ([] if b is None else [bt.grad])


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", GEOMETRIES)
@pytest.mark.parametrize("bias", [False, True])
def test_folded_batch_equals_the_per_image_path(x_shape, w_shape, stride, padding, dilation, bias, monkeypatch):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0]) if bias else None
    geometry = (stride, padding, dilation)
    per_image = run(x, w, b, geometry, 0, monkeypatch)
    folded = run(x, w, b, geometry, 10 ** 9, monkeypatch)
    for a, c in zip(per_image, folded):
        np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", GEOMETRIES[:4])
def test_folded_batch_gradcheck(x_shape, w_shape, stride, padding, dilation, monkeypatch):
    monkeypatch.setattr(Conv2dFunction, "fold_max_pixels", 10 ** 9)
    rng = np.random.default_rng(2)
    x = tr.Tensor(rng.standard_normal(x_shape), requires_grad=True)
    w = tr.Tensor(rng.standard_normal(w_shape), requires_grad=True)
    b = tr.Tensor(rng.standard_normal(w_shape[0]), requires_grad=True)
    assert tr.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, algorithm="im2col"), [x, w, b])


def test_the_demo_sizes_take_the_folded_path_and_large_maps_do_not():
    def folded(x_shape, w_shape):
        x = tr.Tensor(np.zeros(x_shape, np.float32), requires_grad=True)
        return F.conv2d(x, tr.Tensor(np.zeros(w_shape, np.float32)), padding=1, algorithm="im2col").creator.folded
    assert folded((8, 32, 16, 16), (32, 32, 3, 3))          # the demo decoder at 1/4
    assert not folded((2, 8, 64, 64), (8, 8, 3, 3))


# --------------------------------------------------------------------------- max pool, planes innermost
POOL_GEOMETRIES = [  # (x shape, kernel, stride, padding): CRP's 5x5 s1, ResNet's 3x3 s2, uneven maps
    ((2, 3, 8, 8), 5, 1, 2),
    ((2, 3, 2, 2), 5, 1, 2),
    ((3, 2, 7, 6), 3, 2, 1),
    ((2, 2, 9, 12), (3, 2), (2, 1), (1, 0)),
]


def pool_run(x, geometry, planes_last_max_width, monkeypatch):
    monkeypatch.setattr(MaxPool2dFunction, "planes_last_max_width", planes_last_max_width)
    k, s, p = geometry
    xt = tr.Tensor(x, requires_grad=True)
    y, indices = F.max_pool2d(xt, k, s, p, return_indices=True)
    y.backward(np.random.default_rng(1).standard_normal(y.shape).astype(x.dtype))
    return y.data, indices.data, xt.grad


@pytest.mark.parametrize("x_shape, k, s, p", POOL_GEOMETRIES)
@pytest.mark.parametrize("values", ["random", "ties", "nans"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_planes_innermost_gives_the_same_bits(x_shape, k, s, p, values, dtype, monkeypatch):
    """Narrow maps keep the N*C planes innermost in memory; only the memory order may change, so the values,
    the argmax (ties: the first in row-major order; NaN: the last NaN) and the gradient are equal to the bit."""
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 2, x_shape) if values == "ties" else rng.standard_normal(x_shape)
    x = x.astype(dtype)
    if values == "nans":
        x[rng.random(x_shape) < 0.2] = np.nan
    planes_first = pool_run(x, (k, s, p), 0, monkeypatch)
    planes_last = pool_run(x, (k, s, p), 10 ** 6, monkeypatch)
    for a, b in zip(planes_first, planes_last):
        np.testing.assert_array_equal(a, b)
    assert planes_last[1].dtype == np.int64 and planes_last[2].flags.c_contiguous


def test_narrow_maps_pool_with_the_planes_innermost():
    op = MaxPool2dFunction(5, 1, 2)
    y = op(tr.Tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)))
    assert op.planes_last and op.row_offset_of_window_max.strides[0] == 1   # uint8 offsets, planes adjacent
    assert y.data.flags.c_contiguous
    op = MaxPool2dFunction(5, 1, 2)
    op(tr.Tensor(np.zeros((2, 3, 8, MaxPool2dFunction.planes_last_max_width + 1), dtype=np.float32)))
    assert not op.planes_last


def test_max_pool_gradcheck_with_the_planes_innermost():
    x = tr.Tensor(np.random.default_rng(3).standard_normal((2, 2, 5, 4)), requires_grad=True)
    assert tr.gradcheck(lambda t: F.max_pool2d(t, 3, 1, 1), [x])
    assert tr.gradcheck(lambda t: F.max_pool2d(t, 3, 2, 1), [x])
