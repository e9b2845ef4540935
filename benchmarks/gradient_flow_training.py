"""Can the network fit a fixed batch? RefineNet with and without its shortcuts and long-range connections (notebook 05).

    python benchmarks/gradient_flow_training.py --optimizer adam --lr 3e-3
    python benchmarks/gradient_flow_training.py --optimizer sgd --lr 0.02
        # each adds its runs to notebooks/data/gradient_flow_training.json

Each run trains a small RefineNet (ResNet-18 encoder at width 4, decoder width 8) on ONE fixed batch of four
64x64 Shapes training images (drawn once, with the paper's augmentation) for 150 iterations: the poly schedule
(DeepLab's), 20 warm-up iterations, the encoder at lr/10, SGD with momentum 0.9 or Adam. It records the training
loss of every iteration and, at the end, the pixel accuracy and mIoU of the network's prediction on that batch.
Fitting a fixed batch measures how easily the optimiser can move the network (the paper's argument for its
shortcuts); it says nothing about generalisation. At this budget a fresh network does not learn the Shapes
classes from the stream of batches (val mIoU stays at the all-background level, ~0.2-0.25, after 150-200
iterations at either optimiser), so a fixed batch is the affordable test. The variants differ in the
architecture (shortcuts, long_range, cascade) and the decoder's init (analysis.init_decoder: default / he /
zero); at one seed all runs share the batch and the encoder's initial weights.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import tinyrefine.functional as F
from tinyrefine import analysis
from tinyrefine.data import DataLoader, Shapes, train_transform
from tinyrefine.engine import Tensor, no_grad
from tinyrefine.models import RefineNet
from tinyrefine.optim import SGD, Adam, PolyLR, encoder_decoder_groups

# name -> (RefineNet options, decoder init)
VARIANTS = {
    "cascade 4, shortcuts, zero init": (dict(cascade=4), "zero"),
    "cascade 4, shortcuts, default init": (dict(cascade=4), "default"),
    "cascade 4, no shortcuts, default init": (dict(cascade=4, shortcuts=False), "default"),
    "cascade 4, no shortcuts, He init": (dict(cascade=4, shortcuts=False), "he"),
    "cascade 4, shortcuts, no long-range, zero init": (dict(cascade=4, long_range=False), "zero"),
    "cascade 1, shortcuts, zero init": (dict(cascade=1), "zero"),
    "cascade 1, no shortcuts, default init": (dict(cascade=1, shortcuts=False), "default"),
}


def run(options, init, seed, iters, lr, batch_size, width, features, size, optimizer="sgd"):
    train_set = Shapes("train", size=size, seed=0)
    model = RefineNet(train_set.num_classes, "resnet18", encoder_width=width, features=features, seed=seed, **options)
    analysis.init_decoder(model, init, seed=seed)
    groups = encoder_decoder_groups(model, lr, weight_decay=1e-4 if optimizer == "sgd" else 0.0)
    opt = SGD(groups, momentum=0.9) if optimizer == "sgd" else Adam(groups)
    schedule = PolyLR(opt, iters, 0.9, warmup=20)
    loader = DataLoader(train_set, batch_size, shuffle=True, seed=seed, drop_last=True,
                        transform=train_transform(size, (0.7, 1.3)))
    images, masks = next(iter(loader))                  # the one batch every iteration sees
    losses = []
    model.train()
    for it in range(iters):
        schedule.step(it)
        loss = F.cross_entropy(model(Tensor(images)), masks, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        if not np.isfinite(losses[-1]):
            return losses, None, None
    model.eval()
    with no_grad():
        pred = model(Tensor(images)).data.argmax(axis=1)
    valid = masks != 255
    ious = [((pred == c) & (masks == c) & valid).sum() / max((((pred == c) | (masks == c)) & valid).sum(), 1)
            for c in range(train_set.num_classes) if (masks[valid] == c).any()]
    return losses, float((pred == masks)[valid].mean()), float(np.mean(ious))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "notebooks" / "data" /
                                             "gradient_flow_training.json"))
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"commands": {}, "runs": {}}
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "out", "seeds")}
    command = "python benchmarks/gradient_flow_training.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
    result["commands"][args.optimizer] = command
    for name in args.variants:
        options, init = VARIANTS[name]
        for seed in args.seeds:
            key = f"{args.optimizer} | {name} | seed {seed}"
            if key in result["runs"] and result["runs"][key]["settings"] == settings:
                continue
            tick = time.perf_counter()
            losses, accuracy, miou = run(options, init, seed, args.iters, args.lr, args.batch_size, args.width,
                                         args.features, args.size, args.optimizer)
            seconds = time.perf_counter() - tick
            result["runs"][key] = {"optimizer": args.optimizer, "variant": name, "options": options, "init": init,
                                   "seed": seed, "settings": settings, "loss": [round(v, 5) for v in losses],
                                   "fit_pixel_acc": accuracy, "fit_miou": miou, "seconds": round(seconds, 1)}
            print(f"{key:70s} loss first {losses[0]:.3f} last-10 {np.mean(losses[-10:]):.4f}  "
                  f"fit acc {accuracy}  fit mIoU {miou}  {seconds:.0f}s", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
