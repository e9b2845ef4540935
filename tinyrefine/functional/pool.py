"""Pooling: max with -inf padding (chained residual pooling uses 5x5, stride 1), and average and adaptive
average pooling as two matrix products (DeepLabv3's image pooling, PSPNet-style bins)."""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..engine import Function, Tensor, as_tensor
from .common import IntPair, _check_input, _out_size, _pair, over_planes


MAX_POOL_TAPS = 1 << 16   # per axis: the widest offset dtype below is uint16


def offset_dtype(taps: int) -> np.dtype:
    """The smallest unsigned dtype that holds a window offset 0..taps-1."""
    return np.dtype(np.uint8) if taps <= 256 else np.dtype(np.uint16)


def _plane_array(shape: tuple, dtype, planes_last: bool, make=np.empty) -> np.ndarray:
    """A new (P, h, w) array (``make``: np.empty or np.zeros); with ``planes_last`` a view of an (h, w, P) one,
    the P planes innermost in memory."""
    if planes_last:
        return make((*shape[1:], shape[0]), dtype=dtype).transpose(2, 0, 1)
    return make(shape, dtype=dtype)


class MaxPool2dFunction(Function):
    """y[n, c, i, j] = max_{p,q} xpad[n, c, i*s + p, j*s + q], padding with -inf.

    The plain definition, as a loop over windows (what the code below computes faster):

        for n, c, i, j:
            window = xpad[n, c, i*sh : i*sh + kh, j*sw : j*sw + kw]
            y[n, c, i, j] = window.max()             # backward: its argmax receives gy[n, c, i, j]

    -inf, not zero: CRP pools the output of a ReLU'd-then-convolved path, which
    can be negative everywhere, and a zero pad would invent a maximum of 0.
    The max is separable: a max along W (over q), then along H (over p). Each
    stage keeps the first offset that reaches its maximum, so a tie goes to
    the first element of the window in row-major order (smallest row, then
    smallest column) -- the same element torch picks. A NaN beats every number
    and a later NaN an earlier one, so y is NaN and its gradient goes to the
    window's last NaN in row-major order (torch's rule: a divergence shows).
    Backward sends each gradient to that one element; overlapping windows
    (stride < kernel) add up. The offsets are stored as uint8 (a quarter of a
    float32 map) up to 256 taps per axis, uint16 above; larger kernels are refused.

    Maps at most ``planes_last_max_width`` wide are worked on with the planes innermost in memory,
    (H, W, N*C): numpy runs an op as one inner loop per innermost run, and runs of 2-8 values cost more
    in loop overhead than in work (ours, issue 13). Only the memory order of the buffers changes, not
    the arithmetic: the same bits either way.
    """
    saves_inputs = False  # keeps the argmax offsets, not x
    planes_last_max_width = 8    # the demo's 8x8 CRP pool ran ~1.4x faster so, 16x16 ~14% slower (the transposing copies)

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
        better = np.empty_like(best, dtype=bool)     # (empty_like: in best's memory order)
        offset = np.empty_like(arg)
        for t in range(1, k):
            v = tap(t)
            np.greater(v, best, out=better)   # strict: an equal value keeps the earlier offset
            if nan_aware:
                better |= np.isnan(v)
            np.maximum(best, v, out=best)
            np.multiply(better, arg.dtype.type(t), out=offset)  # t where tap t is better, else 0
            np.maximum(arg, offset, out=arg)

    @staticmethod
    def _scatter_along(g, arg, axis: int, k: int, s: int, size: int, planes_last: bool):
        """Adjoint of _max_along: send g to offset arg along ``axis`` (strided adds, no add.at)."""
        shape = list(g.shape)
        shape[axis] = size
        out = _plane_array(shape, g.dtype, planes_last, np.zeros)
        n_out = g.shape[axis]
        hit = np.empty_like(g, dtype=bool)
        routed = np.empty_like(g)
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
        planes, P = x.reshape(N * C, H, W), N * C
        self.planes_last = planes_last = W <= self.planes_last_max_width
        y = _plane_array((P, Ho, Wo), x.dtype, planes_last)
        # stage 1 keeps, for every padded row and output column j, the column offset q of that row's max;
        # stage 2 keeps, for every output (i, j), the row offset p of the window's max
        self.col_offset_of_row_max = _plane_array((P, H + 2 * ph, Wo), offset_dtype(kw), planes_last)
        self.row_offset_of_window_max = _plane_array((P, Ho, Wo), offset_dtype(kh), planes_last)

        def pool(a: int, b: int) -> None:  # planes a..b (their own buffers: they stay in cache between the stages)
            xpad = _plane_array((b - a, H + 2 * ph, W + 2 * pw), x.dtype, planes_last)
            xpad[:, :ph], xpad[:, H + ph:], xpad[:, :, :pw], xpad[:, :, W + pw:] = (-np.inf,) * 4
            xpad[:, ph:ph + H, pw:pw + W] = planes[a:b]
            rows = _plane_array((b - a, H + 2 * ph, Wo), x.dtype, planes_last)
            nan_aware = bool(np.isnan(planes[a:b]).any())
            self._max_along(xpad, 2, kw, sw, rows, self.col_offset_of_row_max[a:b], nan_aware)     # max along W
            self._max_along(rows, 1, kh, sh, y[a:b], self.row_offset_of_window_max[a:b], nan_aware)  # then along H
        over_planes(P, pool, kh * H * W)
        return np.ascontiguousarray(y).reshape(N, C, Ho, Wo)

    def backward(self, gy):
        if get_array_module(gy) is not np:
            return self._backward_cuda(gy)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        N, C, H, W = self.x_shape
        g_planes = gy.reshape(N * C, *gy.shape[2:])
        if self.planes_last:   # in the offsets' memory order
            g_planes = _plane_array(g_planes.shape, gy.dtype, True)
            g_planes[...] = gy.reshape(g_planes.shape)
        gx = np.empty((N * C, H, W), dtype=gy.dtype)
        planes_last = self.planes_last

        def unpool(a: int, b: int) -> None:
            g_rows = self._scatter_along(g_planes[a:b], self.row_offset_of_window_max[a:b], 1, kh, sh, H + 2 * ph, planes_last)  # (P, H+2ph, Wo)
            g_pad = self._scatter_along(g_rows, self.col_offset_of_row_max[a:b], 2, kw, sw, W + 2 * pw, planes_last)  # (P, H+2ph, W+2pw)
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


