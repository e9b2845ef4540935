"""What the training recipe adds: zero-initialised residual branches, LR warm-up, the class-balanced and
OHEM losses, and evaluation scored at the original mask size."""
import numpy as np
import pytest

import tinyrefine as tr
from tinyrefine import functional as F
from tinyrefine.engine import Tensor
from tinyrefine.models import RefineNet
from tinyrefine.models.refinenet import ChainedResidualPooling, ResidualConvUnit
from tinyrefine.nn import Module, Parameter
from tinyrefine.optim import SGD, PolyLR
from tinyrefine.train import (TrainConfig, build_model, build_optimizer, class_frequencies, evaluate, median_frequency_weights,
                              segmentation_loss, train)


def _tiny(**changes):
    return RefineNet(5, "resnet18", encoder_width=8, features=8, n_crp=2, freeze_bn=False, **changes)


# --------------------------------------------------------------------------- zero-initialised branches
def test_zero_init_zeroes_exactly_the_last_conv_of_each_residual_branch():
    model = _tiny(zero_init_residual=True)
    rcus = [m for m in model.modules() if isinstance(m, ResidualConvUnit)]
    crps = [m for m in model.modules() if isinstance(m, ChainedResidualPooling)]
    assert len(rcus) == 2 * (1 + 2 + 2 + 2) + 4 + 2 and len(crps) == 4   # path RCUs, output RCUs, head
    for rcu in rcus:
        assert not rcu.conv2.weight.data.any() and rcu.conv1.weight.data.any()
    for crp in crps:
        assert all(not conv.weight.data.any() for conv in crp.convs)
    zeroed = {id(r.conv2.weight) for r in rcus} | {id(c.weight) for crp in crps for c in crp.convs}
    assert all(p.data.any() for p in model.parameters() if id(p) not in zeroed and p.ndim == 4)


def test_a_zero_initialised_rcu_and_crp_are_the_identity_on_nonnegative_inputs():
    x = Tensor(np.random.default_rng(0).random((2, 8, 9, 7)))        # relu(x) = x
    rcu, crp = ResidualConvUnit(8), ChainedResidualPooling(8, 4)
    for m in (rcu, crp):
        m.astype(np.float64)
    RefineNet.zero_init_residual_branches(_Holder(rcu, crp))
    np.testing.assert_array_equal(rcu(x).data, x.data)
    np.testing.assert_array_equal(crp(x).data, x.data)


class _Holder(Module):
    def __init__(self, *parts):
        self.parts = list(parts)
        self.config = {"shortcuts": True}

    def modules(self):
        return iter(self.parts)


def test_zeroed_branches_still_learn_from_the_first_step():
    model = _tiny(zero_init_residual=True)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32))
    target = np.random.default_rng(2).integers(0, 5, (2, 64, 64))
    F.cross_entropy(model(x), target).backward()
    rcu = model.refine1.out_rcu
    assert np.abs(rcu.conv2.weight.grad).max() > 0               # the zeroed conv gets a gradient
    assert np.abs(model.refine1.crp.convs[0].weight.grad).max() > 0
    assert not np.abs(rcu.conv1.weight.grad).any()               # behind a zero conv: none yet


def test_zero_init_needs_the_shortcuts():
    with pytest.raises(ValueError, match="shortcuts"):
        _tiny(zero_init_residual=True, shortcuts=False)
    # the trainer drops it quietly for the no-shortcut ablation
    assert build_model(TrainConfig(encoder_width=8, features=8, n_crp=1, shortcuts=False), 3).config["zero_init_residual"] is False


def test_zero_init_tames_the_first_adam_step():
    """The blow-up of issue 15 in miniature (decoder width 64): after one Adam step at lr 2e-3 the logits
    of the default init grow to ~24 (std), those of the zero-initialised decoder to ~5."""
    after = {}
    for zero in (False, True):
        config = TrainConfig(data="shapes", encoder_width=8, features=64, n_crp=4, crop=32, batch_size=2,
                             optimizer="adam", lr=2e-3, encoder_lr=2e-3, weight_decay=0.0, freeze_bn=False,
                             zero_init_residual=zero)
        model = build_model(config, 4)
        x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
        target = np.random.default_rng(1).integers(0, 4, (2, 32, 32))
        assert float(model(x).data.std()) < 1                     # both start small
        optimizer = build_optimizer(config, model)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        after[zero] = float(model(x).data.std())
    assert after[False] > 10 and after[True] < after[False] / 3, after


