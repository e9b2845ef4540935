"""3x3 stride-1 convolution by Winograd's minimal filtering (Lavin & Gray 2016), F(2x2,3x3) and F(4x4,3x3).

The 1-D algorithm F(m, 3) computes m outputs of a 3-tap correlation y_j = sum_k g_k d_{j+k} from a = m + 2
inputs with a multiplications instead of 3m (Winograd 1980; Toom-Cook). It is the transpose of a
polynomial product: the linear convolution s = g * h (g of degree 2, h of degree m-1) is evaluated at a
points, multiplied pointwise and interpolated back, s = V^-1 [(V_g g) ⊙ (V_h h)], where V, V_g, V_h
evaluate polynomials of degree a-1, 2, m-1 at the points (the point "infinity" reads the leading coefficient).
Since <d, s> = <h, y> for every h (both are sum_{j,k} d_{j+k} g_k h_j), transposing gives

    y = A^T [ (G g) ⊙ (B^T d) ],   A = V_h,  G = D^-1 V_g,  B^T = D V^-T,

with D = diag(prod_{l != i} (x_i - x_l)) moved from B^T into G so that B^T is integer (Lavin & Gray's
choice). Points 0, 1, -1 (+ infinity) give F(2,3) (16 multiplications per 2x2 output tile in 2-D instead
of 36); 0, ±1, ±2 give F(4,3) (36 instead of 144), Lavin & Gray's matrices up to signs. Nested in 2-D:

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A        (d: one a x a input tile, Y: its m x m output tile)

Each transform of an a x a tile is one matrix, kron(B^T, B^T) on the row-major flattened tile, so every
stage is a GEMM over all tiles and channels at once (ours):

    V = KB @ D          (a², C, tiles)     KB = kron(B^T, B^T)   input tiles, overlapping by 2
    U = KG @ w          (a², O, C)         KG = kron(G, G)
    M[k] = U[k] @ V[k]  (a², O, tiles)     one (O x C) @ (C x tiles) GEMM per tile position k
    Y = KA @ M          (m², O, tiles)     KA = kron(A^T, A^T)   output tiles, cropped to Ho x Wo

Backward is the exact adjoint of each linear stage (ours; the weight gradient is Lavin & Gray's
"update" convolution written in the transformed domain):

    gM = KA^T @ gY,  gU[k] = gM[k] @ V[k]^T,  gw = KG^T @ gU    i.e. dW = G^T [ sum_tiles (B^T d B) ⊙ (A dY A^T) ] G
                     gV[k] = U[k]^T @ gM[k],  gD = KB^T @ gV    then overlapping tiles add back into dx

Forward saves x and w, like the im2col conv, and backward recomputes V and U (one transform each):
keeping V would cost a²/m² times the input's memory per layer. The same array code runs on NumPy and
CuPy (``xp = get_array_module(x)``): gathers are strided copies, scatters strided adds, no atomics.
"""
from __future__ import annotations

import functools
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..engine import Function
from .common import IntPair, _out_size, _pair, over_planes, scratch

TILE_POINTS = {2: (0, 1, -1), 4: (0, 1, -1, 2, -2)}  # F(2,3): Lavin & Gray; F(4,3): Lavin & Gray's points


def _solve_exact(matrix):  # inverse of a small square matrix of Fractions (Gauss-Jordan, exact)
    n = len(matrix)
    rows = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                rows[r] = [a - rows[r][col] * b for a, b in zip(rows[r], rows[col])]
    return [row[n:] for row in rows]


