"""Training, evaluation and prediction: what the CLI and the notebooks call.

Reproducible by construction: the only randomness is the loader's shuffle and the
per-sample augmentation, both derived from (seed, epoch, index). A checkpoint
stores the weights, the optimizer state and the loader position, so a resumed
run on the CPU continues bit-exactly as if it had never stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import backend
from . import functional as F
from .data import (CamVid, DataLoader, Shapes, VOCSegmentation, colorize, eval_transform, train_transform)
from .engine import Tensor, no_grad
from .io import atomic_write_bytes, load_npz, load_npz_meta, load_torch_checkpoint, save_npz
from .memory import empty_cache
from .metrics import RunningConfusion
from .models import FCN, DeepLabV3, RefineNet
from .optim import SGD, Adam, PolyLR, clip_grad_norm, encoder_decoder_groups


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (saved in every checkpoint)."""
    data: str = "shapes"                 # shapes[:SIZE] | voc:PATH | camvid:PATH
    subset: Optional[int] = None         # first N training ids (for a full VOC download)
    model: str = "refinenet"             # refinenet | deeplabv3 | fcn (torchvision's, to compare with)
    output_stride: int = 8               # deeplabv3 / fcn: 8 (torchvision's) or 16 (the DeepLabv3 paper's)
    aux_loss: float = 0.0                # deeplabv3 / fcn: weight of the auxiliary FCN head's loss on layer3
                                         # (torchvision's reference training: 0.5); 0: no aux head
    encoder: str = "resnet18"
    encoder_width: int = 64
    features: int = 256
    n_crp: int = 4
    cascade: int = 4
    improved_crp: bool = False
    two_scale: bool = False              # the paper's 2-scale variant (two encoders, at 1.2x and 0.6x)
    shortcuts: bool = True               # ablations (gradient-flow lesson): the RCU/CRP identities,
    long_range: bool = True              # the encoder's long-range gradient paths,
    crp_relu: bool = True                # and the CRP's leading ReLU
    freeze_bn: bool = True
    crop: int = 256
    scale_min: float = 0.7               # random scale augmentation range (the paper's 0.7-1.3)
    scale_max: float = 1.3
    batch_size: int = 2
    iters: int = 1000
    optimizer: str = "sgd"               # sgd | adam
    lr: float = 5e-3                     # decoder learning rate
    encoder_lr: Optional[float] = None   # default lr / 10 (the paper trains the encoder slower)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    device: str = "cpu"
    out: str = "runs/train"
    seed: int = 0
    eval_every: int = 0                  # 0: only at the end
    checkpoint_every: int = 100
    eval_size: Optional[int] = None      # the network sees the shorter side at this size (speed); scored at full size
    eval_limit: Optional[int] = None     # evaluations during the run score only this many val (and train) images
    pretrained: Optional[str] = None     # torchvision ResNet .pth for the encoder
    zero_init_residual: bool = True      # decoder residual branches start at zero (ours; see RefineNet)
    dropout: float = 0.0                 # the official code: 0.5 (encoder outputs > 512 channels, before the classifier)
    classifier_kernel: int = 1           # the official code: 3
    input_scale: float = 1.0             # the official single-scale model: 1.2
    warmup_iters: int = 100              # linear LR warm-up (Goyal et al. 2017): tames the first Adam steps
    loss: str = "ce"                     # ce | balanced (median-frequency class weights) | ohem (hardest pixels)
    ohem_fraction: float = 0.25          # with loss=ohem: the share of valid pixels kept per batch
    clip_grad_norm: Optional[float] = None   # scale the gradients down to this global norm (None: off)


