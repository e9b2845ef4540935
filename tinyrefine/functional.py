"""The kernels: differentiable ops on NCHW tensors (imported as ``F``).

Each op is a ``Function`` subclass whose docstring gives its formula, plus a
lowercase function that calls it. Where CuPy needs its own kernel, the CUDA C
source sits right under the NumPy code it mirrors; both follow the same
formula and the same tie rules.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import backend
from .backend import get_array_module
from .engine import Add, Function, Tensor, as_tensor

IntPair = Union[int, Tuple[int, int]]


_plane_pool = None


def over_planes(n_planes: int, work, plane_size: int, chunks_per_core: int = 4) -> None:
    """Run ``work(a, b)`` over plane ranges covering [0, n_planes), on all cores.

    NumPy runs an elementwise loop on one core (torch uses them all); numpy's loops
    release the GIL, so threads over disjoint planes scale, and smaller chunks stay in cache.
    Small jobs (under ~1M values) run inline: there the threads cost more than they save.
    """
    global _plane_pool
    cores = os.cpu_count() or 1
    if cores == 1 or n_planes < 2 or n_planes * plane_size < (1 << 20):
        work(0, n_planes)
        return
    if _plane_pool is None:
        _plane_pool = ThreadPoolExecutor(cores, thread_name_prefix="tinyrefine")
    bounds = np.linspace(0, n_planes, min(n_planes, cores * chunks_per_core) + 1).astype(int)
    for future in [_plane_pool.submit(work, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
        future.result()  # re-raises a worker's exception here


def _pair(value: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else \
        tuple(value) if isinstance(value, (tuple, list)) else (value,)  # (value,): a float fails below, clearly
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_input(x: Tensor, op: str, ndim: int = 4) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{op} expects a {ndim}-D input (N, C, H, W), got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"{op} needs a floating-point input, got dtype {x.dtype}")


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# =========================================================================== conv2d
_scratch_buffers: dict = {}


def scratch(role: str, shape: tuple, dtype) -> np.ndarray:
    """A reusable host array for short-lived work (im2col columns and their gradient).

    A fresh 100 MB array costs more in page faults than filling it does, so each role
    keeps one buffer, grown when a larger one is asked for. Only valid until the next
    call with the same role: never return it to the caller.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buffer = _scratch_buffers.get(role)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _scratch_buffers[role] = np.empty(nbytes, dtype=np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


def im2col(x, kernel, stride, padding, dilation, out=None):
    """cols[n, c, p, q, i, j] = xpad[n, c, i*s + p*d, j*s + q*d]  -> (N, C, kh, kw, Ho, Wo)

    One strided copy per kernel offset (kh*kw copies of an output-sized block).
    ``out`` may be a preallocated array of that shape (conv2d passes a scratch buffer)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    N, C, H, W = x.shape
    Ho, Wo = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    xp = get_array_module(x)
    if xp is not np:
        return _im2col_cuda(x, kernel, stride, padding, dilation, Ho, Wo)
    xpad = x
    if ph or pw:
        xpad = scratch("im2col.xpad", (N, C, H + 2 * ph, W + 2 * pw), x.dtype)
        xpad[:, :, :ph], xpad[:, :, H + ph:], xpad[..., :pw], xpad[..., W + pw:] = 0, 0, 0, 0
        xpad[:, :, ph:ph + H, pw:pw + W] = x
    cols = np.empty((N, C, kh, kw, Ho, Wo), dtype=x.dtype) if out is None else out
    src, dst = xpad.reshape(N * C, *xpad.shape[2:]), cols.reshape(N * C, kh, kw, Ho, Wo)

    def copy_offsets(a: int, b: int) -> None:  # planes a..b
        for p in range(kh):
            for q in range(kw):
                dst[a:b, p, q] = src[a:b, p * dh:p * dh + sh * (Ho - 1) + 1:sh, q * dw:q * dw + sw * (Wo - 1) + 1:sw]
    over_planes(N * C, copy_offsets, kh * kw * Ho * Wo)
    return cols


_IM2COL_CUDA = r"""
extern "C" __global__ void im2col(const T* x, T* cols, long long total, int C, int H, int W,
                                  int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
                                  int Ho, int Wo) {
    // one thread per element of cols (N, C, kh, kw, Ho, Wo); zero where the window hits padding
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int j = idx % Wo; long long r = idx / Wo;
    int i = r % Ho; r /= Ho;
    int q = r % kw; r /= kw;
    int p = r % kh; r /= kh;            // r = n * C + c
    int h = i * sh - ph + p * dh, w = j * sw - pw + q * dw;
    cols[idx] = (h >= 0 && h < H && w >= 0 && w < W) ? x[(r * H + h) * W + w] : (T)0;
}
"""


def _im2col_cuda(x, kernel, stride, padding, dilation, Ho, Wo):
    xp = get_array_module(x)
    N, C, H, W = x.shape
    x = xp.ascontiguousarray(x)
    cols = xp.empty((N, C, kernel[0], kernel[1], Ho, Wo), dtype=x.dtype)
    k = backend.raw_kernel(_IM2COL_CUDA, "im2col", x.dtype)
    backend.launch(k, cols.size, (x, cols, np.int64(cols.size), np.int32(C), np.int32(H), np.int32(W),
                                  *[np.int32(v) for v in (*kernel, *stride, *padding, *dilation)], np.int32(Ho), np.int32(Wo)))
    return cols


def col2im(cols, x_shape, kernel, stride, padding, dilation):
    """The adjoint of im2col: dx[n, c, h, w] = sum of cols entries that copied xpad[n, c, h, w].

    Strided adds over the kernel offsets (np.add.at is several times slower here)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    N, C, H, W = x_shape
    Ho, Wo = cols.shape[-2:]
    xp = get_array_module(cols)
    if xp is not np:
        return _col2im_cuda(cols, x_shape, kernel, stride, padding, dilation)
    dxpad = scratch("col2im.dxpad", (N * C, H + 2 * ph, W + 2 * pw), cols.dtype)
    src = cols.reshape(N * C, kh, kw, Ho, Wo)
    dx = np.empty((N * C, H, W), dtype=cols.dtype)

    def add_offsets(a: int, b: int) -> None:  # planes a..b
        dxpad[a:b] = 0
        for p in range(kh):
            for q in range(kw):
                dxpad[a:b, p * dh:p * dh + sh * (Ho - 1) + 1:sh, q * dw:q * dw + sw * (Wo - 1) + 1:sw] += src[a:b, p, q]
        dx[a:b] = dxpad[a:b, ph:ph + H, pw:pw + W]
    over_planes(N * C, add_offsets, kh * kw * Ho * Wo)
    return dx.reshape(x_shape)


_COL2IM_CUDA = r"""
extern "C" __global__ void col2im(const T* cols, T* dx, long long total, int C, int H, int W,
                                  int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,
                                  int Ho, int Wo) {
    // one thread per input element: gather every cols entry that copied it (no atomics)
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int w = idx % W; long long r = idx / W;
    int h = r % H; r /= H;              // r = n * C + c
    T acc = 0;
    for (int p = 0; p < kh; ++p) {
        int hs = h + ph - p * dh;       // = i * sh for the output row i that read (h, w) at offset p
        if (hs < 0 || hs % sh) continue;
        int i = hs / sh; if (i >= Ho) continue;
        for (int q = 0; q < kw; ++q) {
            int ws = w + pw - q * dw;
            if (ws < 0 || ws % sw) continue;
            int j = ws / sw; if (j >= Wo) continue;
            acc += cols[(((r * kh + p) * kw + q) * Ho + i) * Wo + j];
        }
    }
    dx[idx] = acc;
}
"""


def _col2im_cuda(cols, x_shape, kernel, stride, padding, dilation):
    xp = get_array_module(cols)
    N, C, H, W = x_shape
    Ho, Wo = cols.shape[-2:]
    cols = xp.ascontiguousarray(cols)
    dx = xp.empty(x_shape, dtype=cols.dtype)
    k = backend.raw_kernel(_COL2IM_CUDA, "col2im", cols.dtype)
    backend.launch(k, dx.size, (cols, dx, np.int64(dx.size), np.int32(C), np.int32(H), np.int32(W),
                                *[np.int32(v) for v in (*kernel, *stride, *padding, *dilation)], np.int32(Ho), np.int32(Wo)))
    return dx


class Conv2d(Function):
    """y[n, o, i, j] = b[o] + sum_{c,p,q} w[o, c, p, q] * xpad[n, c, i*s + p*d, j*s + q*d]

    As GEMMs: y[n] = W (O, C*kh*kw) @ cols[n] (C*kh*kw, Ho*Wo), one per image on the CPU,
    one batched GEMM for all images on CUDA (a Python loop of small launches would starve the GPU).
    Backward: dW = sum_n gy[n] @ cols[n]^T, dcols[n] = W^T @ gy[n], dx = col2im(dcols), db = sum gy.
    Forward saves x and W, not cols: recomputing cols in backward costs one copy,
    keeping them would cost kh*kw times the input's memory per layer.
    """

    def __init__(self, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1) -> None:
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)

    def _cols(self, x):  # (N, C*kh*kw, Ho*Wo); a free view for a 1x1, stride-1, unpadded conv
        kernel = self.w_shape[2:]
        if kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            return x.reshape(x.shape[0], x.shape[1], -1)
        out_hw = tuple(_out_size(x.shape[2 + a], kernel[a], self.stride[a], self.padding[a], self.dilation[a]) for a in (0, 1))
        buffer = scratch("conv.cols", (*x.shape[:2], *kernel, *out_hw), x.dtype) if get_array_module(x) is np else None
        cols = im2col(x, kernel, self.stride, self.padding, self.dilation, out=buffer)
        self.out_hw = out_hw
        return cols.reshape(x.shape[0], -1, cols.shape[-2] * cols.shape[-1])

    def forward(self, x, w, b=None):
        self.x, self.w, self.w_shape, self.has_bias = x, w, w.shape, b is not None
        self.out_hw = x.shape[2:]
        xp = get_array_module(x)
        cols = self._cols(x)                                            # (N, C*kh*kw, Ho*Wo)
        w2 = w.reshape(w.shape[0], -1)                                  # (O, C*kh*kw)
        y = xp.empty((x.shape[0], w.shape[0], cols.shape[2]), dtype=x.dtype)
        if xp is np:
            for n in range(x.shape[0]):  # one GEMM per image (faster than numpy's broadcast matmul)
                np.matmul(w2, cols[n], out=y[n])
        else:
            xp.matmul(w2, cols, out=y)                                  # one batched GEMM
        if b is not None:
            y += b.reshape(1, -1, 1)
        return y.reshape(x.shape[0], w.shape[0], *self.out_hw)

    def backward(self, gy):
        x, w = self.x, self.w
        xp = get_array_module(gy)
        N, O = gy.shape[:2]
        gy2 = gy.reshape(N, O, -1)                                      # (N, O, Ho*Wo)
        gb = gy.sum(axis=(0, 2, 3)) if self.has_bias else None
        gw = None
        if self.needs_input_grad[1]:
            cols = self._cols(x)
            if xp is np:
                gw = gy2[0] @ cols[0].T                                 # sum_n gy[n] @ cols[n]^T
                for n in range(1, N):
                    gw += gy2[n] @ cols[n].T
            else:  # one batched GEMM, then a fixed-order sum over images (deterministic, unlike atomics)
                gw = xp.matmul(gy2, cols.transpose(0, 2, 1)).sum(axis=0)
            gw = gw.reshape(w.shape)
            del cols  # on CUDA: free before the column gradient of the same size is made
        if not self.needs_input_grad[0]:  # e.g. the first conv, fed by the image
            return (None, gw, gb) if self.has_bias else (None, gw)
        kernel, w_t = w.shape[2:], w.reshape(O, -1).T                   # (C*kh*kw, O)
        one_by_one = kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        shape = (N, w_t.shape[0], gy2.shape[2])
        gcols = xp.empty(shape, dtype=gy.dtype) if (one_by_one or xp is not np) else scratch("conv.gcols", shape, gy.dtype)
        if xp is np:
            for n in range(N):
                np.matmul(w_t, gy2[n], out=gcols[n])                    # dcols = W^T @ gy[n]
        else:
            xp.matmul(w_t, gy2, out=gcols)                              # one batched GEMM
        if one_by_one:
            gx = gcols.reshape(x.shape)
        else:
            gcols = gcols.reshape(N, x.shape[1], kernel[0], kernel[1], *gy.shape[2:])
            gx = col2im(gcols, x.shape, kernel, self.stride, self.padding, self.dilation)
        return (gx, gw, gb) if self.has_bias else (gx, gw)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
           padding: IntPair = 0, dilation: IntPair = 1) -> Tensor:
    """2-D convolution (cross-correlation, like torch), NCHW input, weight (C_out, C_in, kH, kW)."""
    x, weight = as_tensor(x), as_tensor(weight)
    _check_input(x, "conv2d")
    if weight.ndim != 4:
        raise ValueError(f"conv2d weight must be 4-D (C_out, C_in, kH, kW), got shape {weight.shape}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d channel mismatch: input {x.shape} has {x.shape[1]} channels, "
                         f"weight {weight.shape} expects {weight.shape[1]}")
    if bias is not None and as_tensor(bias).shape != (weight.shape[0],):
        raise ValueError(f"conv2d bias must have shape ({weight.shape[0]},), got {as_tensor(bias).shape}")
    op = Conv2d(stride, padding, dilation)
    for axis in (0, 1):
        span = op.dilation[axis] * (weight.shape[2 + axis] - 1) + 1
        padded = x.shape[2 + axis] + 2 * op.padding[axis]
        if span > padded:
            raise ValueError(f"conv2d kernel {tuple(weight.shape[2:])} with dilation {op.dilation} spans {span} "
                             f"but the padded input is only {padded} ({'HW'[axis]} of input {x.shape}, padding {op.padding})")
    return op(x, weight) if bias is None else op(x, weight, bias)


