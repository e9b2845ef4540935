"""conv2d as im2col + GEMM (stride, padding, dilation), with col2im, its adjoint, for the input gradient."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .. import backend, threads
from ..backend import get_array_module
from ..engine import Function, Tensor, as_tensor
from .common import IntPair, _check_input, _out_size, _pair, over_planes, over_ranges, range_bounds, scratch
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
    xpad = _zero_padded(x, padding, "im2col.xpad")
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


# --------------------------------------------------------------------------- the CPU path: output rows in bands
BAND_BYTES = 1 << 20     # one band's columns: about the L2 cache (1 MiB per core here); measured, issue 13
MIN_BAND_COLUMNS = 1024  # ...but never so few columns that the band's GEMM runs thin
PARALLEL_BANDS = 4       # a job worth threads gets at least this many bands (cores to share them: 2 to 16)
PARALLEL_MIN_MACS = 1 << 26     # smaller GEMMs run inline, BLAS on its own threads (the pool lost on the demo's 16x16 maps)
CHUNK_RESULTS_BYTES = 32 << 20   # at most this much held in per-chunk sums (the weight gradient's)


def _zero_padded(x, padding, role: str):
    """x (N, C, H, W) zero-padded into a scratch buffer (N, C, H + 2ph, W + 2pw), plane ranges on all cores
    (a serial copy was 10% of a 64 @ 160x160 conv); x itself where there is no padding."""
    (ph, pw), (N, C, H, W) = padding, x.shape
    if not (ph or pw):
        return x
    xpad = scratch(role, (N * C, H + 2 * ph, W + 2 * pw), x.dtype)
    src = x.reshape(N * C, H, W)

    def pad_planes(a: int, b: int) -> None:  # planes a..b
        xpad[a:b, :ph], xpad[a:b, H + ph:], xpad[a:b, :, :pw], xpad[a:b, :, W + pw:] = 0, 0, 0, 0
        xpad[a:b, ph:ph + H, pw:pw + W] = src[a:b]
    over_planes(N * C, pad_planes, xpad[0].size)
    return xpad.reshape(N, C, H + 2 * ph, W + 2 * pw)


def _padded_images(x, padding, stride, kernel, dilation, batch_last: bool, role: str, x_t=None) -> list:
    """x (N, C, H, W) zero-padded into a scratch buffer, as a list of images (C, sh, sw, Hq, Wq, B) for
    _band_cols: one holding the whole batch innermost (B = N, for small maps), or one per image (B = 1).
    ``x_t``: x already batch-last (C, H, W, N).

    Strided convs get the padded image split into its stride phases (space-to-depth, ours, issue 13):
        image[c, a, b, i, j] = xpad[c, a + i*sh, b + j*sw],
    so that every kernel tap reads unit-stride rows of one phase (a tap of a stride-2 conv read every other
    value). Only the phases some tap of ``kernel`` (with ``dilation``) reads are filled: a 1x1 stride-2 conv
    reads one of four. Stride 1 is the one phase, xpad itself."""
    (ph, pw), (sh, sw), (N, C, H, W) = padding, stride, x.shape
    if (sh, sw) == (1, 1):                                              # the common case, kept lean (small maps)
        if not batch_last:
            return list(_zero_padded(x, padding, role)[:, :, None, None, :, :, None])
        xpad = scratch(role, (C, H + 2 * ph, W + 2 * pw, N), x.dtype)
        xpad[:, :ph], xpad[:, H + ph:], xpad[:, :, :pw], xpad[:, :, W + pw:] = 0, 0, 0, 0
        if x_t is not None:
            xpad[:, ph:ph + H, pw:pw + W] = x_t
        else:
            _copy_batch_last(xpad[:, ph:ph + H, pw:pw + W], x)
        return [xpad[:, None, None]]
    Hq, Wq = -(-(H + 2 * ph) // sh), -(-(W + 2 * pw) // sw)          # rows and columns of each phase
    out = scratch(role, (1, C, sh, sw, Hq, Wq, N) if batch_last else (N, C, sh, sw, Hq, Wq, 1), x.dtype)
    read_a = sorted({p * dilation[0] % sh for p in range(kernel[0])})
    read_b = sorted({q * dilation[1] % sw for q in range(kernel[1])})
    phases = [(a, b, *_phase_span(a, sh, ph, H, Hq), *_phase_span(b, sw, pw, W, Wq)) for a in read_a for b in read_b]

    def fill(c0: int, c1: int) -> None:  # channels c0..c1, every phase read: zero border, then the strided copy
        for a, b, i0, i1, h0, j0, j1, w0 in phases:
            dst = out[:, c0:c1, a, b]                                   # (lead, c, Hq, Wq, B)
            dst[:, :, :i0], dst[:, :, i1:], dst[:, :, :, :j0], dst[:, :, :, j1:] = 0, 0, 0, 0
            if i1 == i0 or j1 == j0:
                continue
            rows, cols = slice(h0, h0 + sh * (i1 - i0 - 1) + 1, sh), slice(w0, w0 + sw * (j1 - j0 - 1) + 1, sw)
            if not batch_last:
                dst[:, :, i0:i1, j0:j1, 0] = x[:, c0:c1, rows, cols]
            elif x_t is not None:
                dst[0, :, i0:i1, j0:j1] = x_t[c0:c1, rows, cols]
            else:
                _copy_batch_last(dst[0, :, i0:i1, j0:j1], x[:, c0:c1, rows, cols])
    over_planes(C, fill, out[0, 0].size * out.shape[0])
    return list(out)


def _copy_batch_last(dst, a) -> None:
    """dst (C, H, W, N) = a (N, C, H, W) moved batch-last. Image by image where a row is at least twice as long
    as the batch: numpy's inner loop then runs along a row, not across the N images (6-10x faster at N=2); one
    transposed copy otherwise."""
    if a.shape[3] >= 2 * a.shape[0]:
        for n in range(a.shape[0]):
            dst[..., n] = a[n]
    else:
        dst[...] = a.transpose(1, 2, 3, 0)


def _phase_span(a: int, s: int, pad: int, size: int, n_phase: int):
    """Phase a of a padded axis (every s-th value from a): the phase indices [i0, i1) that hold input values
    (the rest is padding) and the input index h0 of the first: xpad[a + i*s] = x[a + i*s - pad]."""
    i0 = max(0, -(-(pad - a) // s))
    i1 = min(n_phase, (size - 1 + pad - a) // s + 1)
    return i0, max(i0, i1), a + i0 * s - pad


def _band_cols(image, kernel, stride, dilation, rows, Wo):
    """cols[p, q, c, i, j, b] = xpad[c, i*s + p*d, j*s + q*d, b] for the output rows i in [i0, i1)
    -> (kh*kw*C, (i1-i0)*Wo*B): im2col of one band, in this thread's scratch buffer (borrowed).
    From the phase image: tap p reads phase (p*d) % s from row i + (p*d) // s on, one unit-stride block per tap."""
    (kh, kw), (sh, sw), (dh, dw), (i0, i1) = kernel, stride, dilation, rows
    C, B = image.shape[0], image.shape[-1]
    if (kh, kw) == (1, 1) and image.shape[4] == Wo:                   # 1x1: the (0, 0) phase is its own columns
        return image[:, 0, 0, i0:i1].reshape(C, -1)
    cols = scratch("conv.band_cols", (kh, kw, C, i1 - i0, Wo, B), image.dtype)
    for p in range(kh):
        a, di = (p * dh) % sh, (p * dh) // sh
        for q in range(kw):
            b, dj = (q * dw) % sw, (q * dw) // sw
            cols[p, q] = image[:, a, b, i0 + di:i1 + di, dj:dj + Wo]
    return cols.reshape(kh * kw * C, -1)


