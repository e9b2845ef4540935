"""The autograd engine: Tensor, Function and an iterative backward.

A ``Function`` computes on raw arrays (numpy or cupy). Calling it on Tensors
records one node of the graph: the node remembers its parents (the creators of
its inputs, or the leaf tensors themselves) and whatever its ``forward`` saved
on ``self`` for ``backward``. ``Tensor.backward`` sorts the nodes
topologically with an explicit stack (no recursion: a ResNet-101 graph is
thousands of nodes deep), walks them from the output back to the leaves and
frees each node's saved arrays once it has been used.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from . import backend

_grad_mode = threading.local()  # per thread, as torch's: one thread's no_grad() leaves the others recording


def is_grad_enabled() -> bool:
    return getattr(_grad_mode, "enabled", True)


@contextlib.contextmanager
def set_grad_enabled(enabled: bool) -> Iterator[None]:
    """Record graphs (True) or not (False) inside this block, in this thread only."""
    previous, _grad_mode.enabled = is_grad_enabled(), bool(enabled)
    try:
        yield
    finally:
        _grad_mode.enabled = previous


def no_grad():
    """Inside this block no graph is recorded (inference, optimizer steps); this thread only."""
    return set_grad_enabled(False)


def enable_grad():
    """Record graphs again inside a no_grad() block (this thread only)."""
    return set_grad_enabled(True)


def _check_float(array, what: str) -> None:
    if array.dtype.kind != "f":
        raise TypeError(f"{what} needs a floating-point array, got dtype {array.dtype}")


def sum_to(grad, shape: tuple):
    """Undo broadcasting: sum ``grad`` down to ``shape`` (the one place this happens)."""
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape) if lead else grad


class Tensor:
    """An array plus what autograd needs: ``grad``, ``requires_grad`` and its ``creator``.

    ``_version`` counts in-place edits of ``data`` (as torch's): ``t.data *= 2`` hands the same
    array back to the ``data`` setter, which bumps it, and backward refuses to use a tensor an op
    saved if its version changed since. (Writing through the array itself, ``t.data[0] = 1`` or
    ``np.copyto(t.data, ...)``, bypasses the setter and is not seen: use ``t.data = new_array``.)
    """

    __array_priority__ = 1000  # make ndarray + Tensor call Tensor.__radd__

    def __init__(self, data: Any, requires_grad: bool = False, dtype=None) -> None:
        if isinstance(data, Tensor):
            data = data.data
        if isinstance(data, np.generic):  # a NumPy scalar (a full reduction like x.sum()) keeps its dtype
            data = np.asarray(data)
        if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
            data = np.asarray(data, dtype=dtype if dtype is not None else None)
            if data.dtype == np.float64 and dtype is None:
                data = data.astype(np.float32)  # float32 by default, like torch
        elif dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        if requires_grad:
            _check_float(data, "requires_grad=True")
        self._version = 0
        self._data = data
        self.grad: Optional[Any] = None
        self.requires_grad = bool(requires_grad)
        self.creator: Optional[Function] = None
        self._hooks: list = []  # hooks of a leaf; a non-leaf keeps them on its creator
        self.name: Optional[str] = None

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value) -> None:
        if value is self._data:  # `t.data *= 2`: the array was edited in place
            self._version += 1
        self._data = value

    # ----- array-like facts
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self.creator is None)
    grad_fn = property(lambda self: self.creator)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = f", grad_fn={type(self.creator).__name__}" if self.creator else (", requires_grad=True" if self.requires_grad else "")
        body = np.array2string(backend.as_numpy(self.data), precision=4, threshold=20, prefix="tensor(")
        return f"tensor({body}, device={self.device!r}{extra})"

    def numpy(self) -> np.ndarray:
        """A host (numpy) copy of the data."""
        return np.array(backend.as_numpy(self.data))

    def item(self) -> float:
        """The one value of a single-element tensor (on CUDA: one scalar read back, a sync)."""
        return self.data.item()

    def to(self, device: str) -> "Tensor":
        """The same values on ``device`` (itself if nothing moves); the gradient flows back across."""
        if device == self.device:
            return self
        return ToDevice(device)(self)

    def detach(self) -> "Tensor":
        return Tensor(self.data)

    def astype(self, dtype) -> "Tensor":
        """The values cast to ``dtype`` (itself if already so); the gradient is cast back."""
        if np.dtype(dtype) == self.dtype:
            return self
        return Cast(dtype)(self)

    def zero_grad(self) -> None:
        self.grad = None

    def register_hook(self, hook: Callable) -> Callable:
        """``hook(grad)`` is called with this tensor's full gradient during backward;
        if it returns an array, that array replaces the gradient."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        (self.creator._output_hooks if self.creator else self._hooks).append(hook)
        return hook

    def retain_grad(self) -> None:
        """Keep ``.grad`` on a non-leaf tensor too (leaves always keep theirs)."""
        if self.creator is not None:
            # a raw array like a leaf's .grad (hooks receive a Tensor), accumulated like a leaf's
            self.register_hook(lambda g: setattr(self, "grad", g.data.copy() if self.grad is None else self.grad + g.data))

    # ----- backward
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is the upstream gradient (ones for a scalar). The graph is freed
        as it is walked unless ``retain_graph=True``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (was it made under no_grad?)")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-element tensor, got shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.data.shape:
                raise ValueError(f"gradient shape {grad.shape} does not match tensor shape {self.shape}")
        start = self.creator if self.creator is not None else self
        run_backward(start, grad, retain_graph)

    # ----- operators (the Functions live in ops below)
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __neg__(self): return neg(self)
    def __pow__(self, exponent: float): return power(self, exponent)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __getitem__(self, index): return GetItem(index)(self)

    def sum(self, axis=None, keepdims: bool = False): return Sum(axis, keepdims)(self)
    def mean(self, axis=None, keepdims: bool = False): return mean(self, axis, keepdims)
    def reshape(self, *shape): return Reshape(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)(self)
    def transpose(self, *axes): return Transpose(axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))(self)
    def exp(self): return Exp()(self)
    def log(self): return Log()(self)
    T = property(lambda self: self.transpose())


