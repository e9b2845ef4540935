"""Small layers (issue 13): on the CPU a conv with a small output map folds the batch into one GEMM
(Conv2dFunction.fold_max_pixels), its columns laid out with the batch innermost. It must give what
the per-image path gives, for every geometry, and pass its gradcheck."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine.functional.conv import Conv2dFunction

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
