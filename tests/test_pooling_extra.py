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
