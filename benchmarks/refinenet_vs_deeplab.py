"""RefineNet against DeepLabv3 on the same encoder and the same time budget (notebook 11's runs).

    OPENBLAS_NUM_THREADS=1 python benchmarks/refinenet_vs_deeplab.py --model refinenet
    OPENBLAS_NUM_THREADS=1 python benchmarks/refinenet_vs_deeplab.py --model deeplabv3

Each call trains one model from scratch on camvid-mini (ResNet-18 at width 32; RefineNet's decoder
and DeepLabv3's ASPP both 64 channels; 192² crops, batch 4, Adam 2e-3 with 20 warm-up iterations, as
the budget allows few; BN trained) for about --budget-s seconds of training: it first times 3 steps,
then sets the number of iterations (and so the poly schedule) to fill the budget. It then scores val
mIoU at the masks' full size (the network sees the shorter side at 240) and merges the result into
--out (JSON). The machine is shared, so the JSON records the wall time, the load average and the s/iteration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402

from tinyrefine.engine import Tensor  # noqa: E402
from tinyrefine.train import (TrainConfig, build_datasets, build_model, build_optimizer,  # noqa: E402
                              segmentation_loss, train)
from tinyrefine.data import DataLoader, train_transform  # noqa: E402

SETTINGS = dict(encoder="resnet18", encoder_width=32, features=64, crop=192, batch_size=4, optimizer="adam",
                lr=2e-3, encoder_lr=2e-3, weight_decay=0.0, freeze_bn=False, warmup_iters=20, eval_size=240,
                checkpoint_every=10 ** 6, seed=0)
MODELS = {"refinenet": dict(model="refinenet"), "deeplabv3": dict(model="deeplabv3", output_stride=8),
          "deeplabv3-os16": dict(model="deeplabv3", output_stride=16)}


def seconds_per_step(config: TrainConfig, steps: int = 3) -> float:
    """Median time of ``steps`` training steps after one warm-up, on real batches."""
    train_set, _, num_classes = build_datasets(config)
    model = build_model(config, num_classes).train()
    optimizer = build_optimizer(config, model)
    transform = train_transform(config.crop, (config.scale_min, config.scale_max))
    loader = DataLoader(train_set, config.batch_size, shuffle=True, transform=transform, seed=config.seed)
    times = []
    for i, (images, masks) in zip(range(steps + 1), loader):
        start = time.perf_counter()
        optimizer.zero_grad()
        segmentation_loss(model(Tensor(images)), masks).backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--data", default="camvid:" + os.path.join(HERE, "..", "..", "shared", "data", "camvid-mini"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="training time to fill (seconds)")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "notebooks", "data", "refinenet_vs_deeplabv3.json"))
    args = parser.parse_args()

    config = TrainConfig(data=args.data, **SETTINGS, **MODELS[args.model])
    load_before = os.getloadavg()[0]
    per_step = seconds_per_step(config)
    config.iters = max(10, int(args.budget_s / per_step))
    print(f"{args.model}: {per_step:.2f} s/step measured, {config.iters} iterations for {args.budget_s:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as out:
        config.out = out
        start = time.perf_counter()
        result = train(config, progress=False, log_every_s=60.0)
        wall = time.perf_counter() - start
    history = result["history"]
    record = {"settings": {**SETTINGS, **MODELS[args.model], "data": os.path.basename(args.data.rstrip("/"))},
              "iterations": config.iters, "probe_s_per_step": per_step, "wall_s_with_eval": wall,
              "val_miou": result["val"]["mean_iou"], "val_pixel_acc": result["val"]["pixel_acc"],
              "val_iou": result["val"].get("iou"), "loss": history["loss"],
              "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
              "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
              "command": f"OPENBLAS_NUM_THREADS=1 python benchmarks/refinenet_vs_deeplab.py --model {args.model} "
                         f"--budget-s {args.budget_s:.0f}"}
    merged = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            merged = json.load(f)
    merged[args.model] = record
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    print(f"{args.model}: val mIoU {record['val_miou']:.4f} after {config.iters} iterations, {wall:.0f} s with eval",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
