"""Forward+backward time of the kernels, tinyrefine beside torch, in one run.

    python benchmarks/ops.py                 # NumPy vs torch CPU
    python benchmarks/ops.py --device cuda   # CuPy vs torch CUDA
    python benchmarks/ops.py --repeat 5 --only conv
    python benchmarks/ops.py --only conv3x3 --sweep --json notebooks/data/fast_convolution_benchmark.json
    python benchmarks/ops.py --only conv3x3 --paired 15    # calls in turns: ratios that survive drift

3x3 convolutions get one row per algorithm (--algorithms: im2col, winograd = F(2x2,3x3), winograd4 =
F(4x4,3x3), auto = what F.conv2d picks); --sweep adds the grid of channels x map sizes that
``winograd.choose_algorithm`` was decided from (tinyrefine only); --json writes every number, with the load average.

Prints one row per shape: median milliseconds for each library and the ratio
tinyrefine / torch (below 1.0 means tinyrefine is faster). float32.

--paired R: the plain mode times all of torch's calls, then all of ours; on these shared machines the
whole machine's speed drifts by 10-40% within minutes, so the same code measured 0.97x and 1.35x in two
runs (issue 13). Paired mode takes the calls in turns instead: R rounds, each giving every algorithm's
step and torch's step one turn (the order reversed every other round), with a pause before each turn so
that the other library's idle threads have stopped spinning. A turn is one call of a large kernel, or as
many calls of a small one as make MIN_TURN_S. Each round gives each algorithm a ratio to torch's turn in
that same round; the table shows the median times per call, the median ratio and its quartiles.
"""
from __future__ import annotations

import argparse
import json
import math
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
    ("maxpool5 s1 p2 (8,32,16²) demo", "maxpool", (8, 32, 16, 16), {}),   # the demo network's CRP pools
    ("maxpool5 s1 p2 (8,32,8²) demo", "maxpool", (8, 32, 8, 8), {}),
    ("maxpool5 s1 p2 (8,64,2²) demo", "maxpool", (8, 64, 2, 2), {}),
    ("bilinear x2 (4,256,40²)", "bilinear", (4, 256, 40, 40), {}),
    # issue 12's kernels: the pooling matrices, conv_transpose2d = col2im(W^T x), max_unpool2d's sorted scatter
    ("avgpool3 s2 p1 (4,256,80²)", "avgpool", (4, 256, 80, 80), {}),
    ("adaptive avg ->1 (4,2048,32²)", "adaptive", (4, 2048, 32, 32), dict(size=1)),
    ("adaptive avg ->6 (4,512,40²)", "adaptive", (4, 512, 40, 40), dict(size=6)),
    ("convT4 s2 256->256 @40²", "convT", (2, 256, 40, 40), dict(c_out=256, k=4, stride=2, padding=1)),
    ("convT16 s8 21->21 @20² (FCN)", "convT", (2, 21, 20, 20), dict(c_out=21, k=16, stride=8, padding=4)),
    ("maxunpool2 (4,64,80²)->160²", "unpool", (4, 64, 160, 160), {}),
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


def _leaf(array, requires_grad: bool, device: str):
    t = tr.Tensor(array).to(device)
    t.requires_grad = requires_grad
    return t


def tinyrefine_step(kind, x_np, extra, device, algorithm: str = "auto"):
    x = tr.Tensor(x_np, requires_grad=True).to(device)
    x.requires_grad = True
    if kind == "conv":
        rng = np.random.default_rng(1)
        w = tr.Tensor(rng.standard_normal((extra["c_out"], x_np.shape[1], extra["k"], extra["k"]), dtype=np.float32) * 0.01,
                      requires_grad=True).to(device)
        w.requires_grad = True
        fn = lambda: F.conv2d(x, w, padding=extra["padding"], algorithm=algorithm)  # noqa: E731
    elif kind == "maxpool":
        fn = lambda: F.max_pool2d(x, 5, 1, 2)  # noqa: E731
    elif kind in ("avgpool", "adaptive", "convT", "unpool"):
        fn = _issue12_fn(F, lambda a, grad: _leaf(a, grad, device), kind, x, x_np, extra)
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


