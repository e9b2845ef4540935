"""Winograd 3x3 convolution (functional/winograd.py) against the im2col conv, finite differences and float64.

The CUDA cases run on a GPU or under the CuPy emulator:
PYTHONPATH=../shared/tools/fakecupy python -m pytest -q -o addopts= tests/test_winograd.py
"""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F
import tinyrefine.nn as nn
from tinyrefine.functional import winograd
from tinyrefine.gradcheck import gradcheck

ALGOS = ["winograd", "winograd4"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def conv_and_grads(x, w, b, upstream, padding, algorithm):
    """(y, dx, dw, db) of F.conv2d with ``algorithm`` for one upstream gradient (db None without bias)."""
    xt, wt = tr.Tensor(x.copy(), requires_grad=True), tr.Tensor(w.copy(), requires_grad=True)
    bt = None if b is None else tr.Tensor(b.copy(), requires_grad=True)
    y = F.conv2d(xt, wt, bt, padding=padding, algorithm=algorithm)
    y.backward(upstream)
    return y.data, xt.grad, wt.grad, None if bt is None else bt.grad


# --------------------------------------------------------------------------- the transforms
@pytest.mark.parametrize("m", [2, 4])
def test_1d_transforms_compute_m_outputs_of_a_3_tap_correlation(m):
    A_T, G, B_T = winograd.winograd_matrices(m)
    assert A_T.shape == (m, m + 2) and G.shape == (m + 2, 3) and B_T.shape == (m + 2, m + 2)
    np.testing.assert_array_equal(B_T, np.round(B_T))             # the scaling went into G: B^T is integer
    rng = np.random.default_rng(0)
    for _ in range(5):
        g, d = rng.standard_normal(3), rng.standard_normal(m + 2)
        direct = np.array([g @ d[j:j + 3] for j in range(m)])
        np.testing.assert_allclose(A_T @ ((G @ g) * (B_T @ d)), direct, rtol=0, atol=1e-13)


def test_f23_matrices_are_lavin_and_grays_up_to_row_signs():
    A_T, G, B_T = winograd.winograd_matrices(2)
    lavin_B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
    lavin_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])
    np.testing.assert_array_equal(np.abs(B_T), np.abs(lavin_B_T))
    np.testing.assert_array_equal(np.abs(G), np.abs(lavin_G))
    np.testing.assert_array_equal(A_T, [[1, 1, 1, 0], [0, 1, -1, 1]])


def test_points_must_be_distinct_and_counted():
    with pytest.raises(ValueError, match="distinct finite points"):
        winograd.winograd_matrices(2, points=(0, 1, 1))
    with pytest.raises(ValueError, match="needs 3"):
        winograd.winograd_matrices(2, points=(0, 1))


# --------------------------------------------------------------------------- equal to im2col in float64
CASES = [  # (x shape, C_out, padding, bias): even and odd sizes, paddings 0/1/2, batch 1 and > 1
    ((2, 3, 8, 8), 4, 1, True),
    ((2, 3, 7, 5), 4, 1, False),
    ((1, 2, 6, 9), 3, 0, True),
    ((3, 2, 5, 6), 2, 0, False),
    ((2, 2, 3, 4), 3, 2, True),
    ((1, 3, 11, 10), 2, (1, 0), True),
]


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("shape, c_out, padding, bias", CASES)
def test_equals_im2col_in_float64(shape, c_out, padding, bias, algorithm):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(shape), rng.standard_normal((c_out, shape[1], 3, 3))
    b = rng.standard_normal(c_out) if bias else None
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    upstream = rng.standard_normal((shape[0], c_out, shape[2] + 2 * ph - 2, shape[3] + 2 * pw - 2))
    ours = conv_and_grads(x, w, b, upstream, padding, algorithm)
    reference = conv_and_grads(x, w, b, upstream, padding, "im2col")
    for what, a, r in zip(("y", "dx", "dw", "db"), ours, reference):
        if r is None:
            assert a is None
            continue
        assert a.shape == r.shape and a.dtype == np.float64, what
        assert rel_err(a, r) < 1e-12, f"{what}: {rel_err(a, r)}"