def _node_parents(node) -> Sequence:
    return node._parents if isinstance(node, Function) else ()


def topological_order(start) -> list:
    """Every node reachable from ``start`` (Functions and leaf Tensors), each after all its consumers.

    A post-order depth-first search with an explicit stack (no recursion), then reversed."""
    order, visited, stack = [], {id(start)}, [(start, iter(_node_parents(start)))]
    while stack:
        node, parents = stack[-1]
        for parent in parents:
            if parent is not None and id(parent) not in visited:
                visited.add(id(parent))
                stack.append((parent, iter(_node_parents(parent))))
                break
        else:
            stack.pop()
            order.append(node)
    return order[::-1]


def run_backward(start, grad, retain_graph: bool = False) -> None:
    """Walk the graph from ``start`` (a Function, or a leaf Tensor) to the leaves.

    Each node receives the sum of its consumers' gradients, then hands one gradient to each input.
    The rule about shared arrays: a backward may hand the same array to two inputs (Add returns
    gy twice). Nothing in the engine writes into a gradient array, but a hook may, so a hook on a
    tensor whose gradient array was also handed to another branch gets its own copy; a leaf's
    ``.grad`` is always its own array.
    """
    grads = {id(start): grad}
    shared = set()  # ids of gradient arrays handed to more than one input
    for node in topological_order(start):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        hooks = node._hooks if isinstance(node, Tensor) else node._output_hooks
        if hooks and id(g) in shared:
            g = g.copy()
        for hook in hooks:
            g = _apply_hook(hook, g)
        if isinstance(node, Tensor):  # a leaf: accumulate into .grad
            node.grad = g.copy() if node.grad is None else node.grad + g
            continue
        node._check_saved_versions()
        input_grads = node.backward(g)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        if len(input_grads) != len(node._parents):
            raise RuntimeError(f"{type(node).__name__}.backward returned {len(input_grads)} gradients for {len(node._parents)} inputs")
        handed = set()
        for parent, shape, dtype, gx in zip(node._parents, node._input_shapes, node._input_dtypes, input_grads):
            if parent is None or gx is None:
                continue
            gx = sum_to(gx, shape)
            if gx.dtype != dtype:  # a gradient has its tensor's dtype (float32 stays float32)
                gx = gx.astype(dtype)
            if id(gx) in handed:
                shared.add(id(gx))
            handed.add(id(gx))
            key = id(parent)
            grads[key] = gx if key not in grads else grads[key] + gx
        if not retain_graph:
            node.release()


def _apply_hook(hook, g):
    result = hook(Tensor(g))
    if result is None:
        return g
    return result.data if isinstance(result, Tensor) else result