# --------------------------------------------------------------------------- data
def build_dataset(data: str, split: str, seed: int = 0, subset: Optional[int] = None):
    """(the ``split`` of ``data``, number of classes): only that split's file is needed.

    ``data`` is shapes[:SIZE], voc:PATH or camvid:PATH; ``split`` any split file the folder has
    (VOC: train, val, trainval; CamVid: train, val, test), train or val for Shapes."""
    kind, _, path = data.partition(":")
    if kind == "shapes":  # "shapes" or "shapes:SIZE" (image side in pixels, 64 by default)
        if path and not path.isdigit():
            raise ValueError(f"--data shapes:SIZE needs a whole number of pixels, got {data!r}")
        dataset = Shapes(split, size=int(path) if path else 64, seed=seed)
    elif kind == "voc":
        dataset = VOCSegmentation(path, split, subset=subset)
    elif kind == "camvid":
        dataset = CamVid(path, split, subset=subset)
    else:
        raise ValueError(f"--data must be shapes[:SIZE], voc:PATH or camvid:PATH, got {data!r}")
    return dataset, dataset.num_classes


def build_datasets(config: TrainConfig):
    """(train set, val set, number of classes) from ``config.data`` (subset applies to train only)."""
    train, num_classes = build_dataset(config.data, "train", config.seed, config.subset)
    val, _ = build_dataset(config.data, "val", config.seed)
    return train, val, num_classes


MODELS = ("refinenet", "deeplabv3", "fcn")


def build_model(config: TrainConfig, num_classes: int) -> Union[RefineNet, DeepLabV3, FCN]:
    """``config.model`` with ``num_classes`` outputs; DeepLabV3's ASPP gets ``features`` channels (256 in
    the paper), the FCN head is torchvision's (in/4 channels)."""
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {config.model!r}")
    if config.model != "refinenet":  # RefineNet's own structure options would be silently ignored
        defaults = TrainConfig()
        changed = [k for k in ("cascade", "improved_crp", "two_scale", "shortcuts", "long_range", "crp_relu",
                               "dropout", "classifier_kernel", "input_scale")
                   if getattr(config, k) != getattr(defaults, k)]
        if changed:
            raise ValueError(f"{', '.join(changed)} apply to --model refinenet only, not {config.model}")
    if not (np.isfinite(config.aux_loss) and config.aux_loss >= 0):
        raise ValueError(f"aux_loss is the auxiliary loss's weight, >= 0; got {config.aux_loss!r}")
    if config.aux_loss and config.model == "refinenet":   # its deep supervision is not the paper's
        raise ValueError("aux_loss applies to --model deeplabv3 / fcn (torchvision's aux head on layer3), not refinenet")
    aux = config.aux_loss > 0
    if config.model == "deeplabv3":
        model = DeepLabV3(num_classes, config.encoder, output_stride=config.output_stride, width=config.encoder_width,
                          aspp_channels=config.features, aux_loss=aux, freeze_bn=config.freeze_bn, seed=config.seed)
    elif config.model == "fcn":
        model = FCN(num_classes, config.encoder, output_stride=config.output_stride, width=config.encoder_width,
                    aux_loss=aux, freeze_bn=config.freeze_bn, seed=config.seed)
    else:
        model = _build_refinenet(config, num_classes)
    if config.pretrained:
        weights = load_torch_checkpoint(config.pretrained)
        encoder_weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
        for encoder in model.encoders():      # the 2-scale variant: both start from the same weights
            encoder.load_state_dict(encoder_weights, strict=True)
    return model.to(config.device)


def _build_refinenet(config: TrainConfig, num_classes: int) -> RefineNet:
    return RefineNet(num_classes, config.encoder, n_crp=config.n_crp, cascade=config.cascade,
                     freeze_bn=config.freeze_bn, improved_crp=config.improved_crp, features=config.features,
                     encoder_width=config.encoder_width, two_scale=config.two_scale, shortcuts=config.shortcuts,
                     long_range=config.long_range, crp_relu=config.crp_relu,
                     # without the identities there is no residual branch to zero
                     zero_init_residual=config.zero_init_residual and config.shortcuts, dropout=config.dropout,
                     classifier_kernel=config.classifier_kernel, input_scale=config.input_scale, seed=config.seed)