@pytest.mark.parametrize("algorithm", ALGOS)
def test_gradcheck_float64(algorithm):
    rng = np.random.default_rng(2)
    x = tr.Tensor(rng.standard_normal((2, 2, 5, 6)), requires_grad=True)
    w = tr.Tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    b = tr.Tensor(rng.standard_normal(3), requires_grad=True)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, padding=1, algorithm=algorithm), [x, w, b], atol=1e-7, rtol=1e-6)
    assert gradcheck(lambda x, w: F.conv2d(x, w, padding=0, algorithm=algorithm), [x, w], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_weight_gradient_alone_and_input_gradient_alone(algorithm):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((2, 3, 3, 3))
    u = rng.standard_normal((2, 2, 6, 7))
    _, gx_ref, gw_ref, _ = conv_and_grads(x, w, None, u, 1, "im2col")
    frozen_x, wt = tr.Tensor(x), tr.Tensor(w, requires_grad=True)          # e.g. the first conv, fed by the image
    F.conv2d(frozen_x, wt, padding=1, algorithm=algorithm).backward(u)
    assert frozen_x.grad is None and rel_err(wt.grad, gw_ref) < 1e-12
    xt, frozen_w = tr.Tensor(x, requires_grad=True), tr.Tensor(w)          # e.g. a frozen encoder
    F.conv2d(xt, frozen_w, padding=1, algorithm=algorithm).backward(u)
    assert frozen_w.grad is None and rel_err(xt.grad, gx_ref) < 1e-12


# --------------------------------------------------------------------------- float32 error
@pytest.mark.parametrize("algorithm, bound", [("im2col", 2e-6), ("winograd", 4e-6), ("winograd4", 2e-5)])
def test_float32_error_against_float64_is_bounded(algorithm, bound):
    """Relative error (max |err| / max |y|) of float32 forward and gradients at a RefineNet-like width.
    Measured here: im2col ~4e-7, F(2x2,3x3) ~3e-7, F(4x4,3x3) ~4e-6 (notebook 12 has the table)."""
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 64, 12, 12)), rng.standard_normal((32, 64, 3, 3)) / 24
    u = rng.standard_normal((1, 32, 12, 12))
    exact = conv_and_grads(x, w, None, u, 1, "im2col")
    single = conv_and_grads(x.astype(np.float32), w.astype(np.float32), None, u.astype(np.float32), 1, algorithm)
    for what, a, r in zip(("y", "dx", "dw"), single[:3], exact[:3]):
        assert a.dtype == np.float32
        assert rel_err(a, r) < bound, f"{what}: {rel_err(a, r):.2e}"


# --------------------------------------------------------------------------- choosing and refusing
@pytest.mark.parametrize("kernel, stride, dilation, why", [((1, 1), 1, 1, "kernel"), ((3, 3), 2, 1, "stride"),
                                                            ((3, 3), 1, 2, "dilation"), ((5, 5), 1, 1, "kernel")])
@pytest.mark.parametrize("algorithm", ALGOS)
def test_winograd_refuses_what_it_cannot_compute(kernel, stride, dilation, why, algorithm):
    x, w = tr.Tensor(np.ones((1, 2, 9, 9))), tr.Tensor(np.ones((3, 2, *kernel)))
    with pytest.raises(ValueError, match=f"algorithm='{algorithm}' needs a 3x3 kernel.*{why}"):
        F.conv2d(x, w, stride=stride, dilation=dilation, padding=1, algorithm=algorithm)
    y = F.conv2d(x, w, stride=stride, dilation=dilation, padding=1, algorithm="auto")  # auto falls back to im2col
    np.testing.assert_array_equal(y.data, F.conv2d(x, w, stride=stride, dilation=dilation, padding=1,
                                                   algorithm="im2col").data)


def test_unknown_algorithm_is_named():
    x, w = tr.Tensor(np.ones((1, 2, 5, 5))), tr.Tensor(np.ones((3, 2, 3, 3)))
    with pytest.raises(ValueError, match="algorithm must be one of.*'fft'"):
        F.conv2d(x, w, algorithm="fft")
    with pytest.raises(ValueError, match="Conv2d algorithm must be one of.*'winograd8'"):
        nn.Conv2d(2, 3, 3, algorithm="winograd8")


def test_layer_passes_its_algorithm():
    rng = np.random.default_rng(5)
    layer = nn.Conv2d(3, 4, 3, padding=1, algorithm="winograd4", rng=rng)
    assert "algorithm='winograd4'" in repr(layer)
    x = tr.Tensor(rng.standard_normal((2, 3, 6, 6)).astype(np.float32))
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1, algorithm="im2col")
    assert rel_err(layer(x).data, expected.data) < 1e-5