class Function:
    """One differentiable operation on raw arrays.

    Subclasses implement ``forward(*arrays) -> array`` (saving on ``self`` what
    backward needs) and ``backward(grad_output) -> one gradient per input``
    (``None`` for inputs with no gradient, such as integer targets).
    ``self.needs_input_grad`` (one bool per input) is set before ``forward`` runs.

    A Function object is one node of one graph: calling it a second time raises (make a new
    one per call, as the lowercase functions do). ``saves_inputs`` / ``saves_output`` say
    whether backward reads the input or output arrays; where it does, backward first checks
    that none was edited in place since forward (``Tensor._version``).
    """
    saves_inputs = True    # the safe default for a new op; ops that keep only shapes set False
    saves_output = False

    def __call__(self, *inputs: Any) -> Tensor:
        if "_called" in vars(self):
            raise RuntimeError(f"this {type(self).__name__} was already called: a Function object is one node of one "
                               "graph. Make a new one per call (or use the lowercase function, e.g. F.relu(x)); "
                               "a reusable layer is a tinyrefine.nn module")
        self._called = True
        tensors = [x if isinstance(x, Tensor) else None for x in inputs]
        like = next((t for t in tensors if t is not None), None)
        arrays = []
        devices = set()
        for x, t in zip(inputs, tensors):
            if t is not None:
                arrays.append(t.data)
                devices.add(t.device)
            else:
                arrays.append(_as_array(x, like))
        if len(devices) > 1:
            names = ", ".join(f"input {i}: {t.device} {t.shape}" for i, t in enumerate(tensors) if t is not None)
            raise ValueError(f"{type(self).__name__} got inputs on different devices ({names}); move them with .to(device)")
        # which inputs will want a gradient: forward can skip saving what backward won't use
        recording = is_grad_enabled()
        self.needs_input_grad = tuple(recording and t is not None and t.requires_grad for t in tensors)
        output = self.forward(*arrays)
        result = Tensor(output)
        if recording and any(self.needs_input_grad):
            self._parents = [(t.creator if t.creator is not None else t) if (t is not None and t.requires_grad) else None
                             for t in tensors]
            self._input_shapes = [getattr(a, "shape", ()) for a in arrays]  # () for a Python scalar
            self._input_dtypes = [getattr(a, "dtype", None) for a in arrays]
            # weak references: checking versions must not keep activations alive
            watched = [(i, t) for i, t in enumerate(tensors) if t is not None] if self.saves_inputs else []
            if self.saves_output:
                watched.append(("output", result))
            self._watched = [(i, weakref.ref(t), t._version) for i, t in watched]
            self._output_hooks = []
            self._released = False
            result.requires_grad = True
            result.creator = self
        return result

    def _check_saved_versions(self) -> None:
        if self._released:
            raise RuntimeError(f"backward through {type(self).__name__} a second time: its saved arrays were freed; "
                               "pass retain_graph=True to the first backward()")
        for which, ref, version in self._watched:
            t = ref()
            if t is not None and t._version != version:
                what = "its output" if which == "output" else f"its input {which}"
                label = f" '{t.name}'" if t.name else ""
                raise RuntimeError(
                    f"{type(self).__name__} needs {what}{label} (shape {t.shape}) as it was in forward, but it was "
                    f"modified in place since (version {t._version}, saved at {version}), e.g. by `t.data *= 10`. "
                    "Edit it after backward, or replace the array (`t.data = t.data * 10`) instead of editing it")

    def forward(self, *arrays):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad_output):  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self) -> None:
        """Drop what forward saved (everything but the engine's own underscore fields)."""
        for key in [k for k in vars(self) if not k.startswith("_")]:
            delattr(self, key)
        self._released = True


def _as_array(x, like: Optional[Tensor]):
    """The dtype policy (torch's), at every op boundary:

    - a Python or NumPy scalar beside a Tensor is *weak* (as in torch and NEP 50): ``f32 * np.int64(2)``
      stays float32; it needs no device, so it is never uploaded to the GPU;
    - a raw array is data, a tensor in its own right: float32 times a float64 array is float64,
      as float32 times a float64 Tensor is (numpy's promotion); it must be on the Tensor's device;
    - every gradient has the dtype of the tensor it belongs to (run_backward casts it), so a
      float32 parameter always gets a float32 ``.grad``;
    - the kernels that combine data with weights (conv2d, batch_norm) refuse mixed float dtypes.
    """
    if like is not None and (isinstance(x, (int, float)) or (isinstance(x, np.generic) and x.dtype.kind in "biuf")):
        return x.item() if isinstance(x, np.generic) else x
    xp = backend.get_array_module(like.data) if like is not None else np
    if backend.is_cupy_array(x) != (xp is not np):
        raise ValueError(f"an array on {backend.device_of(x)} was mixed with a tensor on {like.device if like else 'cpu'}")
    return xp.asarray(x)


def as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


# --------------------------------------------------------------------------- elementwise arithmetic
class Add(Function):
    """y = a + b (broadcasting; the engine sums gradients back to each shape)."""
    saves_inputs = False

    def forward(self, a, b):
        return a + b

    def backward(self, gy):
        return gy, gy


class Sub(Function):
    """y = a - b"""
    saves_inputs = False

    def forward(self, a, b):
        return a - b

    def backward(self, gy):
        return gy, -gy


class Mul(Function):
    """y = a * b;  da = gy * b, db = gy * a"""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        return gy * self.b, gy * self.a


