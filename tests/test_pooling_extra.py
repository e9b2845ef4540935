"""Issue 12's kernels: adaptive_avg_pool2d, avg_pool2d, conv_transpose2d, max_pool2d(return_indices) and
max_unpool2d. Float64 gradchecks (random upstream gradient), torch parity forward and backward over a grid
of sizes, and the errors bad arguments get. Shapes are tiny, odd and non-square, batch > 1."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F


def randn(*shape, seed=0, requires_grad=True):
    return tr.Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=requires_grad)


def torch_parity(ours_fn, torch_fn, arrays, seed=0, tol=1e-12):
    """Run ours and torch's on the same float64 arrays with the same random upstream gradient;
    return the largest forward and gradient differences (asserted below ``tol``)."""
    torch = pytest.importorskip("torch")
    ours = [tr.Tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    theirs = [torch.tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    y, y_t = ours_fn(*ours), torch_fn(*theirs)
    assert y.shape == tuple(y_t.shape), (y.shape, tuple(y_t.shape))
    u = np.random.default_rng(seed).standard_normal(y.shape)
    y.backward(u)
    y_t.backward(torch.tensor(u))
    errors = [float(np.abs(y.data - y_t.detach().numpy()).max(initial=0))]
    errors += [float(np.abs(a.grad - b.grad.numpy()).max(initial=0)) for a, b in zip(ours, theirs)]
    assert max(errors) < tol, errors
    return errors


# =========================================================================== adaptive_avg_pool2d
ADAPTIVE_CASES = [((2, 3, 7, 7), (3, 3)), ((2, 2, 5, 6), (4, 4)), ((2, 2, 3, 4), (5, 5)), ((2, 3, 6, 9), (6, 3)),
                  ((1, 2, 7, 5), (1, 1)), ((2, 2, 4, 7), (2, 5)), ((2, 1, 5, 5), (None, 2)), ((2, 2, 9, 8), 4)]


@pytest.mark.parametrize("shape, size", ADAPTIVE_CASES, ids=str)
def test_adaptive_avg_pool2d_matches_torch(shape, size):
    torch = pytest.importorskip("torch")
    torch_parity(lambda x: F.adaptive_avg_pool2d(x, size),
                 lambda x: torch.nn.functional.adaptive_avg_pool2d(x, size), [randn(*shape, seed=1).data])


@pytest.mark.parametrize("shape, size", [((2, 2, 7, 5), (3, 2)), ((2, 1, 3, 4), (5, 6)), ((1, 2, 4, 4), (1, 1))])
def test_adaptive_avg_pool2d_gradcheck(shape, size):
    assert tr.gradcheck(lambda x: F.adaptive_avg_pool2d(x, size), [randn(*shape, seed=2)])


def test_adaptive_pool_bins_follow_torchs_rule():
    """7 -> 3: bins [0, 3), [2, 5), [4, 7) (start floor(i*7/3), end ceil((i+1)*7/3)): overlapping by one."""
    P = F.adaptive_pool_matrix(7, 3)
    expected = np.zeros((3, 7))
    expected[0, 0:3], expected[1, 2:5], expected[2, 4:7] = 1 / 3, 1 / 3, 1 / 3
    np.testing.assert_allclose(P, expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(F.adaptive_pool_matrix(3, 5).argmax(axis=1), [0, 0, 1, 1, 2])  # upsizing repeats


def test_adaptive_avg_pool2d_global_is_the_mean_and_float32_stays_float32():
    x = randn(2, 3, 5, 7, seed=3)
    np.testing.assert_allclose(F.adaptive_avg_pool2d(x, 1).data[..., 0, 0], x.data.mean(axis=(2, 3)), rtol=1e-13)
    y = F.adaptive_avg_pool2d(tr.Tensor(x.data.astype(np.float32)), (2, 3))
    assert y.dtype == np.float32 and y.shape == (2, 3, 2, 3)


@pytest.mark.parametrize("size, error, words", [((0, 2), ValueError, "output_size must be >= 1"),
                                                ((2, 2, 2), TypeError, "an int, None or a pair"),
                                                (2.5, TypeError, "an int, None or a pair")])
def test_adaptive_avg_pool2d_errors(size, error, words):
    with pytest.raises(error, match=words):
        F.adaptive_avg_pool2d(randn(1, 1, 4, 4), size)
    with pytest.raises(ValueError, match="4-D input"):
        F.adaptive_avg_pool2d(randn(4, 4), 2)


# =========================================================================== avg_pool2d
AVG_CASES = [  # (x shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    ((2, 2, 7, 6), 3, 2, 1, False, True, None), ((2, 2, 7, 6), 3, 2, 1, False, False, None),
    ((2, 2, 7, 6), 3, 2, 1, True, True, None), ((2, 2, 8, 9), 3, 2, 1, True, False, None),
    ((2, 2, 5, 5), 2, 2, 1, True, True, None), ((2, 2, 5, 5), 2, 2, 1, True, False, None),
    ((2, 3, 8, 9), 2, None, 0, False, True, None), ((2, 2, 7, 6), (3, 2), (2, 1), (1, 0), False, True, 5),
    ((2, 2, 4, 3), 3, 1, 1, True, False, 4), ((1, 2, 9, 8), 5, 3, 2, True, True, None), ((2, 1, 6, 7), 1, 2, 0, True, True, None),
]


@pytest.mark.parametrize("shape, k, s, p, ceil_mode, include_pad, divisor", AVG_CASES, ids=str)
def test_avg_pool2d_matches_torch(shape, k, s, p, ceil_mode, include_pad, divisor):
    torch = pytest.importorskip("torch")
    torch_parity(lambda x: F.avg_pool2d(x, k, s, p, ceil_mode, include_pad, divisor),
                 lambda x: torch.nn.functional.avg_pool2d(x, k, s, p, ceil_mode, include_pad, divisor),
                 [randn(*shape, seed=4).data])


@pytest.mark.parametrize("shape, k, s, p, ceil_mode, include_pad, divisor", [AVG_CASES[1], AVG_CASES[3], AVG_CASES[7]],
                         ids=str)
def test_avg_pool2d_gradcheck(shape, k, s, p, ceil_mode, include_pad, divisor):
    x = randn(1, *shape[1:], seed=5)
    assert tr.gradcheck(lambda x: F.avg_pool2d(x, k, s, p, ceil_mode, include_pad, divisor), [x])


def test_avg_pool_matrix_divisors():
    """n=5, k=3, s=2, p=1: windows [-1, 2), [1, 4), [3, 6) cover 2, 3, 2 inputs; with the pad counted, 3 each."""
    with_pad, without = F.avg_pool_matrix(5, 3, 2, 1), F.avg_pool_matrix(5, 3, 2, 1, count_include_pad=False)
    np.testing.assert_allclose(with_pad.sum(axis=1), [2 / 3, 1, 2 / 3], rtol=1e-15)
    np.testing.assert_allclose(without.sum(axis=1), [1, 1, 1], rtol=1e-15)
    np.testing.assert_array_equal(with_pad > 0, [[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    # ceil mode: n=5, k=2, s=2, p=1 -> 4 windows; the last, [5, 6), would start in the padding and is dropped: 3
    assert F.avg_pool_matrix(5, 2, 2, 1, ceil_mode=True).shape == (3, 5)
    assert F.avg_pool_matrix(6, 2, 2, 0, ceil_mode=True).shape == F.avg_pool_matrix(6, 2, 2, 0).shape == (3, 6)
    assert F.avg_pool_matrix(7, 2, 2, 0, ceil_mode=True).shape == (4, 7)


@pytest.mark.parametrize("kw, error, words", [
    (dict(kernel_size=3, padding=2), ValueError, "at most half the kernel"),
    (dict(kernel_size=6), ValueError, "larger than the padded input"),
    (dict(kernel_size=2, divisor_override=0), ValueError, "divisor_override must be a non-zero int"),
    (dict(kernel_size=2, divisor_override=2.5), ValueError, "divisor_override must be a non-zero int"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=2, stride=0), ValueError, "stride must be >= 1"),
    (dict(kernel_size=2.0), TypeError, "kernel_size must be an int or a pair"),
], ids=str)
def test_avg_pool2d_errors(kw, error, words):
    with pytest.raises(error, match=words):
        F.avg_pool2d(randn(1, 1, 4, 5), **kw)
    with pytest.raises(TypeError, match="floating-point"):
        F.avg_pool2d(tr.Tensor(np.ones((1, 1, 4, 4), np.int64)), 2)


# =========================================================================== conv_transpose2d
CONV_T_CASES = [  # (x shape, w shape (C_in, C_out, kh, kw), kwargs)
    ((2, 3, 4, 5), (3, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((2, 3, 4, 5), (3, 2, 3, 3), dict(stride=2, padding=1)),
    ((2, 2, 3, 3), (2, 3, 4, 4), dict(stride=2, padding=1)),               # FCN/DCGAN-style 2x upsampling
    ((2, 2, 3, 4), (2, 2, 2, 3), dict(stride=(3, 1), padding=(0, 1), dilation=(1, 2))),
    ((2, 2, 4, 3), (2, 3, 3, 3), dict(stride=1, padding=1, output_padding=1, dilation=2)),  # output_padding >= stride
    ((1, 3, 3, 4), (3, 2, 1, 1), dict()),
    ((2, 2, 2, 3), (2, 2, 16, 16), dict(stride=8, padding=4)),              # FCN-8s' last 8x upsampling
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("xs, ws, kw", CONV_T_CASES, ids=str)
def test_conv_transpose2d_matches_torch(xs, ws, kw, bias):
    torch = pytest.importorskip("torch")
    arrays = [randn(*xs, seed=6).data, randn(*ws, seed=7).data] + ([randn(ws[1], seed=8).data] if bias else [])
    torch_parity(lambda x, w, *b: F.conv_transpose2d(x, w, *b, **kw),
                 lambda x, w, *b: torch.nn.functional.conv_transpose2d(x, w, *b, **kw), arrays)


@pytest.mark.parametrize("xs, ws, kw", [CONV_T_CASES[0], CONV_T_CASES[3], CONV_T_CASES[4]], ids=str)
def test_conv_transpose2d_gradcheck(xs, ws, kw):
    x, w, b = randn(*xs, seed=9), randn(*ws, seed=10), randn(ws[1], seed=11)
    assert tr.gradcheck(lambda x, w, b: F.conv_transpose2d(x, w, b, **kw), [x, w, b])


def test_conv_transpose2d_gradient_for_one_input_only():
    x, w = randn(2, 2, 3, 4, seed=12), randn(2, 3, 3, 3, seed=13)
    assert tr.gradcheck(lambda w: F.conv_transpose2d(x, w, stride=2), [w])
    assert tr.gradcheck(lambda x: F.conv_transpose2d(x, w, stride=2), [x])


@pytest.mark.parametrize("xs, ws, kw", CONV_T_CASES[:5], ids=str)
def test_conv_transpose2d_is_the_adjoint_of_conv2d(xs, ws, kw):
    """<conv2d(y, w), x> = <y, conv_transpose2d(x, w)> for the same w, stride, padding and dilation
    (w's (C_in, C_out) for the transposed conv is (C_out, C_in) for conv2d, which maps back)."""
    x, w = randn(*xs, seed=14, requires_grad=False), randn(*ws, seed=15, requires_grad=False)
    up = F.conv_transpose2d(x, w, **kw)
    y = randn(*up.shape, seed=16, requires_grad=False)
    down = F.conv2d(y, w, **{k: v for k, v in kw.items() if k != "output_padding"})
    H, W = x.shape[2:]
    assert down.shape[:2] == x.shape[:2] and all(d >= n for d, n in zip(down.shape[2:], (H, W)))
    # (larger only when output_padding >= stride)
    assert np.isclose((down.data[..., :H, :W] * x.data).sum(), (y.data * up.data).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kw, error, words", [
    (dict(weight=(3, 2, 3, 3)), ValueError, "channel mismatch.*first axis is C_in"),
    (dict(weight=(2, 3, 3)), ValueError, "weight must be 4-D"),
    (dict(bias=(2,)), ValueError, r"bias must have shape \(3,\)"),
    (dict(groups=2), NotImplementedError, "groups=1 only"),
    (dict(stride=2, output_padding=2), ValueError, "output_padding .* smaller than the stride"),
    (dict(padding=3), ValueError, "output size .* not positive"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
], ids=str)
def test_conv_transpose2d_errors(kw, error, words):
    kw = dict(kw)
    w = randn(*kw.pop("weight", (2, 3, 3, 3)))
    b = randn(*kw.pop("bias")) if "bias" in kw else None
    with pytest.raises(error, match=words):
        F.conv_transpose2d(randn(1, 2, 2, 2), w, b, **kw)


# =========================================================================== max_pool2d(return_indices) + max_unpool2d
POOL_CASES = [((2, 3, 7, 6), 3, 2, 1), ((2, 2, 8, 9), 2, 2, 0), ((1, 2, 7, 7), 5, 1, 2), ((2, 2, 9, 7), (3, 2), (2, 1), (1, 0))]


@pytest.mark.parametrize("values", ["distinct", "ties", "nan"])
@pytest.mark.parametrize("shape, k, s, p", POOL_CASES, ids=str)
def test_max_pool2d_indices_match_torch(shape, k, s, p, values):
    """torch's flat index h*W + w per (n, c) plane, through its tie rule (first in row-major order) and NaNs (last)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    x = rng.standard_normal(shape)
    if values != "distinct":
        x = np.round(x)
    if values == "nan":
        x[rng.random(shape) < 0.15] = np.nan
    y, indices = F.max_pool2d(tr.Tensor(x), k, s, p, return_indices=True)
    y_t, indices_t = torch.nn.functional.max_pool2d(torch.tensor(x), k, s, p, return_indices=True)
    assert indices.dtype == np.int64 and indices.shape == y.shape
    np.testing.assert_array_equal(indices.data, indices_t.numpy())
    np.testing.assert_array_equal(y.data, y_t.numpy())


def test_max_pool2d_return_indices_keeps_the_gradient():
    x = randn(2, 2, 6, 5, seed=18)
    y, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    assert y.requires_grad and not indices.requires_grad
    y.backward(np.ones(y.shape))
    expected = np.zeros(x.shape).reshape(2, 2, -1)
    np.put_along_axis(expected, indices.data.reshape(2, 2, -1), 1.0, axis=2)
    np.testing.assert_array_equal(x.grad, expected.reshape(x.shape))


UNPOOL_CASES = [  # (x shape, kernel, stride, padding, output_size): pooled (stride >= kernel: distinct indices),
    # then unpooled to the original size
    ((2, 3, 8, 6), 2, 2, 0, None), ((2, 2, 7, 9), 2, 2, 0, (7, 9)), ((2, 2, 9, 8), 3, 3, 1, (2, 2, 9, 8)),
    ((1, 2, 6, 7), (2, 3), (2, 3), (1, 0), (6, 7)), ((2, 2, 5, 5), 2, 3, 0, None)]


@pytest.mark.parametrize("shape, k, s, p, size", UNPOOL_CASES, ids=str)
def test_max_unpool2d_matches_torch(shape, k, s, p, size):
    torch = pytest.importorskip("torch")
    pooled, indices = F.max_pool2d(randn(*shape, seed=19), k, s, p, return_indices=True)
    idx = torch.tensor(indices.data)
    torch_parity(lambda x: F.max_unpool2d(x, indices, k, s, p, size),
                 lambda x: torch.nn.functional.max_unpool2d(x, idx, k, s, p, size), [pooled.data])


def test_max_unpool2d_after_overlapping_windows_matches_torchs_forward():
    """stride < kernel: one maximum can win several windows, so indices repeat (with the same value)."""
    torch = pytest.importorskip("torch")
    pooled, indices = F.max_pool2d(randn(2, 2, 7, 6, seed=21), 3, 2, 1, return_indices=True)
    assert len(np.unique(indices.data[0, 0])) < indices.data[0, 0].size
    y = F.max_unpool2d(pooled, indices, 3, 2, 1, (7, 6))
    y_t = torch.nn.functional.max_unpool2d(torch.tensor(pooled.data), torch.tensor(indices.data), 3, 2, 1, (7, 6))
    np.testing.assert_array_equal(y.data, y_t.numpy())


def test_max_unpool2d_repeated_index_last_wins_and_only_it_gets_the_gradient():
    """Two inputs aim at 0: the later one in row-major order lands (torch leaves this undefined: on the CPU
    its result changed from call to call here). The other reaches no output, so its exact gradient is 0
    (torch's backward hands it gy[0] as well)."""
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    indices = np.array([[[[0, 5], [0, 15]]]])
    y = F.max_unpool2d(tr.Tensor(x), indices, 2)
    expected = np.zeros(16)
    expected[[0, 5, 15]] = 3.0, 2.0, 4.0
    np.testing.assert_array_equal(y.data.reshape(-1), expected)
    x_t = tr.Tensor(x, requires_grad=True)
    F.max_unpool2d(x_t, indices, 2).backward(np.arange(16.0).reshape(1, 1, 4, 4) + 1)
    np.testing.assert_array_equal(x_t.grad, [[[[0.0, 6.0], [1.0, 16.0]]]])


def test_max_unpool2d_gradcheck():
    pooled, indices = F.max_pool2d(randn(2, 2, 6, 5, seed=20), 3, 2, 1, return_indices=True)  # repeats included
    assert tr.gradcheck(lambda x: F.max_unpool2d(x, indices, 3, 2, 1, (6, 5)), [tr.Tensor(pooled.data, requires_grad=True)])


@pytest.mark.parametrize("kw, error, words", [
    (dict(indices=np.full((1, 1, 2, 2), 16)), ValueError, "index 16 is outside the output plane of 16"),
    (dict(indices=np.full((1, 1, 2, 2), -1)), ValueError, "index -1 is outside"),
    (dict(indices=np.zeros((1, 1, 2, 3), np.int64)), ValueError, "indices shape .* must equal the input shape"),
    (dict(indices=np.zeros((1, 1, 2, 2))), TypeError, "indices must be integers"),
    (dict(output_size=(6, 4)), ValueError, r"output_size \(6, 4\) must lie strictly between \(2, 2\) and \(6, 6\)"),
    (dict(output_size=(4,)), ValueError, "output_size must be"),
], ids=str)
def test_max_unpool2d_errors(kw, error, words):
    kw = {"indices": np.zeros((1, 1, 2, 2), np.int64), **kw}
    with pytest.raises(error, match=words):
        F.max_unpool2d(randn(1, 1, 2, 2), kw.pop("indices"), 2, **kw)


# =========================================================================== the layers
def test_layers_match_torchs_modules():
    """Same state dict names and shapes as torch's modules; loaded with our weights, the same outputs."""
    torch = pytest.importorskip("torch")
    from tinyrefine import nn
    x = randn(2, 3, 6, 5, seed=22, requires_grad=False)
    up = nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1, output_padding=1, rng=np.random.default_rng(0)).astype(np.float64)
    up_t = torch.nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1, output_padding=1).double()
    state = up.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in up_t.state_dict().items()}
    up_t.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
    pairs = [(up, up_t), (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                          torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)),
             (nn.AdaptiveAvgPool2d((2, 3)), torch.nn.AdaptiveAvgPool2d((2, 3)))]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours(x).data, theirs(torch.tensor(x.data)).detach().numpy(), rtol=1e-12, atol=1e-14)


def test_conv_transpose2d_layer_init_follows_torch():
    """torch's ConvTranspose2d fan-in is weight.shape[1] * kH * kW = out_channels * kH * kW: bound 1/sqrt(4*9)."""
    from tinyrefine import nn
    layer = nn.ConvTranspose2d(64, 4, 3, rng=np.random.default_rng(1))
    assert layer.weight.shape == (64, 4, 3, 3) and layer.weight.dtype == np.float32
    bound = 1 / 6
    for values in (layer.weight.data, layer.bias.data):
        assert np.abs(values).max() <= bound
    assert np.abs(layer.weight.data).max() > 0.99 * bound                  # uniform up to the bound, not narrower
    assert nn.ConvTranspose2d(2, 3, 2, bias=False).bias is None
    with pytest.raises(NotImplementedError, match="groups=1 only"):
        nn.ConvTranspose2d(4, 4, 3, groups=2)
