"""Training end to end: the CLI on real data, exact resume, divergence, parity with the torch twin."""
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from tinyrefine import cli
from tinyrefine import functional as F
from tinyrefine.engine import Tensor
from tinyrefine.io import load_npz, load_npz_meta
from tinyrefine.train import TrainConfig, TrainingDiverged, build_model, train

TINY = ["--encoder", "resnet18", "--encoder-width", "8", "--features", "16", "--n-crp", "2", "--crop", "64",
        "--batch-size", "2", "--quiet", "--eval-size", "64"]


def _tiny_config(tmp_path, **changes) -> TrainConfig:
    base = dict(data="shapes", encoder="resnet18", encoder_width=8, features=16, n_crp=2, crop=48, batch_size=2,
                iters=4, optimizer="sgd", lr=0.01, checkpoint_every=2, out=str(tmp_path / "run"), eval_size=None)
    base.update(changes)
    return TrainConfig(**base)


@pytest.mark.parametrize("name,kind", [("voc-mini", "voc"), ("camvid-mini", "camvid")])
def test_cli_train_resume_evaluate_predict(tmp_path, data_root, capsys, name, kind):
    root = data_root(name)
    out = tmp_path / "run"
    data = f"{kind}:{root}"
    assert cli.main(["train", "--data", data, "--iters", "2", "--out", str(out)] + TINY) == 0
    meta = load_npz_meta(out / "checkpoint.npz")
    assert meta["iteration"] == 2
    assert (out / "log.csv").read_text().count("\n") == 3          # header + 2 iterations
    assert (out / "curves.png").stat().st_size > 0
    # resume to 3 iterations: continues from the saved position
    assert cli.main(["train", "--data", data, "--iters", "3", "--out", str(out), "--resume"] + TINY) == 0
    assert load_npz_meta(out / "checkpoint.npz")["iteration"] == 3
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--eval-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed
    # evaluation reads only the split it scores: a folder with just test.txt (CamVid's official split name)
    only = tmp_path / "only-one-split"
    split_dir = only / ("ImageSets/Segmentation" if kind == "voc" else "splits")
    split_dir.mkdir(parents=True)
    for folder in (("JPEGImages", "SegmentationClass") if kind == "voc" else ("images", "labels")):
        (only / folder).symlink_to(root / folder)
    val_ids = (root / ("ImageSets/Segmentation" if kind == "voc" else "splits") / "val.txt").read_text().split()[:2]
    (split_dir / "test.txt").write_text("\n".join(val_ids) + "\n")
    assert cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--data", f"{kind}:{only}",
                     "--split", "test", "--eval-size", "64"]) == 0       # old: asked for train.txt
    assert "test mIoU" in capsys.readouterr().out
    assert cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--data", f"{kind}:{only}"]) != 0
    assert "val.txt (splits there: test)" in capsys.readouterr().err
    image = sorted((root / ("JPEGImages" if kind == "voc" else "images")).glob("*.jpg"))[0]
    assert cli.main(["predict", "--checkpoint", str(out / "checkpoint.npz"), str(image), "--out",
                     str(tmp_path / "pred"), "--flip", "--scales", "0.75,1"]) == 0
    from PIL import Image
    mask = Image.open(tmp_path / "pred" / f"{image.stem}_mask.png")
    assert mask.mode == "P" and mask.size == Image.open(image).size
    assert (tmp_path / "pred" / f"{image.stem}_overlay.png").exists()


def test_resume_is_bit_exact(tmp_path):
    straight = _tiny_config(tmp_path / "a", iters=4)
    train(straight, progress=False)
    interrupted = _tiny_config(tmp_path / "b", iters=4)
    first = train(interrupted, progress=False, stop_after=3)   # "killed" after 3 of 4 iterations
    assert first["stopped"] and first["iteration"] == 3
    train(interrupted, resume=True, progress=False)
    a, b = load_npz(Path(straight.out) / "checkpoint.npz"), load_npz(Path(interrupted.out) / "checkpoint.npz")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ha, hb = load_npz_meta(Path(straight.out) / "checkpoint.npz")["history"], load_npz_meta(Path(interrupted.out) / "checkpoint.npz")["history"]
    assert ha["loss"] == hb["loss"]


def test_resume_refuses_a_different_model(tmp_path):
    config = _tiny_config(tmp_path, iters=2)
    train(config, progress=False)
    with pytest.raises(ValueError, match="features"):
        train(dataclasses.replace(config, features=8, iters=3), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(dataclasses.replace(config, out=str(tmp_path / "nowhere")), resume=True, progress=False)


def test_divergence_stops_with_the_last_good_checkpoint_intact(tmp_path):
    config = _tiny_config(tmp_path, iters=50, lr=1e8, encoder_lr=1e8, checkpoint_every=1, momentum=0.0)
    with pytest.raises(TrainingDiverged, match="lower --lr") as error:
        train(config, progress=False)
    checkpoint = Path(config.out) / "checkpoint.npz"
    assert "is intact" in str(error.value)
    arrays = load_npz(checkpoint)       # the last good one still loads, with finite weights
    assert all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("model.") and v.dtype.kind == "f")