class Div(Function):
    """y = a / b;  da = gy / b, db = -gy * a / b^2"""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        gb = -gy * self.a / (self.b * self.b)
        return gy / self.b, gb


class Neg(Function):
    """y = -x"""
    saves_inputs = False

    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


class Power(Function):
    """y = x^p for a constant p;  dx = p x^(p-1) gy"""

    def __init__(self, exponent: float) -> None:
        self.exponent = exponent

    def forward(self, x):
        self.x = x
        return x ** self.exponent

    def backward(self, gy):
        return gy * self.exponent * self.x ** (self.exponent - 1)


class Exp(Function):
    """y = exp(x);  dx = y gy"""
    saves_inputs, saves_output = False, True

    def forward(self, x):
        self.y = backend.get_array_module(x).exp(x)
        return self.y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    """y = log(x);  dx = gy / x"""

    def forward(self, x):
        self.x = x
        return backend.get_array_module(x).log(x)

    def backward(self, gy):
        return gy / self.x


class MatMul(Function):
    """y = a @ b (2-D or batched);  da = gy @ b^T, db = a^T @ gy"""

    def forward(self, a, b):
        if getattr(a, "ndim", 0) < 2 or getattr(b, "ndim", 0) < 2:
            raise ValueError(f"matmul needs arrays of rank >= 2, got shapes {np.shape(a)} and {np.shape(b)}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        return gy @ self.b.swapaxes(-1, -2), self.a.swapaxes(-1, -2) @ gy


def add(a, b) -> Tensor: return Add()(a, b)
def sub(a, b) -> Tensor: return Sub()(a, b)
def mul(a, b) -> Tensor: return Mul()(a, b)
def div(a, b) -> Tensor: return Div()(a, b)
def neg(x) -> Tensor: return Neg()(x)
def power(x, exponent: float) -> Tensor: return Power(exponent)(x)
def matmul(a, b) -> Tensor: return MatMul()(a, b)


# --------------------------------------------------------------------------- casts and moves
class Cast(Function):
    """y = x.astype(dtype);  dx = gy.astype(x.dtype) (the engine casts gradients back to their tensor's dtype)"""
    saves_inputs = False

    def __init__(self, dtype) -> None:
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        return x.astype(self.dtype)

    def backward(self, gy):
        return gy


class ToDevice(Function):
    """y = x copied to ``device``;  dx = gy copied back to x's device"""
    saves_inputs = False

    def __init__(self, device: str) -> None:
        self.device = device

    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.source)


# --------------------------------------------------------------------------- shape and reductions
class Sum(Function):
    """y = sum over ``axis``;  dx = gy broadcast back to x's shape"""
    saves_inputs = False

    def __init__(self, axis=None, keepdims: bool = False) -> None:
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape = x.shape
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        if not self.keepdims and self.axis is not None:
            axes = (self.axis,) if isinstance(self.axis, int) else self.axis
            gy = xp.expand_dims(gy, tuple(a % len(self.x_shape) for a in axes))
        return xp.broadcast_to(gy, self.x_shape)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """Sum divided by the number of elements reduced."""
    shape = as_tensor(x).shape
    axes = range(len(shape)) if axis is None else ((axis,) if isinstance(axis, int) else axis)
    count = int(np.prod([shape[a] for a in axes])) if shape else 1
    return Sum(axis, keepdims)(x) / float(count)


class Reshape(Function):
    """y = x.reshape(shape);  dx = gy.reshape(x.shape)"""
    saves_inputs = False

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)

    def forward(self, x):
        self.x_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.x_shape)


class Transpose(Function):
    """y = x.transpose(axes);  dx = gy.transpose(inverse axes)"""
    saves_inputs = False

    def __init__(self, axes=None) -> None:
        self.axes = None if axes is None else tuple(axes)

    def forward(self, x):
        return x.transpose(self.axes)

    def backward(self, gy):
        if self.axes is None:
            return gy.transpose()
        return gy.transpose(tuple(np.argsort(self.axes)))


class GetItem(Function):
    """y = x[index];  dx = zeros with gy written (added, for repeated indices) at index"""
    saves_inputs = False

    def __init__(self, index) -> None:
        self.index = index.data if isinstance(index, Tensor) else index

    def forward(self, x):
        self.x_shape, self.dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gx = xp.zeros(self.x_shape, dtype=gy.dtype)
        # Basic slicing never repeats an element; fancy indexing may, so it scatters with add.at
        # (a cold path: indexing is for teaching and small tensors, not the network's hot loop).
        if _is_basic_index(self.index):
            gx[self.index] = gy
        else:
            xp.add.at(gx, self.index, gy)
        return gx


def _is_basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) or i is Ellipsis for i in items)