# --------------------------------------------------------------------------- warm-up
def test_warmup_ramps_linearly_then_follows_poly():
    p = Parameter(np.zeros(1, np.float32))
    optimizer = SGD([p], lr=0.1)
    schedule = PolyLR(optimizer, max_iter=100, power=0.9, warmup=4)
    lrs = []
    for it in range(6):
        schedule.step(it)
        lrs.append(optimizer.param_groups[0]["lr"])
    poly = [0.1 * (1 - it / 100) ** 0.9 for it in range(6)]
    np.testing.assert_allclose(lrs, [poly[0] / 4, poly[1] * 2 / 4, poly[2] * 3 / 4, poly[3], poly[4], poly[5]])
    with pytest.raises(ValueError, match="warmup"):
        PolyLR(optimizer, 10, warmup=-1)


# --------------------------------------------------------------------------- losses
def _logits_and_target(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 5, 6))
    t = rng.integers(0, 4, (2, 5, 6))
    t[0, 0, :3] = 255
    return x, t


def test_balanced_loss_is_torchs_weighted_cross_entropy():
    torch = pytest.importorskip("torch")
    x, t = _logits_and_target()
    w = np.array([0.5, 1.0, 2.0, 3.0])
    ours = Tensor(x.copy(), requires_grad=True)
    loss = segmentation_loss(ours, t, "balanced", w)
    loss.backward()
    theirs = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(theirs, torch.tensor(t), weight=torch.tensor(w), ignore_index=255)
    ref.backward()
    np.testing.assert_allclose(float(loss.item()), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_ohem_averages_the_hardest_pixels_only():
    x, t = _logits_and_target(1)
    per_pixel = F.cross_entropy(Tensor(x), t, reduction="none").data
    valid = per_pixel[t != 255]
    k = int(0.25 * t.size)
    expected = np.sort(valid)[::-1][:k].mean()
    assert float(segmentation_loss(Tensor(x), t, "ohem", ohem_fraction=0.25).item()) == pytest.approx(expected)
    assert float(segmentation_loss(Tensor(x), t, "ohem", ohem_fraction=1.0).item()) == pytest.approx(valid.mean())
    assert tr.gradcheck(lambda z: segmentation_loss(z, t, "ohem", ohem_fraction=0.4),
                        [Tensor(x, requires_grad=True)])


def test_loss_errors_name_the_problem():
    x, t = _logits_and_target()
    with pytest.raises(ValueError, match="class_weights"):
        segmentation_loss(Tensor(x), t, "balanced")
    with pytest.raises(ValueError, match="ohem_fraction"):
        segmentation_loss(Tensor(x), t, "ohem", ohem_fraction=0)
    with pytest.raises(ValueError, match="loss must be"):
        segmentation_loss(Tensor(x), t, "focal")


class _Masks:
    def __init__(self, masks):
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def load(self, i):
        return np.zeros(self.masks[i].shape + (3,), np.uint8), self.masks[i]

    def __getitem__(self, i):
        return self.load(i)


def test_class_frequencies_and_median_frequency_weights():
    masks = _Masks([np.array([[0, 0, 0, 1], [255, 255, 0, 2]], np.uint8), np.array([[0, 1]], np.uint8)])
    f = class_frequencies(masks, 4)
    np.testing.assert_allclose(f, [5 / 8, 2 / 8, 1 / 8, 0])                # 255 is not counted
    w = median_frequency_weights(f)
    np.testing.assert_allclose(w, [0.4, 1.0, 2.0, 0.0])                    # median 2/8; an unseen class gets 0


# --------------------------------------------------------------------------- evaluation at the original size
class _RampModel(Module):
    """Logits of 2 classes at whatever size it is given: class 0 is 0, class 1 ramps -1, 0.2, 1 over 3 columns."""

    def __init__(self):
        self.seen = []

    def forward(self, x):
        n, _, h, w = x.shape
        self.seen.append((h, w))
        assert w == 3
        logits = np.zeros((n, 2, h, w), x.dtype)
        logits[:, 1] = np.array([-1.0, 0.2, 1.0], x.dtype)
        return Tensor(logits)


def test_evaluation_scores_against_the_original_mask_size_by_hand():
    """The network sees a 2x3 image (eval_size=2); its logits are upsampled (bilinear, align_corners=False)
    to the 4x6 mask. Columns 0..5 sample the ramp at x = -0.25 (clamped), 0.25, 0.75, 1.25, 1.75, 2.25
    (clamped): -1, -0.7, -0.1, 0.4, 0.8, 1 -> class 0 in columns 0-2, class 1 in columns 3-5."""
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 2:] = 1
    mask[0, 0] = 255                                       # ignored
    model = _RampModel()
    metrics = evaluate(model, _Masks([mask]), 2, eval_size=2)
    assert model.seen == [(2, 3)]
    # class 1: truth 16 pixels (cols 2-5), predicted 12 (cols 3-5), overlap 12 -> 12/16
    # class 0: truth 7 (cols 0-1 less the ignored one), predicted 11 valid (cols 0-2), overlap 7 -> 7/11
    np.testing.assert_allclose(metrics["iou"], [7 / 11, 12 / 16])
    assert metrics["mean_iou"] == pytest.approx((7 / 11 + 12 / 16) / 2)
    assert metrics["pixel_acc"] == pytest.approx(19 / 23)