def build_optimizer(config: TrainConfig, model: RefineNet):
    groups = encoder_decoder_groups(model, config.lr, config.encoder_lr, config.weight_decay)
    if config.optimizer == "sgd":
        return SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return Adam(groups, lr=config.lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


# --------------------------------------------------------------------------- the loss
def class_frequencies(dataset, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Each class's share of the labelled pixels over ``dataset``'s raw masks."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for i in range(len(dataset)):
        mask = dataset.load(i)[1]
        counts += np.bincount(mask[mask != ignore_index].ravel(), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1.0)


def median_frequency_weights(frequencies: np.ndarray) -> np.ndarray:
    """w_c = median(f) / f_c (Eigen & Fergus 2015, as SegNet uses it); a class never seen gets 0."""
    seen = frequencies > 0
    weights = np.zeros_like(frequencies)
    weights[seen] = np.median(frequencies[seen]) / frequencies[seen]
    return weights


def segmentation_loss(logits: Tensor, masks, kind: str = "ce", class_weights=None, ohem_fraction: float = 0.25,
                      ignore_index: int = 255) -> Tensor:
    """The training loss over the valid pixels V (mask != ignore_index).

    ce:       mean over V of -log p(t)                              (the paper's)
    balanced: sum_V w_t * -log p(t) / sum_V w_t  (class weights, e.g. median frequency; torch's weighted mean)
    ohem:     mean of -log p(t) over the hardest ``ohem_fraction`` of V (online hard example mining,
              Shrivastava et al. 2016, per pixel as in Wu et al. 2016)
    """
    if kind == "ce":
        return F.cross_entropy(logits, masks, ignore_index=ignore_index)
    xp = backend.get_array_module(logits.data)
    losses = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="none")   # (N, H, W), 0 if ignored
    valid = masks != ignore_index
    if kind == "balanced":
        if class_weights is None:
            raise ValueError("loss='balanced' needs class_weights")
        weights = xp.asarray(class_weights, dtype=logits.dtype)[xp.where(valid, masks, 0)] * valid
    elif kind == "ohem":
        if not 0 < ohem_fraction <= 1:
            raise ValueError(f"ohem_fraction must be in (0, 1], got {ohem_fraction}")
        values = xp.where(valid, losses.data, -1.0)                  # ignored pixels are never picked
        k = max(1, int(ohem_fraction * values.size))
        threshold = xp.partition(values.ravel(), values.size - k)[values.size - k]
        weights = ((values >= threshold) & valid).astype(logits.dtype)
    else:
        raise ValueError(f"loss must be 'ce', 'balanced' or 'ohem', got {kind!r}")
    return (losses * weights).sum() / xp.maximum(weights.sum(), 1e-12)


def training_loss(model, images: Tensor, masks, config: TrainConfig, class_weights=None) -> Tensor:
    """The loss one training step minimises: ``config.loss`` on the logits, plus, with ``config.aux_loss`` > 0,
    that weight times the same loss on the auxiliary head's logits (torchvision's reference recipe for DeepLabV3
    and FCN: main + 0.5 * aux; the aux head only trains the encoder better and is not used to predict)."""
    if not config.aux_loss:
        return segmentation_loss(model(images), masks, config.loss, class_weights, config.ohem_fraction)
    main, aux = model.forward_with_aux(images)
    return (segmentation_loss(main, masks, config.loss, class_weights, config.ohem_fraction)
            + config.aux_loss * segmentation_loss(aux, masks, config.loss, class_weights, config.ohem_fraction))


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model, optimizer, meta: Dict[str, Any]) -> None:
    """Weights, optimizer state and run position in one .npz, written atomically."""
    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    save_npz(path, arrays, meta=meta)


def load_checkpoint(path: Path):
    """(model state, optimizer state, meta) from a checkpoint written by save_checkpoint."""
    arrays, meta = load_npz(path), load_npz_meta(path)
    model_state = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optim_state = {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}
    return model_state, optim_state, meta