# =========================================================================== max-pool
class MaxPool2d(Function):
    """y[n, c, i, j] = max_{p,q} xpad[n, c, i*s + p, j*s + q], padding with -inf.

    -inf, not zero: CRP pools the output of a ReLU'd-then-convolved path, which
    can be negative everywhere, and a zero pad would invent a maximum of 0.
    The max is separable: a max along W (over q), then along H (over p). Each
    stage keeps the first offset that reaches its maximum, so a tie goes to
    the first element of the window in row-major order (smallest row, then
    smallest column) -- the same element torch picks. A NaN beats every number
    and a later NaN an earlier one, so y is NaN and its gradient goes to the
    window's last NaN in row-major order (torch's rule: a divergence shows).
    Backward sends each gradient to that one element; overlapping windows
    (stride < kernel) add up.
    """

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0) -> None:
        self.kernel = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride if stride is not None else kernel_size, "stride", 1)
        self.padding = _pair(padding, "padding", 0)

    @staticmethod
    def _max_along(x, axis: int, k: int, s: int, best, arg, nan_aware: bool = False) -> None:
        """Running max over k taps along ``axis`` (stride s) into ``best``, first arg offset into ``arg``.

        Only plain ufuncs with ``out=``: ``np.copyto(..., where=)`` is ~10x slower here.
        ``arg = max(arg, t * better)`` records t exactly where tap t is strictly better,
        because t exceeds every earlier offset. ``nan_aware``: a NaN tap is always better
        (np.maximum already carries the NaN into ``best``); off when x has none, to save a pass."""
        n_out = best.shape[axis]

        def tap(t):
            index = [slice(None)] * x.ndim
            index[axis] = slice(t, t + s * (n_out - 1) + 1, s)
            return x[tuple(index)]
        np.copyto(best, tap(0))
        arg.fill(0)
        better = np.empty(best.shape, dtype=bool)
        offset = np.empty(best.shape, dtype=np.uint8)
        for t in range(1, k):
            v = tap(t)
            np.greater(v, best, out=better)   # strict: an equal value keeps the earlier offset
            if nan_aware:
                better |= np.isnan(v)
            np.maximum(best, v, out=best)
            np.multiply(better.view(np.uint8), t, out=offset)
            np.maximum(arg, offset, out=arg)

    @staticmethod
    def _scatter_along(g, arg, axis: int, k: int, s: int, size: int):
        """Adjoint of _max_along: send g to offset arg along ``axis`` (strided adds, no add.at)."""
        shape = list(g.shape)
        shape[axis] = size
        out = np.zeros(shape, dtype=g.dtype)
        n_out = g.shape[axis]
        hit = np.empty(g.shape, dtype=bool)
        routed = np.empty(g.shape, dtype=g.dtype)
        for t in range(k):
            index = [slice(None)] * g.ndim
            index[axis] = slice(t, t + s * (n_out - 1) + 1, s)
            np.equal(arg, t, out=hit)
            np.multiply(g, hit, out=routed)   # (an inf in g would leak NaN to its neighbours; finite g is exact)
            out[tuple(index)] += routed
        return out

    def forward(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        N, C, H, W = x.shape
        Ho, Wo = _out_size(H, kh, sh, ph), _out_size(W, kw, sw, pw)
        self.x_shape = x.shape
        if get_array_module(x) is not np:
            return self._forward_cuda(x, Ho, Wo)
        planes = x.reshape(N * C, H, W)
        y = np.empty((N * C, Ho, Wo), dtype=x.dtype)
        self.arg_w = np.empty((N * C, H + 2 * ph, Wo), dtype=np.uint8)   # column offset of each row max
        self.arg_h = np.empty((N * C, Ho, Wo), dtype=np.uint8)           # row offset of each window max

        def pool(a: int, b: int) -> None:  # planes a..b
            xpad = np.full((b - a, H + 2 * ph, W + 2 * pw), -np.inf, dtype=x.dtype)
            xpad[:, ph:ph + H, pw:pw + W] = planes[a:b]
            rows = np.empty((b - a, H + 2 * ph, Wo), dtype=x.dtype)
            nan_aware = bool(np.isnan(planes[a:b]).any())
            self._max_along(xpad, 2, kw, sw, rows, self.arg_w[a:b], nan_aware)     # max along W
            self._max_along(rows, 1, kh, sh, y[a:b], self.arg_h[a:b], nan_aware)  # then along H
        over_planes(N * C, pool, kh * H * W)
        return y.reshape(N, C, Ho, Wo)

    def backward(self, gy):
        if get_array_module(gy) is not np:
            return self._backward_cuda(gy)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        N, C, H, W = self.x_shape
        g_planes = gy.reshape(N * C, *gy.shape[2:])
        gx = np.empty((N * C, H, W), dtype=gy.dtype)

        def unpool(a: int, b: int) -> None:
            g_rows = self._scatter_along(g_planes[a:b], self.arg_h[a:b], 1, kh, sh, H + 2 * ph)  # (P, H+2ph, Wo)
            g_pad = self._scatter_along(g_rows, self.arg_w[a:b], 2, kw, sw, W + 2 * pw)         # (P, H+2ph, W+2pw)
            gx[a:b] = g_pad[:, ph:ph + H, pw:pw + W]
        over_planes(N * C, unpool, kh * H * W)
        return gx.reshape(self.x_shape)

    # ---- CUDA twin: one thread per output scans its window in row-major order (same tie and NaN rules);
    # backward gathers, per input element, the outputs whose argmax is that element (no atomics).
    _CUDA = r"""
    extern "C" __global__ void maxpool_fwd(const T* x, T* y, int* arg, long long total, int H, int W, int Ho, int Wo,
                                           int kh, int kw, int sh, int sw, int ph, int pw) {
        long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (idx >= total) return;
        int j = idx % Wo; long long r = idx / Wo; int i = r % Ho; r /= Ho;
        const T* plane = x + r * H * W;
        T best = 0; int best_at = -1;      // best_at < 0: nothing seen yet (the pad acts as -inf)
        for (int p = 0; p < kh; ++p) {
            int h = i * sh - ph + p; if (h < 0 || h >= H) continue;
            for (int q = 0; q < kw; ++q) {
                int w = j * sw - pw + q; if (w < 0 || w >= W) continue;
                T v = plane[h * W + w];
                if (v > best || v != v || best_at < 0) { best = v; best_at = h * W + w; }   // v != v: NaN
            }
        }
        y[idx] = best; arg[idx] = best_at;
    }
    extern "C" __global__ void maxpool_bwd(const T* gy, const int* arg, T* gx, long long total, int H, int W, int Ho, int Wo,
                                           int kh, int kw, int sh, int sw, int ph, int pw) {
        long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (idx >= total) return;
        int w = idx % W; long long r = idx / W; int h = r % H; r /= H;
        int i_lo = max(0, (h + ph - kh + sh) / sh), i_hi = min(Ho - 1, (h + ph) / sh);
        int j_lo = max(0, (w + pw - kw + sw) / sw), j_hi = min(Wo - 1, (w + pw) / sw);
        T acc = 0;
        for (int i = i_lo; i <= i_hi; ++i)
            for (int j = j_lo; j <= j_hi; ++j) {
                long long o = (r * Ho + i) * Wo + j;
                if (arg[o] == h * W + w) acc += gy[o];
            }
        gx[idx] = acc;
    }
    """

    def _geometry(self):
        N, C, H, W = self.x_shape
        return (np.int32(H), np.int32(W), np.int32(self.out_hw[0]), np.int32(self.out_hw[1]),
                *[np.int32(v) for v in (*self.kernel, *self.stride, *self.padding)])

    def _forward_cuda(self, x, Ho, Wo):
        xp = get_array_module(x)
        x = xp.ascontiguousarray(x)
        self.out_hw = (Ho, Wo)
        y = xp.empty((x.shape[0], x.shape[1], Ho, Wo), dtype=x.dtype)
        self.arg = xp.empty(y.shape, dtype=np.int32)
        backend.launch(backend.raw_kernel(self._CUDA, "maxpool_fwd", x.dtype), y.size, (x, y, self.arg, np.int64(y.size), *self._geometry()))
        return y

    def _backward_cuda(self, gy):
        xp = get_array_module(gy)
        gx = xp.empty(self.x_shape, dtype=gy.dtype)
        backend.launch(backend.raw_kernel(self._CUDA, "maxpool_bwd", gy.dtype), gx.size,
                       (xp.ascontiguousarray(gy), self.arg, gx, np.int64(gx.size), *self._geometry()))
        return gx


def max_pool2d(x: Tensor, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0) -> Tensor:
    """Max pooling with -inf padding; ``stride`` defaults to ``kernel_size``."""
    x = as_tensor(x)
    _check_input(x, "max_pool2d")
    op = MaxPool2d(kernel_size, stride, padding)
    for axis in (0, 1):
        if op.padding[axis] > op.kernel[axis] // 2:
            raise ValueError(f"max_pool2d padding {op.padding} must be at most half the kernel {op.kernel}")
        if op.kernel[axis] > x.shape[2 + axis] + 2 * op.padding[axis]:
            raise ValueError(f"max_pool2d kernel {op.kernel} is larger than the padded input "
                             f"({x.shape} with padding {op.padding})")
    return op(x)


# =========================================================================== bilinear upsample
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
    output size is floor(in * scale) and the sampling ratio is 1/scale.
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
        scales = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else tuple(scale_factor)
        if len(scales) != 2 or any(s <= 0 for s in scales):
            raise ValueError(f"scale_factor must be positive (one number or a pair), got {scale_factor!r}")
        size = (int(np.floor(H * scales[0])), int(np.floor(W * scales[1])))
        if min(size) < 1:
            raise ValueError(f"scale_factor {scale_factor!r} shrinks input {x.shape} to an empty output {size}")
        scales = tuple(float(s) for s in scales) if not align_corners else (None, None)
    return Bilinear(size, bool(align_corners), scales)(x)


# =========================================================================== residual add, relu
def add(a: Tensor, b: Tensor) -> Tensor:
    """The residual add y = a + b (gradient flows unchanged to both: the identity shortcut)."""
    a, b = as_tensor(a), as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"residual add needs equal shapes, got {a.shape} and {b.shape}")
    return Add()(a, b)


