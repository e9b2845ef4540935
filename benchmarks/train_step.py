"""One training step of RefineNet-ResNet-50, tinyrefine beside its PyTorch twin, in one run.

    python benchmarks/train_step.py                        # NumPy vs torch CPU, 256x256 and 320x320
    python benchmarks/train_step.py --sizes 256 --steps 3
    python benchmarks/train_step.py --device cuda          # CuPy vs torch CUDA

A step is: forward, cross-entropy (ignore_index 255), backward, SGD with momentum 0.9.
RefineNet with a ResNet-50 encoder, n_crp 4, frozen BN, batch 2, float32, random data.
Each (framework, size) runs in its own subprocess (this script with --worker), so each
peak RSS (ru_maxrss, absolute, whole process) belongs to one framework alone. Time per
step is the median of --steps steps after one warm-up step. Ratios are
tinyrefine / torch (above 1.0: tinyrefine is slower or bigger).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

CONFIG = dict(num_classes=21, encoder="resnet50", n_crp=4, cascade=4, freeze_bn=True)
LR, MOMENTUM = 1e-3, 0.9


def make_batch(size: int, batch: int, classes: int):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    target = rng.integers(0, classes, (batch, size, size)).astype(np.int64)
    target[:, : size // 8] = 255                            # an ignored border, as VOC's
    return images, target


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


# --------------------------------------------------------------------------- tinyrefine worker
def run_tinyrefine(size: int, batch: int, steps: int, device: str) -> dict:
    import tinyrefine as tr
    import tinyrefine.functional as F
    from tinyrefine import backend
    from tinyrefine.models import RefineNet

    model = RefineNet(**CONFIG).train()
    if device == "cuda":
        model.to("cuda")
    images, target = make_batch(size, batch, CONFIG["num_classes"])
    x = tr.Tensor(backend.to_device(images, device))
    t = backend.to_device(target, device)
    try:
        from tinyrefine.optim import SGD
        optimizer = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        step_params = optimizer.step
        zero_grad = optimizer.zero_grad
    except ImportError:                                       # inline SGD (torch's formulation)
        params = [p for p in model.parameters() if p.requires_grad]
        buffers: dict = {}

        def step_params():
            for p in params:
                if p.grad is None:
                    continue
                v = buffers.get(id(p))
                buffers[id(p)] = v = p.grad.copy() if v is None else v * MOMENTUM + p.grad
                p.data -= LR * v

        def zero_grad():
            for p in params:
                p.grad = None

    def sync():
        if device == "cuda":
            backend.synchronize()

    def step() -> float:
        zero_grad()
        loss = F.cross_entropy(model(x), t, ignore_index=255)
        loss.backward()
        step_params()
        return loss.item()

    return _time_steps(step, sync, steps, extra=lambda: _cupy_peak() if device == "cuda" else {})


def _cupy_peak() -> dict:
    import cupy
    pool = cupy.get_default_memory_pool()
    # the pool keeps every block it ever took from the driver: its total is the high-water mark of
    # reserved memory (the counterpart of torch.cuda.max_memory_reserved)
    return {"gpu_peak_gib": pool.total_bytes() / 2 ** 30}


# --------------------------------------------------------------------------- torch worker
def run_torch(size: int, batch: int, steps: int, device: str, threads: int) -> dict:
    import torch
    from tinyrefine.interop.torch_twin import TorchRefineNet

    torch.set_num_threads(threads)
    model = TorchRefineNet(**CONFIG).to(device).train()   # its own init: weights do not change the cost
    images, target = make_batch(size, batch, CONFIG["num_classes"])
    x, t = torch.from_numpy(images).to(device), torch.from_numpy(target).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), t, ignore_index=255)
        loss.backward()
        optimizer.step()
        return loss.item()

    def extra():
        if device != "cuda":
            return {"threads": torch.get_num_threads()}
        return {"threads": torch.get_num_threads(), "gpu_peak_gib": torch.cuda.max_memory_reserved() / 2 ** 30,
                "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    return _time_steps(step, sync, steps, extra)


def _time_steps(step, sync, steps: int, extra) -> dict:
    losses, times = [], []
    for i in range(steps + 1):                                 # step 0 is the warm-up
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times, "losses": losses,
            "peak_rss_gib": peak_rss_gib(), **extra()}


# --------------------------------------------------------------------------- driver
def spawn(framework: str, args, size: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--size", str(size), "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 320])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--worker", choices=["tinyrefine", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "tinyrefine":
            result = run_tinyrefine(args.size, args.batch, args.steps, args.device)
        else:
            result = run_torch(args.size, args.batch, args.steps, args.device, args.threads)
        print(json.dumps(result))
        return

    memory = "GPU peak" if args.device == "cuda" else "peak RSS"
    print(f"RefineNet-ResNet-50 training step (n_crp 4, frozen BN, batch {args.batch}, float32, SGD momentum {MOMENTUM}), "
          f"device {args.device}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"median of {args.steps} steps after 1 warm-up; {memory} per framework in its own process")
    header = f"{'size':>7}  {'tinyrefine s/step':>17}  {'torch s/step':>12}  {'time ratio':>10}  " \
             f"{'tinyrefine ' + memory + ' GiB':>24}  {'torch ' + memory + ' GiB':>19}  {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    key = "gpu_peak_gib" if args.device == "cuda" else "peak_rss_gib"
    for size in args.sizes:
        ours, theirs = spawn("tinyrefine", args, size), spawn("torch", args, size)
        if "error" in ours or "error" in theirs:
            print(f"{size:>4}px  failed: tinyrefine: {ours.get('error', 'ok')}; torch: {theirs.get('error', 'ok')}")
            if "error" not in ours:  # e.g. a torch without CUDA: tinyrefine's numbers still count
                print(f"{size:>4}px  {ours['median_s']:>17.2f}  {'-':>12}  {'-':>10}  {ours[key]:>24.2f}", flush=True)
            continue
        print(f"{size:>4}px  {ours['median_s']:>17.2f}  {theirs['median_s']:>12.2f}  {ours['median_s'] / theirs['median_s']:>10.2f}  "
              f"{ours[key]:>24.2f}  {theirs[key]:>19.2f}  {ours[key] / theirs[key]:>9.2f}", flush=True)
        print(f"         losses  tinyrefine {['%.4f' % v for v in ours['losses']]}  torch {['%.4f' % v for v in theirs['losses']]}"
              f"  (torch threads in worker: {theirs.get('threads')})", flush=True)


if __name__ == "__main__":
    main()
