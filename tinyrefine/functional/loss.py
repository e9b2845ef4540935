"""Softmax, log-softmax and the cross-entropy loss with an ignored label."""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..engine import Function, Tensor, as_tensor


class LogSoftmax(Function):
    """y = x - logsumexp(x, axis);  dx = gy - softmax(x) * sum(gy, axis)"""
    saves_inputs, saves_output = False, True

    def __init__(self, axis: int) -> None:
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        shifted = x - x.max(axis=self.axis, keepdims=True)   # keeps exp() from overflowing
        self.y = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        return self.y

    def backward(self, gy):
        xp = get_array_module(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.axis, keepdims=True)


class Softmax(Function):
    """y = exp(x) / sum(exp(x), axis);  dx = y * (gy - sum(gy * y, axis))"""
    saves_inputs, saves_output = False, True

    def __init__(self, axis: int) -> None:
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, gy):
        return self.y * (gy - (gy * self.y).sum(axis=self.axis, keepdims=True))


def log_softmax(x: Tensor, axis: int = 1) -> Tensor:
    return LogSoftmax(axis)(as_tensor(x))


def softmax(x: Tensor, axis: int = 1) -> Tensor:
    return Softmax(axis)(as_tensor(x))


class CrossEntropy(Function):
    """loss = -1/|V| sum_{(n,h,w) in V} log softmax(x)[n, t[n,h,w], h, w],  V = pixels with t != ignore.

    dx = (softmax(x) - onehot(t)) / |V| on valid pixels, 0 on ignored ones (times the upstream gy).
    With every pixel ignored the mean loss is 0 with a zero gradient (torch returns NaN there).
    Nothing here reads the device: |V| stays an array, and a label outside 0..C-1 (which
    cross_entropy refuses up front for CPU data) makes its pixel's loss and gradient NaN, so a
    GPU step needs no sync to check labels and the trainer's finite-loss check stops on it.
    """
    saves_inputs = False  # keeps the softmax it computed

    def __init__(self, ignore_index: int, reduction: str) -> None:
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, target):
        xp = get_array_module(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)                # keeps exp() from overflowing
        softmax = xp.exp(shifted)
        total = softmax.sum(axis=1, keepdims=True)                           # (N, 1, ...)
        softmax /= total                                                     # kept for backward: no second exp
        valid = target != self.ignore_index                                     # (N, ...)
        in_range = (target >= 0) & (target < logits.shape[1])
        safe_target = xp.where(in_range, target, 0)                              # ignored/bad read class 0 ...
        weight = xp.where(valid & ~in_range, xp.nan, valid).astype(logits.dtype, copy=False)  # ... weighted 0/NaN
        log_p_target = _at_class(shifted, safe_target) - xp.log(total[:, 0])     # log softmax at the target
        losses = -log_p_target * weight
        self.softmax, self.weight, self.safe_target = softmax, weight, safe_target
        if self.reduction == "none":
            return losses
        # |V| on the device (at least 1: all ignored gives 0); int(valid.sum()) would wait for the GPU
        self.count = xp.maximum(valid.sum(), 1).astype(logits.dtype) if self.reduction == "mean" else 1
        return (losses.sum() / self.count).astype(logits.dtype, copy=False)

    def backward(self, gy):
        xp = get_array_module(gy)
        classes = xp.arange(self.softmax.shape[1]).reshape((1, -1) + (1,) * (self.softmax.ndim - 2))
        grad = self.softmax - (classes == self.safe_target[:, None])           # softmax minus one-hot(target)
        if self.reduction == "none":
            scale = (gy * self.weight)[:, None]
        else:
            scale = (self.weight * (gy / self.count))[:, None]
        grad *= scale.astype(grad.dtype, copy=False)
        return grad, None


def _at_class(a, index):
    """a[n, index[n, ...], ...] for a (N, C, ...) and integer index (N, ...) in 0..C-1: one gather from the
    flat array (take_along_axis was 1.5-2.5x slower here on 4-21 classes; ours, issue 13)."""
    xp = get_array_module(a)
    N, C, pixels = a.shape[0], a.shape[1], math.prod(index.shape[1:])   # pixels per image (1 for (N, C) logits)
    flat = (index.reshape(N, pixels) + (xp.arange(N) * C)[:, None]) * pixels + xp.arange(pixels)
    return xp.take(a.reshape(-1), flat).reshape(index.shape)


def cross_entropy(logits: Tensor, target, ignore_index: int = 255, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy over the class axis 1 with an ignored label (VOC's 255 border).

    A label outside 0..C-1 raises for CPU data; on CUDA it gives a NaN loss instead (checking
    it here would stop the GPU pipeline every step; see CrossEntropy)."""
    logits = as_tensor(logits)
    target_array = target.data if isinstance(target, Tensor) else target
    xp = get_array_module(logits.data)
    if backend.device_of(target_array) != logits.device:
        raise ValueError(f"cross_entropy: logits on {logits.device} but target on {backend.device_of(target_array)}")
    target_array = xp.asarray(target_array)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.ndim < 2 or target_array.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"cross_entropy: target shape {target_array.shape} does not fit logits {logits.shape} "
                         f"(expected {(logits.shape[0],) + logits.shape[2:]})")
    if target_array.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy target must be integer class indices, got dtype {target_array.dtype}")
    C = logits.shape[1]
    if xp is np:  # free on the host
        bad = (target_array != ignore_index) & ((target_array < 0) | (target_array >= C))
        if bad.any():
            values = sorted(set(target_array[bad].tolist()))[:10]
            raise ValueError(f"cross_entropy target has values {values} outside 0..{C - 1} (ignore_index={ignore_index})")
    return CrossEntropy(ignore_index, reduction)(logits, target_array.astype(np.int64, copy=False))
