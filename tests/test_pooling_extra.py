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