def test_evaluate_limit_scores_the_first_images_only():
    masks = [np.ones((4, 6), np.uint8), np.zeros((4, 6), np.uint8)]
    model = _RampModel()
    assert evaluate(model, _Masks(masks), 2, eval_size=2, limit=1)["pixel_acc"] == pytest.approx(0.5)
    assert len(model.seen) == 1


def test_training_records_train_and_val_miou_during_the_run(tmp_path):
    config = TrainConfig(data="shapes:32", encoder_width=4, features=8, n_crp=1, crop=32, batch_size=2, iters=4,
                         optimizer="adam", lr=1e-3, warmup_iters=2, loss="balanced", eval_every=2, eval_limit=3,
                         checkpoint_every=4, out=str(tmp_path / "run"))
    history = train(config, progress=False)["history"]
    assert history["val_iteration"] == [2, 4]
    assert len(history["val_miou"]) == len(history["train_miou"]) == 2
    assert history["lr"][0] == pytest.approx(history["lr"][1] / 2 * (1 - 0 / 4) ** 0.9 / (1 - 1 / 4) ** 0.9)


def test_constant_background_baseline_and_iou_table():
    from tinyrefine.train import constant_baseline, iou_table
    masks = _Masks([np.array([[0, 0, 1, 255]], np.uint8), np.array([[0, 2, 2, 2]], np.uint8)])
    base = constant_baseline(masks, 3)
    # background predicted everywhere: IoU_bg = 3 / 7 valid pixels, the others 0
    np.testing.assert_allclose(base["iou"], [3 / 7, 0, 0])
    assert base["mean_iou"] == pytest.approx(1 / 7) and base["pixel_acc"] == pytest.approx(3 / 7)
    table = iou_table(base, ["background", "cat", "dog"], base).splitlines()
    assert table[0].split() == ["class", "IoU", "baseline"]
    assert table[2].split() == ["cat", "0.000", "0.000"] and table[-2].split()[-1] == "0.143"


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    from tinyrefine.optim import clip_grad_norm
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (5,), (2, 2, 3))]
    ours = [Parameter(np.zeros_like(g)) for g in grads]
    theirs = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.copy(), torch.tensor(g)
    total = clip_grad_norm(ours, 1.5)
    ref = torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    assert float(total) == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-5)
    assert float(clip_grad_norm(ours, 100.0)) == pytest.approx(1.5, rel=1e-5)   # under the limit: unchanged
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(ours, 0)


def test_python_dash_m_exits_non_zero_on_an_error(tmp_path):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "tinyrefine", "evaluate", "--checkpoint", str(tmp_path / "none.npz")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "none.npz" in done.stderr