def load_model(path: str, device: str = "cpu") -> Tuple[RefineNet, Dict[str, Any]]:
    """A model ready for inference from a checkpoint (weights-only .npz files work too, with their meta)."""
    model_state, _, meta = load_checkpoint(Path(path))
    if "config" not in meta:
        raise ValueError(f"{path}: no model config in its metadata; was it written by tinyrefine?")
    config = TrainConfig(**{**meta["config"], "pretrained": None, "device": device})
    model = build_model(config, meta["num_classes"])
    model.load_state_dict(model_state)
    return model.eval(), meta


def load_torchvision_model(path: str, model: Optional[str] = None, device: str = "cpu"
                           ) -> Tuple[Union[DeepLabV3, FCN], Dict[str, Any]]:
    """A torchvision segmentation checkpoint (``deeplabv3_resnet50/101`` or ``fcn_resnet50/101``: a state
    dict of the whole model, zip or legacy ``.pth``) as our model, ready for inference, without torch.

    The architecture is read off the names and shapes: DeepLabV3 if ``classifier.0.convs.*`` exist, else
    FCN; the ResNet depth from the number of layer3 blocks; the classes from the last conv; the aux head
    from ``aux_classifier.*``. ``model`` ('deeplabv3' or 'fcn'), when given, must agree. The meta's config
    says how the model was built (torchvision's defaults: output stride 8, ASPP rates 12/24/36)."""
    from .models.resnet import DEPTHS
    from .models import ENCODERS
    state = load_torch_checkpoint(path)
    if "backbone.conv1.weight" not in state or "classifier.4.weight" not in state:
        raise ValueError(f"{path} is not a torchvision DeepLabV3/FCN state dict (no backbone.conv1.weight or "
                         f"classifier.4.weight; its first keys: {list(state)[:4]})")
    kind = "deeplabv3" if "classifier.0.convs.0.0.weight" in state else "fcn"
    if model is not None and model != kind:
        raise ValueError(f"{path} holds a {kind} (its classifier's names say so), not a {model}")
    blocks = len({k.split(".")[2] for k in state if k.startswith("backbone.layer3.")})
    block_kind = "bottleneck" if "backbone.layer1.0.conv3.weight" in state else "basic"
    encoder = next((name for name, depth in ENCODERS.items() if DEPTHS[depth][0] == block_kind
                    and DEPTHS[depth][1][2] == blocks), None)
    if encoder is None:
        raise ValueError(f"{path}: a ResNet with {blocks} {block_kind} blocks in layer3 is not one we build")
    num_classes, width = state["classifier.4.weight"].shape[0], state["backbone.conv1.weight"].shape[0]
    features = state["classifier.0.convs.0.0.weight"].shape[0] if kind == "deeplabv3" else 256
    aux = any(k.startswith("aux_classifier.") for k in state)
    # the aux head is built when present so that strict loading checks every tensor; inference ignores it
    if kind == "deeplabv3":
        net = DeepLabV3(num_classes, encoder, aux_loss=aux, width=width, aspp_channels=features)
    else:
        net = FCN(num_classes, encoder, aux_loss=aux, width=width)
    net.load_state_dict(state)
    config = TrainConfig(model=kind, encoder=encoder, encoder_width=width, features=features, freeze_bn=False,
                         device=device)
    return net.to(device).eval(), {"num_classes": num_classes, "config": dataclasses.asdict(config),
                                   "weights": str(path)}


