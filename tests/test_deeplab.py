"""DeepLabv3 and FCN against torchvision's own models (the oracle), and the atrous ResNet options.

torchvision's compiled ops do not load with the CPU torch wheel; its model code is pure Python,
so an empty ``torchvision._meta_registrations`` module is put in sys.modules before the import.
"""
import sys
import types

import numpy as np
import pytest

import tinyrefine as tr
from tinyrefine.models import FCN, ASPPPooling, DeepLabV3, ResNet

INSTALL = "pip install torchvision==0.28.0 --no-deps (the version that matches torch 2.13.0)"


def _torchvision():
    torch = pytest.importorskip("torch")
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision.models.segmentation as segmentation
    except ImportError as exc:
        pytest.skip(f"torchvision is not importable ({exc}); {INSTALL}")
    return torch, segmentation


def _tv_model(segmentation, name: str, aux: bool):
    torch = sys.modules["torch"]
    torch.manual_seed(0)
    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=21, aux_loss=aux)


def _ours(name: str, aux: bool):
    kind, encoder = name.split("_")
    return (DeepLabV3 if kind == "deeplabv3" else FCN)(21, encoder, aux_loss=aux)


def _numpy_state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- names, shapes, counts
@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "fcn_resnet50", "deeplabv3_resnet101", "fcn_resnet101"])
def test_state_dict_names_and_shapes_are_torchvisions(name):
    _, segmentation = _torchvision()
    theirs = _tv_model(segmentation, name, aux=True)
    ours = _ours(name, aux=True)
    their_state = _numpy_state(theirs)
    assert list(ours.state_dict()) == list(their_state)           # same names, same order
    for key, value in ours.state_dict().items():
        assert value.shape == their_state[key].shape, key
    ours.load_state_dict(their_state)                             # strict: loads unchanged
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())


def test_deeplabv3_resnet50_parameter_count():
    # torchvision's deeplabv3_resnet50 with 21 classes and no aux head: 39,638,869 (39.6 M)
    assert DeepLabV3(21, "resnet50").num_parameters() == 39_638_869
    assert FCN(21, "resnet50").num_parameters() == 32_957_013


# --------------------------------------------------------------------------- float64 parity
def _set_dropout(module, p: float) -> None:
    for m in module.modules():
        if type(m).__name__ == "Dropout":
            m.p = p


@pytest.mark.parametrize("name,train", [("deeplabv3_resnet50", True), ("fcn_resnet50", False)])
def test_logits_and_gradients_match_torchvision(name, train):
    """Full-size ResNet-50 models with aux heads, float64, a 2x3x27x23 batch (odd sizes test the
    upsampling); train mode (batch statistics, the ASPP pooling BN on 1x1 maps) with dropout set to
    0 on both sides, or eval mode (running statistics, dropout off)."""
    torch, segmentation = _torchvision()
    theirs = _tv_model(segmentation, name, aux=True).double()
    ours = _ours(name, aux=True)
    ours.load_state_dict(_numpy_state(theirs))
    ours.astype(np.float64)
    # non-trivial running statistics, so eval mode is not close to the identity
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for (buf_name, buf), (_, our_buf) in zip(theirs.named_buffers(), ours.named_buffers()):
            if buf.dtype == torch.float64:
                low, high = (0.5, 1.5) if buf_name.endswith("running_var") else (-0.2, 0.2)
                buf.copy_(torch.from_numpy(rng.uniform(low, high, buf.shape)))
                our_buf.data[...] = buf.numpy()
    theirs.train(train), ours.train(train)
    _set_dropout(theirs, 0.0), _set_dropout(ours, 0.0)
    x = rng.standard_normal((2, 3, 27, 23))
    g_main, g_aux = rng.standard_normal((2, 21, 27, 23)), rng.standard_normal((2, 21, 27, 23))

    out = theirs(torch.from_numpy(x))
    (out["out"] * torch.from_numpy(g_main)).sum().add((out["aux"] * torch.from_numpy(g_aux)).sum()).backward()
    main, aux = ours.forward_with_aux(tr.Tensor(x))
    ((main * g_main).sum() + (aux * g_aux).sum()).backward()

    def rel(a, b):
        assert np.abs(b).max() > 0   # a dead gradient would prove nothing
        return np.abs(a - b).max() / np.abs(b).max()

    errors = {"main": rel(main.data, out["out"].detach().numpy()), "aux": rel(aux.data, out["aux"].detach().numpy())}
    their_grads = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    errors["worst gradient"] = max(rel(p.grad, their_grads[k]) for k, p in ours.named_parameters())
    print(name, "train" if train else "eval", {k: f"{v:.1e}" for k, v in errors.items()})   # shown with -s
    assert errors["main"] < 1e-10 and errors["aux"] < 1e-10 and errors["worst gradient"] < 1e-9, errors
    if train:  # the running statistics moved the same way
        their_bufs = _numpy_state(theirs)
        assert max(rel(b.data, their_bufs[k]) for k, b in ours.named_buffers() if b.dtype == np.float64) < 1e-10


