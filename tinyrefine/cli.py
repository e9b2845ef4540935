"""The command line: ``python -m tinyrefine {train,evaluate,predict,demo}`` (also ``tinyrefine ...``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from .memory import retain_freed_memory
from .train import TrainConfig, TrainingDiverged

DEMO = dict(data="shapes", encoder="resnet18", encoder_width=16, features=32, n_crp=2, crop=64, batch_size=8,
            iters=3000, optimizer="adam", lr=3e-3, encoder_lr=3e-3, weight_decay=0.0, freeze_bn=False,
            checkpoint_every=500, out="runs/demo",
            # an mIoU curve for the plot: 20 val and 20 train images every 250 iterations (ours; about 1.5 s each)
            eval_every=250, eval_limit=20,
            # the settings its README numbers were measured with (before the warm-up and zero-init defaults)
            zero_init_residual=False, warmup_iters=0)
# demo --quick: a first look in 2-4 minutes (replaces these DEMO values unless given on the command line)
DEMO_QUICK = dict(iters=600, eval_every=100, out="runs/demo-quick")


def _add_train_arguments(p: argparse.ArgumentParser, defaults: dict) -> None:
    d = {**dataclasses.asdict(TrainConfig()), **defaults}
    p.add_argument("--data", default=d["data"], help="shapes[:SIZE] | voc:PATH | camvid:PATH (default: %(default)s)")
    p.add_argument("--subset", type=int, default=d["subset"], help="use the first N training images")
    p.add_argument("--model", default=d["model"], choices=["refinenet", "deeplabv3", "fcn"],
                   help="refinenet, or torchvision's DeepLabV3 / FCN built from the same kernels (default: %(default)s)")
    p.add_argument("--output-stride", type=int, default=d["output_stride"], choices=[8, 16],
                   help="deeplabv3 / fcn: the encoder's output stride (8: torchvision's, 16: the DeepLabv3 paper's)")
    p.add_argument("--aux-loss", type=float, default=d["aux_loss"], metavar="WEIGHT",
                   help="deeplabv3 / fcn: add WEIGHT x the loss of an auxiliary FCN head on layer3 "
                        "(torchvision's reference training: 0.5; default: %(default)s, no aux head)")
    p.add_argument("--encoder", default=d["encoder"], choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    p.add_argument("--encoder-width", type=int, default=d["encoder_width"], help="ResNet base width (64 in the paper)")
    p.add_argument("--features", type=int, default=d["features"], help="decoder width (256 in the paper)")
    p.add_argument("--n-crp", type=int, default=d["n_crp"], help="blocks in chained residual pooling")
    p.add_argument("--cascade", type=int, default=d["cascade"], choices=[1, 2, 4])
    p.add_argument("--improved-crp", action="store_true", default=d["improved_crp"])
    p.add_argument("--two-scale", action="store_true", default=d["two_scale"],
                   help="the paper's 2-scale variant: two encoders on the image at 1.2x and 0.6x (needs --cascade 4)")
    p.add_argument("--no-freeze-bn", dest="freeze_bn", action="store_false", default=d["freeze_bn"],
                   help="train BatchNorm statistics (frozen by default, as in the paper)")
    p.add_argument("--crop", type=int, default=d["crop"])
    p.add_argument("--scale-min", type=float, default=d["scale_min"], help="random scale augmentation, lower end")
    p.add_argument("--scale-max", type=float, default=d["scale_max"], help="random scale augmentation, upper end")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--iters", type=int, default=d["iters"])
    p.add_argument("--epochs", type=int, default=None, help="train this many epochs (overrides --iters)")
    p.add_argument("--optimizer", default=d["optimizer"], choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=d["lr"], help="decoder learning rate")
    p.add_argument("--encoder-lr", type=float, default=d["encoder_lr"], help="default: lr / 10")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--device", default=d["device"], choices=["cpu", "cuda"])
    p.add_argument("--out", default=d["out"], help="run folder (checkpoint, logs, plots)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"])
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"])
    p.add_argument("--eval-size", type=int, default=d["eval_size"],
                   help="the network sees the shorter side at this size (speed); scored at the masks' full size")
    p.add_argument("--eval-limit", type=int, default=d["eval_limit"],
                   help="evaluations during the run (--eval-every) score only this many images (the last scores all)")
    p.add_argument("--loss", default=d["loss"], choices=["ce", "balanced", "ohem"],
                   help="ce (the paper's), balanced (median-frequency class weights) or ohem (hardest pixels)")
    p.add_argument("--ohem-fraction", type=float, default=d["ohem_fraction"], help="with --loss ohem: share of pixels kept")
    p.add_argument("--clip-grad-norm", type=float, default=d["clip_grad_norm"],
                   help="scale the gradients down to this global norm (off by default)")
    p.add_argument("--warmup-iters", type=int, default=d["warmup_iters"], help="linear learning-rate warm-up")
    p.add_argument("--zero-init", dest="zero_init_residual", action=argparse.BooleanOptionalAction,
                   default=d["zero_init_residual"],
                   help="start each decoder residual branch at zero (--no-zero-init: torch's default init)")
    p.add_argument("--dropout", type=float, default=d["dropout"],
                   help="the official code's dropout (0.5) on encoder outputs over 512 channels and before the classifier")
    p.add_argument("--classifier-kernel", type=int, default=d["classifier_kernel"], choices=[1, 3],
                   help="1 (default) or 3 (the official code's classifier)")
    p.add_argument("--input-scale", type=float, default=d["input_scale"],
                   help="resize the input by this factor first (the official single-scale model: 1.2)")
    p.add_argument("--pretrained", default=d["pretrained"], help="torchvision ResNet .pth for the encoder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar: a line with the ETA every minute instead")


def _config(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.epochs:
        from .train import build_datasets
        train_set, _, _ = build_datasets(config)
        config.iters = max(1, args.epochs * (len(train_set) // config.batch_size))
    return config


def _make_quick(args: argparse.Namespace) -> None:
    """demo --quick: DEMO_QUICK's values, except where the command line changed the demo's own."""
    for key, value in DEMO_QUICK.items():
        if getattr(args, key) == DEMO[key]:
            setattr(args, key, value)


def _scales(text: str) -> List[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales must be comma-separated numbers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyrefine", description="RefineNet from scratch on NumPy/CuPy")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(sub.add_parser("train", help="train a RefineNet (or --model deeplabv3 | fcn)"), {})
    demo = sub.add_parser("demo", help="train and evaluate on the synthetic shapes set (8-16 minutes on 2 CPU cores)")
    _add_train_arguments(demo, DEMO)
    demo.add_argument("--quick", action="store_true",
                      help=f"a first look: {DEMO_QUICK['iters']} iterations into {DEMO_QUICK['out']} (2-4 minutes on 2 CPU cores)")
    for name in ("evaluate", "predict"):
        p = sub.add_parser(name, help="mIoU on a validation split" if name == "evaluate" else "segment image files")
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--checkpoint", help="a checkpoint.npz written by train")
        source.add_argument("--weights", help="a torchvision deeplabv3_resnet50/101 or fcn_resnet50/101 .pth "
                                              "(read without torch; VOC classes, ImageNet normalisation)")
        p.add_argument("--model", default=None, choices=["refinenet", "deeplabv3", "fcn"],
                       help="the architecture the file must hold (default: whatever it holds)")
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        p.add_argument("--scales", type=_scales, default=[1.0], help="e.g. 0.75,1,1.25 (averaged, as in the paper)")
        p.add_argument("--flip", action="store_true", help="also average over horizontal flips")
        if name == "evaluate":
            p.add_argument("--data", default=None, help="shapes[:SIZE] | voc:PATH | camvid:PATH (default: the training data)")
            p.add_argument("--eval-size", type=int, default=None)
            p.add_argument("--split", default="val",
                           help="which split file to score: val, train (does the model fit what it saw?), "
                                "trainval, test (CamVid), ...; only that split's file is read")
        else:
            p.add_argument("images", nargs="+", help="image files")
            p.add_argument("--out", default="predictions")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    retain_freed_memory()   # this process is ours: keep freed heap for the next step (memory.py; 5-10% on the demo step)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, TrainingDiverged, MemoryError, RuntimeError, KeyError) as error:
        print(f"tinyrefine {args.command}: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from . import train as T
    if args.command in ("train", "demo"):
        if args.command == "demo" and args.quick:
            _make_quick(args)
        config = _config(args)
        start = time.perf_counter()
        result = T.train(config, resume=args.resume, progress=not args.quiet, log_every_s=60.0 if args.quiet else None)
        val = result["val"]
        print(f"trained {result['iteration']} iterations in {time.perf_counter() - start:.0f} s; "
              f"final loss {result['history']['loss'][-1]:.4f}")
        print(f"val mIoU {val['mean_iou']:.4f}, pixel accuracy {val['pixel_acc']:.4f}")
        print(f"checkpoint: {result['checkpoint']}\nlogs and curves: {config.out}/log.csv, history.json, curves.png")
        if args.command == "demo":
            paths = T.save_val_predictions(config, result["model"], result["val_set"], n=4)
            print("predictions: " + ", ".join(paths))
        return 0
    if args.weights:
        model, meta = T.load_torchvision_model(args.weights, args.model, args.device)
        if args.command == "evaluate" and not args.data:
            raise ValueError("evaluate --weights needs --data (a torchvision file says nothing about its data set)")
    else:
        model, meta = T.load_model(args.checkpoint, args.device)
        trained = meta["config"].get("model", "refinenet")
        if args.model is not None and args.model != trained:
            raise ValueError(f"{args.checkpoint} holds a {trained}, not a {args.model}")
    if args.command == "evaluate":
        config = T.TrainConfig(**{**meta["config"], "pretrained": None})
        if args.data:
            config.data = args.data
        dataset, num_classes = T.build_dataset(config.data, args.split, config.seed)
        metrics = T.evaluate(model, dataset, num_classes, args.scales, args.flip, args.device,
                             eval_size=args.eval_size, progress=True)
        print(json.dumps(metrics, indent=1))
        baseline = T.constant_baseline(dataset, num_classes)
        print(T.iou_table(metrics, dataset.classes, baseline) + "\n(baseline: background predicted everywhere)")
        print(f"{args.split} mIoU {metrics['mean_iou']:.4f}  pixel accuracy {metrics['pixel_acc']:.4f}  "
              f"(scales {args.scales}{', flip' if args.flip else ''})")
        return 0
    for image in args.images:
        paths = T.predict_file(model, image, args.out, args.scales, args.flip, args.device)
        print(f"{image}: {paths['mask']}, {paths['overlay']}")
    return 0