# --------------------------------------------------------------------------- the loop
def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: Optional[int] = None, log_every_s: Optional[float] = None) -> Dict[str, Any]:
    """Train, evaluate at the end, and return a summary (paths, final loss, mIoU, the trained model
    and the validation set).

    ``stop_after`` ends the run early after that many iterations *of this call*
    (used to test interruption and resume). With a progress bar or ``log_every_s`` the run says what it
    will cost (expected time after 20 iterations, each evaluation's result and time); ``log_every_s``
    also prints a line with the ETA that often (the CLI's --quiet)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    backend.check_device(config.device)
    train_set, val_set, num_classes = build_datasets(config)
    model = build_model(config, num_classes)
    optimizer = build_optimizer(config, model)
    schedule = PolyLR(optimizer, config.iters, config.poly_power, config.warmup_iters)
    loader = DataLoader(train_set, config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
                        transform=train_transform(config.crop, (config.scale_min, config.scale_max)),
                        device=config.device)
    class_weights = None
    if config.loss == "balanced":
        weights = median_frequency_weights(class_frequencies(train_set, num_classes)).astype(np.float32)
        class_weights = backend.to_device(weights, config.device)     # uploaded once, not every step
    checkpoint = out / "checkpoint.npz"
    history: Dict[str, List] = {"iteration": [], "loss": [], "lr": [], "seconds": [], "val_iteration": [], "val_miou": [],
                                "train_miou": []}
    start, epoch, batch_index = 0, 0, 0
    if resume:
        if not checkpoint.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        model_state, optim_state, meta = load_checkpoint(checkpoint)
        _check_same_run(meta["config"], config)
        model.load_state_dict(model_state)
        asked = [group["initial_lr"] for group in optimizer.param_groups]   # this run's --lr / --encoder-lr
        optimizer.load_state_dict(optim_state)
        for group, lr, what in zip(optimizer.param_groups, asked, ("encoder", "decoder")):
            if lr != group["initial_lr"]:   # a changed LR takes effect: the schedule continues from it
                print(f"resume: {what} base lr {group['initial_lr']:g} -> {lr:g} (the schedule continues from the new value)")
                group["initial_lr"] = lr
        start, epoch, batch_index, history = meta["iteration"], meta["epoch"], meta["batch_index"], meta["history"]

    def meta(iteration: int) -> Dict[str, Any]:
        return {"config": dataclasses.asdict(config), "num_classes": num_classes, "iteration": iteration,
                "epoch": epoch, "batch_index": batch_index, "history": history, "format": "tinyrefine-checkpoint-1"}

    bar = _progress(range(start, config.iters), progress, initial=start, total=config.iters)
    say = (bar.write if progress else print) if (progress or log_every_s is not None) else None
    clock = _RunClock(start, config.iters, say, log_every_s)
    batches = loader.iter_from(epoch, batch_index)
    model.train()
    done_here = 0
    for iteration in bar:
        try:
            images, masks = next(batches)
        except StopIteration:  # next epoch
            epoch, batch_index = epoch + 1, 0
            batches = loader.iter_from(epoch, 0)
            images, masks = next(batches)
        batch_index += 1
        tick = time.perf_counter()
        schedule.step(iteration)
        try:
            loss = training_loss(model, Tensor(images), masks, config, class_weights)
            loss_value = float(loss.item())
            if not np.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss became {loss_value} at iteration {iteration}; stopped without updating the weights. "
                    f"The last good checkpoint ({checkpoint if checkpoint.exists() else 'none written yet'}) is intact. "
                    f"Try a lower --lr (now {config.lr}), --warmup-iters or --clip-grad-norm"
                    + (f"; on CUDA a mask label outside 0..{num_classes - 1} (other than 255) also gives a NaN loss"
                       if config.device == "cuda" else "") + ".")
            optimizer.zero_grad()
            loss.backward()
            if config.clip_grad_norm:
                clip_grad_norm(model.parameters(), config.clip_grad_norm)
            optimizer.step()
        except Exception as error:  # a CUDA out-of-memory error gets advice; everything else passes through
            if backend.is_out_of_memory(error):
                raise MemoryError(f"the GPU ran out of memory at batch size {config.batch_size} and crop {config.crop}; "
                                  f"lower --batch-size or --crop") from error
            raise
        seconds = time.perf_counter() - tick
        for key, value in (("iteration", iteration + 1), ("loss", loss_value), ("lr", schedule_lr(optimizer)),
                           ("seconds", seconds)):
            history[key].append(value)
        if progress:
            bar.set_postfix(loss=f"{loss_value:.4f}", s_per_it=f"{seconds:.2f}")
        clock.tick(iteration + 1, loss_value)
        last = iteration + 1 == config.iters
        if config.eval_every and (iteration + 1) % config.eval_every == 0 and not last:
            eval_start = time.perf_counter()
            _record_miou(history, iteration + 1, config, model, train_set, val_set, num_classes, config.eval_limit)
            if say:
                scored = f" on the first {config.eval_limit} images of each split" if config.eval_limit else ""
                say(f"iteration {iteration + 1}: val mIoU {history['val_miou'][-1]:.3f}, train mIoU "
                    f"{history['train_miou'][-1]:.3f} (evaluated in {time.perf_counter() - eval_start:.1f} s{scored})")
            model.train()
        if (iteration + 1) % config.checkpoint_every == 0 or last:
            save_checkpoint(checkpoint, model, optimizer, meta(iteration + 1))
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            save_checkpoint(checkpoint, model, optimizer, meta(iteration + 1))
            return {"checkpoint": str(checkpoint), "iteration": iteration + 1, "history": history, "stopped": True}

    metrics = _record_miou(history, config.iters, config, model, train_set, val_set, num_classes, None)
    save_checkpoint(checkpoint, model, optimizer, meta(config.iters))
    write_logs(out, history)
    empty_cache()   # the scratch buffers have grown to the largest layer: give them back (a notebook lives on)
    return {"checkpoint": str(checkpoint), "iteration": config.iters, "history": history, "val": metrics,
            "out": str(out), "model": model, "val_set": val_set}


def _record_miou(history, iteration: int, config: TrainConfig, model, train_set, val_set, num_classes: int,
                 limit: Optional[int]) -> Dict[str, Any]:
    """Val mIoU (the first ``limit`` images, or all) and train mIoU (the first ``limit`` training images,
    or 100, without augmentation) into ``history``; returns the val metrics."""
    score = dict(device=config.device, eval_size=config.eval_size)
    val = evaluate(model, val_set, num_classes, limit=limit, **score)
    train_limit = limit if limit is not None else min(100, len(train_set))
    history["val_iteration"].append(iteration)
    history["val_miou"].append(val["mean_iou"])
    history.setdefault("train_miou", []).append(evaluate(model, train_set, num_classes, limit=train_limit, **score)["mean_iou"])
    return val


def schedule_lr(optimizer) -> float:
    return float(optimizer.param_groups[-1]["lr"])


def _check_same_run(saved: Dict[str, Any], config: TrainConfig) -> None:
    """Resuming with another model, parameter set or data would silently train something else.

    Refused when changed: what builds the network or its parameter set (freeze_bn decides which
    parameters the optimizer holds), the data and its sampling, the optimizer. Allowed, and taking
    effect: lr / encoder_lr (the schedule continues from the new base), iters, weight decay, momentum,
    evaluation and logging settings."""
    fixed = ("data", "model", "output_stride", "aux_loss", "encoder", "encoder_width", "features", "n_crp", "cascade", "improved_crp", "two_scale",
             "shortcuts", "long_range", "crp_relu", "freeze_bn", "classifier_kernel", "input_scale", "loss", "crop",
             "scale_min", "scale_max", "batch_size", "seed", "optimizer")
    defaults = TrainConfig()        # a key missing from an older checkpoint had its default then
    changed = [f"{k}: checkpoint {saved.get(k, getattr(defaults, k))!r} vs now {getattr(config, k)!r}"
               for k in fixed if saved.get(k, getattr(defaults, k)) != getattr(config, k)]
    if changed:
        raise ValueError("--resume with a different configuration: " + "; ".join(changed))


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return _Quiet(iterable)
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class _RunClock:
    """What a run costs, said while it runs (ours): after ``first`` iterations of this call, the expected
    time of the iterations left at the rate of iterations 2..first (the first builds caches); then, every
    ``every_s`` seconds, the ETA at the wall-clock rate so far (evaluations included). ``say`` is None: silent."""

    def __init__(self, start: int, total: int, say, every_s: Optional[float], first: int = 20):
        self.start, self.total, self.say, self.every_s, self.first = start, total, say, every_s, first
        self.began = self.last = time.perf_counter()
        self.after_one: Optional[float] = None

    def tick(self, done: int, loss: float) -> None:
        if self.say is None:
            return
        now, count = time.perf_counter(), done - self.start
        if count == 1:
            self.after_one = now
        if count == self.first and self.total - self.start > self.first:
            rate = (now - self.after_one) / (self.first - 1)
            self.say(f"expected: {_minutes((self.total - self.start) * rate)} for {self.total - self.start} "
                     f"iterations ({rate:.3f} s/iteration over iterations 2-{self.first}), evaluations extra")
        if self.every_s is not None and (now - self.last >= self.every_s or done == self.total):
            self.last = now
            rate = (now - self.began) / count
            self.say(f"iteration {done}/{self.total}  loss {loss:.4f}  {rate:.3f} s/iteration  "
                     f"elapsed {_minutes(now - self.began)}  ETA {_minutes(rate * (self.total - done))}")


class _Quiet:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        pass


def write_logs(out: Path, history: Dict[str, List]) -> None:
    """history.json, a CSV of the training iterations, and the loss / mIoU curves as PNG."""
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=1).encode())
    rows = zip(history["iteration"], history["loss"], history["lr"], history["seconds"])
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "loss", "lr", "seconds"])
        writer.writerows(rows)
    from .viz import plot_curves
    plot_curves(history, out / "curves.png")


# --------------------------------------------------------------------------- evaluation and prediction
def predict_probs(model, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = False,
                  device: str = "cpu", out_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Class probabilities (C, H', W') for one normalised image (3, H, W), averaged over scales and flips.

    (H', W') is ``out_size`` if given, else (H, W): the network may see a resized image while the
    probabilities are upsampled (bilinear) to the original label size, as the paper's protocol scores."""
    _, H, W = image.shape
    out_size = (H, W) if out_size is None else tuple(out_size)
    x = Tensor(backend.to_device(image[None], device))
    total = None
    with no_grad():
        for scale in scales:
            xs = x if scale == 1.0 else F.interpolate(x, size=(max(32, round(H * scale)), max(32, round(W * scale))),
                                                      align_corners=False)
            for flipped in ((False, True) if flip else (False,)):
                inp = Tensor(xs.data[..., ::-1].copy()) if flipped else xs
                logits = model(inp)
                if flipped:
                    logits = Tensor(logits.data[..., ::-1].copy())
                if logits.shape[2:] != out_size:
                    logits = F.interpolate(logits, size=out_size, align_corners=False)
                probs = F.softmax(logits, axis=1).data[0]
                total = probs if total is None else total + probs
    return backend.as_numpy(total) / (len(scales) * (2 if flip else 1))


