"""Where a training step's time goes, op by op, tinyrefine beside its torch twin, in one run.

    python benchmarks/profile_step.py                      # the demo step, 1 thread each
    python benchmarks/profile_step.py --threads 2 --steps 10
    python benchmarks/profile_step.py --case r50 --steps 2 --no-layers
    python benchmarks/profile_step.py --batch 1 --no-layers     # what a step costs with (almost) no data

Issue 13 left the demo step at 1.4-1.9x torch while its most frequent conv alone was 0.5-1.3x: this splits
the step. Two tables:
  ops:    milliseconds per step in each kind of op, forward + backward, tinyrefine (timed around each
          Function's forward and backward) beside torch (torch.profiler, self CPU time of its aten ops,
          grouped the same way); "outside the ops" is the step's wall time less the ops (Python, the engine,
          graph bookkeeping). The profilers cost time themselves: compare rows, not the totals with
          contention.py's.
  layers: every distinct conv2d of the network (shape, count in one step), forward + backward alone,
          tinyrefine and torch alternating call by call in this process, and their sum weighted by count.
With --threads above 1 the two libraries' idle threads spin against each other in one process: the layers
table then runs each library in its own process, one after the other.
Models and data as contention.py (demo: ResNet-18 width 16, batch 8, 64x64; r50: batch 2, 256x256); --batch
changes the batch. A step at batch 1 is mostly fixed cost per op (Python, numpy's per-call overhead, the
engine): comparing it with batch 8 splits the demo's gap into a fixed part and a part that grows with the data.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from contention import case_shape, make_batch, tinyrefine_step, torch_step  # noqa: E402
from tinyrefine.functional.common import _out_size  # noqa: E402

# torch's aten ops, by the same kinds as tinyrefine's Functions (first match wins; at batch 1 torch's CPU conv is
# its own im2col, aten::_slow_conv2d_forward/backward, not oneDNN). Rough: "optimizer" takes
# every in-place mul_/add_/zero_, batch norm's running-statistics updates included
KINDS = [("conv2d", ("convolution", "slow_conv2d")), ("max pool", ("max_pool",)), ("batch norm", ("batch_norm",)),
         ("relu", ("relu", "threshold", "clamp_min")), ("upsample", ("upsample",)),
         ("cross entropy", ("nll_loss", "log_softmax", "cross_entropy")), ("optimizer", ("sgd", "mul_", "add_", "zero_")),
         ("add", ("aten::add",))]
OURS = {"Conv2dFunction": "conv2d", "Conv2dWinogradFunction": "conv2d", "MaxPool2dFunction": "max pool",
        "BatchNorm": "batch norm", "ReLUFunction": "relu", "Bilinear": "upsample", "CrossEntropy": "cross entropy",
        "Add": "add"}


def kind_of_torch_op(name: str) -> str:
    for kind, needles in KINDS:
        if any(n in name for n in needles):
            return kind
    return "other ops"


def profile_tinyrefine(config, images, target, steps: int, threads: int) -> dict:
    """ms per step by kind of op (forward + backward), and the step's wall time."""
    from tinyrefine import engine
    from tinyrefine.optim import SGD
    spent = collections.defaultdict(float)
    call = engine.Function.__call__

    def timed_call(self, *inputs):
        start = time.perf_counter()
        out = call(self, *inputs)
        spent[OURS.get(type(self).__name__, "other ops")] += time.perf_counter() - start
        return out

    def timed_backward(cls):
        backward = cls.backward

        def wrapper(self, gy):
            start = time.perf_counter()
            out = backward(self, gy)
            spent[OURS.get(type(self).__name__, "other ops")] += time.perf_counter() - start
            return out
        return wrapper

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    step, _ = tinyrefine_step(config, images, target, str(threads), retain_heap=False)   # torch shares this process
    originals = {cls: cls.backward for cls in subclasses(engine.Function) if "backward" in vars(cls)}
    original_step = SGD.step

    def timed_step(self):
        start = time.perf_counter()
        original_step(self)
        spent["optimizer"] += time.perf_counter() - start
    try:
        engine.Function.__call__ = timed_call
        for cls in originals:
            cls.backward = timed_backward(cls)
        SGD.step = timed_step
        step()
        spent.clear()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    finally:
        engine.Function.__call__ = call
        for cls, backward in originals.items():
            cls.backward = backward
        SGD.step = original_step
    return {"kinds": {k: v / steps * 1e3 for k, v in spent.items()}, "wall": wall * 1e3}


def profile_torch(config, images, target, steps: int, threads: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(threads)
    step, _ = torch_step(config, images, target, str(threads))
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    spent = collections.defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):   # ops only (the optimizer's named range is not one: its ops count)
            spent[kind_of_torch_op(event.key)] += event.self_cpu_time_total / 1e3   # microseconds -> ms
    return {"kinds": {k: v / steps for k, v in spent.items()}, "wall": wall * 1e3}


# --------------------------------------------------------------------------- conv layers alone
def conv_geometries(config, images) -> list:
    """Each distinct conv2d call of one forward: (x shape, w shape, stride, padding, dilation, x needs grad, count)."""
    import tinyrefine as tr
    import tinyrefine.functional as F
    from tinyrefine.models import RefineNet
    seen = collections.Counter()
    real = F.conv2d

    def recording(x, weight, bias=None, stride=1, padding=0, dilation=1, algorithm="auto"):
        seen[(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, x.requires_grad)] += 1
        return real(x, weight, bias, stride, padding, dilation, algorithm)
    F.conv2d = recording                                              # the module the layers call through
    try:
        with tr.no_grad():
            RefineNet(**config).train()(tr.Tensor(images))
    finally:
        F.conv2d = real
    # no_grad: requires_grad of activations is False; every conv but the first takes an activation with grad
    first = next(iter(seen))
    return [(*g[:5], g != first, n) for g, n in seen.items()]