def test_output_stride_16_head_matches_torchvision():
    """The paper's setting without multi-grid: torchvision's ResNet with [False, False, True] and
    DeepLabHead at rates (6, 12, 18), assembled by hand, against DeepLabV3(output_stride=16)."""
    torch, segmentation = _torchvision()
    from torchvision.models import resnet50
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    torch.manual_seed(0)
    backbone = IntermediateLayerGetter(resnet50(replace_stride_with_dilation=[False, False, True]),
                                       return_layers={"layer4": "out"})
    theirs = segmentation.DeepLabV3(backbone, DeepLabHead(2048, 21, [6, 12, 18])).double().eval()
    ours = DeepLabV3(21, "resnet50", output_stride=16)
    assert ours.aspp_rates == (6, 12, 18)
    ours.load_state_dict(_numpy_state(theirs))
    ours.astype(np.float64).eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 27, 27))
    expected = theirs(torch.from_numpy(x))["out"].detach().numpy()
    got = ours(tr.Tensor(x)).data
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print("output stride 16 logits", f"{error:.1e}")   # shown with -s
    assert error < 1e-10


# --------------------------------------------------------------------------- atrous ResNet options (no torch)
def _rates(model: ResNet, layer: str):
    return [block.conv2.dilation for block in getattr(model, layer)]


def test_replace_stride_with_dilation_follows_torchvision():
    # torchvision's rule: a dilated layer's first block keeps the previous dilation
    os8 = ResNet(50, width=4, replace_stride_with_dilation=[False, True, True])
    assert _rates(os8, "layer3") == [1, 2, 2, 2, 2, 2] and _rates(os8, "layer4") == [2, 4, 4]
    assert os8.output_strides == [4, 8, 8, 8]
    os16 = ResNet(50, width=4, replace_stride_with_dilation=[False, False, True])
    assert _rates(os16, "layer3") == [1] * 6 and _rates(os16, "layer4") == [1, 2, 2]
    assert os16.output_strides == [4, 8, 16, 16]
    assert list(ResNet(50, width=4, dilated=True).state_dict()) == list(os8.state_dict())
    assert _rates(ResNet(50, width=4, dilated=True), "layer4") == [2, 4, 4]
    x = tr.Tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32))
    assert [c.shape[2] for c in os16.eval()(x)] == [16, 8, 4, 4]


def test_multi_grid_multiplies_layer4_rates():
    # DeepLabv3, Sec. 3.2: output stride 16 and multi-grid (1, 2, 4) give rates 2 * (1, 2, 4) in block4
    model = DeepLabV3(5, "resnet50", output_stride=16, multi_grid=(1, 2, 4), width=4)
    assert _rates(model.backbone, "layer4") == [2, 4, 8]
    assert [b.conv2.padding for b in model.backbone.layer4] == [2, 4, 8]     # sizes kept
    assert _rates(DeepLabV3(5, "resnet50", multi_grid=(1, 2, 4), width=4).backbone, "layer4") == [4, 8, 16]
    x = tr.Tensor(np.random.default_rng(0).standard_normal((2, 3, 48, 48)).astype(np.float32))
    assert model(x).shape == (2, 5, 48, 48)


@pytest.mark.parametrize("kwargs,message", [
    (dict(multi_grid=(1, 2)), "3 positive unit rates"),
    (dict(replace_stride_with_dilation=[True, True]), "3 flags"),
    (dict(dilated=True, replace_stride_with_dilation=[False, True, True]), "not both"),
])
def test_resnet_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNet(50, width=4, **kwargs)