def _issue12_fn(functional, make_tensor, kind, x, x_np, extra):
    """The step of an issue-12 case, written once for both libraries: ``functional`` is F or
    torch.nn.functional (same names and arguments); ``make_tensor(array, requires_grad)`` makes a
    tensor on the benchmark's device."""
    if kind == "avgpool":
        return lambda: functional.avg_pool2d(x, 3, 2, 1)
    if kind == "adaptive":
        return lambda: functional.adaptive_avg_pool2d(x, extra["size"])
    if kind == "convT":
        w = np.random.default_rng(1).standard_normal((x_np.shape[1], extra["c_out"], extra["k"], extra["k"]), dtype=np.float32)
        w = make_tensor(w * 0.01, True)
        return lambda: functional.conv_transpose2d(x, w, stride=extra["stride"], padding=extra["padding"])
    # unpool: indices from a 2x2 max-pool of x (made on the CPU, the same for both), the pooled map as the leaf
    pooled, indices = F.max_pool2d(tr.Tensor(x_np), 2, 2, return_indices=True)
    pooled, indices = make_tensor(pooled.data, True), make_tensor(indices.data, False)
    return lambda: functional.max_unpool2d(pooled, indices, 2, 2)


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
    elif kind in ("avgpool", "adaptive", "convT", "unpool"):
        fn = _issue12_fn(torch.nn.functional, lambda a, grad: torch.tensor(a, device=device, requires_grad=grad),
                         kind, x, x_np, extra)
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


PAUSE_S = 0.2      # before each paired turn: OpenBLAS's idle threads spin about 0.1 s after a GEMM
MIN_TURN_S = 0.05  # a turn repeats its call until it lasts this long (one call of a large kernel): a single call of
                   # a small one after the pause was mostly waking threads up (torch's 0.1 ms 2x2 pool took 10 ms)


def paired_rows(name: str, steps: dict, torch_call, sync, rounds: int) -> list:
    """Time each of ``steps`` (algorithm -> step) and ``torch_call`` in turns, ``rounds`` times (see --paired)."""
    calls = dict(steps, torch=torch_call)
    calls_per_turn = {}
    for key, call in calls.items():   # warm-up (scratch buffers, plans, first-touch page faults), then one timed call
        call()
        sync()
        start = time.perf_counter()
        call()
        sync()
        calls_per_turn[key] = max(1, math.ceil(MIN_TURN_S / max(time.perf_counter() - start, 1e-6)))
    times = {key: [] for key in calls}
    for r in range(rounds):
        for key in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            for _ in range(calls_per_turn[key]):
                calls[key]()
            sync()
            times[key].append((time.perf_counter() - start) / calls_per_turn[key] * 1e3)
    rows = []
    for algorithm in steps:
        ratios = [ours / theirs for ours, theirs in zip(times[algorithm], times["torch"])]
        q1, median, q3 = np.percentile(ratios, [25, 50, 75])
        ours, theirs = float(np.median(times[algorithm])), float(np.median(times["torch"]))
        print(f"{name:30s} {algorithm:>10s} {ours:14.1f} {theirs:10.1f} {median:6.2f}x  ({q1:.2f}-{q3:.2f})", flush=True)
        rows.append(dict(case=name, algorithm=algorithm, ms=ours, torch_ms=theirs, paired_ratio=float(median),
                         ratio_quartiles=[float(q1), float(q3)], rounds=rounds,
                         calls_per_turn=calls_per_turn[algorithm], torch_calls_per_turn=calls_per_turn["torch"]))
    return rows


SWEEP_CHANNELS, SWEEP_SIZES = (32, 64, 128, 256, 512), (10, 20, 40, 80, 160)


