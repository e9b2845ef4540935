"""conv2d on the CPU in bands of output rows (issue 13): each band's im2col is made and used while in cache,
bands run on the pool, and a stride-1 conv's input gradient is a conv of gy with the flipped kernel.
Forced down to bands of one or two rows and to the pool for every size, it must still give the plain
im2col formula (float64), its gradcheck, and the same bits on 1 and 2 threads."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine.functional import conv as conv_module
from tinyrefine.functional.conv import Conv2dFunction, im2col

GEOMETRIES = [  # (x shape, weight shape, stride, padding, dilation)
    ((2, 3, 9, 7), (4, 3, 3, 3), 1, 1, 1),
    ((2, 3, 9, 8), (2, 3, 3, 3), 1, 2, 2),          # dilated: the flipped-kernel gradient keeps the dilation
    ((1, 2, 8, 9), (3, 2, 3, 3), 1, 3, 1),          # padding past the kernel's reach (3 > 2): col2im
    ((2, 3, 11, 7), (4, 3, 3, 3), 2, 1, 1),         # strided: col2im
    ((1, 2, 10, 10), (3, 2, 7, 7), 2, 3, 1),
    ((3, 4, 6, 5), (5, 4, 1, 1), 1, 0, 1),
    ((2, 2, 5, 7), (3, 2, 2, 3), (1, 2), (0, 1), 1),
    # strided convs read phase-split images (space-to-depth): phases of unequal length, dilation across
    # phases, a stride wider than the kernel (phases never read), padding wider than a phase
    ((2, 3, 9, 8), (2, 3, 3, 3), 2, 2, 2),
    ((1, 2, 10, 11), (3, 2, 2, 2), 3, 1, 1),
    ((2, 4, 7, 6), (3, 4, 1, 1), 2, 0, 1),
    ((1, 2, 5, 5), (2, 2, 3, 3), 2, 4, 1),
]


@pytest.fixture
def tiny_bands(monkeypatch):
    """Bands of about one output row, every job on the pool, no folding: every band edge is exercised."""
    monkeypatch.setattr(conv_module, "BAND_BYTES", 1)
    monkeypatch.setattr(conv_module, "MIN_BAND_COLUMNS", 1)
    monkeypatch.setattr(conv_module, "PARALLEL_MIN_MACS", 0)


def reference(x, w, stride, padding, dilation, gy):
    """y, dx, dW from the whole im2col (float64), dx by the adjoint written out with np.add.at."""
    s, p, d = (Conv2dFunction(stride, padding, dilation).__dict__[k] for k in ("stride", "padding", "dilation"))
    cols = im2col(x, w.shape[2:], s, p, d)                      # (N, C, kh, kw, Ho, Wo)
    y = np.einsum("ocpq,ncpqij->noij", w, cols)
    gw = np.einsum("noij,ncpqij->ocpq", gy, cols)
    gcols = np.einsum("ocpq,noij->ncpqij", w, gy)
    N, C, H, W = x.shape
    gxpad = np.zeros((N, C, H + 2 * p[0], W + 2 * p[1]))
    Ho, Wo = gy.shape[2:]
    for a in range(w.shape[2]):
        for b in range(w.shape[3]):
            rows = a * d[0] + s[0] * np.arange(Ho)
            cols_ = b * d[1] + s[1] * np.arange(Wo)
            np.add.at(gxpad, (slice(None), slice(None), rows[:, None], cols_[None, :]), gcols[:, :, a, b])
    return y, gxpad[:, :, p[0]:p[0] + H, p[1]:p[1] + W], gw


def run(x, w, geometry, gy, n_threads):
    stride, padding, dilation = geometry
    xt, wt = tr.Tensor(x, requires_grad=True), tr.Tensor(w, requires_grad=True)
    with tr.num_threads(n_threads):
        y = F.conv2d(xt, wt, None, stride, padding, dilation, algorithm="im2col")
        y.backward(gy)
    return y.data, xt.grad, wt.grad


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", GEOMETRIES)
@pytest.mark.parametrize("fold", [False, True])
def test_bands_give_the_im2col_formula_on_one_and_two_threads(x_shape, w_shape, stride, padding, dilation, fold,
                                                              tiny_bands, monkeypatch):
    monkeypatch.setattr(Conv2dFunction, "fold_max_pixels", 10 ** 9 if fold else 0)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y_shape = F.conv2d(tr.Tensor(x), tr.Tensor(w), None, stride, padding, dilation).shape
    gy = rng.standard_normal(y_shape)
    expected = reference(x, w, stride, padding, dilation, gy)
    one = run(x, w, (stride, padding, dilation), gy, 1)
    two = run(x, w, (stride, padding, dilation), gy, 2)
    for name, e, a, b in zip(("y", "dx", "dW"), expected, one, two):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: 1 and 2 threads differ")


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", GEOMETRIES[:4] + GEOMETRIES[7:])
def test_banded_conv_gradcheck(x_shape, w_shape, stride, padding, dilation, tiny_bands):
    rng = np.random.default_rng(2)
    x = tr.Tensor(rng.standard_normal(x_shape), requires_grad=True)
    w = tr.Tensor(rng.standard_normal(w_shape), requires_grad=True)
    b = tr.Tensor(rng.standard_normal(w_shape[0]), requires_grad=True)
    with tr.num_threads(2):
        assert tr.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, algorithm="im2col"), [x, w, b])


def test_bands_are_cut_from_the_shapes_not_the_thread_count(monkeypatch):
    """The weight gradient is summed band by band: the same bands on any number of threads give the same bits."""
    seen = []
    real = conv_module._band_cols

    def spy(image, kernel, stride, dilation, rows, Wo):
        seen.append(rows)
        return real(image, kernel, stride, dilation, rows, Wo)
    monkeypatch.setattr(conv_module, "_band_cols", spy)
    x = np.random.default_rng(1).standard_normal((2, 16, 96, 96)).astype(np.float32)
    w = np.random.default_rng(2).standard_normal((16, 16, 3, 3)).astype(np.float32)
    for n in (1, 2):
        with tr.num_threads(n):
            F.conv2d(tr.Tensor(x), tr.Tensor(w), padding=1, algorithm="im2col")
    first, second = seen[:len(seen) // 2], seen[len(seen) // 2:]
    assert sorted(first) == sorted(second) and len(set(first)) > 1     # several bands, the same on 1 and 2 threads


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", GEOMETRIES)
@pytest.mark.parametrize("fold", [False, True])
def test_bands_match_torch_forward_and_backward(x_shape, w_shape, stride, padding, dilation, fold, tiny_bands,
                                                monkeypatch):
    """The same banded paths against torch's conv2d (float64): output, input and weight gradients."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(Conv2dFunction, "fold_max_pixels", 10 ** 9 if fold else 0)
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    ours = F.conv2d(tr.Tensor(x), tr.Tensor(w), None, stride, padding, dilation)
    gy = rng.standard_normal(ours.shape)
    y, gx, gw = run(x, w, (stride, padding, dilation), gy, 2)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, None, stride, padding, dilation)
    yt.backward(torch.tensor(gy))
    for name, a, b in (("y", y, yt), ("dx", gx, xt.grad), ("dW", gw, wt.grad)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
