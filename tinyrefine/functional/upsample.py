"""Bilinear resizing as two matrix products (both align_corners modes), with its exact adjoint."""
from __future__ import annotations

import functools
import numbers
from typing import Optional, Tuple, Union

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..engine import Function, Tensor, as_tensor
from .common import IntPair, _check_input, _pair


def interpolation_taps(n_in: int, n_out: int, align_corners: bool, scale: Optional[float] = None):
    """For each output index o: the two source indices (i0, i1) and the weight lam of i1.

    Source coordinate, as torch computes it:
      align_corners=True : src = o * (n_in - 1) / (n_out - 1)
      align_corners=False: src = (o + 0.5) * r - 0.5, clamped at 0, with r = 1/scale when a
                           scale factor was given, else n_in / n_out.
    Then i0 = floor(src), i1 = min(i0 + 1, n_in - 1), lam = src - i0.
    """
    o = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = o * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        ratio = (1.0 / scale) if scale else n_in / n_out
        src = np.maximum((o + 0.5) * ratio - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool, scale: Optional[float] = None) -> np.ndarray:
    """A (n_out, n_in) matrix whose row o holds the weights (1 - lam, lam) at columns (i0, i1)."""
    i0, i1, lam = interpolation_taps(n_in, n_out, align_corners, scale)
    A = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    A[rows, i0] += 1.0 - lam   # at the border i0 == i1 and the two weights add up on one column
    A[rows, i1] += lam
    return A


@functools.lru_cache(maxsize=256)
def interpolation_tables(n_in: int, n_out: int, align_corners: bool, scale: Optional[float], dtype, device: str) -> tuple:
    """One axis's interpolation data, built once per (sizes, align_corners, scale, dtype, device) and
    kept there: a training step uploads nothing. Shared by every caller, so never written to.

    cpu : (A,), A = interpolation_matrix(...) in ``dtype`` (read-only).
    cuda: (i0, i1, lam) for the forward kernel and (A, lo, hi) for the backward gather, where
          the outputs o that read input index h are exactly lo[h] <= o < hi[h] (i0 and i1 rise with o,
          and i1 <= i0 + 1, so they form one run: i1[o] >= h and i0[o] <= h)."""
    A = interpolation_matrix(n_in, n_out, align_corners, scale).astype(dtype)
    if device == "cpu":
        A.setflags(write=False)
        return (A,)
    i0, i1, lam = interpolation_taps(n_in, n_out, align_corners, scale)
    h = np.arange(n_in)
    lo, hi = np.searchsorted(i1, h, side="left"), np.searchsorted(i0, h, side="right")
    up = lambda a, t: backend.to_device(np.ascontiguousarray(a, dtype=t), device)  # noqa: E731
    return up(i0, np.int32), up(i1, np.int32), up(lam, dtype), up(A, dtype), up(lo, np.int32), up(hi, np.int32)