def max_pool2d(x: Tensor, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
               return_indices: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Max pooling with -inf padding; ``stride`` defaults to ``kernel_size``. ``return_indices=True`` also
    returns, as torch does, each maximum's flat index h*W + w within its (n, c) plane (int64, for max_unpool2d)."""
    x = as_tensor(x)
    _check_input(x, "max_pool2d")
    op = MaxPool2dFunction(kernel_size, stride, padding)
    if max(op.kernel) > MAX_POOL_TAPS:
        raise ValueError(f"max_pool2d kernel {op.kernel} has more than {MAX_POOL_TAPS} taps along an axis")
    for axis in (0, 1):
        if op.padding[axis] > op.kernel[axis] // 2:
            raise ValueError(f"max_pool2d padding {op.padding} must be at most half the kernel {op.kernel}")
        if op.kernel[axis] > x.shape[2 + axis] + 2 * op.padding[axis]:
            raise ValueError(f"max_pool2d kernel {op.kernel} is larger than the padded input "
                             f"({x.shape} with padding {op.padding})")
    y = op(x)
    return (y, Tensor(max_pool_indices(op))) if return_indices else y


def max_pool_indices(op: MaxPool2dFunction):
    """The flat index h*W + w, within its (n, c) plane, of each output's maximum, read off what the forward
    of ``op`` saved (call it before backward releases that): on the CPU the two stages' offsets, the row
    offset p of the window's maximum and the column offset q of that padded row's maximum, so
    h = i*sh + p - ph and w = j*sw + q - pw; on CUDA the kernel's own flat index."""
    if hasattr(op, "arg"):   # the CUDA forward keeps the flat index itself (int32)
        return op.arg.astype(np.int64)
    (sh, sw), (ph, pw) = op.stride, op.padding
    N, C, H, W = op.x_shape
    Ho, Wo = op.row_offset_of_window_max.shape[1:]
    padded_row = np.arange(Ho)[:, None] * sh + op.row_offset_of_window_max               # (N*C, Ho, Wo)
    col_offset = np.take_along_axis(op.col_offset_of_row_max, padded_row, axis=1)        # (N*C, Ho, Wo)
    index = (padded_row - ph) * W + (np.arange(Wo) * sw + col_offset - pw)
    return index.astype(np.int64).reshape(N, C, Ho, Wo)


# ---------------------------------------------------------------------------------------------------------
# Average pooling is linear and separable: each output averages a rectangle of rows x columns, so per (n, c)
# plane y = P_h @ x @ P_w^T with one pooling matrix per axis (as Bilinear does with its interpolation
# matrices), and its backward is the exact adjoint gx = P_h^T @ gy @ P_w. Written with matrix products only,
# the same code runs on NumPy and CuPy.

def _window_matrix(n_in: int, starts: np.ndarray, ends: np.ndarray, divisors: np.ndarray) -> np.ndarray:
    """(n_out, n_in): row o is 1/divisors[o] on columns starts[o] .. ends[o]-1, zero elsewhere."""
    columns = np.arange(n_in)
    inside = (columns >= starts[:, None]) & (columns < ends[:, None])    # (n_out, n_in)
    return inside / divisors[:, None].astype(np.float64)


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) for adaptive average pooling along one axis, torch's bins:
    row i averages inputs start = floor(i * n_in / n_out) .. end = ceil((i + 1) * n_in / n_out), end excluded.
    Bins overlap when n_in is not a multiple of n_out; n_out > n_in repeats inputs (torch allows both)."""
    i = np.arange(n_out)
    starts = (i * n_in) // n_out
    ends = -((-(i + 1) * n_in) // n_out)   # ceil division in integers
    return _window_matrix(n_in, starts, ends, ends - starts)


def avg_pool_size(n_in: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length along one axis, torch's rule: floor (or ceil) of (n + 2p - k) / s, plus 1;
    in ceil mode a last window that would start inside the right padding is dropped."""
    n_out = (n_in + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (n_out - 1) * stride >= n_in + padding:
        n_out -= 1
    return n_out


def avg_pool_matrix(n_in: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False,
                    count_include_pad: bool = True, divisor: Optional[int] = None) -> np.ndarray:
    """(n_out, n_in) for average pooling along one axis with zero padding, torch's divisors:
    a window spans start = o*s - p .. min(start + k, n + p) in input coordinates (the padded zeros add
    nothing, so only the columns inside the input are non-zero); it divides by that span when
    ``count_include_pad``, else by the number of input elements it covers, or by ``divisor`` if given."""
    n_out = avg_pool_size(n_in, kernel, stride, padding, ceil_mode)
    starts = np.arange(n_out) * stride - padding
    ends = np.minimum(starts + kernel, n_in + padding)                   # ceil mode: stops at the padded border
    span = ends - starts                                                 # counts the padding
    starts, ends = np.maximum(starts, 0), np.minimum(ends, n_in)
    divisors = np.full(n_out, divisor) if divisor is not None else span if count_include_pad else ends - starts
    return _window_matrix(n_in, starts, ends, divisors)


@functools.lru_cache(maxsize=256)
def _pool_matrix(builder, args: tuple, dtype, device: str):
    """``builder(*args)`` in ``dtype`` on ``device``, built once and shared (never written to): a training
    step uploads nothing."""
    matrix = builder(*args).astype(dtype)
    if device == "cpu":
        matrix.setflags(write=False)
        return matrix
    return backend.to_device(np.ascontiguousarray(matrix), device)


class _SeparablePool2d(Function):
    """y = P_h @ x @ P_w^T per (n, c) plane; gx = P_h^T @ gy @ P_w (the exact adjoint).
    Subclasses say which matrices: ``_matrices(H, W, dtype, device) -> (P_h (Ho, H), P_w (Wo, W))``."""

    saves_inputs = False  # keeps the pooling matrices only

    def forward(self, x):
        N, C, H, W = x.shape
        self.x_shape = x.shape
        self.P_h, self.P_w = self._matrices(H, W, x.dtype, backend.device_of(x))
        Ho, Wo = self.P_h.shape[0], self.P_w.shape[0]
        rows = x.reshape(N * C * H, W) @ self.P_w.T                      # (N*C*H, Wo)
        return (self.P_h @ rows.reshape(N * C, H, Wo)).reshape(N, C, Ho, Wo)

    def backward(self, gy):
        N, C, H, W = self.x_shape
        Ho, Wo = gy.shape[2:]
        g_rows = self.P_h.T @ gy.reshape(N * C, Ho, Wo)                  # (N*C, H, Wo)
        return (g_rows.reshape(N * C * H, Wo) @ self.P_w).reshape(N, C, H, W)


class AdaptiveAvgPool2dFunction(_SeparablePool2d):
    """y[n, c, i, j] = mean of x[n, c, h0(i):h1(i), w0(j):w1(j)], with torch's bins
    h0(i) = floor(i * H / Ho), h1(i) = ceil((i + 1) * H / Ho) (the same along W).

    The mean over the rectangle is the mean along W, then along H: y = P_h @ x @ P_w^T with
    P = adaptive_pool_matrix. Output 1x1 is global average pooling (DeepLabv3's image pooling)."""

    def __init__(self, output_size: Tuple[int, int]) -> None:
        self.output_size = output_size

    def _matrices(self, H: int, W: int, dtype, device: str):
        return (_pool_matrix(adaptive_pool_matrix, (H, self.output_size[0]), dtype, device),
                _pool_matrix(adaptive_pool_matrix, (W, self.output_size[1]), dtype, device))


def adaptive_avg_pool2d(x: Tensor, output_size: Union[int, None, Tuple[Optional[int], Optional[int]]]) -> Tensor:
    """Average pooling to a fixed output size (torch's bins); ``None`` for an axis keeps its input size."""
    x = as_tensor(x)
    _check_input(x, "adaptive_avg_pool2d")
    pair = (output_size, output_size) if output_size is None or isinstance(output_size, (int, np.integer)) else output_size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"adaptive_avg_pool2d output_size must be an int, None or a pair, got {output_size!r}")
    size = tuple(x.shape[2 + a] if v is None else v for a, v in enumerate(pair))
    size = _pair(size, "adaptive_avg_pool2d output_size", 1)
    if min(x.shape[2:]) < 1:
        raise ValueError(f"adaptive_avg_pool2d needs a non-empty input, got shape {x.shape}")
    return AdaptiveAvgPool2dFunction(size)(x)


