"""One training step of DeepLabV3-ResNet-50: tinyrefine beside torchvision's model, in one run.

    python benchmarks/deeplab_step.py                     # CPU, 256x256
    python benchmarks/deeplab_step.py --sizes 192 256 --steps 3 --model fcn

A step is: forward, cross-entropy (ignore_index 255), backward, SGD with momentum 0.9 and
weight decay 1e-4 (torchvision's reference recipe). torchvision's ``deeplabv3_resnet50``
(or ``fcn_resnet50``) with 21 classes, no aux head, output stride 8, BN in training mode,
batch 2, float32, random data; tinyrefine's DeepLabV3/FCN with the same names and shapes.
Each framework runs in its own subprocess, so each peak RSS (ru_maxrss, whole process)
belongs to one framework alone; time per step is the median of --steps steps after one
warm-up step. Ratios are tinyrefine / torch (above 1.0: tinyrefine is slower or bigger).
The two start from different random weights and dropout masks, so their losses differ.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

from train_step import _time_steps, make_batch  # noqa: E402  (the same batch and timing as the RefineNet step)

LR, MOMENTUM, WEIGHT_DECAY, CLASSES = 0.01, 0.9, 1e-4, 21


def run_tinyrefine(model_name: str, size: int, batch: int, steps: int) -> dict:
    import tinyrefine as tr
    import tinyrefine.functional as F
    from tinyrefine.models import FCN, DeepLabV3
    from tinyrefine.optim import SGD

    model = (DeepLabV3 if model_name == "deeplabv3" else FCN)(CLASSES, "resnet50").train()
    images, target = make_batch(size, batch, CLASSES)
    x = tr.Tensor(images)
    optimizer = SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target, ignore_index=255)
        loss.backward()
        optimizer.step()
        return loss.item()

    return _time_steps(step, lambda: None, steps, lambda: {})


def run_torch(model_name: str, size: int, batch: int, steps: int, threads: int) -> dict:
    import torch
    # torchvision's compiled ops do not load with the CPU wheel; its model code is pure Python
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision.models.segmentation as segmentation

    torch.set_num_threads(threads)
    build = segmentation.deeplabv3_resnet50 if model_name == "deeplabv3" else segmentation.fcn_resnet50
    model = build(weights=None, weights_backbone=None, num_classes=CLASSES, aux_loss=False).train()
    images, target = make_batch(size, batch, CLASSES)
    x, t = torch.from_numpy(images), torch.from_numpy(target)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x)["out"], t, ignore_index=255)
        loss.backward()
        optimizer.step()
        return loss.item()

    return _time_steps(step, lambda: None, steps, lambda: {"threads": torch.get_num_threads()})


def spawn(framework: str, args, size: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--model", args.model, "--size", str(size),
           "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["deeplabv3", "fcn"], default="deeplabv3")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--worker", choices=["tinyrefine", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "tinyrefine":
            result = run_tinyrefine(args.model, args.size, args.batch, args.steps)
        else:
            result = run_torch(args.model, args.size, args.batch, args.steps, args.threads)
        print(json.dumps(result))
        return 0

    print(f"{args.model}_resnet50 training step (output stride 8, BN trained, batch {args.batch}, float32, SGD momentum "
          f"{MOMENTUM}), CPU, {os.cpu_count()} cores, torch threads {args.threads}, load average "
          f"{os.getloadavg()[0]:.1f}; median of {args.steps} steps after 1 warm-up; peak RSS per framework in its "
          f"own process")
    header = (f"{'size':>7}  {'tinyrefine s/step':>17}  {'torch s/step':>12}  {'time ratio':>10}  "
              f"{'tinyrefine peak RSS GiB':>23}  {'torch peak RSS GiB':>18}  {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    failed = False
    for size in args.sizes:
        ours, theirs = spawn("tinyrefine", args, size), spawn("torch", args, size)
        if "error" in ours or "error" in theirs:
            print(f"{size:>4}px  failed: tinyrefine: {ours.get('error', 'ok')}; torch: {theirs.get('error', 'ok')}")
            failed = True
            continue
        print(f"{size:>4}px  {ours['median_s']:>17.2f}  {theirs['median_s']:>12.2f}  "
              f"{ours['median_s'] / theirs['median_s']:>10.2f}  {ours['peak_rss_gib']:>23.2f}  "
              f"{theirs['peak_rss_gib']:>18.2f}  {ours['peak_rss_gib'] / theirs['peak_rss_gib']:>9.2f}", flush=True)
        print(f"         losses  tinyrefine {['%.4f' % v for v in ours['losses']]}  "
              f"torch {['%.4f' % v for v in theirs['losses']]}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
