"""The autograd engine: accumulation, broadcasting, graph freeing, deep graphs, hooks, dtypes, gradcheck."""
import numpy as np
import pytest

import tinyrefine as tr
from tinyrefine import backend
from tinyrefine.engine import Function
from tinyrefine.gradcheck import GradcheckError


def rand(*shape, seed=0, requires_grad=True, low=None):
    """A float64 tensor of standard normals (or uniform in [low, low + 1] when ``low`` is given)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape) if low is None else low + rng.random(shape)
    return tr.Tensor(data, requires_grad=requires_grad)


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f(x) (x a float64 numpy array)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + eps
        plus = f(x)
        flat[k] = old - eps
        minus = f(x)
        flat[k] = old
        gflat[k] = (plus - minus) / (2 * eps)
    return g


# --------------------------------------------------------------------------- accumulation and broadcasting
def test_gradient_accumulates_when_a_tensor_feeds_several_ops():
    x = tr.Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    y = x * x + x
    y.backward(np.ones(3))
    np.testing.assert_allclose(x.grad, 2 * x.data + 1, rtol=0, atol=1e-15)


def test_gradient_accumulates_through_a_diamond():
    x = tr.Tensor(np.array([0.5, 2.0]), requires_grad=True)
    a = x * 3.0
    y = (a * a + a.exp()).sum()
    y.backward()
    np.testing.assert_allclose(x.grad, 3 * (2 * a.data + np.exp(a.data)), rtol=1e-14)


def test_broadcast_row_vector_gradient_is_summed_back():
    rng = np.random.default_rng(1)
    a0, b0, u = rng.standard_normal((2, 3)), rng.standard_normal(3), rng.standard_normal((2, 3))
    a, b = tr.Tensor(a0.copy(), requires_grad=True), tr.Tensor(b0.copy(), requires_grad=True)
    (a * b + b).backward(u)
    assert a.grad.shape == (2, 3) and b.grad.shape == (3,)
    np.testing.assert_allclose(b.grad, numerical_grad(lambda b_: ((a0 * b_ + b_) * u).sum(), b0.copy()), atol=1e-8)
    np.testing.assert_allclose(a.grad, numerical_grad(lambda a_: ((a_ * b0 + b0) * u).sum(), a0.copy()), atol=1e-8)


def test_broadcast_both_sides_gradients_match_numerical():
    rng = np.random.default_rng(2)
    a0, b0 = rng.standard_normal((2, 1, 4)), rng.standard_normal((3, 1))
    u = rng.standard_normal((2, 3, 4))
    a, b = tr.Tensor(a0.copy(), requires_grad=True), tr.Tensor(b0.copy(), requires_grad=True)
    y = a * b
    assert y.shape == (2, 3, 4)
    y.backward(u)
    assert a.grad.shape == (2, 1, 4) and b.grad.shape == (3, 1)
    np.testing.assert_allclose(a.grad, numerical_grad(lambda a_: (a_ * b0 * u).sum(), a0.copy()), atol=1e-8)
    np.testing.assert_allclose(b.grad, numerical_grad(lambda b_: (a0 * b_ * u).sum(), b0.copy()), atol=1e-8)


def test_broadcast_gradcheck_div_and_sub():
    a, b = rand(2, 1, 4, seed=3), rand(3, 1, seed=4, low=1.0)
    assert tr.gradcheck(lambda a, b: a / b - b, [a, b])


# --------------------------------------------------------------------------- no_grad and graph freeing
def test_no_grad_records_nothing():
    x = rand(3, 2)
    with tr.no_grad():
        assert not tr.is_grad_enabled()
        y = (x * 2.0 + x).sum()
    assert tr.is_grad_enabled()
    assert not y.requires_grad and y.creator is None
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_restores_state_after_exception():
    with pytest.raises(KeyError):
        with tr.no_grad():
            raise KeyError("boom")
    assert tr.is_grad_enabled()


def test_second_backward_raises_and_mentions_retain_graph():
    x = rand(3)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_allows_two_backwards_which_accumulate():
    x = rand(4)
    y = (x * x * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.copy()
    y.backward()
    np.testing.assert_allclose(first, 3 * x.data ** 2, rtol=1e-14)
    np.testing.assert_allclose(x.grad, 2 * first, rtol=1e-14)


def test_backward_frees_saved_arrays():
    x = rand(3)
    y = x * x
    node = y.creator
    assert hasattr(node, "a")
    y.backward(np.ones(3))
    assert not hasattr(node, "a") and not hasattr(node, "b")


# --------------------------------------------------------------------------- deep graphs
def test_deep_mul_chain_does_not_recurse():
    depth = 20000
    x = tr.Tensor(np.array([1.5, -0.5]), requires_grad=True)
    y = x
    for _ in range(depth):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.full(2, 1.0001 ** depth), rtol=1e-9)


def test_deep_relu_chain_does_not_recurse():
    x = tr.Tensor(np.array([1.0, -1.0, 2.0]), requires_grad=True)
    y = x
    for _ in range(20000):
        y = tr.functional.relu(y)
    y.backward(np.array([1.0, 1.0, 3.0]))
    np.testing.assert_array_equal(x.grad, [1.0, 0.0, 3.0])


# --------------------------------------------------------------------------- hooks
def test_leaf_hook_sees_the_summed_gradient():
    x = tr.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    seen = []
    x.register_hook(lambda g: seen.append(g.numpy()))
    (x * 3.0 + x * x).sum().backward()
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], 3.0 + 2 * np.array([1.0, 2.0]))


def test_leaf_hook_can_replace_the_gradient():
    x = tr.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    x.register_hook(lambda g: g * 0.0 + 7.0)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])


def test_non_leaf_hook_replaces_the_gradient_flowing_on():
    x = tr.Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    h = x * 2.0
    seen = []

    def hook(g):
        seen.append(g.numpy())
        return np.zeros_like(g.data) + 10.0
    h.register_hook(hook)
    (h * h).sum().backward()
    np.testing.assert_allclose(seen[0], 2 * h.data)        # d(h^2)/dh, summed
    np.testing.assert_allclose(x.grad, np.full(3, 20.0))   # the replaced 10 times dh/dx = 2


def test_hook_on_tensor_without_grad_raises():
    with pytest.raises(RuntimeError):
        tr.Tensor(np.ones(2)).register_hook(lambda g: g)


def test_retain_grad_keeps_non_leaf_gradient():
    x = tr.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x * 3.0
    h.retain_grad()
    (h * h).sum().backward()
    assert isinstance(h.grad, np.ndarray)  # a raw array, like a leaf's .grad
    np.testing.assert_allclose(h.grad, 2 * h.data)
    np.testing.assert_allclose(x.grad, 6 * h.data)


def test_retain_grad_accumulates_over_two_backwards():
    x = tr.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x * 3.0
    h.retain_grad()
    y = (h * h).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(h.grad, 4 * h.data)


def test_full_reductions_keep_float64():
    x = rand(2, 3)
    assert x.sum().dtype == np.float64 and x.mean().dtype == np.float64
    assert x.sum(axis=(0, 1)).dtype == np.float64
    assert tr.Tensor(np.float64(1.5)).dtype == np.float64
    assert rand(2, 3).astype(np.float32).sum().dtype == np.float32


def test_non_leaf_without_retain_grad_has_no_grad():
    x = tr.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x * 3.0
    (h * h).sum().backward()
    assert h.grad is None


# --------------------------------------------------------------------------- dtypes and devices
def test_python_lists_default_to_float32():
    assert tr.Tensor([1.0, 2.0]).dtype == np.float32
    assert tr.Tensor(3.5).dtype == np.float32


def test_float64_arrays_are_preserved():
    assert tr.Tensor(np.zeros(3)).dtype == np.float64
    assert tr.Tensor(np.zeros(3, dtype=np.float32)).dtype == np.float32
    assert tr.Tensor([1.0], dtype=np.float64).dtype == np.float64


def test_integer_lists_stay_integer():
    assert tr.Tensor([1, 2]).dtype.kind == "i"


@pytest.mark.parametrize("op", [lambda x: x * 2.0, lambda x: 2.0 * x, lambda x: x + 1, lambda x: 1.0 - x,
                                lambda x: x / 3.0, lambda x: 3.0 / x, lambda x: x ** 2, lambda x: -x])
def test_python_scalars_follow_the_tensor_dtype(op):
    x = tr.Tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    y = op(x)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_to_cpu_and_device():
    x = rand(2, 2)
    assert x.device == "cpu"
    assert x.to("cpu") is x


def test_numpy_returns_a_copy():
    x = tr.Tensor(np.arange(4.0))
    a = x.numpy()
    a[0] = 100.0
    assert x.data[0] == 0.0
    assert isinstance(a, np.ndarray)


def test_detach_cuts_the_graph():
    x = rand(3)
    d = (x * 2.0).detach()
    assert not d.requires_grad and d.creator is None


def test_mixing_devices_raises_naming_both(monkeypatch):
    """Simulated on the CPU: pretend one array lives on 'cuda' (the real check runs in test_cuda.py)."""
    a, b = rand(2, 3), rand(2, 3, seed=1)
    fake = id(b.data)
    real = backend.device_of
    monkeypatch.setattr(backend, "device_of", lambda arr: "cuda" if id(arr) == fake else real(arr))
    assert b.device == "cuda"
    with pytest.raises(ValueError, match=r"cpu.*cuda|cuda.*cpu"):
        a + b


# --------------------------------------------------------------------------- gradcheck of each engine op
def _positive(*shape, seed):
    return rand(*shape, seed=seed, low=0.5)


ENGINE_OPS = {
    "add": (lambda a, b: a + b, lambda: [rand(3, 4, seed=1), rand(3, 4, seed=2)]),
    "add_broadcast": (lambda a, b: a + b, lambda: [rand(2, 3, 4, seed=1), rand(4, seed=2)]),
    "sub": (lambda a, b: a - b, lambda: [rand(3, 5, seed=1), rand(1, 5, seed=2)]),
    "mul": (lambda a, b: a * b, lambda: [rand(2, 3, seed=1), rand(2, 3, seed=2)]),
    "div": (lambda a, b: a / b, lambda: [rand(2, 3, seed=1), _positive(2, 3, seed=2)]),
    "rdiv_scalar": (lambda a: 2.0 / a, lambda: [_positive(2, 3, seed=1)]),
    "neg": (lambda a: -a, lambda: [rand(3, 2, seed=1)]),
    "pow": (lambda a: a ** 3, lambda: [rand(3, 2, seed=1)]),
    "pow_fractional": (lambda a: a ** 1.5, lambda: [_positive(3, 2, seed=1)]),
    "pow_negative": (lambda a: a ** -2.0, lambda: [_positive(3, 2, seed=1)]),
    "matmul_2d": (lambda a, b: a @ b, lambda: [rand(3, 4, seed=1), rand(4, 5, seed=2)]),
    "matmul_batched": (lambda a, b: a @ b, lambda: [rand(2, 3, 4, seed=1), rand(2, 4, 5, seed=2)]),
    "matmul_broadcast_batch": (lambda a, b: a @ b, lambda: [rand(2, 3, 4, seed=1), rand(4, 2, seed=2)]),
    "sum_all": (lambda a: a.sum(), lambda: [rand(2, 3, 4, seed=1)]),
    "sum_axis": (lambda a: a.sum(axis=1), lambda: [rand(2, 3, 4, seed=1)]),
    "sum_axes_keepdims": (lambda a: a.sum(axis=(0, 2), keepdims=True), lambda: [rand(2, 3, 4, seed=1)]),
    "sum_negative_axis": (lambda a: a.sum(axis=-1), lambda: [rand(2, 3, 4, seed=1)]),
    "mean_all": (lambda a: a.mean(), lambda: [rand(2, 3, 5, seed=1)]),
    "mean_axis": (lambda a: a.mean(axis=(1, 2), keepdims=True), lambda: [rand(2, 3, 5, seed=1)]),
    "reshape": (lambda a: a.reshape(3, 8), lambda: [rand(2, 3, 4, seed=1)]),
    "reshape_tuple": (lambda a: a.reshape((4, -1)), lambda: [rand(2, 3, 4, seed=1)]),
    "transpose_default": (lambda a: a.transpose(), lambda: [rand(2, 3, 4, seed=1)]),
    "transpose_axes": (lambda a: a.transpose(1, 2, 0), lambda: [rand(2, 3, 4, seed=1)]),
    "T": (lambda a: a.T, lambda: [rand(3, 5, seed=1)]),
    "getitem_slices": (lambda a: a[1:, ::2, -1], lambda: [rand(3, 5, 4, seed=1)]),
    "getitem_int_ellipsis": (lambda a: a[0, ..., 1:3], lambda: [rand(2, 3, 4, seed=1)]),
    "getitem_fancy": (lambda a: a[np.array([2, 0]), :], lambda: [rand(3, 4, seed=1)]),
    "getitem_fancy_repeated": (lambda a: a[np.array([1, 1, 0, 1])], lambda: [rand(3, 4, seed=1)]),
    "getitem_fancy_pairs_repeated": (lambda a: a[np.array([0, 2, 0]), np.array([1, 3, 1])], lambda: [rand(3, 4, seed=1)]),
    "exp": (lambda a: a.exp(), lambda: [rand(2, 3, seed=1)]),
    "log": (lambda a: a.log(), lambda: [_positive(2, 3, seed=1)]),
    "composite": (lambda a, b: ((a @ b).exp().sum(axis=0) / (b * b + 1.0).sum()).log(),
                  lambda: [tr.Tensor(0.3 * rand(3, 2, seed=1).data, requires_grad=True), rand(2, 4, seed=2)]),
}


@pytest.mark.parametrize("name", sorted(ENGINE_OPS))
def test_engine_op_gradcheck(name):
    fn, make = ENGINE_OPS[name]
    inputs = make()
    assert tr.gradcheck(fn, inputs)


def test_getitem_repeated_indices_accumulate():
    x = tr.Tensor(np.arange(4.0), requires_grad=True)
    x[np.array([1, 1, 3, 1])].backward(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(x.grad, [0.0, 7.0, 0.0, 3.0])


# --------------------------------------------------------------------------- gradcheck itself
class _WrongSquare(Function):
    """y = x^2 with a wrong backward (x instead of 2x)."""

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, gy):
        return gy * self.x


def test_gradcheck_reports_a_wrong_backward_naming_input_and_entry():
    a = rand(2, 3, seed=5)
    b = rand(2, 3, seed=6)
    with pytest.raises(GradcheckError, match=r"input 1 \(2, 3\) at entry \(0, 0\).*analytic .* numeric"):
        tr.gradcheck(lambda a, b: a + _WrongSquare()(b), [a, b])


def test_gradcheck_reports_a_wrong_param():
    w = rand(3, seed=7)
    w.name = "my_weight"
    with pytest.raises(GradcheckError, match="my_weight"):
        tr.gradcheck(lambda x: x * _WrongSquare()(w), [rand(3, seed=8)], params=[w])


def test_gradcheck_rejects_float32():
    x = tr.Tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        tr.gradcheck(lambda x: x * x, [x])


def test_gradcheck_needs_something_to_check():
    with pytest.raises(ValueError, match="nothing to check"):
        tr.gradcheck(lambda x: x * x, [rand(2, requires_grad=False)])


def test_gradcheck_n_samples_and_max_gradient_error():
    from tinyrefine.gradcheck import max_gradient_error
    x = rand(4, 5, seed=9)
    assert tr.gradcheck(lambda x: (x * x).exp(), [x], n_samples=5)
    assert max_gradient_error(lambda x: x * x * x, [x]) < 1e-7
    assert max_gradient_error(lambda x: _WrongSquare()(x), [x]) > 0.1


def test_gradcheck_handles_non_contiguous_inputs():
    data = np.random.default_rng(10).standard_normal((3, 4)).T  # a transposed view
    x = tr.Tensor(data, requires_grad=True)
    assert not x.data.flags.c_contiguous
    assert tr.gradcheck(lambda x: x * x, [x])