def winograd_sweep(device: str, repeat: int) -> list:
    """3x3 stride-1 pad-1 conv fwd+bwd, batch 2, C -> C: im2col against both Winograd tiles (the auto rule's data)."""
    print(f"\nWinograd sweep (tinyrefine only, batch 2, C -> C, 3x3 pad 1), median of {repeat} ms; ratio = winograd / im2col")
    print(f"{'C':>5s} {'HxW':>5s} {'im2col':>9s} {'winograd':>9s} {'winograd4':>10s} {'w2/i2c':>7s} {'w4/i2c':>7s}")
    rows = []
    for c in SWEEP_CHANNELS:
        for size in SWEEP_SIZES:
            if c * size * size > 256 * 80 * 80:  # larger than any RefineNet decoder map we train on: skipped
                continue
            x_np = np.random.default_rng(0).standard_normal((2, c, size, size), dtype=np.float32)
            extra = dict(c_out=c, k=3, padding=1)
            ms = {a: median_ms(tinyrefine_step("conv", x_np, extra, device, a), lambda: _sync(device), repeat)
                  for a in ("im2col", "winograd", "winograd4")}
            rows.append(dict(channels=c, size=size, **{f"{a}_ms": v for a, v in ms.items()}))
            print(f"{c:5d} {size:5d} {ms['im2col']:9.1f} {ms['winograd']:9.1f} {ms['winograd4']:10.1f} "
                  f"{ms['winograd'] / ms['im2col']:6.2f}x {ms['winograd4'] / ms['im2col']:6.2f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--algorithms", default="im2col,winograd,winograd4,auto",
                        help="conv2d algorithms timed on the 3x3 cases (others run 'auto')")
    parser.add_argument("--sweep", action="store_true", help="also time the Winograd-vs-im2col grid")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="take tinyrefine's and torch's calls in turns, ROUNDS rounds (needs torch; see above)")
    parser.add_argument("--json", default="", help="write the results (and the load average) to this file")
    args = parser.parse_args()
    load_before = os.getloadavg()
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
          f"  {f'{args.paired} paired rounds' if args.paired else f'median of {args.repeat}'}, forward+backward, float32")
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} on {os.cpu_count()} cores")
    if args.paired and not torch_ok:
        parser.error(f"--paired needs torch beside tinyrefine (torch: {missing})")
    if args.paired:
        print(f"paired: {args.paired} rounds, calls in turns; ratio = median over rounds (quartiles)")
    print(f"{'case':30s} {'algorithm':>10s} {'tinyrefine ms':>14s} {'torch ms':>10s} {'ratio':>7s}")
    rows = []
    for name, kind, shape, extra in CASES:
        if args.only and args.only not in name and args.only not in kind:
            continue
        x_np = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        algorithms = args.algorithms.split(",") if kind == "conv" and extra["k"] == 3 else ["auto"]
        if args.paired:
            steps = {a: tinyrefine_step(kind, x_np, extra, args.device, a) for a in algorithms}
            rows += paired_rows(name, steps, torch_step(kind, x_np, extra, args.device),
                                lambda: (_sync(args.device), _torch_sync(args.device)), args.paired)
            continue
        theirs = median_ms(torch_step(kind, x_np, extra, args.device), lambda: _torch_sync(args.device),
                           args.repeat) if torch_ok else None
        for algorithm in algorithms:
            ours = median_ms(tinyrefine_step(kind, x_np, extra, args.device, algorithm), lambda: _sync(args.device),
                             args.repeat)
            ratio = f"{ours / theirs:6.2f}x" if theirs else "      -"
            print(f"{name:30s} {algorithm:>10s} {ours:14.1f} {theirs or float('nan'):10.1f} {ratio}", flush=True)
            rows.append(dict(case=name, algorithm=algorithm, ms=ours, torch_ms=theirs))
    sweep = winograd_sweep(args.device, args.repeat) if args.sweep else []
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command="python " + " ".join(sys.argv), device=args.device, numpy=np.__version__, torch=torch.__version__ if torch_ok else None,
                           torch_threads=threads, repeat=args.repeat, paired=args.paired, cores=os.cpu_count(), load_before=load_before,
                           load_after=load_after, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           rows=rows, sweep=sweep), f, indent=1)
        print("wrote", args.json)


if __name__ == "__main__":
    main()