predict_logits = predict_probs   # the old name (it always returned probabilities)


def evaluate(model, dataset, num_classes: int, scales: Sequence[float] = (1.0,), flip: bool = False,
             device: str = "cpu", eval_size: Optional[int] = None, progress: bool = False,
             limit: Optional[int] = None) -> Dict[str, Any]:
    """Pixel accuracy, per-class IoU and mIoU over ``dataset`` (one image at a time, any size).

    Always scored against the original masks: with ``eval_size`` the network sees the image resized
    (shorter side = eval_size, for speed) and its probabilities are upsampled back to the mask's size
    before the argmax. ``limit`` scores only the first that many images (a cheap curve during training)."""
    model.eval()
    confusion = RunningConfusion(num_classes)
    resize = eval_transform(eval_size)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = _progress(range(count), progress, total=count, desc="evaluate")
    for i in indices:
        image, mask = dataset[i]
        normalized, _ = resize(image, mask, None)      # the resized mask is not used
        probs = predict_probs(model, normalized, scales, flip, device, out_size=mask.shape)
        confusion.update(probs.argmax(axis=0), mask)
    return _scores(confusion)


def _scores(confusion: RunningConfusion) -> Dict[str, Any]:
    """The confusion's pixel accuracy, mIoU and per-class IoU as plain floats (JSON-ready)."""
    result = confusion.compute()
    return {"pixel_acc": float(result["pixel_acc"]), "mean_iou": float(result["mean_iou"]),
            "iou": [float(v) for v in result["iou"]]}