class AvgPool2dFunction(_SeparablePool2d):
    """y[n, c, i, j] = sum_{p,q} xpad[n, c, i*sh + p, j*sw + q] / D(i, j), zero padding, torch's divisor D:

        count_include_pad=True : D = (window rows) * (window columns), counting padded ones
                                 (in ceil mode a window is cut at the padded border);
        count_include_pad=False: D = the number of input elements the window covers;
        divisor_override=d     : D = d.

    Every D is a product of one factor per axis, so the op is separable: y = P_h @ x @ P_w^T with
    P = avg_pool_matrix (the padded zeros add nothing and have no column); d goes into P_h."""

    def __init__(self, kernel: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int], ceil_mode: bool,
                 count_include_pad: bool, divisor_override: Optional[int]) -> None:
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override

    def _matrices(self, H: int, W: int, dtype, device: str):
        d = self.divisor_override
        axis_args = [(n, self.kernel[a], self.stride[a], self.padding[a], self.ceil_mode, self.count_include_pad,
                      None if d is None else (d if a == 0 else 1)) for a, n in enumerate((H, W))]
        return tuple(_pool_matrix(avg_pool_matrix, args, dtype, device) for args in axis_args)


def avg_pool2d(x: Tensor, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
               ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: Optional[int] = None) -> Tensor:
    """Average pooling with zero padding, torch's output sizes and divisors; ``stride`` defaults to ``kernel_size``."""
    x = as_tensor(x)
    _check_input(x, "avg_pool2d")
    kernel = _pair(kernel_size, "avg_pool2d kernel_size", 1)
    stride = _pair(stride if stride is not None else kernel_size, "avg_pool2d stride", 1)
    padding = _pair(padding, "avg_pool2d padding", 0)
    if divisor_override is not None and (not isinstance(divisor_override, (int, np.integer)) or divisor_override == 0):
        raise ValueError(f"avg_pool2d divisor_override must be a non-zero int or None, got {divisor_override!r}")
    for axis in (0, 1):
        if padding[axis] > kernel[axis] // 2:
            raise ValueError(f"avg_pool2d padding {padding} must be at most half the kernel {kernel}")
        if kernel[axis] > x.shape[2 + axis] + 2 * padding[axis]:
            raise ValueError(f"avg_pool2d kernel {kernel} is larger than the padded input ({x.shape} with padding {padding})")
    return AvgPool2dFunction(kernel, stride, padding, bool(ceil_mode), bool(count_include_pad),
                             None if divisor_override is None else int(divisor_override))(x)


