"""Training parity: the same weights, batches and SGD in tinyrefine and in the torch twin.

    python benchmarks/parity_run.py [--steps 20] [--encoder resnet18]

Prints the loss of both at every step, in float64 and in float32, with the relative
difference. (tests/test_train.py asserts the float64 case.)
"""
from __future__ import annotations

import argparse

import numpy as np

from tinyrefine.data import DataLoader, Shapes, train_transform
from tinyrefine.interop.torch_twin import sgd_side_by_side, twin_from
from tinyrefine.train import TrainConfig, build_model


def run(dtype, steps: int, encoder: str):
    config = TrainConfig(encoder=encoder, encoder_width=8, features=16, n_crp=2, freeze_bn=True)
    model = build_model(config, 4).astype(dtype)
    loader = DataLoader(Shapes("train", n=80, size=64), 2, shuffle=True, seed=0, transform=train_transform(64))
    ours, theirs = sgd_side_by_side(model, twin_from(model), (b for _, b in zip(range(steps), loader)))
    return np.array(ours), np.array(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--encoder", default="resnet18")
    args = parser.parse_args()
    results = {name: run(dtype, args.steps, args.encoder) for name, dtype in (("float64", np.float64), ("float32", np.float32))}
    print(f"RefineNet-{args.encoder} (width 8, decoder 16), batch 2 at 64x64, SGD lr 0.01 momentum 0.9 wd 1e-4")
    print(f"{'step':>4s} | {'float64 ours':>13s} {'torch':>13s} {'rel diff':>9s} | {'float32 ours':>13s} {'torch':>13s} {'rel diff':>9s}")
    (a64, b64), (a32, b32) = results["float64"], results["float32"]
    for i in range(len(a64)):
        print(f"{i + 1:4d} | {a64[i]:13.10f} {b64[i]:13.10f} {abs(a64[i] - b64[i]) / abs(b64[i]):9.1e} | "
              f"{a32[i]:13.8f} {b32[i]:13.8f} {abs(a32[i] - b32[i]) / abs(b32[i]):9.1e}")
    for name, (a, b) in results.items():
        print(f"{name}: worst relative loss difference over {len(a)} steps {np.max(np.abs(a - b) / np.abs(b)):.2e}")


if __name__ == "__main__":
    main()