class ReLU(Function):
    """y = max(x, 0);  dx = gy where x > 0 (the kink at 0 takes gradient 0, like torch)"""

    def forward(self, x):
        self.positive = x > 0
        return get_array_module(x).maximum(x, 0)

    def backward(self, gy):
        return gy * self.positive


def relu(x: Tensor) -> Tensor:
    return ReLU()(as_tensor(x))


# =========================================================================== batch norm
class BatchNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel of NCHW.

    training: batch statistics over (N, H, W); running stats are updated in place as
    running = (1 - momentum) * running + momentum * batch (unbiased variance, as torch).
      dx = weight * inv_std / M * (M * gy - sum(gy) - xhat * sum(gy * xhat))
    eval: the running statistics, so y is an affine map of x and dx = gy * weight * inv_std.
    """

    def __init__(self, running_mean, running_var, training: bool, momentum: float, eps: float) -> None:
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

    def forward(self, x, weight=None, bias=None):
        xp = get_array_module(x)
        C = x.shape[1]
        shape = (1, C, 1, 1)
        if self.training:
            M = x.size // C
            if M < 2:
                raise ValueError(f"batch_norm in training needs more than one value per channel, got input {x.shape}")
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))
            if self.running_mean is not None:
                self.running_mean *= 1 - self.momentum
                self.running_mean += self.momentum * mean.astype(self.running_mean.dtype)
                self.running_var *= 1 - self.momentum
                self.running_var += self.momentum * (var * (M / (M - 1))).astype(self.running_var.dtype)
        else:
            mean, var = self.running_mean.astype(x.dtype), self.running_var.astype(x.dtype)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype)
        xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
        self.inv_std, self.weight, self.has_affine = inv_std, weight, weight is not None
        # xhat is needed by backward in training, and for the weight's gradient; a frozen
        # BN in eval mode needs neither, and skipping it saves one activation per layer
        affine_grad = self.has_affine and any(self.needs_input_grad[1:])
        self.xhat = xhat if (self.training or affine_grad) else None
        y = xhat if weight is None else xhat * weight.reshape(shape)
        if bias is not None:
            y = y + bias.reshape(shape)
        return y

    def backward(self, gy):
        C = gy.shape[1]
        shape = (1, C, 1, 1)
        xhat = self.xhat
        scale = self.inv_std if self.weight is None else self.inv_std * self.weight
        if self.training:
            M = gy.size // C
            sum_gy = gy.sum(axis=(0, 2, 3))
            sum_gy_xhat = (gy * xhat).sum(axis=(0, 2, 3))
            gx = (scale / M).reshape(shape) * (M * gy - sum_gy.reshape(shape) - xhat * sum_gy_xhat.reshape(shape))
        else:
            gx = gy * scale.reshape(shape)
        if not self.has_affine:
            return (gx,)
        if xhat is None:  # the affine parameters are frozen
            return gx, None, None
        return gx, (gy * xhat).sum(axis=(0, 2, 3)), gy.sum(axis=(0, 2, 3))


def batch_norm(x: Tensor, running_mean, running_var, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalisation over the channels of an NCHW tensor (running stats are raw arrays)."""
    x = as_tensor(x)
    _check_input(x, "batch_norm")
    C = x.shape[1]
    for name, a in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if a is not None and tuple(a.shape) != (C,):
            raise ValueError(f"batch_norm {name} must have shape ({C},) for input {x.shape}, got {tuple(a.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm in eval mode needs running_mean and running_var")
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    for name, a in (("running_mean", rm), ("running_var", rv)):
        if a is not None and backend.device_of(a) != x.device:
            raise ValueError(f"batch_norm: input on {x.device} but {name} on {backend.device_of(a)}; "
                             "move the module with .to(device)")
    op = BatchNorm(rm, rv, training, momentum, eps)
    if weight is None:
        return op(x) if bias is None else op(x) + as_tensor(bias).reshape(1, C, 1, 1)
    return op(x, weight, bias if bias is not None else Tensor(get_array_module(x.data).zeros(C, dtype=x.dtype)))