class MaxUnpool2dFunction(Function):
    """y[n, c].flat[indices[n, c, i, j]] = x[n, c, i, j], zero everywhere else (max_pool2d's indices undone).

    When several inputs of a plane carry the same index, the last in row-major order wins, on both devices
    (torch leaves it undefined: its CPU result changed from call to call in our test). The winners are found
    by sorting (index, position) pairs, so every write has its own target: no atomics, no write races.
    Backward is the exact adjoint, a gather: gx = gy.flat[index] for the winners, 0 for the overwritten
    (torch's backward gives them gy too, although they did not reach y).
    """

    saves_inputs = False  # keeps the targets it computed from the indices, not x or the indices

    def __init__(self, output_hw: Tuple[int, int]) -> None:
        self.output_hw = output_hw

    def forward(self, x, indices):
        xp = get_array_module(x)
        N, C, H, W = x.shape
        plane = self.output_hw[0] * self.output_hw[1]
        self.x_shape = x.shape
        index = indices.reshape(N * C, H * W).astype(np.int64)
        inside = (index >= 0) & (index < plane)
        if xp is np and not inside.all():   # (on CUDA not checked, to keep the GPU running: such inputs are dropped)
            bad = index[~inside][0]
            raise ValueError(f"max_unpool2d index {bad} is outside the output plane of {plane} = {self.output_hw} values")
        target = xp.where(inside, xp.arange(N * C).reshape(-1, 1) * plane + index, -1).reshape(-1)  # into y.flat
        # one sort key per input, all distinct: (target, position in the plane); a target's last input wins
        order = xp.argsort(target * (H * W) + xp.arange(target.size) % (H * W))
        sorted_target = target[order]
        last_of_run = xp.ones(target.size, dtype=bool)
        last_of_run[:-1] = sorted_target[1:] != sorted_target[:-1]
        self.won = xp.zeros(target.size, dtype=bool)
        self.won[order] = last_of_run & (sorted_target >= 0)           # order is a permutation: one write each
        self.target = xp.where(self.won, target, N * C * plane)         # losers go to a spare slot, dropped
        y = xp.zeros(N * C * plane + 1, dtype=x.dtype)
        y[self.target] = x.reshape(-1)                                  # only the spare slot is written twice
        return y[:-1].reshape(N, C, *self.output_hw)

    def backward(self, gy):
        xp = get_array_module(gy)
        g = xp.concatenate([gy.reshape(-1), xp.zeros(1, dtype=gy.dtype)])  # the spare slot's gradient: 0
        return g[self.target].reshape(self.x_shape), None