def _over_bands(images: list, kernel, stride, dilation, out_hw, out_channels: int, per_band, result_nbytes: int = 0) -> list:
    """For every band of output rows of every image: per_band(k, (i0, i1), cols), k the image's index and
    cols its _band_cols. Bands hold about BAND_BYTES of columns, so the copies and the GEMM that reads them
    stay in cache (the whole im2col of a 64-channel 160x160 map is 59 MB). Where the GEMMs come to
    PARALLEL_MIN_MACS multiply-adds (out_channels per column value), at least PARALLEL_BANDS bands, in
    contiguous chunks, run on the pool (each thread with its own buffers, BLAS at 1 thread). Returns each
    chunk's sum of what per_band returned (None if nothing), in order. Bands and chunks depend on the shapes only, never on the thread count, so a sum over
    them gives the same bits on 1 or 16 threads; chunks are fewer where each keeps a result_nbytes sum."""
    (kh, kw), (Ho, Wo) = kernel, out_hw
    C, B = images[0].shape[0], images[0].shape[-1]
    row_columns, depth = Wo * B, kh * kw * C                           # one output row: its GEMM columns, cols rows
    min_rows = -(-MIN_BAND_COLUMNS // row_columns)
    rows = max(min_rows, BAND_BYTES // (depth * row_columns * images[0].itemsize))
    large = len(images) * Ho * row_columns * depth * out_channels >= PARALLEL_MIN_MACS
    if large and len(images) * -(-Ho // rows) < PARALLEL_BANDS:          # more bands, none thinner than min_rows
        rows = max(min_rows, -(-Ho // -(-PARALLEL_BANDS // len(images))))
    if not large and Ho * row_columns * depth * images[0].itemsize <= 4 * BAND_BYTES:
        rows = Ho   # a small job in one piece: there each band's overhead cost 3-6% more than the cache saved
    bands = [(k, (i, min(Ho, i + rows))) for k in range(len(images)) for i in range(0, Ho, rows)]
    n_chunks = min(len(bands), PARALLEL_BANDS * 4, max(1, CHUNK_RESULTS_BYTES // max(1, result_nbytes))) if large else 1

    def run(a: int, b: int):
        total = None
        for k, band in bands[a:b]:
            result = per_band(k, band, _band_cols(images[k], kernel, stride, dilation, band, Wo))
            if total is None:
                total = result
            elif result is not None:
                total += result
        return total
    n_threads = threads.get_num_threads() if n_chunks > 1 else 1    # (the lookup costs ~10 us: small jobs skip it)
    if n_threads > 1:
        return over_ranges(len(bands), run, n_chunks, n_threads)
    bounds = range_bounds(len(bands), n_chunks)                        # the same chunks as over_ranges makes
    return [run(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _conv_bands(images: list, w, stride, dilation, out_hw, batch_last: bool):
    """y[n, o, i, j] = sum_{c,p,q} w[o, c, p, q] * xpad[n, c, i*s + p*d, j*s + q*d], as one GEMM per band:
    y_band (O, rows*Wo*B) = W (O, kh*kw*C) @ cols_band, images from _padded_images. Returns y (N, O, Ho, Wo)."""
    N = images[0].shape[-1] if batch_last else len(images)
    O, kernel = w.shape[0], w.shape[2:]
    w2 = w.transpose(0, 2, 3, 1).reshape(O, -1)                        # (O, kh*kw*C): the columns' row order
    y = np.empty((N, O, *out_hw), dtype=w.dtype)
    outs = [scratch("conv.y_t", (O, *out_hw, N), w.dtype)] if batch_last else [y[n][..., None] for n in range(N)]

    def band(k, rows, cols):
        np.matmul(w2, cols, out=outs[k][:, rows[0]:rows[1]].reshape(O, -1))
    _over_bands(images, kernel, stride, dilation, out_hw, O, band)
    if batch_last:
        y[...] = outs[0].transpose(3, 0, 1, 2)                          # (O, Ho, Wo, N) -> NCHW
    return y


def _batch_last(a, role: str):
    """a (N, C, H, W) as (C, H, W, N) in a scratch buffer: the folded path's layout."""
    a_t = scratch(role, (*a.shape[1:], a.shape[0]), a.dtype)
    _copy_batch_last(a_t, a)
    return a_t


def _conv_weight_grad_bands(images: list, gy, gy_t, kernel, stride, dilation):
    """dW[o, c, p, q] = sum_{n,i,j} gy[n, o, i, j] * xpad[n, c, i*s + p*d, j*s + q*d], summed band by band:
    dW (O, kh*kw*C) += gy_band (O, rows*Wo*B) @ cols_band^T. gy_t: gy batch-last (folded), else None."""
    N, O, C = gy.shape[0], gy.shape[1], images[0].shape[0]
    gys = [gy_t] if gy_t is not None else [gy[n][..., None] for n in range(N)]
    parts = _over_bands(images, kernel, stride, dilation, gy.shape[2:], O,
                        lambda k, rows, cols: gys[k][:, rows[0]:rows[1]].reshape(O, -1) @ cols.T,
                        result_nbytes=O * kernel[0] * kernel[1] * C * gy.itemsize)
    gw = parts[0]
    for part in parts[1:]:
        gw += part
    return np.ascontiguousarray(gw.reshape(O, *kernel, C).transpose(0, 3, 1, 2))


def _input_grad_by_conv(gy, gy_t, w, padding, dilation):
    """A stride-1 conv's input gradient is itself a stride-1 conv (a "full" correlation) of gy with the
    kernel flipped and its two channel axes swapped:
        dx[n, c, h, w] = sum_{o,p,q} w[o, c, kh-1-p, kw-1-q] * gypad[n, o, h + p*d, w + q*d],
    gy padded by d*(k-1) - pad on each side. No col2im (its strided adds ran 2x slower than the copies).
    gy_t: gy batch-last (the folded path), else None. Returns None where that padding would be negative
    (pad > d*(k-1)): col2im handles those."""
    kernel = w.shape[2:]
    pad = tuple(dilation[a] * (kernel[a] - 1) - padding[a] for a in (0, 1))
    if min(pad) < 0:
        return None
    w_flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)             # (C, O, kh, kw), a view: copied only if needed
    H, W = (gy.shape[2 + a] + 2 * pad[a] - dilation[a] * (kernel[a] - 1) for a in (0, 1))
    images = _padded_images(gy, pad, (1, 1), kernel, dilation, gy_t is not None, "conv.gypad", x_t=gy_t)
    return _conv_bands(images, w_flipped, (1, 1), dilation, (H, W), gy_t is not None)


def _batch_last_col2im(gcols, x_shape, kernel, stride, padding, dilation):
    """The adjoint of the batch-innermost im2col (_band_cols of a _padded_images(..., batch_last=True) image),
    from gcols (kh, kw, C, Ho, Wo, N): strided adds of runs of Wo*N values, then dx back in NCHW."""
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

    As GEMMs: y = W (O, C*kh*kw) @ cols (C*kh*kw, Ho*Wo), cols the im2col of the input.
    Backward: dW = gy @ cols^T, dcols = W^T @ gy, dx = col2im(dcols), db = sum gy.
    Forward saves x and W, not cols: recomputing cols in backward costs one copy,
    keeping them would cost kh*kw times the input's memory per layer.

    On CUDA: one batched GEMM over the whole im2col (a Python loop of small launches would starve the GPU).
    On the CPU (ours, issue 13) the output rows go in bands (_over_bands): each band's columns are made and
    consumed while they sit in cache, and bands run on all cores, so no 9x-sized im2col buffer is ever
    written. Maps of at most ``fold_max_pixels`` per image fold the batch into the columns instead (batch
    innermost): per-image GEMMs that thin run slowly, and so do copies of rows only Wo long. For stride 1
    the input gradient is a conv of gy with the flipped kernel (_input_grad_by_conv), so no col2im either.
    """
    fold_max_pixels = 256  # 16x16 (measured, issue 13: the demo network's 2x2-16x16 maps)

    def __init__(self, stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1) -> None:
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)

    def _borrowed_cols(self, x, kernel):
        """im2col of x as (N, C*kh*kw, Ho*Wo). A 1x1, stride-1, unpadded conv needs no copy: its columns are
        x itself. Otherwise (CUDA only) a fresh array."""
        if self._one_by_one(kernel):
            return x.reshape(x.shape[0], x.shape[1], -1)
        cols = im2col(x, kernel, self.stride, self.padding, self.dilation)
        return cols.reshape(x.shape[0], -1, self.out_hw[0] * self.out_hw[1])

    def _one_by_one(self, kernel) -> bool:
        return kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_bias = x, w, b is not None
        kernel = w.shape[2:]
        self.out_hw = tuple(_out_size(x.shape[2 + a], kernel[a], self.stride[a], self.padding[a], self.dilation[a])
                            for a in (0, 1))                            # (Ho, Wo)
        xp = get_array_module(x)
        # CPU, small output maps: fold the batch into the GEMM's columns
        self.folded = xp is np and self.out_hw[0] * self.out_hw[1] <= self.fold_max_pixels
        self.banded = xp is np and (self.folded or not self._one_by_one(kernel))   # else: batched / per-image GEMMs
        if self.banded:
            images = _padded_images(x, self.padding, self.stride, kernel, self.dilation, self.folded, "conv.xpad")
            y = _conv_bands(images, w, self.stride, self.dilation, self.out_hw, self.folded)
        else:
            cols = self._borrowed_cols(x, kernel)                       # (N, C*kh*kw, Ho*Wo)
            w2 = w.reshape(w.shape[0], -1)                              # (O, C*kh*kw)
            y = xp.empty((x.shape[0], w.shape[0], cols.shape[2]), dtype=x.dtype)
            if xp is np:
                for n in range(x.shape[0]):  # 1x1 on the CPU: one GEMM per image, on BLAS's threads
                    np.matmul(w2, cols[n], out=y[n])
            else:
                xp.matmul(w2, cols, out=y)                              # one batched GEMM
            y = y.reshape(x.shape[0], w.shape[0], *self.out_hw)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        x, w = self.x, self.w
        N, O, kernel = gy.shape[0], gy.shape[1], w.shape[2:]
        gb = gy.sum(axis=(0, 2, 3)) if self.has_bias else None
        gw = gx = None
        gy_t = _batch_last(gy, "conv.gy_t") if self.folded else None   # (O, Ho, Wo, N), once for dW and dx
        if self.needs_input_grad[1]:
            if self.banded:   # made again: kept from forward, fresh arrays page-faulted more (issue 13)
                images = _padded_images(x, self.padding, self.stride, kernel, self.dilation, self.folded, "conv.xpad")
                gw = _conv_weight_grad_bands(images, gy, gy_t, kernel, self.stride, self.dilation)
            else:
                gw = _sum_over_images(gy.reshape(N, O, -1), self._borrowed_cols(x, kernel)).reshape(w.shape)
        if self.needs_input_grad[0]:  # not for the first conv, fed by the image
            if self.banded and self.stride == (1, 1):
                gx = _input_grad_by_conv(gy, gy_t, w, self.padding, self.dilation)
            if gx is None:
                gx = self._input_grad_by_col2im(gy, gy_t)
        return (gx, gw, gb) if self.has_bias else (gx, gw)

    def _input_grad_by_col2im(self, gy, gy_t):
        """dcols = W^T @ gy, then dx = col2im(dcols): strided convs (and pads wider than the kernel).
        gy_t: gy batch-last (the folded path), else None."""
        x_shape, w = self.x.shape, self.w
        xp = get_array_module(gy)
        N, O, kernel = gy.shape[0], gy.shape[1], w.shape[2:]
        if gy_t is not None:
            gcols = scratch("conv.gcols", (kernel[0] * kernel[1] * x_shape[1], gy_t[0].size), gy.dtype)
            np.matmul(w.transpose(2, 3, 1, 0).reshape(-1, O), gy_t.reshape(O, -1), out=gcols)   # all images
            gcols = gcols.reshape(*kernel, x_shape[1], *gy.shape[2:], N)
            return _batch_last_col2im(gcols, x_shape, kernel, self.stride, self.padding, self.dilation)
        gy2, w_t = gy.reshape(N, O, -1), w.reshape(O, -1).T             # (N, O, Ho*Wo), (C*kh*kw, O)
        shape = (N, w_t.shape[0], gy2.shape[2])
        if self._one_by_one(kernel):
            gcols = xp.empty(shape, dtype=gy.dtype)
        else:
            gcols = scratch("conv.gcols", shape, gy.dtype) if xp is np else xp.empty(shape, dtype=gy.dtype)
        if xp is np:
            for n in range(N):
                np.matmul(w_t, gy2[n], out=gcols[n])                    # dcols = W^T @ gy[n]
        else:
            xp.matmul(w_t, gy2, out=gcols)                              # one batched GEMM
        if self._one_by_one(kernel):
            return gcols.reshape(x_shape)
        gcols = gcols.reshape(N, x_shape[1], kernel[0], kernel[1], *gy.shape[2:])
        return col2im(gcols, x_shape, kernel, self.stride, self.padding, self.dilation)


def _check_weights(x: Tensor, weight: Tensor, bias, op: str, layout: str, in_axis: int, out_axis: int) -> None:
    """The checks conv2d and conv_transpose2d share: a 4-D float input, a 4-D weight whose ``in_axis`` is the
    input's channels, a bias with one value per output channel (``out_axis`` of the weight), all one dtype."""
    _check_input(x, op)
    if weight.ndim != 4:
        raise ValueError(f"{op} weight must be 4-D {layout}, got shape {weight.shape}")
    if x.shape[1] != weight.shape[in_axis]:
        raise ValueError(f"{op} channel mismatch: input {x.shape} has {x.shape[1]} channels, "
                         f"weight {weight.shape} expects {weight.shape[in_axis]} (its {('first', 'second')[in_axis]} axis is C_in)")
    if bias is not None and as_tensor(bias).shape != (weight.shape[out_axis],):
        raise ValueError(f"{op} bias must have shape ({weight.shape[out_axis]},), got {as_tensor(bias).shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and as_tensor(t).dtype != x.dtype:  # torch refuses too; numpy would promote silently
            raise TypeError(f"{op} input is {x.dtype} but its {name} is {as_tensor(t).dtype}; "
                            "cast one (model.astype(...) or x.astype(...))")


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
           padding: IntPair = 0, dilation: IntPair = 1, algorithm: str = "auto") -> Tensor:
    """2-D convolution (cross-correlation, like torch), NCHW input, weight (C_out, C_in, kH, kW).

    ``algorithm``: 'im2col' (any geometry), 'winograd' (F(2x2,3x3)) or 'winograd4' (F(4x4,3x3)) for
    3x3 stride-1 convs (functional/winograd.py), or 'auto': the measured rule in ``winograd.choose_algorithm``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"conv2d algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    x, weight = as_tensor(x), as_tensor(weight)
    _check_weights(x, weight, bias, "conv2d", "(C_out, C_in, kH, kW)", in_axis=1, out_axis=0)
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
