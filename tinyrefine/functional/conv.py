"""conv2d as im2col + GEMM (stride, padding, dilation), with col2im, its adjoint, for the input gradient."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .. import backend, threads
from ..backend import get_array_module
from ..engine import Function, Tensor, as_tensor
from .common import IntPair, _check_input, _out_size, _pair, over_planes, scratch
from .winograd import ALGORITHMS, TILE_OF, Conv2dWinogradFunction, choose_algorithm, winograd_refusal


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


def _sum_over_images(a, b):
    """sum_n a[n] @ b[n]^T: one GEMM per image on the CPU; on CUDA one batched GEMM, then a fixed-order
    sum over images (deterministic, unlike atomics). The weight gradient of conv2d and conv_transpose2d."""
    if get_array_module(a) is np:
        total = a[0] @ b[0].T
        for n in range(1, a.shape[0]):
            total += a[n] @ b[n].T
        return total
    return get_array_module(a).matmul(a, b.transpose(0, 2, 1)).sum(axis=0)


def _batch_last_cols(x, kernel, stride, padding, dilation, out_hw):
    """cols[p, q, c, i, j, n] = xpad[c, i*s + p*d, j*s + q*d, n]  -> (kh*kw*C, Ho*Wo*N), for the CPU (ours)

    im2col with the batch innermost: a stride-1 offset copies runs of Wo*N contiguous values
    (not Wo), which on 2x2-16x16 maps made the copies 2-9x faster (issue 13)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (Ho, Wo) = kernel, stride, padding, dilation, out_hw
    N, C, H, W = x.shape
    xpad = scratch("conv.xpad_nlast", (C, H + 2 * ph, W + 2 * pw, N), x.dtype)
    xpad[:, :ph], xpad[:, H + ph:], xpad[:, :, :pw], xpad[:, :, W + pw:] = 0, 0, 0, 0
    xpad[:, ph:ph + H, pw:pw + W] = x.transpose(1, 2, 3, 0)
    cols = scratch("conv.cols", (kh, kw, C, Ho, Wo, N), x.dtype)

    def copy_offsets(a: int, b: int) -> None:  # channels a..b
        for p in range(kh):
            for q in range(kw):
                cols[p, q, a:b] = xpad[a:b, p * dh:p * dh + sh * (Ho - 1) + 1:sh, q * dw:q * dw + sw * (Wo - 1) + 1:sw]
    over_planes(C, copy_offsets, N * kh * kw * Ho * Wo)
    return cols.reshape(kh * kw * C, -1)


