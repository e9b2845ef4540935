"""The first training steps of an untrained RefineNet, under each initialisation / warm-up fix.

Issue 15's probe (voc-small, ResNet-18 width 32, decoder 64, crop 192, batch 4, Adam 2e-3 on both groups,
BN trained, scale 0.5-1.5) started at loss 2.90 and jumped to 30,635 at its second step. This script runs
the same first N steps (same data, same batches, same seed) for each variant and prints the losses side by
side, so the cause and each fix are measured one by one:

    python benchmarks/first_steps.py --data voc:../shared/data/voc-small/VOC2012 --steps 30

Variants: the default init (torch's, as the paper's code), zero-initialised residual branches (ours, after
Fixup / zero-gamma), a linear LR warm-up (Goyal et al. 2017), and both.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

import numpy as np

from tinyrefine.train import TrainConfig, train

VARIANTS = {
    "default init": dict(zero_init_residual=False, warmup_iters=0),
    "zero-init branches": dict(zero_init_residual=True, warmup_iters=0),
    "warm-up 100": dict(zero_init_residual=False, warmup_iters=100),
    "zero-init + warm-up 100": dict(zero_init_residual=True, warmup_iters=100),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--iters", type=int, default=500, help="the schedule's length (as in the full run)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from: " + ", ".join(VARIANTS))
    p.add_argument("--json", default=None, help="also write the losses here")
    args = p.parse_args(argv)
    base = TrainConfig(data=args.data, encoder="resnet18", encoder_width=32, features=64, crop=192, batch_size=4,
                       iters=args.iters, optimizer="adam", lr=2e-3, encoder_lr=2e-3, weight_decay=0.0,
                       freeze_bn=False, scale_min=0.5, scale_max=1.5, checkpoint_every=10 ** 9)
    losses = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            sys.exit(f"first_steps: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        with tempfile.TemporaryDirectory() as out:
            config = dataclasses.replace(base, out=out, **VARIANTS[name])
            tick = time.perf_counter()
            result = train(config, progress=False, stop_after=args.steps)
            losses[name] = result["history"]["loss"]
            print(f"{name}: {time.perf_counter() - tick:.0f} s", file=sys.stderr)
    shown = [s for s in (1, 2, 3, 5, 10, 20, 30, 50, 100) if s <= args.steps]
    header = f"{'variant':26s}" + "".join(f"{'step ' + str(s):>10s}" for s in shown) + f"{'max':>10s}{'mean':>10s}"
    print(header)
    for name, values in losses.items():
        print(f"{name:26s}" + "".join(f"{values[s - 1]:10.3g}" for s in shown)
              + f"{max(values):10.3g}{np.mean(values):10.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(losses, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