def test_model_option_errors():
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        DeepLabV3(output_stride=32, width=4)
    with pytest.raises(ValueError, match="encoder must be one of"):
        FCN(encoder="vgg16", width=4)
    with pytest.raises(ValueError, match="no aux head"):
        DeepLabV3(3, "resnet18", width=4).forward_with_aux(tr.Tensor(np.zeros((1, 3, 32, 32), np.float32)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        FCN(3, "resnet18", width=4)(tr.Tensor(np.zeros((1, 1, 32, 32), np.float32)))


def test_image_pooling_branch_is_constant_over_space_and_gradchecks():
    pool = ASPPPooling(3, 2, rng=np.random.default_rng(0)).astype(np.float64).eval()
    x = tr.Tensor(np.random.default_rng(1).standard_normal((2, 3, 5, 4)), requires_grad=True)
    y = pool(x).data
    assert y.shape == (2, 2, 5, 4) and np.allclose(y, y[:, :, :1, :1])
    assert tr.gradcheck(lambda t: pool(t), [x])


# --------------------------------------------------------------------------- command line
def test_predict_with_torchvision_weights_needs_no_torch(tmp_path):
    """``predict --weights`` on a torchvision deeplabv3_resnet50 file (legacy format, random weights,
    non-trivial BN statistics) in a process where torch cannot be imported: its mask is torchvision's
    argmax on the same normalised image, and the normalisation is torchvision's."""
    torch, segmentation = _torchvision()
    from PIL import Image
    from tinyrefine.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_mask
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights
    preset = DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.transforms()
    assert tuple(preset.mean) == IMAGENET_MEAN and tuple(preset.std) == IMAGENET_STD
    theirs = _tv_model(segmentation, "deeplabv3_resnet50", aux=True).eval()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for name, buf in theirs.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.from_numpy(rng.uniform(-0.2, 0.2, buf.shape)))
    torch.save(theirs.state_dict(), tmp_path / "deeplab.pth", _use_new_zipfile_serialization=False)
    image = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    normalized, _ = eval_transform(None)(image, np.zeros((48, 56), np.uint8), None)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(normalized[None]))["out"][0].argmax(0).numpy()

    import subprocess
    code = ("import sys; sys.modules['torch'] = None; from tinyrefine.cli import main; "
            f"sys.exit(main(['predict', '--weights', {str(tmp_path / 'deeplab.pth')!r}, '--model', 'deeplabv3', "
            f"{str(tmp_path / 'photo.png')!r}, '--out', {str(tmp_path / 'out')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    mask = load_mask(tmp_path / "out" / "photo_mask.png")
    assert len(np.unique(expected)) > 1 and (mask == expected).mean() > 0.99

    from tinyrefine import cli
    assert cli.main(["predict", "--weights", str(tmp_path / "deeplab.pth"), "--model", "fcn",
                     str(tmp_path / "photo.png")]) == 2     # the file holds a deeplabv3
    assert cli.main(["evaluate", "--weights", str(tmp_path / "deeplab.pth")]) == 2   # which data set?


@pytest.mark.parametrize("model", ["deeplabv3", "fcn"])
def test_train_evaluate_predict_with_model_flag(tmp_path, model, capsys):
    from PIL import Image
    from tinyrefine import cli
    from tinyrefine.io import load_npz_meta
    out = tmp_path / "run"
    tiny = ["--data", "shapes:48", "--encoder", "resnet18", "--encoder-width", "4", "--features", "8", "--crop", "48",
            "--batch-size", "2", "--iters", "2", "--eval-limit", "2", "--out", str(out), "--quiet"]
    assert cli.main(["train", "--model", model, "--output-stride", "16"] + tiny) == 0
    config = load_npz_meta(out / "checkpoint.npz")["config"]
    assert config["model"] == model and config["output_stride"] == 16
    checkpoint = ["--checkpoint", str(out / "checkpoint.npz")]
    if model == "fcn":
        assert cli.main(["train", "--model", model, "--two-scale"] + tiny) == 2
        assert "two_scale apply to --model refinenet only" in capsys.readouterr().err
        return  # evaluate and predict are the same code for both
    assert cli.main(["evaluate", "--model", model] + checkpoint) == 0
    other = "fcn" if model == "deeplabv3" else "deeplabv3"
    assert cli.main(["evaluate", "--model", other] + checkpoint) == 2
    assert f"holds a {model}, not a {other}" in capsys.readouterr().err
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img.png")
    assert cli.main(["predict", str(tmp_path / "img.png"), "--out", str(tmp_path / "pred")] + checkpoint) == 0
    assert (tmp_path / "pred" / "img_mask.png").exists()


@pytest.mark.parametrize("kind", ["deeplabv3", "fcn"])
def test_training_loss_adds_the_weighted_aux_loss(kind):
    """main + w * aux, each the configured loss on its own head's logits (eval mode: no dropout draws)."""
    from tinyrefine.train import TrainConfig, build_model, segmentation_loss, training_loss
    config = TrainConfig(model=kind, encoder="resnet18", encoder_width=4, features=8, aux_loss=0.4, output_stride=16)
    model = build_model(config, 3).eval()
    rng = np.random.default_rng(0)
    images = tr.Tensor(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    masks = rng.integers(0, 3, (2, 32, 32))
    masks[0, :4] = 255
    main, aux = model.forward_with_aux(images)
    expected = segmentation_loss(main, masks).item() + 0.4 * segmentation_loss(aux, masks).item()
    assert abs(training_loss(model, images, masks, config).item() - expected) < 1e-5 * expected
    plain = TrainConfig(model=kind, encoder="resnet18", encoder_width=4, features=8, output_stride=16)
    assert build_model(plain, 3).aux_classifier is None       # no weight, no aux head
    assert abs(training_loss(model, images, masks, plain).item() - segmentation_loss(main, masks).item()) < 1e-6


def test_train_with_aux_loss_trains_the_aux_head_and_keeps_it_in_the_checkpoint(tmp_path, capsys):
    from tinyrefine import cli
    from tinyrefine.train import TrainConfig, build_model, load_checkpoint, load_model
    out = tmp_path / "run"
    tiny = ["--data", "shapes:48", "--encoder", "resnet18", "--encoder-width", "4", "--features", "8", "--crop", "48",
            "--batch-size", "2", "--iters", "2", "--eval-limit", "2", "--out", str(out), "--quiet", "--output-stride", "16"]
    assert cli.main(["train", "--model", "deeplabv3", "--aux-loss", "0.5"] + tiny) == 0
    state, _, _ = load_checkpoint(out / "checkpoint.npz")
    initial = build_model(TrainConfig(model="deeplabv3", encoder="resnet18", encoder_width=4, features=8,
                                      output_stride=16, aux_loss=0.5), 4).state_dict()
    aux_keys = [k for k in initial if k.startswith("aux_classifier.") and k.endswith("weight")]
    assert aux_keys and all(k in state for k in aux_keys)
    assert any(not np.array_equal(state[k], np.asarray(getattr(initial[k], "data", initial[k])))
               for k in aux_keys)                             # two SGD steps moved the aux head
    model, meta = load_model(str(out / "checkpoint.npz"))     # rebuilt with its aux head, loaded strictly
    assert meta["config"]["aux_loss"] == 0.5 and model.aux_classifier is not None
    assert cli.main(["train", "--model", "deeplabv3", "--aux-loss", "0.2", "--resume"] + tiny) == 2
    assert "aux_loss: checkpoint 0.5 vs now 0.2" in capsys.readouterr().err
    assert cli.main(["train", "--aux-loss", "0.5"] + tiny) == 2                    # refinenet
    assert "aux_loss applies to --model deeplabv3 / fcn" in capsys.readouterr().err
    assert cli.main(["train", "--model", "fcn", "--aux-loss", "-1"] + tiny) == 2
    assert "aux_loss is the auxiliary loss's weight, >= 0; got -1.0" in capsys.readouterr().err


def test_valid_weight_fraction_check_names_the_mistake(capsys):
    from tinyrefine.exercises import check_valid_weight_fraction

    def right(size, rate):
        return ((size + 2 * max(size - rate, 0)) / (3 * size)) ** 2

    def stub(size, rate):
        raise NotImplementedError

    assert check_valid_weight_fraction(right)
    assert not check_valid_weight_fraction(lambda size, rate: 1.0)                           # padding counted
    assert not check_valid_weight_fraction(lambda size, rate: right(size, rate) ** 0.5)      # one axis only
    assert not check_valid_weight_fraction(lambda size, rate: ((3 * size - 2 * rate) / (3 * size)) ** 2)  # no max(0)
    assert not check_valid_weight_fraction(stub)
    out = capsys.readouterr().out
    for hint in ("does not count", "AND its column", "never drops below 1/9", "not attempted yet"):
        assert hint in out, hint


def test_deeplabv3_on_cuda_matches_cpu():
    """A small DeepLabV3 with its aux head (float64, train mode, dropout off) on CUDA against the CPU: logits and
    gradients. Runs on a GPU or under the CuPy emulator (../shared/tools/fakecupy first on PYTHONPATH)."""
    if not tr.cuda_available():
        pytest.skip("CuPy with a GPU is not available (or put ../shared/tools/fakecupy first on PYTHONPATH)")
    from tinyrefine import backend
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 31))
    grads, outputs = [], []
    for device in ("cpu", "cuda"):
        model = DeepLabV3(5, "resnet18", output_stride=16, width=4, aspp_channels=8, aux_loss=True, seed=1)
        model.astype(np.float64).to(device).train()
        _set_dropout(model, 0.0)
        main, aux = model.forward_with_aux(tr.Tensor(backend.to_device(x, device)))
        (main.sum() + (aux * aux).sum()).backward()
        outputs.append([backend.as_numpy(t.data) for t in (main, aux)])
        grads.append({k: backend.as_numpy(p.grad) for k, p in model.named_parameters()})
    for ours, theirs in zip(outputs[1], outputs[0]):
        assert np.abs(ours - theirs).max() <= 1e-10 * np.abs(theirs).max()
    for key, cpu_grad in grads[0].items():
        assert np.abs(grads[1][key] - cpu_grad).max() <= 1e-9 * max(np.abs(cpu_grad).max(), 1e-30), key