def winograd_matrices(m: int, points: Optional[Sequence[int]] = None, r: int = 3) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T (m, a), G (a, r), B^T (a, a)) of F(m, r), a = m + r - 1, from a - 1 finite points and infinity.

    Built exactly in rationals by the construction in the module docstring, then rounded to float64."""
    points = TILE_POINTS[m] if points is None else tuple(points)
    a = m + r - 1
    if len(points) != a - 1 or len(set(points)) != len(points):
        raise ValueError(f"F({m},{r}) needs {a - 1} distinct finite points, got {points}")
    xs = [Fraction(p) for p in points]

    def evaluate(degree_plus_one):  # (a, degree + 1): rows x_i^j, and infinity picks the last coefficient
        return [[x ** j for j in range(degree_plus_one)] for x in xs] + \
               [[Fraction(int(j == degree_plus_one - 1)) for j in range(degree_plus_one)]]
    scale = [Fraction(1)] * a
    for i, x in enumerate(xs):
        for k, other in enumerate(xs):
            scale[i] *= (x - other) if k != i else 1
    V_inv = _solve_exact(evaluate(a))                                   # V^-1 (a, a)
    A_T = np.array(evaluate(m), dtype=float).T                          # V_h^T
    G = np.array([[v / scale[i] for v in row] for i, row in enumerate(evaluate(r))], dtype=float)
    B_T = np.array([[scale[i] * V_inv[j][i] for j in range(a)] for i in range(a)], dtype=float)  # D V^-T
    return A_T, G, B_T


@functools.lru_cache(maxsize=16)
def transform_tables(m: int, dtype, device: str) -> tuple:
    """(KB (a², a²), KG (a², 9), KA (m², a²)) = kron of each 1-D transform with itself, in ``dtype`` on
    ``device``, built once and shared (read-only on the CPU): a training step uploads nothing."""
    A_T, G, B_T = winograd_matrices(m)
    tables = tuple(np.kron(M, M).astype(dtype) for M in (B_T, G, A_T))
    if device == "cpu":
        for t in tables:
            t.setflags(write=False)
        return tables
    return tuple(backend.to_device(t, device) for t in tables)


def _tiles_of(m: int, out_hw: Tuple[int, int]) -> Tuple[int, int]:
    return -(-out_hw[0] // m), -(-out_hw[1] // m)                      # ceil: the last tile may overhang


def _buffer(xp, role: str, shape: tuple, dtype):
    """Short-lived work array: a reused scratch buffer on the CPU (no page faults), a fresh one on CUDA."""
    return scratch("winograd." + role, shape, dtype) if xp is np else xp.empty(shape, dtype=dtype)


def _over_channels(xp, n_channels: int, work, size_per_channel: int) -> None:
    """work(c0, c1) over channel ranges: on all cores for NumPy (strided copies run on one core), one call on CUDA."""
    if xp is np:
        over_planes(n_channels, work, size_per_channel)
    else:
        work(0, n_channels)


def _input_tiles(x, m: int, padding: Tuple[int, int], tiles_hw: Tuple[int, int]):
    """d[u, v, c, n, i, j] = xpad[n, c, i*m + u, j*m + v] -> (a, a, C, N, th, tw); xpad zero beyond x."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    (th, tw), (ph, pw), a = tiles_hw, padding, m + 2
    xpad = _buffer(xp, "xpad", (N, C, th * m + 2, tw * m + 2), x.dtype)  # covers every tile, overhang included
    tiles = _buffer(xp, "tiles", (a, a, C, N, th, tw), x.dtype)

    def gather(c0: int, c1: int) -> None:
        xpad[:, c0:c1] = 0
        xpad[:, c0:c1, ph:ph + H, pw:pw + W] = x[:, c0:c1]
        for u in range(a):
            for v in range(a):  # a² strided copies, as im2col makes kh*kw
                tiles[u, v, c0:c1] = xpad[:, c0:c1, u:u + m * (th - 1) + 1:m, v:v + m * (tw - 1) + 1:m].transpose(1, 0, 2, 3)
    _over_channels(xp, C, gather, a * a * N * th * tw)
    return tiles


def _add_tiles(gD, x_shape: tuple, m: int, padding: Tuple[int, int]):
    """The adjoint of _input_tiles: dx[n, c, h, w] = sum of the tile entries gD[u, v, c, n, i, j] that copied it."""
    xp = get_array_module(gD)
    N, C, H, W = x_shape
    a, th, tw = gD.shape[0], gD.shape[4], gD.shape[5]
    (ph, pw) = padding
    gxpad = _buffer(xp, "xpad", (N, C, th * m + 2, tw * m + 2), gD.dtype)
    gx = xp.empty(x_shape, dtype=gD.dtype)

    def scatter(c0: int, c1: int) -> None:
        gxpad[:, c0:c1] = 0
        for u in range(a):
            for v in range(a):  # overlapping tiles add up: strided adds, no atomics
                gxpad[:, c0:c1, u:u + m * (th - 1) + 1:m, v:v + m * (tw - 1) + 1:m] += gD[u, v, c0:c1].transpose(1, 0, 2, 3)
        gx[:, c0:c1] = gxpad[:, c0:c1, ph:ph + H, pw:pw + W]
    _over_channels(xp, C, scatter, a * a * N * th * tw)
    return gx