def choose(x_shape, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), device="cpu"):
    """What auto picks for a C -> C conv, padding 1."""
    return winograd.choose_algorithm(x_shape, (x_shape[1], x_shape[1], *kernel), stride, (1, 1), dilation, device)


def test_auto_rule_follows_its_measurements():
    assert choose((2, 256, 40, 40), kernel=(1, 1)) == choose((2, 256, 40, 40), stride=(2, 2)) == "im2col"
    assert choose((2, 256, 40, 40), dilation=(2, 2)) == choose((2, 256, 40, 40), device="cuda") == "im2col"
    assert choose((2, 256, 40, 40)) == choose((2, 128, 20, 20)) == choose((2, 64, 40, 40)) == "winograd4"
    assert choose((2, 128, 80, 80)) == choose((2, 64, 20, 20)) == "winograd4"
    assert choose((2, 512, 20, 20)) == choose((2, 256, 20, 20)) == choose((1, 256, 32, 32)) == "winograd"
    assert choose((2, 512, 10, 10)) == choose((2, 32, 160, 160)) == choose((2, 32, 40, 40)) == "im2col"
    assert choose((2, 64, 80, 80)) == choose((2, 64, 160, 160)) == "im2col"     # banded im2col stays in cache


def test_auto_computes_what_it_chose():
    rng = np.random.default_rng(7)
    x, w = tr.Tensor(rng.standard_normal((2, 128, 20, 20))), tr.Tensor(rng.standard_normal((128, 128, 3, 3)))
    assert winograd.choose_algorithm(x.shape, w.shape, (1, 1), (1, 1), (1, 1), "cpu") == "winograd4"
    auto, winograd4 = (F.conv2d(x, w, padding=1, algorithm=a).data for a in ("auto", "winograd4"))
    np.testing.assert_array_equal(auto, winograd4)
    assert rel_err(auto, F.conv2d(x, w, padding=1, algorithm="im2col").data) < 1e-12


# --------------------------------------------------------------------------- the CUDA path (GPU or emulator)
@pytest.mark.skipif(not tr.cuda_available(), reason="CuPy with a GPU (or ../shared/tools/fakecupy) is not available")
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("algorithm", ALGOS)
def test_cuda_path_equals_numpy(algorithm, dtype, tol):
    cp = tr.backend._cupy
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    u = rng.standard_normal((2, 4, 7, 6))
    cpu = [tr.Tensor(a.astype(dtype), requires_grad=True) for a in (x, w, b)]
    gpu = [tr.Tensor(cp.asarray(a.astype(dtype)), requires_grad=True) for a in (x, w, b)]
    y_cpu, y_gpu = (F.conv2d(*t[:2], t[2], padding=1, algorithm=algorithm) for t in (cpu, gpu))
    y_cpu.backward(u.astype(dtype))
    y_gpu.backward(cp.asarray(u.astype(dtype)))
    assert y_gpu.device == "cuda" and y_gpu.dtype == dtype
    assert rel_err(cp.asnumpy(y_gpu.data), y_cpu.data) < tol
    for a, g in zip(cpu, gpu):
        assert isinstance(g.grad, cp.ndarray) and g.grad.dtype == dtype
        assert rel_err(cp.asnumpy(g.grad), a.grad) < tol


# --------------------------------------------------------------------------- notebook 12's checks
def test_exercise_checks_accept_the_transforms_and_name_the_mistakes(capsys):
    from tinyrefine.exercises import check_winograd_f23, check_winograd_tile
    A_T, G, B_T = winograd.winograd_matrices(2)
    assert check_winograd_f23(lambda d, g: A_T @ ((G @ g) * (B_T @ d)))
    assert not check_winograd_f23(lambda d, g: A_T @ ((G @ g[::-1]) * (B_T @ d)))
    assert "convolution (the filter flipped)" in capsys.readouterr().out

    def stub(d, g):
        raise NotImplementedError
    assert not check_winograd_f23(stub)
    assert "not attempted yet" in capsys.readouterr().out
    assert check_winograd_tile(lambda d, g: A_T @ ((G @ g @ G.T) * (B_T @ d @ B_T.T)) @ A_T.T)
    assert not check_winograd_tile(lambda d, g: (A_T @ ((G @ g @ G.T) * (B_T @ d @ B_T.T)) @ A_T.T).T)
    assert "transposed" in capsys.readouterr().out
