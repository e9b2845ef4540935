"""The residual add, ReLU, concatenation, padding and dropout."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backend import get_array_module
from ..engine import Add, Function, Tensor, as_tensor


def add(a: Tensor, b: Tensor) -> Tensor:
    """The residual add y = a + b (gradient flows unchanged to both: the identity shortcut)."""
    a, b = as_tensor(a), as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"residual add needs equal shapes, got {a.shape} and {b.shape}")
    return Add()(a, b)


class ReLUFunction(Function):
    """y = max(x, 0);  dx = gy where x > 0 (the kink at 0 takes gradient 0, like torch)"""
    saves_inputs = False  # keeps the mask x > 0

    def forward(self, x):
        self.positive = x > 0
        return get_array_module(x).maximum(x, 0)

    def backward(self, gy):
        return gy * self.positive


def relu(x: Tensor) -> Tensor:
    return ReLUFunction()(as_tensor(x))


class Concat(Function):
    """y = [x_0, x_1, ...] joined along ``axis``;  dx_k = the matching slice of gy"""
    saves_inputs = False

    def __init__(self, axis: int) -> None:
        self.axis = axis

    def forward(self, *xs):
        xp = get_array_module(xs[0])
        self.bounds = np.cumsum([x.shape[self.axis] for x in xs])[:-1]
        return xp.concatenate(xs, axis=self.axis)

    def backward(self, gy):
        xp = get_array_module(gy)
        return tuple(xp.split(gy, self.bounds, axis=self.axis))


def concat(tensors: Sequence[Tensor], axis: int = 1) -> Tensor:
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    first = tensors[0].shape
    for t in tensors[1:]:
        if t.ndim != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, t.shape)) if i != axis % len(first)):
            raise ValueError(f"concat along axis {axis}: shapes {first} and {t.shape} differ off that axis")
    return Concat(axis)(*tensors)


class Pad(Function):
    """y = x with ``widths`` = ((before, after), ...) constant-filled borders;  dx = the interior of gy"""
    saves_inputs = False

    def __init__(self, widths, value: float) -> None:
        self.widths, self.value = widths, value

    def forward(self, x):
        xp = get_array_module(x)
        return xp.pad(x, self.widths, mode="constant", constant_values=self.value)

    def backward(self, gy):
        return gy[tuple(slice(b, gy.shape[i] - a) for i, (b, a) in enumerate(self.widths))]


def pad(x: Tensor, padding: Sequence[int], value: float = 0.0) -> Tensor:
    """torch-style padding: ``padding`` = (left, right, top, bottom, ...) from the last axis back."""
    x = as_tensor(x)
    if len(padding) % 2 or len(padding) // 2 > x.ndim or any(p < 0 for p in padding):
        raise ValueError(f"pad needs non-negative (before, after) pairs for at most {x.ndim} axes, got {tuple(padding)}")
    widths = [(0, 0)] * x.ndim
    for k in range(len(padding) // 2):
        widths[x.ndim - 1 - k] = (int(padding[2 * k]), int(padding[2 * k + 1]))
    return Pad(tuple(widths), value)(x)


class DropoutFunction(Function):
    """y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p);  dx = gy * mask / (1 - p)"""
    saves_inputs = False

    def __init__(self, p: float, rng) -> None:
        self.p, self.rng = p, rng

    def forward(self, x):
        xp = get_array_module(x)
        keep = self.rng.random(x.shape) >= self.p
        self.scale = xp.asarray(keep, dtype=x.dtype) / (1 - self.p)
        return x * self.scale

    def backward(self, gy):
        return gy * self.scale


def dropout(x: Tensor, p: float = 0.5, training: bool = True, rng=None) -> Tensor:
    """Inverted dropout; pass ``rng`` (numpy Generator, or cupy.random for CUDA) for reproducibility."""
    x = as_tensor(x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    if rng is None:
        rng = np.random.default_rng() if x.device == "cpu" else get_array_module(x.data).random
    return DropoutFunction(p, rng)(x)
