"""Segmentation metrics from a confusion matrix: pixel accuracy, per-class IoU, mean IoU.

``cm[t, p]`` counts pixels whose true class is ``t`` and predicted class is
``p``. Everything else follows from it:

* pixel accuracy = trace / total
* IoU of class c = cm[c, c] / (row c + column c - cm[c, c])   (TP / (TP + FN + FP))
* mean IoU      = mean of the IoUs over classes that occur in truth or prediction

Pixels whose target is ``ignore_index`` (VOC's void border, CamVid's void)
are left out entirely, as in the RefineNet paper's evaluation.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np


def _array_module(*arrays: Any):
    """cupy if any input lives on the GPU, else numpy."""
    try:
        from .backend import get_array_module
    except ImportError:  # the data/metrics code also works on its own
        return np
    for array in arrays:
        xp = get_array_module(array)
        if xp is not np:
            return xp
    return np


def _to_host(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    from .backend import as_numpy
    return as_numpy(array)


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = target, columns = prediction.

    ``pred`` and ``target`` are integer class maps of the same shape (any
    number of dimensions), NumPy or CuPy; the counting happens where the data
    is, and the small result always comes back as a NumPy array."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    num_classes = int(num_classes)
    xp = _array_module(pred, target)
    pred, target = xp.asarray(pred), xp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred shape {tuple(pred.shape)} differs from target shape "
                         f"{tuple(target.shape)}")
    for name, array in (("pred", pred), ("target", target)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            hint = " (did you forget argmax over the class axis?)" if name == "pred" else ""
            raise TypeError(f"confusion_matrix: {name} must hold integer class indices, got dtype {array.dtype}{hint}")
    pred, target = pred.reshape(-1).astype(xp.int64), target.reshape(-1).astype(xp.int64)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    for name, array in (("target", target), ("pred", pred)):
        bad = (array < 0) | (array >= num_classes)
        if bool(bad.any()):
            values = _to_host(xp.unique(array[bad]))[:10].tolist()
            raise ValueError(f"confusion_matrix: {name} has values {values} outside 0..{num_classes - 1} "
                             f"(ignore_index {ignore_index} is only skipped in target)")
    # one bincount over the pair code t * K + p counts every (target, pred) combination at once
    counts = xp.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return _to_host(counts.reshape(num_classes, num_classes)).astype(np.int64)


def _check_cm(cm: Any) -> np.ndarray:
    cm = np.asarray(_to_host(cm))
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {cm.shape}")
    return cm


def pixel_accuracy(cm: Any) -> float:
    """Fraction of counted pixels predicted correctly (NaN if nothing was counted)."""
    cm = _check_cm(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def per_class_iou(cm: Any) -> np.ndarray:
    """IoU per class, float64; NaN for classes absent from both target and prediction."""
    cm = _check_cm(cm).astype(np.float64)
    hits = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - hits
    iou = np.full(len(cm), np.nan)
    np.divide(hits, union, out=iou, where=union > 0)
    return iou


def mean_iou(cm: Any) -> float:
    """Mean of ``per_class_iou`` over the classes that occur (NaN if none do)."""
    iou = per_class_iou(cm)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


class RunningConfusion:
    """Accumulates a confusion matrix over many images: ``update(pred, target)``, then ``compute()``."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[...] = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add one image (H, W) or a batch (N, H, W) of predictions and targets."""
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> Dict[str, Any]:
        """``{'pixel_acc': float, 'mean_iou': float, 'iou': per-class array}``."""
        return {"pixel_acc": pixel_accuracy(self.matrix), "mean_iou": mean_iou(self.matrix),
                "iou": per_class_iou(self.matrix)}

    def __repr__(self) -> str:
        return f"RunningConfusion({self.num_classes} classes, {int(self.matrix.sum())} pixels)"
