"""Where conv2d's CPU time goes, beside torch, in one run: the GEMM floor, the bands, the cost of threads.

    python benchmarks/conv_floor.py
    python benchmarks/conv_floor.py --repeat 9

Two 3x3, padding-1, stride-1 convolutions (float32, forward + backward): 64 -> 64 channels on 160x160
(batch 2), the layer issue 13 could not bring under torch, and 32 -> 32 on 16x16 (batch 8), the demo
decoder's most frequent layer. For each, as median milliseconds and as a ratio to torch:
  torch              torch.nn.functional.conv2d forward + backward (its default threads)
  bands              F.conv2d(algorithm='im2col'): im2col one band of output rows at a time (the library)
  whole im2col       the same with bands switched off (one band, made whole, BLAS on its own threads): the control
  GEMMs alone        the three matrix products (y, dW, dcols) on ready-made columns: no copy at all, a floor
Then what splitting small work over threads costs here: a no-op hand-off to the plane pool, and BLAS's
second thread on the demo layer's forward GEMM (32 x 288 x 2048), and single-thread sgemm at 2048^3.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tinyrefine as tr  # noqa: E402
import tinyrefine.functional as F  # noqa: E402
from tinyrefine.functional import common, conv  # noqa: E402
import ops  # noqa: E402

CASES = [("conv3x3 64->64 @160² (N=2)", (2, 64, 160, 160)), ("conv3x3 32->32 @16² (N=8, demo)", (8, 32, 16, 16))]


def median_ms(step, repeat: int) -> float:
    """ops.py's timer (one warm-up call, then the median of ``repeat``), on the CPU: nothing to synchronise."""
    return ops.median_ms(step, lambda: None, repeat)


def tinyrefine_step(x, w, gy):
    xt, wt = tr.Tensor(x, requires_grad=True), tr.Tensor(w, requires_grad=True)
    return lambda: F.conv2d(xt, wt, padding=1, algorithm="im2col").backward(gy)


def whole_im2col(step):
    """step with bands off: one band holding the whole im2col, run inline (the library before issue 13's bands)."""
    def run():
        saved = conv.BAND_BYTES, conv.MIN_BAND_COLUMNS, conv.PARALLEL_MIN_MACS
        conv.BAND_BYTES = conv.MIN_BAND_COLUMNS = conv.PARALLEL_MIN_MACS = 1 << 62
        try:
            step()
        finally:
            conv.BAND_BYTES, conv.MIN_BAND_COLUMNS, conv.PARALLEL_MIN_MACS = saved
    return run


def gemms_alone(x, w, gy):
    """The three GEMMs of a conv's forward and backward, per image, on columns made beforehand."""
    N, C, H, W = x.shape
    cols = F.im2col(x, (3, 3), (1, 1), (1, 1), (1, 1)).reshape(N, C * 9, H * W).copy()
    w2, gy2 = w.reshape(w.shape[0], -1), gy.reshape(N, w.shape[0], -1)

    def run():
        for n in range(N):
            w2 @ cols[n]                      # y
            gy2[n] @ cols[n].T                # dW
            w2.T @ gy2[n]                     # dcols
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    print(f"numpy {np.__version__}, torch {torch.__version__ if torch else 'not installed'} "
          f"({torch.get_num_threads() if torch else 0} threads), tinyrefine threads {tr.get_num_threads()}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, median of {args.repeat}, float32")
    print(f"{'case':34s} {'torch':>8s} {'bands':>8s} {'whole im2col':>13s} {'GEMMs alone':>12s}   (ms; x torch)")
    rng = np.random.default_rng(0)
    for name, shape in CASES:
        x = rng.standard_normal(shape, dtype=np.float32)
        w = (rng.standard_normal((shape[1], shape[1], 3, 3)) * 0.05).astype(np.float32)
        gy = rng.standard_normal(shape, dtype=np.float32)
        step = tinyrefine_step(x, w, gy)
        ms = {"bands": median_ms(step, args.repeat), "whole": median_ms(whole_im2col(step), args.repeat),
              "gemms": median_ms(gemms_alone(x, w, gy), args.repeat)}
        if torch is not None:
            xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
            gt = torch.from_numpy(gy)
            ms["torch"] = median_ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1).backward(gt), args.repeat)
        ref = ms.get("torch", float("nan"))
        cells = " ".join(f"{ms[k]:8.1f} ({ms[k] / ref:4.2f}x)" for k in ("bands", "whole", "gemms"))
        print(f"{name:34s} {ref:8.1f} {cells}")

    print("\nThe cost of splitting small work (2 threads):")
    with tr.num_threads(2):
        handoff = [median_ms(lambda: common.over_ranges(2, lambda a, b: None, 2, 2), 200) for _ in range(3)]
    print(f"  a no-op hand-off to the plane pool (caller + 1 worker): {1000 * min(handoff):.0f}-{1000 * max(handoff):.0f} us")
    a = rng.standard_normal((32, 288), dtype=np.float32)
    b = rng.standard_normal((288, 2048), dtype=np.float32)
    one = two = None
    with tr.num_threads(1):
        one = median_ms(lambda: a @ b, 50)
    with tr.num_threads(2):
        two = median_ms(lambda: a @ b, 50)
    print(f"  the demo layer's forward GEMM 32x288x2048: BLAS 1 thread {1000 * one:.0f} us, 2 threads {1000 * two:.0f} us "
          f"({one / two:.2f}x)")
    big = rng.standard_normal((2048, 2048), dtype=np.float32)
    with tr.num_threads(1):
        peak = 2 * 2048 ** 3 / median_ms(lambda: big @ big, 3) / 1e6
    print(f"  single-thread sgemm 2048^3: {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