def test_cli_reports_bad_data_clearly(tmp_path, capsys):
    (tmp_path / "voc" / "ImageSets" / "Segmentation").mkdir(parents=True)
    code = cli.main(["train", "--data", f"voc:{tmp_path / 'voc'}", "--iters", "1", "--out", str(tmp_path / "r")] + TINY)
    assert code == 2
    err = capsys.readouterr().err
    assert "train.txt" in err and "error" in err
    assert cli.main(["train", "--data", "imagenet", "--iters", "1", "--out", str(tmp_path / "r")] + TINY) == 2
    assert "--data must be" in capsys.readouterr().err


def test_loss_parity_with_the_torch_twin_for_20_sgd_steps():
    """Same initial weights, same batches, same SGD: the same losses, float64."""
    pytest.importorskip("torch")
    from tinyrefine.data import DataLoader, Shapes, train_transform
    from tinyrefine.interop.torch_twin import sgd_side_by_side, twin_from
    config = TrainConfig(encoder="resnet18", encoder_width=4, features=8, n_crp=2, freeze_bn=True)
    model = build_model(config, 4).astype(np.float64)
    loader = DataLoader(Shapes("train", n=40, size=40), 2, shuffle=True, seed=0, transform=train_transform(32))
    ours, theirs = sgd_side_by_side(model, twin_from(model), (b for _, b in zip(range(20), loader)))
    assert len(ours) == 20
    np.testing.assert_allclose(ours, theirs, rtol=1e-8)
    assert ours[-1] < ours[0]   # and it learns


def test_pretrained_torchvision_encoder_weights_load_in_one_call(tmp_path):
    """A torchvision-style ResNet .pth (with its fc head) fills the encoder, read without torch's unpickler."""
    torch = pytest.importorskip("torch")
    from tinyrefine.interop.torch_twin import twin_from
    config = TrainConfig(encoder="resnet18", encoder_width=8, features=8, n_crp=1)
    source = twin_from(build_model(dataclasses.replace(config, seed=1), 3))
    state = dict(source.encoder.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet18.pth")
    model = build_model(dataclasses.replace(config, pretrained=str(tmp_path / "resnet18.pth")), 3)
    ours = model.encoder.state_dict()
    assert set(ours) == {k for k in state if not k.startswith("fc.")}
    for key, value in ours.items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    # the 2-scale variant starts both of its encoders from the same file
    two = build_model(dataclasses.replace(config, pretrained=str(tmp_path / "resnet18.pth"), two_scale=True), 3)
    for encoder in (two.encoder, two.encoder_small):
        for key, value in encoder.state_dict().items():
            np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)


def test_cli_trains_and_evaluates_the_two_scale_variant(tmp_path, capsys):
    out = tmp_path / "two"
    args = ["--data", "shapes", "--iters", "3", "--out", str(out), "--two-scale", "--optimizer", "adam",
            "--lr", "1e-3"] + TINY
    assert cli.main(["train"] + args) == 0
    meta = load_npz_meta(out / "checkpoint.npz")
    assert meta["config"]["two_scale"] is True and meta["iteration"] == 3
    weights = load_npz(out / "checkpoint.npz")
    assert "model.encoder_small.layer4.1.conv2.weight" in weights and "model.adapt_small2.weight" in weights
    losses = [float(line.split(",")[1]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--eval-size", "64"]) == 0
    assert "val mIoU" in capsys.readouterr().out
    # a one-scale run refuses to resume it
    assert cli.main(["train"] + [a for a in args if a != "--two-scale"] + ["--resume"]) == 2
    assert "two_scale" in capsys.readouterr().err


def test_cli_demo_trains_evaluates_and_says_where_its_outputs_are(tmp_path, capsys):
    """The README's run command, cut to 3 iterations: the demo's own model, data and outputs."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--iters", "3", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = load_npz_meta(out / "checkpoint.npz")
    assert meta["iteration"] == 3
    assert meta["config"]["data"] == "shapes" and meta["config"]["encoder"] == "resnet18"
    assert meta["config"]["optimizer"] == cli.DEMO["optimizer"] and meta["config"]["lr"] == cli.DEMO["lr"]
    for name in ("log.csv", "history.json", "curves.png", "val_0.png", "val_3.png"):
        assert (out / name).stat().st_size > 0, name
    assert "log.csv, history.json, curves.png" in printed
    assert str(out / "val_0.png") in printed and "val mIoU" in printed
    miou = float(printed.split("val mIoU ")[1].split(",")[0])
    assert 0.0 <= miou <= 1.0