# =========================================================================== softmax and the loss
class LogSoftmax(Function):
    """y = x - logsumexp(x, axis);  dx = gy - softmax(x) * sum(gy, axis)"""

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

    def __init__(self, ignore_index: int, reduction: str) -> None:
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, target):
        xp = get_array_module(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))   # (N, C, ...)
        valid = target != self.ignore_index                                     # (N, ...)
        in_range = (target >= 0) & (target < logits.shape[1])
        safe_target = xp.where(in_range, target, 0)                              # ignored/bad read class 0 ...
        weight = xp.where(valid & ~in_range, xp.nan, valid).astype(logits.dtype, copy=False)  # ... weighted 0/NaN
        picked = xp.take_along_axis(log_p, safe_target[:, None], axis=1)[:, 0]  # (N, ...)
        losses = -picked * weight
        self.log_p, self.weight, self.safe_target = log_p, weight, safe_target
        if self.reduction == "none":
            return losses
        # |V| on the device (at least 1: all ignored gives 0); int(valid.sum()) would wait for the GPU
        self.count = xp.maximum(valid.sum(), 1).astype(logits.dtype) if self.reduction == "mean" else 1
        return (losses.sum() / self.count).astype(logits.dtype, copy=False)

    def backward(self, gy):
        xp = get_array_module(gy)
        grad = xp.exp(self.log_p)                                               # softmax
        classes = xp.arange(grad.shape[1]).reshape((1, -1) + (1,) * (grad.ndim - 2))
        grad -= classes == self.safe_target[:, None]                            # minus one-hot(target)
        if self.reduction == "none":
            scale = (gy * self.weight)[:, None]
        else:
            scale = (self.weight * (gy / self.count))[:, None]
        return grad * scale.astype(grad.dtype, copy=False), None


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


# =========================================================================== concat, pad, dropout
class Concat(Function):
    """y = [x_0, x_1, ...] joined along ``axis``;  dx_k = the matching slice of gy"""

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


class Dropout(Function):
    """y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p);  dx = gy * mask / (1 - p)"""

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
    return Dropout(p, rng)(x)