def constant_baseline(dataset, num_classes: int, label: int = 0, limit: Optional[int] = None) -> Dict[str, Any]:
    """The metrics of predicting ``label`` (background) everywhere: the floor a trained model must beat."""
    confusion = RunningConfusion(num_classes)
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        mask = dataset.load(i)[1]
        confusion.update(np.full(mask.shape, label, dtype=np.int64), mask)
    return _scores(confusion)


def iou_table(metrics: Dict[str, Any], class_names: Sequence[str], baseline: Optional[Dict[str, Any]] = None) -> str:
    """Per-class IoU as an aligned text table (NaN: the class is absent from the scored images)."""
    rows = [f"{'class':14s}{'IoU':>8s}" + (f"{'baseline':>10s}" if baseline else "")]
    for c, name in enumerate(class_names):
        rows.append(f"{name:14s}{metrics['iou'][c]:8.3f}" + (f"{baseline['iou'][c]:10.3f}" if baseline else ""))
    rows.append(f"{'mean IoU':14s}{metrics['mean_iou']:8.3f}" + (f"{baseline['mean_iou']:10.3f}" if baseline else ""))
    rows.append(f"{'pixel acc':14s}{metrics['pixel_acc']:8.3f}" + (f"{baseline['pixel_acc']:10.3f}" if baseline else ""))
    return "\n".join(rows)