class Bilinear(Function):
    """y = A_h @ x @ A_w^T per (n, c) plane, with the interpolation matrices above.

    Written as two matrix products, bilinear interpolation is plainly linear in x,
    and its backward is the exact adjoint: dx = A_h^T @ gy @ A_w.
    """
    saves_inputs = False  # keeps shapes and interpolation tables only

    def __init__(self, size: Tuple[int, int], align_corners: bool, scales=(None, None)) -> None:
        self.size, self.align_corners, self.scales = size, align_corners, scales

    def _tables(self, dtype, device: str):  # (tables along H, tables along W), cached
        (H, W), (Ho, Wo) = self.x_shape[2:], self.size
        return (interpolation_tables(H, Ho, self.align_corners, self.scales[0], dtype, device),
                interpolation_tables(W, Wo, self.align_corners, self.scales[1], dtype, device))

    def forward(self, x):
        xp = get_array_module(x)
        N, C, H, W = x.shape
        Ho, Wo = self.size
        self.x_shape = x.shape
        if xp is not np:
            return self._forward_cuda(x)
        (self.A_h,), (self.A_w,) = self._tables(x.dtype, "cpu")          # (Ho, H), (Wo, W)
        rows = x.reshape(N * C * H, W) @ self.A_w.T                       # (N*C*H, Wo)
        return (self.A_h @ rows.reshape(N * C, H, Wo)).reshape(N, C, Ho, Wo)

    def backward(self, gy):
        xp = get_array_module(gy)
        if xp is not np:
            return self._backward_cuda(gy)
        N, C, H, W = self.x_shape
        Ho, Wo = self.size
        g_rows = self.A_h.T @ gy.reshape(N * C, Ho, Wo)                   # (N*C, H, Wo)
        return (g_rows.reshape(N * C * H, Wo) @ self.A_w).reshape(N, C, H, W)

    # ---- CUDA twin: forward reads the two taps per axis (4 per output). Backward is the adjoint
    # gathered per input element, dx[h, w] = sum_{o, p} A_h[o, h] gy[o, p] A_w[p, w] over the runs
    # of outputs that read h and w: no atomics, so every run gives the same bits (as col2im).
    _CUDA = r"""
    extern "C" __global__ void bilinear_fwd(const T* x, T* y, long long total, int H, int W, int Ho, int Wo,
                                            const int* h0, const int* h1, const T* lh,
                                            const int* w0, const int* w1, const T* lw) {
        long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (idx >= total) return;
        int j = idx % Wo; long long r = idx / Wo; int i = r % Ho; r /= Ho;
        const T* p = x + r * H * W;
        T a = lh[i], b = lw[j];
        T top = (1 - b) * p[h0[i] * W + w0[j]] + b * p[h0[i] * W + w1[j]];
        T bottom = (1 - b) * p[h1[i] * W + w0[j]] + b * p[h1[i] * W + w1[j]];
        y[idx] = (1 - a) * top + a * bottom;
    }
    extern "C" __global__ void bilinear_bwd(const T* gy, T* gx, long long total, int H, int W, int Ho, int Wo,
                                            const T* Ah, const int* h_lo, const int* h_hi,
                                            const T* Aw, const int* w_lo, const int* w_hi) {
        long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (idx >= total) return;
        int w = idx % W; long long r = idx / W; int h = r % H; r /= H;
        const T* g = gy + r * Ho * Wo;
        T acc = 0;
        for (int j = w_lo[w]; j < w_hi[w]; ++j) {       // the CPU's order: A_h^T first, then A_w
            T col = 0;
            for (int i = h_lo[h]; i < h_hi[h]; ++i) col += Ah[i * H + h] * g[i * Wo + j];
            acc += col * Aw[j * W + w];
        }
        gx[idx] = acc;
    }
    """

    def _geometry(self):
        (H, W), (Ho, Wo) = self.x_shape[2:], self.size
        return np.int32(H), np.int32(W), np.int32(Ho), np.int32(Wo)

    def _forward_cuda(self, x):
        xp = get_array_module(x)
        (h0, h1, lh, *_), (w0, w1, lw, *_) = self._tables(x.dtype, "cuda")
        y = xp.empty((*x.shape[:2], *self.size), dtype=x.dtype)
        backend.launch(backend.raw_kernel(self._CUDA, "bilinear_fwd", x.dtype), y.size,
                       (xp.ascontiguousarray(x), y, np.int64(y.size), *self._geometry(), h0, h1, lh, w0, w1, lw))
        return y

    def _backward_cuda(self, gy):
        xp = get_array_module(gy)
        (*_, Ah, h_lo, h_hi), (*_, Aw, w_lo, w_hi) = self._tables(gy.dtype, "cuda")
        gx = xp.empty(self.x_shape, dtype=gy.dtype)
        backend.launch(backend.raw_kernel(self._CUDA, "bilinear_bwd", gy.dtype), gx.size,
                       (xp.ascontiguousarray(gy), gx, np.int64(gx.size), *self._geometry(), Ah, h_lo, h_hi, Aw, w_lo, w_hi))
        return gx


def interpolate(x: Tensor, size: Optional[IntPair] = None, scale_factor: Optional[Union[float, Tuple[float, float]]] = None,
                mode: str = "bilinear", align_corners: bool = False) -> Tensor:
    """Bilinear resize of an NCHW tensor to ``size`` or by ``scale_factor`` (up or down).

    Matches torch.nn.functional.interpolate(mode='bilinear'): with ``scale_factor`` the
    output size is floor(in * scale) and the sampling ratio is 1/scale, except on an axis
    whose size does not change (floor(in * scale) == in), which torch leaves as it is.
    """
    x = as_tensor(x)
    _check_input(x, "interpolate")
    if mode != "bilinear":
        raise ValueError(f"interpolate supports mode='bilinear' only, got {mode!r}")
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate needs exactly one of size and scale_factor")
    H, W = x.shape[2:]
    scales = (None, None)
    if size is not None:
        size = _pair(size, "size", 1)
    else:
        scales = (scale_factor, scale_factor) if isinstance(scale_factor, numbers.Real) else tuple(scale_factor)
        if len(scales) != 2 or not all(isinstance(s, numbers.Real) and s > 0 for s in scales):
            raise ValueError(f"scale_factor must be positive (one number or a pair), got {scale_factor!r}")
        size = (int(np.floor(H * scales[0])), int(np.floor(W * scales[1])))
        if min(size) < 1:
            raise ValueError(f"scale_factor {scale_factor!r} shrinks input {x.shape} to an empty output {size}")
        # align_corners=True never uses the scale; an axis that keeps its size is the identity (torch)
        scales = tuple(None if (align_corners or n_out == n_in) else float(s)
                       for s, n_in, n_out in zip(scales, (H, W), size))
    return Bilinear(size, bool(align_corners), scales)(x)
