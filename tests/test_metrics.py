"""Metrics: confusion matrix, pixel accuracy, IoU, mIoU, against hand counts and a brute-force loop."""
import math

import numpy as np
import pytest

from tinyrefine.metrics import RunningConfusion, confusion_matrix, mean_iou, per_class_iou, pixel_accuracy


def brute_force_confusion(pred, target, num_classes, ignore_index=255):
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t != ignore_index:
            cm[t, p] += 1
    return cm


def brute_force_iou(cm):
    ious = []
    for c in range(len(cm)):
        tp = cm[c, c]
        fp = sum(cm[t, c] for t in range(len(cm)) if t != c)
        fn = sum(cm[c, p] for p in range(len(cm)) if p != c)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return np.array(ious)


def test_hand_computed_example():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    assert cm.dtype == np.int64
    assert pixel_accuracy(cm) == pytest.approx(4 / 5)
    # class 0: TP 1, FN 1, FP 0 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: 1/1
    np.testing.assert_allclose(per_class_iou(cm), [1 / 2, 2 / 3, 1.0])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    iou = per_class_iou(confusion_matrix(pred, target, 4))
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert mean_iou(confusion_matrix(pred, target, 4)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # a class only predicted (a false positive everywhere) counts, with IoU 0
    iou = per_class_iou(confusion_matrix(np.array([0, 3]), np.array([0, 0]), 4))
    assert iou[3] == 0.0 and math.isnan(iou[1])


def test_against_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    for num_classes in (2, 5, 21):
        target = rng.integers(0, num_classes, size=(3, 17, 13))
        target[rng.random(target.shape) < 0.2] = 255
        pred = rng.integers(0, num_classes, size=target.shape)
        cm = confusion_matrix(pred, target, num_classes)
        expected = brute_force_confusion(pred, target, num_classes)
        np.testing.assert_array_equal(cm, expected)
        np.testing.assert_allclose(per_class_iou(cm), brute_force_iou(expected))
        assert pixel_accuracy(cm) == pytest.approx((pred == target).sum() / (target != 255).sum())


def test_ignored_pixels_do_not_count():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, size=(20, 20))
    target[:, :5] = 255
    pred = rng.integers(0, 4, size=target.shape)
    other = pred.copy()
    other[:, :5] = (other[:, :5] + 1) % 4  # change predictions only where the target is ignored
    np.testing.assert_array_equal(confusion_matrix(pred, target, 4), confusion_matrix(other, target, 4))
    assert confusion_matrix(pred, target, 4).sum() == 20 * 15
    # any value is fine in pred where the target is ignored; a custom ignore_index works too
    pred[0, 0] = 200
    confusion_matrix(pred, target, 4)
    target[target == 255] = 9
    assert confusion_matrix(pred, target, 4, ignore_index=9).sum() == 20 * 15


def test_validation_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)
    with pytest.raises(ValueError, match=r"target has values \[7\]"):
        confusion_matrix(np.zeros(3, int), np.array([0, 7, 1]), 3)
    with pytest.raises(ValueError, match=r"pred has values \[-1, 5\]"):
        confusion_matrix(np.array([-1, 5, 0]), np.zeros(3, int), 3)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(np.zeros((2, 2), np.float32), np.zeros((2, 2), int), 2)
    with pytest.raises(ValueError, match="square"):
        per_class_iou(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="num_classes"):
        RunningConfusion(0)


def test_empty_counts_give_nan():
    cm = confusion_matrix(np.zeros(4, int), np.full(4, 255), 3)
    assert cm.sum() == 0
    assert math.isnan(pixel_accuracy(cm)) and math.isnan(mean_iou(cm))


def test_running_confusion_accumulates():
    rng = np.random.default_rng(2)
    preds = [rng.integers(0, 3, size=(8, 9)) for _ in range(4)]
    targets = [rng.integers(0, 3, size=(8, 9)) for _ in range(4)]
    running = RunningConfusion(3)
    for pred, target in zip(preds, targets):
        running.update(pred, target)
    whole = confusion_matrix(np.stack(preds), np.stack(targets), 3)
    np.testing.assert_array_equal(running.matrix, whole)
    result = running.compute()
    assert set(result) == {"pixel_acc", "mean_iou", "iou"}
    assert result["mean_iou"] == pytest.approx(mean_iou(whole))
    assert result["pixel_acc"] == pytest.approx(pixel_accuracy(whole))
    np.testing.assert_allclose(result["iou"], per_class_iou(whole))
    running.update(np.stack(preds), np.stack(targets))  # a batch at once
    np.testing.assert_array_equal(running.matrix, 2 * whole)
    running.reset()
    assert running.matrix.sum() == 0


def test_cupy_inputs_if_available():
    from tinyrefine.backend import cuda_available, to_device
    if not cuda_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(3)
    target = rng.integers(0, 5, size=(6, 7))
    pred = rng.integers(0, 5, size=(6, 7))
    cm = confusion_matrix(to_device(pred, "cuda"), to_device(target, "cuda"), 5)
    assert isinstance(cm, np.ndarray)
    np.testing.assert_array_equal(cm, confusion_matrix(pred, target, 5))