def predict_file(model, image_path: str, out_dir: str, scales: Sequence[float] = (1.0,), flip: bool = False,
                 device: str = "cpu") -> Dict[str, str]:
    """Segment one image file; writes <name>_mask.png (palette) and <name>_overlay.png."""
    from PIL import Image
    from .data import load_image
    from .viz import overlay
    image = load_image(image_path)
    normalized, _ = eval_transform(None)(image, np.zeros(image.shape[:2], dtype=np.uint8), None)
    if min(image.shape[:2]) < 32:
        raise ValueError(f"{image_path}: image {image.shape[1]}x{image.shape[0]} is smaller than 32 pixels")
    mask = predict_probs(model, normalized, scales, flip, device).argmax(axis=0).astype(np.uint8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    from .data import save_palette_png
    mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    save_palette_png(mask, mask_path)
    Image.fromarray(overlay(image, mask)).save(overlay_path)
    return {"mask": str(mask_path), "overlay": str(overlay_path)}


def save_val_predictions(config: TrainConfig, model, val_set, n: int = 4) -> List[str]:
    """Labelled figures (image | ground truth | prediction with its mIoU | overlay, and a class legend) for
    the first ``n`` validation images: ``val_<i>.png`` each, and ``predictions.png`` with all of them."""
    from .viz import plot_predictions
    model.eval()
    transform = eval_transform(config.eval_size)
    samples = []
    for i in range(min(n, len(val_set))):
        image, mask = val_set[i]
        normalized, _ = transform(image, mask, None)
        pred = predict_probs(model, normalized, device=config.device, out_size=mask.shape).argmax(axis=0)
        samples.append({"image": image, "truth": mask, "prediction": pred.astype(np.uint8), "name": f"val image {i}"})
    out = Path(config.out)
    classes, palette = list(val_set.classes), getattr(val_set, "palette", None)
    paths = []
    for i, sample in enumerate(samples):
        plot_predictions([sample], classes, palette, path=out / f"val_{i}.png")
        paths.append(str(out / f"val_{i}.png"))
    plot_predictions(samples, classes, palette, path=out / "predictions.png")
    return [str(out / "predictions.png")] + paths