def _batch_last_col2im(gcols, x_shape, kernel, stride, padding, dilation):
    """The adjoint of _batch_last_cols, from gcols (kh, kw, C, Ho, Wo, N): strided adds of runs of
    Wo*N values, then dx back in NCHW."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    N, C, H, W = x_shape
    Ho, Wo = gcols.shape[3:5]
    dxpad = scratch("conv.dxpad_nlast", (C, H + 2 * ph, W + 2 * pw, N), gcols.dtype)

    def add_offsets(a: int, b: int) -> None:  # channels a..b
        dxpad[a:b] = 0
        for p in range(kh):
            for q in range(kw):
                dxpad[a:b, p * dh:p * dh + sh * (Ho - 1) + 1:sh, q * dw:q * dw + sw * (Wo - 1) + 1:sw] += gcols[p, q, a:b]
    over_planes(C, add_offsets, N * kh * kw * Ho * Wo)
    dx = np.empty(x_shape, dtype=gcols.dtype)
    dx[...] = dxpad[:, ph:ph + H, pw:pw + W].transpose(3, 0, 1, 2)
    return dx


class Conv2dFunction(Function):
    """y[n, o, i, j] = b[o] + sum_{c,p,q} w[o, c, p, q] * xpad[n, c, i*s + p*d, j*s + q*d]

    As GEMMs: y[n] = W (O, C*kh*kw) @ cols[n] (C*kh*kw, Ho*Wo), one per image on the CPU,
    one batched GEMM for all images on CUDA (a Python loop of small launches would starve the GPU).
    Backward: dW = sum_n gy[n] @ cols[n]^T, dcols[n] = W^T @ gy[n], dx = col2im(dcols), db = sum gy.
    Forward saves x and W, not cols: recomputing cols in backward costs one copy,
    keeping them would cost kh*kw times the input's memory per layer.
    On the CPU, outputs of at most ``fold_max_pixels`` per image fold the batch into the columns instead
    (ours): cols (kh*kw*C, Ho*Wo*N) with the batch innermost (_batch_last_cols), y = W @ cols in one
    GEMM; per-image GEMMs that thin run slowly, and so do copies of rows only Wo long.
    """
    fold_max_pixels = 256  # 16x16 (measured, issue 13: the demo network's 2x2-16x16 maps)

    def __init__(self, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1) -> None:
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)

    def _borrowed_cols(self, x, kernel):
        """im2col of x as (N, C*kh*kw, Ho*Wo), in a *borrowed* scratch buffer on the CPU: valid until the
        next conv in this thread, so use it at once and never keep it. A 1x1, stride-1, unpadded conv
        needs no copy: its columns are x itself."""
        if kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            return x.reshape(x.shape[0], x.shape[1], -1)
        buffer = scratch("conv.cols", (*x.shape[:2], *kernel, *self.out_hw), x.dtype) if get_array_module(x) is np else None
        cols = im2col(x, kernel, self.stride, self.padding, self.dilation, out=buffer)
        return cols.reshape(x.shape[0], -1, self.out_hw[0] * self.out_hw[1])

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_bias = x, w, b is not None
        kernel = w.shape[2:]
        self.out_hw = tuple(_out_size(x.shape[2 + a], kernel[a], self.stride[a], self.padding[a], self.dilation[a])
                            for a in (0, 1))                            # (Ho, Wo)
        xp = get_array_module(x)
        # CPU, small output maps: fold the batch into the GEMM's columns
        self.folded = xp is np and self.out_hw[0] * self.out_hw[1] <= self.fold_max_pixels
        if self.folded:
            return self._folded_forward(x, w, b)
        cols = self._borrowed_cols(x, kernel)                           # (N, C*kh*kw, Ho*Wo)
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

    def _folded_forward(self, x, w, b):
        N, O, kernel = x.shape[0], w.shape[0], w.shape[2:]
        cols = _batch_last_cols(x, kernel, self.stride, self.padding, self.dilation, self.out_hw)
        w2 = w.transpose(0, 2, 3, 1).reshape(O, -1)                     # (O, kh*kw*C): the rows' order
        y_t = scratch("conv.y_t", (O, *self.out_hw, N), x.dtype)
        np.matmul(w2, cols, out=y_t.reshape(O, -1))                     # one GEMM for the batch
        y = np.empty((N, O, *self.out_hw), dtype=x.dtype)
        y[...] = y_t.transpose(3, 0, 1, 2)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    def _folded_backward(self, gy):
        x, w = self.x, self.w
        N, O, kernel = gy.shape[0], gy.shape[1], w.shape[2:]
        gy_t = scratch("conv.gy_t", (O, *gy.shape[2:], N), gy.dtype)
        gy_t[...] = gy.transpose(1, 2, 3, 0)
        gy_t = gy_t.reshape(O, -1)                                      # (O, Ho*Wo*N)
        gb = gy.sum(axis=(0, 2, 3)) if self.has_bias else None
        gw = gx = None
        if self.needs_input_grad[1]:
            cols = _batch_last_cols(x, kernel, self.stride, self.padding, self.dilation, self.out_hw)
            gw = np.ascontiguousarray((gy_t @ cols.T).reshape(O, *kernel, -1).transpose(0, 3, 1, 2))
        if self.needs_input_grad[0]:
            gcols = scratch("conv.gcols", (kernel[0] * kernel[1] * x.shape[1], gy_t.shape[1]), gy.dtype)
            np.matmul(w.transpose(2, 3, 1, 0).reshape(-1, O), gy_t, out=gcols)   # dcols, all images
            gcols = gcols.reshape(*kernel, x.shape[1], *gy.shape[2:], N)
            gx = _batch_last_col2im(gcols, x.shape, kernel, self.stride, self.padding, self.dilation)
        return (gx, gw, gb) if self.has_bias else (gx, gw)

    def backward(self, gy):
        if self.folded:
            return self._folded_backward(gy)
        x, w = self.x, self.w
        xp = get_array_module(gy)
        N, O = gy.shape[:2]
        gy2 = gy.reshape(N, O, -1)                                      # (N, O, Ho*Wo)
        gb = gy.sum(axis=(0, 2, 3)) if self.has_bias else None
        gw = None
        if self.needs_input_grad[1]:
            cols = self._borrowed_cols(x, w.shape[2:])
            gw = _sum_over_images(gy2, cols).reshape(w.shape)           # sum_n gy[n] @ cols[n]^T
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


def _check_weights(x: Tensor, weight: Tensor, bias, op: str, layout: str, in_axis: int, out_axis: int) -> None:
    """The checks conv2d and conv_transpose2d share: a 4-D float input, a 4-D weight whose ``in_axis`` is the
    input's channels, and a bias with one value per output channel (``out_axis`` of the weight)."""
    _check_input(x, op)
    if weight.ndim != 4:
        raise ValueError(f"{op} weight must be 4-D {layout}, got shape {weight.shape}")
    if x.shape[1] != weight.shape[in_axis]:
        raise ValueError(f"{op} channel mismatch: input {x.shape} has {x.shape[1]} channels, "
                         f"weight {weight.shape} expects {weight.shape[in_axis]} (its {('first', 'second')[in_axis]} axis is C_in)")
    if bias is not None and as_tensor(bias).shape != (weight.shape[out_axis],):
        raise ValueError(f"{op} bias must have shape ({weight.shape[out_axis]},), got {as_tensor(bias).shape}")


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
           padding: IntPair = 0, dilation: IntPair = 1, algorithm: str = "auto") -> Tensor:
    """2-D convolution (cross-correlation, like torch), NCHW input, weight (C_out, C_in, kH, kW).

    ``algorithm``: 'im2col' (any geometry), 'winograd' (F(2x2,3x3)) or 'winograd4' (F(4x4,3x3)) for
    3x3 stride-1 convs (functional/winograd.py), or 'auto': the measured rule in ``winograd.choose_algorithm``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"conv2d algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    x, weight = as_tensor(x), as_tensor(weight)
    _check_weights(x, weight, bias, "conv2d", "(C_out, C_in, kH, kW)", in_axis=1, out_axis=0)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and as_tensor(t).dtype != x.dtype:  # torch refuses too; numpy would promote silently
            raise TypeError(f"conv2d input is {x.dtype} but its {name} is {as_tensor(t).dtype}; "
                            "cast one (model.astype(...) or x.astype(...))")
    op = Conv2dFunction(stride, padding, dilation)
    for axis in (0, 1):
        span = op.dilation[axis] * (weight.shape[2 + axis] - 1) + 1
        padded = x.shape[2 + axis] + 2 * op.padding[axis]
        if span > padded:
            raise ValueError(f"conv2d kernel {tuple(weight.shape[2:])} with dilation {op.dilation} spans {span} "
                             f"but the padded input is only {padded} ({'HW'[axis]} of input {x.shape}, padding {op.padding})")
    if algorithm == "auto":
        algorithm = choose_algorithm(x.shape, weight.shape, op.stride, op.padding, op.dilation, backend.device_of(x.data))
    if algorithm != "im2col":
        refusal = winograd_refusal(weight.shape, op.stride, op.dilation)
        if refusal is not None:
            raise ValueError(f"conv2d algorithm={algorithm!r} needs a 3x3 kernel, stride 1 and dilation 1: {refusal} "
                             "(use algorithm='im2col' or 'auto')")
        op = Conv2dWinogradFunction(op.padding, TILE_OF[algorithm])
    if x.device == "cpu":
        threads.get_num_threads()  # BLAS follows the thread count in effect (re-checked every few seconds)
    return op(x, weight) if bias is None else op(x, weight, bias)


class ConvTranspose2dFunction(Function):
    """y[n, o, h, w] = b[o] + sum over (c, i, j, p, q) with i*s - pad + p*d = h and j*s - pad + q*d = w
    of x[n, c, i, j] * w[c, o, p, q]; weight (C_in, C_out, kh, kw), as torch.

    The adjoint of conv2d with the same geometry: each input pixel adds a weighted kernel stamp to the
    output, s apart. Output Ho = (H-1)*s - 2*pad + d*(kh-1) + output_padding + 1 (output_padding only
    picks among the sizes that conv2d maps back to H). As GEMMs (conv2d's backward, reused):
        cols[n] = W^T (C_out*kh*kw, C_in) @ x[n] (C_in, H*W),   y = col2im(cols) onto (Ho, Wo) + b
    Backward is conv2d's forward: gcols = im2col(gy) (its windows land on the H x W input grid),
        gx[n] = W @ gcols[n],   gW = sum_n x[n] @ gcols[n]^T,   gb = sum of gy over n, h, w.
    Forward saves x only for gW and W only for gx; no columns (backward makes them from gy).
    """

    def __init__(self, stride: IntPair = 1, padding: IntPair = 0, output_padding: IntPair = 0,
                 dilation: IntPair = 1) -> None:
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.output_padding = _pair(output_padding, "output_padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)

    def output_size(self, in_hw, kernel) -> tuple:
        return tuple((in_hw[a] - 1) * self.stride[a] - 2 * self.padding[a] + self.dilation[a] * (kernel[a] - 1)
                     + self.output_padding[a] + 1 for a in (0, 1))

    def forward(self, x, w, b=None):
        xp = get_array_module(x)
        N, C, H, W = x.shape
        kernel = w.shape[2:]
        self.x_shape, self.w_shape, self.has_bias = x.shape, w.shape, b is not None
        self.x = x if self.needs_input_grad[1] else None
        self.w = w if self.needs_input_grad[0] else None
        w_t = w.reshape(C, -1).T                                        # (C_out*kh*kw, C_in)
        x2 = x.reshape(N, C, H * W)
        shape = (N, w_t.shape[0], H * W)
        cols = scratch("conv_transpose.cols", shape, x.dtype) if xp is np else xp.empty(shape, dtype=x.dtype)
        if xp is np:
            for n in range(N):  # one GEMM per image, as conv2d
                np.matmul(w_t, x2[n], out=cols[n])
        else:
            xp.matmul(w_t, x2, out=cols)                                # one batched GEMM
        cols = cols.reshape(N, w.shape[1], *kernel, H, W)               # (N, C_out, kh, kw, H, W)
        y = col2im(cols, (N, w.shape[1], *self.output_size((H, W), kernel)), kernel, self.stride, self.padding,
                   self.dilation)                                       # (N, C_out, Ho, Wo)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        xp = get_array_module(gy)
        (N, C, H, W), kernel = self.x_shape, self.w_shape[2:]
        gb = gy.sum(axis=(0, 2, 3)) if self.has_bias else None
        if not (self.needs_input_grad[0] or self.needs_input_grad[1]):
            return None, None, gb
        out_hw = [_out_size(gy.shape[2 + a], kernel[a], self.stride[a], self.padding[a], self.dilation[a]) for a in (0, 1)]
        buffer = scratch("conv_transpose.gcols", (*gy.shape[:2], *kernel, *out_hw), gy.dtype) if xp is np else None
        gcols = im2col(gy, kernel, self.stride, self.padding, self.dilation, out=buffer)
        # output_padding >= stride (allowed when the dilation is larger) gives windows past the input: dropped
        gcols = gcols[..., :H, :W].reshape(N, -1, H * W)                # (N, C_out*kh*kw, H*W)
        gx = gw = None
        if self.needs_input_grad[0]:
            w2 = self.w.reshape(C, -1)                                  # (C_in, C_out*kh*kw)
            gx = xp.empty((N, C, H * W), dtype=gy.dtype)
            if xp is np:
                for n in range(N):
                    np.matmul(w2, gcols[n], out=gx[n])
            else:
                xp.matmul(w2, gcols, out=gx)
            gx = gx.reshape(self.x_shape)
        if self.needs_input_grad[1]:
            x2 = self.x.reshape(N, C, H * W)
            gw = _sum_over_images(x2, gcols).reshape(self.w_shape)      # sum_n x[n] @ gcols[n]^T
        return (gx, gw, gb) if self.has_bias else (gx, gw)


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                     padding: IntPair = 0, output_padding: IntPair = 0, groups: int = 1, dilation: IntPair = 1) -> Tensor:
    """Transposed convolution (the adjoint of conv2d), NCHW input, weight (C_in, C_out, kH, kW), torch's arguments
    and output size; groups=1 only."""
    x, weight = as_tensor(x), as_tensor(weight)
    if groups != 1:
        raise NotImplementedError(f"conv_transpose2d supports groups=1 only, got groups={groups!r}")
    _check_weights(x, weight, bias, "conv_transpose2d", "(C_in, C_out, kH, kW)", in_axis=0, out_axis=1)
    op = ConvTranspose2dFunction(stride, padding, output_padding, dilation)
    for axis in (0, 1):
        if op.output_padding[axis] >= max(op.stride[axis], op.dilation[axis]):
            raise ValueError(f"conv_transpose2d output_padding {op.output_padding} must be smaller than the stride "
                             f"{op.stride} or the dilation {op.dilation}")
    out_hw = op.output_size(x.shape[2:], weight.shape[2:])
    if min(out_hw) < 1:
        raise ValueError(f"conv_transpose2d output size {out_hw} is not positive (input {x.shape}, kernel "
                         f"{tuple(weight.shape[2:])}, stride {op.stride}, padding {op.padding})")
    return op(x, weight) if bias is None else op(x, weight, bias)