def _per_position_gemm(left, right, out, transpose_left: bool = False, transpose_right: bool = False):
    """out[k] = op(left[k]) @ op(right[k]) for each of the a² tile positions k."""
    xp = get_array_module(left)
    left = left.transpose(0, 2, 1) if transpose_left else left
    right = right.transpose(0, 2, 1) if transpose_right else right
    if xp is not np:
        xp.matmul(left, right, out=out)                                 # one batched GEMM
        return out
    for k in range(left.shape[0]):  # one BLAS call each (numpy's stacked matmul is slower here)
        np.matmul(left[k], right[k], out=out[k])
    return out


class Conv2dWinogradFunction(Function):
    """y[n, o, i, j] = b[o] + sum_{c,p,q} w[o, c, p, q] * xpad[n, c, i + p, j + q]  (3x3, stride 1, dilation 1)

    Computed tile by tile as Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A with F(m x m, 3x3), m = 2 or 4; the
    GEMM form and the adjoint backward are derived in the module docstring.
    """

    def __init__(self, padding: IntPair = 0, tile: int = 2) -> None:
        if tile not in TILE_POINTS:
            raise ValueError(f"Winograd tile must be one of {sorted(TILE_POINTS)} (F(2x2,3x3) or F(4x4,3x3)), got {tile!r}")
        self.padding, self.m = _pair(padding, "padding", 0), tile

    def _transformed_input(self, x, KB):  # V (a², C, N*th*tw), in a scratch buffer on the CPU
        xp, a2 = get_array_module(x), KB.shape[0]
        tiles = _input_tiles(x, self.m, self.padding, self.tiles_hw)
        V = _buffer(xp, "V", (a2, x.shape[1], tiles[0, 0, 0].size), x.dtype)
        xp.matmul(KB, tiles.reshape(a2, -1), out=V.reshape(a2, -1))
        return V

    def _transformed_filter(self, w, KG):  # U (a², O, C)
        O, C = w.shape[:2]
        return (KG @ w.reshape(O * C, 9).T).reshape(KG.shape[0], O, C)

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_bias = x, w, b is not None
        xp = get_array_module(x)
        N, O, m = x.shape[0], w.shape[0], self.m
        self.out_hw = tuple(_out_size(x.shape[2 + i], 3, 1, self.padding[i]) for i in (0, 1))
        self.tiles_hw = th, tw = _tiles_of(m, self.out_hw)
        KB, KG, KA = transform_tables(m, x.dtype, backend.device_of(x))
        V = self._transformed_input(x, KB)                              # (a², C, N*th*tw)
        M = _per_position_gemm(self._transformed_filter(w, KG), V, _buffer(xp, "M", (V.shape[0], O, V.shape[2]), x.dtype))
        Y = (KA @ M.reshape(M.shape[0], -1)).reshape(m, m, O, N, th, tw)
        Y = Y.transpose(3, 2, 4, 0, 5, 1)                                   # (N, O, th, m, tw, m)
        Ho, Wo = self.out_hw
        y = xp.empty((N, O, Ho, Wo), dtype=x.dtype)
        if (Ho, Wo) == (th * m, tw * m):
            y.reshape(Y.shape)[...] = Y                                     # one copy into a view of y
        else:                                                               # the last tiles overhang: crop
            y[...] = Y.reshape(N, O, th * m, tw * m)[:, :, :Ho, :Wo]
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        x, w, m = self.x, self.w, self.m
        xp = get_array_module(gy)
        O = w.shape[0]
        (N, C), (th, tw), (Ho, Wo), a = x.shape[:2], self.tiles_hw, self.out_hw, m + 2
        KB, KG, KA = transform_tables(m, gy.dtype, backend.device_of(gy))
        gb = gy.sum(axis=(0, 2, 3)) if self.has_bias else None
        if (Ho, Wo) != (th * m, tw * m):                                    # zero where the last tiles overhang
            gy_full = xp.zeros((N, O, th * m, tw * m), dtype=gy.dtype)
            gy_full[:, :, :Ho, :Wo] = gy
            gy = gy_full
        gy_tiles = _buffer(xp, "gy", (m, m, O, N, th, tw), gy.dtype)
        gy_tiles[...] = gy.reshape(N, O, th, m, tw, m).transpose(3, 5, 1, 0, 2, 4)
        gM = _buffer(xp, "M", (a * a, O, N * th * tw), gy.dtype)
        xp.matmul(KA.T, gy_tiles.reshape(m * m, -1), out=gM.reshape(a * a, -1))
        V = self._transformed_input(x, KB)                                # recomputed (see module docstring)
        gw = gx = None
        if self.needs_input_grad[1]:
            gU = _per_position_gemm(gM, V, xp.empty((a * a, O, C), dtype=gy.dtype), transpose_right=True)  # sum over tiles
            gw = (KG.T @ gU.reshape(a * a, -1)).T.reshape(w.shape)
        if self.needs_input_grad[0]:
            gV = _per_position_gemm(self._transformed_filter(w, KG), gM, V, transpose_left=True)  # V is dead: reuse it
            gD = _buffer(xp, "tiles", (a, a, C, N, th, tw), gy.dtype)
            xp.matmul(KB.T, gV.reshape(a * a, -1), out=gD.reshape(a * a, -1))
            gx = _add_tiles(gD, x.shape, m, self.padding)
        return (gx, gw, gb) if self.has_bias else (gx, gw)