def layer_runner(framework: str, geometry):
    x_shape, w_shape, stride, padding, dilation, x_grad, _ = geometry
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) * 0.1).astype(np.float32)
    out_hw = [_out_size(x_shape[2 + a], w_shape[2 + a], stride, padding, dilation) for a in (0, 1)]
    gy = rng.standard_normal((x_shape[0], w_shape[0], *out_hw)).astype(np.float32)
    if framework == "torch":
        import torch
        xt, wt, gyt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(gy)

        def run():
            a, b = xt.detach().requires_grad_(x_grad), wt.detach().requires_grad_(True)
            torch.nn.functional.conv2d(a, b, None, stride, padding, dilation).backward(gyt)
        return run
    import tinyrefine as tr
    import tinyrefine.functional as F

    def run():
        F.conv2d(tr.Tensor(x, requires_grad=x_grad), tr.Tensor(w, requires_grad=True), None,
                 stride, padding, dilation).backward(gy)
    return run


def time_layers(frameworks, geometries, repeat: int) -> dict:
    """Median ms per call, {framework: [per geometry]}, the frameworks alternating call by call."""
    result = {f: [] for f in frameworks}
    for geometry in geometries:
        runs = {f: layer_runner(f, geometry) for f in frameworks}
        times = {f: [] for f in frameworks}
        for f in frameworks:
            runs[f]()                                                  # warm-up
        for _ in range(repeat):
            for f in frameworks:
                start = time.perf_counter()
                runs[f]()
                times[f].append(time.perf_counter() - start)
        for f in frameworks:
            result[f].append(statistics.median(times[f]) * 1e3)
    return result


def layers_in_subprocess(args, framework: str) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), "--layers-worker", framework, "--case", args.case,
           "--threads", str(args.threads), "--repeat", str(args.repeat)] + (["--batch", str(args.batch)] if args.batch else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"layers worker ({framework}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def set_threads(n: int) -> None:
    import torch
    import tinyrefine as tr
    tr.set_num_threads(n)
    torch.set_num_threads(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=["demo", "r50"], default="demo")
    parser.add_argument("--threads", type=int, default=1, help="threads for both libraries (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default: demo 10, r50 2)")
    parser.add_argument("--repeat", type=int, default=None, help="calls per conv layer (default: demo 15, r50 3)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: demo 8, r50 2)")
    parser.add_argument("--no-layers", action="store_true", help="skip the conv layers table")
    parser.add_argument("--layers-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    args.steps = args.steps or (10 if args.case == "demo" else 2)
    args.repeat = args.repeat or (15 if args.case == "demo" else 3)
    config, batch, size = case_shape(args.case, 256)
    batch = args.batch or batch
    images, target = make_batch(batch, size, config["num_classes"])
    set_threads(args.threads)
    if args.layers_worker:
        print(json.dumps(time_layers([args.layers_worker], conv_geometries(config, images), args.repeat)[args.layers_worker]))
        return

    print(f"{args.case} step, batch {batch}, {args.threads} thread(s) each, {os.cpu_count()} cores, load average "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    ours = profile_tinyrefine(config, images, target, args.steps, args.threads)
    theirs = profile_torch(config, images, target, args.steps, args.threads)
    print(f"\nops: ms per step, forward + backward ({args.steps} steps)")
    print(f"{'kind':<22} {'tinyrefine':>10} {'torch':>8} {'ratio':>7}")
    kinds = sorted(set(ours["kinds"]) | set(theirs["kinds"]), key=lambda k: -ours["kinds"].get(k, 0))
    for kind in kinds:
        a, b = ours["kinds"].get(kind, 0.0), theirs["kinds"].get(kind, 0.0)
        print(f"{kind:<22} {a:>10.1f} {b:>8.1f} {(f'{a / b:.2f}x' if b else '-'):>7}")
    outside = {name: r["wall"] - sum(r["kinds"].values()) for name, r in (("ours", ours), ("theirs", theirs))}
    print(f"{'outside the ops':<22} {outside['ours']:>10.1f} {outside['theirs']:>8.1f}")
    print(f"{'step (profiled)':<22} {ours['wall']:>10.1f} {theirs['wall']:>8.1f} {ours['wall'] / theirs['wall']:>6.2f}x")
    if args.no_layers:
        return

    geometries = conv_geometries(config, images)
    if args.threads == 1:
        times = time_layers(["tinyrefine", "torch"], geometries, args.repeat)
    else:
        times = {f: layers_in_subprocess(args, f) for f in ("tinyrefine", "torch")}
    print(f"\nlayers: conv2d forward + backward alone, ms per call (median of {args.repeat}), largest gap first")
    print(f"{'input':<20} {'weight':<20} {'s':>1} {'p':>1} {'calls':>5} {'tinyrefine':>10} {'torch':>7} {'ratio':>6} "
          f"{'gap x calls':>11}")
    rows = sorted(zip(geometries, times["tinyrefine"], times["torch"]), key=lambda r: -(r[1] - r[2]) * r[0][6])
    for (x_shape, w_shape, stride, padding, _, _, count), a, b in rows:
        print(f"{str(x_shape):<20} {str(w_shape):<20} {stride:>1} {padding:>1} {count:>5} {a:>10.3f} {b:>7.3f} "
              f"{a / b:>5.2f}x {(a - b) * count:>11.2f}")
    total = [sum(t * g[6] for t, g in zip(times[f], geometries)) for f in ("tinyrefine", "torch")]
    print(f"{'all convs of one step':<56} {total[0]:>10.1f} {total[1]:>7.1f} {total[0] / total[1]:>5.2f}x")
    print("load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