def max_unpool2d(x: Tensor, indices, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                 output_size: Optional[Sequence[int]] = None) -> Tensor:
    """The inverse of max_pool2d(..., return_indices=True) as torch defines it: each value goes back to its
    index, zeros elsewhere. The output is (H-1)*s - 2p + k per axis, or ``output_size`` (its last two
    numbers, within a stride of that size, as torch: it picks among the sizes that pool down to H)."""
    x, indices = as_tensor(x), as_tensor(indices)
    _check_input(x, "max_unpool2d")
    if indices.dtype.kind not in "iu":
        raise TypeError(f"max_unpool2d indices must be integers (as max_pool2d returns them), got dtype {indices.dtype}")
    if indices.shape != x.shape:
        raise ValueError(f"max_unpool2d indices shape {indices.shape} must equal the input shape {x.shape}")
    kernel = _pair(kernel_size, "max_unpool2d kernel_size", 1)
    stride = _pair(stride if stride is not None else kernel_size, "max_unpool2d stride", 1)
    padding = _pair(padding, "max_unpool2d padding", 0)
    default = tuple((x.shape[2 + a] - 1) * stride[a] - 2 * padding[a] + kernel[a] for a in (0, 1))
    if output_size is None:
        size = default
    else:
        size = tuple(output_size)[-2:]
        if len(tuple(output_size)) not in (2, 4) or not all(isinstance(v, (int, np.integer)) for v in size):
            raise ValueError(f"max_unpool2d output_size must be (H, W) or (N, C, H, W) ints, got {output_size!r}")
        for a in (0, 1):
            if not default[a] - stride[a] < size[a] < default[a] + stride[a]:
                raise ValueError(f"max_unpool2d output_size {tuple(size)} must lie strictly between "
                                 f"{tuple(d - s for d, s in zip(default, stride))} and {tuple(d + s for d, s in zip(default, stride))}")
    if min(size) < 1:
        raise ValueError(f"max_unpool2d output size {tuple(size)} is not positive (input {x.shape}, kernel {kernel}, "
                         f"stride {stride}, padding {padding})")
    return MaxUnpool2dFunction((int(size[0]), int(size[1])))(x, indices)