ALGORITHMS = ("auto", "im2col", "winograd", "winograd4")  # winograd: F(2x2,3x3); winograd4: F(4x4,3x3)
TILE_OF = {"winograd": 2, "winograd4": 4}


def winograd_refusal(w_shape: tuple, stride: Tuple[int, int], dilation: Tuple[int, int]) -> Optional[str]:
    """Why Winograd cannot compute this conv (None when it can): it is derived for 3x3, stride 1, dilation 1."""
    if tuple(w_shape[2:]) != (3, 3):
        return f"kernel {tuple(w_shape[2:])} is not 3x3"
    if stride != (1, 1):
        return f"stride {stride} is not 1"
    if dilation != (1, 1):
        return f"dilation {dilation} is not 1"
    return None


def choose_algorithm(x_shape: tuple, w_shape: tuple, stride: Tuple[int, int], padding: Tuple[int, int],
                     dilation: Tuple[int, int], device: str) -> str:
    """The rule behind ``algorithm='auto'``: Winograd where it was measured faster than im2col, else im2col.

    Winograd saves GEMM work (2.25x for F(2x2), 4x for F(4x4)) but adds transforms whose cost does not shrink
    with the channel count, and its GEMMs are (O x C) @ (C x tiles): few tiles make thin, slow GEMMs; many
    tiles make transforms that no longer fit in cache, while im2col runs in cache-sized bands (conv.py).
    With T = the number of 4x4 output tiles (batch 2 at 20x20: 50; at 40x40: 200; at 80x80: 800) and
    C' = min(C, O): F(2x2) when C' >= 256 and 50 <= T < 200; F(4x4) when C' >= 128 and T >= 50 otherwise,
    or 64 <= C' < 128 and 50 <= T <= 200; im2col everywhere else, and on CUDA, where no GPU timing has been
    made (ours).

    Measured (ours; 2-core AMD EPYC (Zen 3) VM, OpenBLAS 0.3.31, numpy 2.4; banded im2col; conv fwd+bwd,
    float32, batch 2, C -> C, pad 1, 2 threads, wall clock; ``benchmarks/ops.py --only conv3x3 --sweep``, load
    0.8-1.5, median of 3; time relative to im2col, < 1 is faster; F(2x2) / F(4x4)):

        C    map: 10x10        20x20        40x40        80x80        160x160
        32        1.04 / 1.65  0.93 / 1.10  0.96 / 0.84  1.46 / 1.00  1.87 / 1.47
        64        1.51 / 2.06  0.84 / 0.84  0.86 / 0.78  1.38 / 1.14  1.40 / 1.05
        128       1.03 / 1.61  0.53 / 0.54  0.98 / 0.70  1.15 / 0.76      -
        256       0.87 / 1.98  0.76 / 0.82  0.87 / 0.71  0.87 / 0.65      -
        512       0.98 / 1.81  0.89 / 0.90  0.65 / 0.58      -            -

    Single cells move by +-20% from run to run on this shared machine; the rule follows the pattern and
    leaves small gains elsewhere (F(4x4) at 32 channels @ 40x40, F(2x2) at 256 @ 10x10) to stay simple.
    """
    if winograd_refusal(w_shape, stride, dilation) is not None or device != "cpu":
        return "im2col"
    out_hw = [_out_size(x_shape[2 + i], 3, 1, padding[i]) for i in (0, 1)]
    tiles = x_shape[0] * -(-out_hw[0] // 4) * -(-out_hw[1] // 4)
    channels = min(x_shape[1], w_shape[0])
    if channels >= 256 and 50 <= tiles < 200:
        return "winograd"
    if (channels >= 128 and tiles >= 50) or (channels >= 64 and 50 <= tiles <= 200):
        return "winograd4"
    return "im2col"
