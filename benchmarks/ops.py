"""Forward+backward time of the kernels, tinyrefine beside torch, in one run.

    python benchmarks/ops.py                 # NumPy vs torch CPU
    python benchmarks/ops.py --device cuda   # CuPy vs torch CUDA
    python benchmarks/ops.py --repeat 5 --only conv

Prints one row per shape: median milliseconds for each library and the ratio
tinyrefine / torch (below 1.0 means tinyrefine is faster). float32.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tinyrefine as tr  # noqa: E402
import tinyrefine.functional as F  # noqa: E402

CASES = [
    # name, kind, input shape, extra
    ("conv3x3 256->256 @80²", "conv", (2, 256, 80, 80), dict(c_out=256, k=3, padding=1)),
    ("conv3x3 256->256 @40²", "conv", (2, 256, 40, 40), dict(c_out=256, k=3, padding=1)),
    ("conv3x3 512->512 @20²", "conv", (2, 512, 20, 20), dict(c_out=512, k=3, padding=1)),
    ("conv3x3 64->64 @160²", "conv", (2, 64, 160, 160), dict(c_out=64, k=3, padding=1)),
    ("conv1x1 2048->512 @10²", "conv", (2, 2048, 10, 10), dict(c_out=512, k=1, padding=0)),
    ("maxpool5 s1 p2 (4,256,80²)", "maxpool", (4, 256, 80, 80), {}),
    ("bilinear x2 (4,256,40²)", "bilinear", (4, 256, 40, 40), {}),
]


def _sync(device: str) -> None:
    if device == "cuda":
        tr.backend.synchronize()


def _torch_sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(step, sync, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def tinyrefine_step(kind, x_np, extra, device):
    x = tr.Tensor(x_np, requires_grad=True).to(device)
    x.requires_grad = True
    if kind == "conv":
        rng = np.random.default_rng(1)
        w = tr.Tensor(rng.standard_normal((extra["c_out"], x_np.shape[1], extra["k"], extra["k"]), dtype=np.float32) * 0.01,
                      requires_grad=True).to(device)
        w.requires_grad = True
        fn = lambda: F.conv2d(x, w, padding=extra["padding"])  # noqa: E731
    elif kind == "maxpool":
        fn = lambda: F.max_pool2d(x, 5, 1, 2)  # noqa: E731
    else:
        fn = lambda: F.interpolate(x, scale_factor=2, align_corners=True)  # noqa: E731
    xp = tr.get_array_module(x.data)
    upstream = None

    def step():
        nonlocal upstream
        y = fn()
        if upstream is None:
            upstream = xp.asarray(np.random.default_rng(2).standard_normal(y.shape, dtype=np.float32))
        y.backward(upstream)
    return step


def torch_step(kind, x_np, extra, device):
    import torch
    x = torch.tensor(x_np, device=device, requires_grad=True)
    if kind == "conv":
        rng = np.random.default_rng(1)
        w = torch.tensor(rng.standard_normal((extra["c_out"], x_np.shape[1], extra["k"], extra["k"]), dtype=np.float32) * 0.01,
                         device=device, requires_grad=True)
        fn = lambda: torch.nn.functional.conv2d(x, w, padding=extra["padding"])  # noqa: E731
    elif kind == "maxpool":
        fn = lambda: torch.nn.functional.max_pool2d(x, 5, 1, 2)  # noqa: E731
    else:
        fn = lambda: torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)  # noqa: E731
    upstream = None

    def step():
        nonlocal upstream
        y = fn()
        if upstream is None:
            upstream = torch.tensor(np.random.default_rng(2).standard_normal(tuple(y.shape), dtype=np.float32), device=device)
        y.backward(upstream)
        x.grad = None
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    args = parser.parse_args()
    try:
        import torch
        torch_ok = True
        threads = torch.get_num_threads()
    except ImportError:
        torch_ok, threads = False, 0
    missing = "not installed"
    if torch_ok and args.device == "cuda" and not torch.cuda.is_available():  # a CPU-only torch: tinyrefine alone
        torch_ok, missing = False, f"{torch.__version__} without CUDA (not run)"
    print(f"device={args.device}  numpy {np.__version__}  torch {'%s (%d threads)' % (torch.__version__, threads) if torch_ok else missing}"
          f"  median of {args.repeat}, forward+backward, float32")
    print(f"{'case':30s} {'tinyrefine ms':>14s} {'torch ms':>10s} {'ratio':>7s}")
    for name, kind, shape, extra in CASES:
        if args.only and args.only not in name and args.only not in kind:
            continue
        x_np = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        ours = median_ms(tinyrefine_step(kind, x_np, extra, args.device), lambda: _sync(args.device), args.repeat)
        if torch_ok:
            theirs = median_ms(torch_step(kind, x_np, extra, args.device), lambda: _torch_sync(args.device), args.repeat)
            print(f"{name:30s} {ours:14.1f} {theirs:10.1f} {ours / theirs:6.2f}x")
        else:
            print(f"{name:30s} {ours:14.1f} {'-':>10s} {'-':>7s}")


if __name__ == "__main__":
    main()
