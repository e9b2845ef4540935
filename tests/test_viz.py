"""viz helpers report the right numbers (not just a figure): gradient norms, feature-map grids,
activation memory in exact bytes; and the dilated (output stride 8) ResNet encoder."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tinyrefine.functional as F  # noqa: E402
from tinyrefine import analysis  # noqa: E402
from tinyrefine.engine import Function, Tensor  # noqa: E402
from tinyrefine.models import RefineNet  # noqa: E402
from tinyrefine.models.resnet import ResNet  # noqa: E402
from tinyrefine.nn import BatchNorm2d, Conv2d, ReLU, Sequential  # noqa: E402
from tinyrefine.viz import activation_memory, memory_report, plot_grad_flow, show_feature_maps  # noqa: E402


def _tiny_refinenet(**kwargs):
    return RefineNet(3, "resnet18", features=8, encoder_width=4, seed=0, **kwargs)


def _batch(n=1, size=32, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, size, size)).astype(np.float32),
            rng.integers(0, classes, (n, size, size)))


# --------------------------------------------------------------------------- plot_grad_flow
def test_plot_grad_flow_model_norms_match_hand_computed():
    model = _tiny_refinenet()
    images, target = _batch()
    F.cross_entropy(model(Tensor(images)), target).backward()
    names, norms = plot_grad_flow(model)
    expected = {n: (np.linalg.norm(p.grad.astype(np.float64).ravel()) if p.grad is not None else 0.0)
                for n, p in model.named_parameters() if p.requires_grad}
    assert names == list(expected)                      # module order, trainable only
    np.testing.assert_allclose(norms, [expected[n] for n in names], rtol=1e-12)
    assert (norms > 0).sum() > len(names) // 2
    # weights_only keeps the rank > 1 parameters (conv weights), in the same order
    w_names, w_norms = plot_grad_flow(model, weights_only=True)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    assert w_names == [n for n in names if len(shapes[n]) > 1]
    np.testing.assert_allclose(w_norms, [expected[n] for n in w_names], rtol=1e-12)
    plt.close("all")


def test_plot_grad_flow_accepts_gradient_norms_dict():
    model = _tiny_refinenet()
    images, target = _batch()
    norms_dict = analysis.gradient_norms(model, images, target)
    fig, ax = plt.subplots()
    names, norms = plot_grad_flow(norms_dict, ax=ax, kind="line", label="init")
    assert names == list(norms_dict)
    np.testing.assert_array_equal(norms, np.array(list(norms_dict.values())))
    assert ax.get_yscale() == "log"
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), norms)          # every norm > 0: drawn as is
    _, zero = plot_grad_flow({"a": 0.0, "b": 1e-20, "c": 2.0}, ax=ax, kind="line")
    np.testing.assert_array_equal(zero, [0.0, 1e-20, 2.0])         # returned exactly ...
    np.testing.assert_allclose(ax.get_lines()[-1].get_ydata(), [1e-21, 1e-20, 2.0])   # ... a zero drawn at min/10
    # the model's own gradients were left untouched by gradient_norms, and match its numbers
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(Tensor(images)), target).backward()
    _, from_model = plot_grad_flow(model, ax=ax, kind="line")
    np.testing.assert_allclose(from_model, norms, rtol=1e-5)
    plt.close("all")


# --------------------------------------------------------------------------- show_feature_maps
def test_show_feature_maps_grid_and_normalisation():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((1, 5, 4, 6)).astype(np.float32) * 7 + 3
    maps[0, 2] = 1.5                                     # a constant channel
    grid = show_feature_maps(Tensor(maps), n=5, cols=3)
    assert grid.shape == (2 * 5 - 1, 3 * 7 - 1)          # 2 rows of 4 + gap, 3 columns of 6 + gaps
    for k in range(5):
        r, c = divmod(k, 3)
        tile = grid[r * 5:r * 5 + 4, c * 7:c * 7 + 6]
        a = maps[0, k].astype(np.float64)
        expected = np.zeros_like(a) if k == 2 else (a - a.min()) / (a.max() - a.min())
        np.testing.assert_allclose(tile, expected, atol=1e-12)
    assert np.isnan(grid[4]).all() and np.isnan(grid[:, 6]).all()     # the gaps
    assert np.isnan(grid[5:, 14:]).all()                                # the unused sixth cell
    assert np.nanmin(grid) == 0.0 and np.nanmax(grid) == 1.0
    # n caps the channels; the default layout is one row of up to 8
    grid = show_feature_maps(rng.standard_normal((12, 3, 3)), n=8)
    assert grid.shape == (3, 8 * 4 - 1)
    with pytest.raises(ValueError):
        show_feature_maps(np.zeros((2, 3, 4, 4)))
    plt.close("all")


# --------------------------------------------------------------------------- activation_memory
def test_activation_memory_conv_relu_exact_bytes():
    rng = np.random.default_rng(0)
    model = Sequential(Conv2d(3, 4, 3, padding=1, rng=rng), ReLU())
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    rows = activation_memory(model, x)
    # conv node saves its input x and its weight (not the bias); the module outputs y
    x_bytes, w_bytes, y_bytes = 2 * 3 * 8 * 8 * 4, 4 * 3 * 3 * 3 * 4, 2 * 4 * 8 * 8 * 4
    # relu node saves a bool mask (1 byte per element); the module outputs relu(y)
    mask_bytes, out_bytes = 2 * 4 * 8 * 8 * 1, 2 * 4 * 8 * 8 * 4
    assert rows == [("0", x_bytes + w_bytes + y_bytes), ("1", mask_bytes + out_bytes)]
    assert activation_memory(model, x, include_parameters=False) == [("0", x_bytes + y_bytes), ("1", mask_bytes + out_bytes)]
    report = memory_report(rows)
    assert f"{x_bytes + w_bytes + y_bytes + mask_bytes + out_bytes:,d}" in report.splitlines()[-1]


def test_activation_memory_dedupes_shared_arrays_and_restores_everything():
    rng = np.random.default_rng(0)
    bn = BatchNorm2d(4)                                  # training mode: batch statistics, updates buffers
    model = Sequential(Conv2d(3, 4, 3, padding=1, bias=False, rng=rng), bn, Conv2d(4, 2, 1, rng=rng))
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    running = bn.running_mean.data.copy(), bn.running_var.data.copy()
    call = Function.__call__
    rows = dict(activation_memory(model, x, include_parameters=False))
    act = 2 * 4 * 5 * 5 * 4
    # conv0: x + its output. bn: xhat + inv_std + output (its input, conv0's output, is not saved).
    # conv1 saves bn's output as its x: already counted, so only its own output is new
    assert rows == {"0": 2 * 3 * 5 * 5 * 4 + act, "1": act + 4 * 4 + act, "2": 2 * 2 * 5 * 5 * 4}
    assert Function.__call__ is call
    assert all("forward" not in vars(m) for m in model.modules())
    np.testing.assert_array_equal(bn.running_mean.data, running[0])
    np.testing.assert_array_equal(bn.running_var.data, running[1])
    assert all(p.grad is None for p in model.parameters())


def test_activation_memory_refinenet_per_module():
    model = _tiny_refinenet()
    images, _ = _batch(size=64)
    rows = activation_memory(model, images)
    names = [n for n, _ in rows]
    for name in ("encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4", "adapt1", "adapt4",
                 "refine4", "refine3", "refine2", "refine1", "head"):
        assert name in names
    assert all(b > 0 for _, b in rows)
    # the final upsample (in RefineNet.forward itself) saves its interpolation matrix + the output: on a square
    # map A_h and A_w are one cached array (F.interpolation_tables), counted once
    assert dict(rows)["(model)"] == 1 * 64 * 16 * 4 + 1 * 3 * 64 * 64 * 4
    # more pixels, more memory (about 4x for twice the side)
    bigger = sum(b for _, b in activation_memory(model, _batch(size=128)[0], include_parameters=False))
    smaller = sum(b for _, b in activation_memory(model, images, include_parameters=False))
    assert 3.5 < bigger / smaller < 4.5
    with pytest.raises(ValueError):
        activation_memory(model, images, groups=["nope"])
    # the model still works normally afterwards
    assert model(Tensor(images)).shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------- dilated encoder
@pytest.mark.parametrize("depth", [18, 50])
def test_dilated_encoder_output_stride_8(depth):
    enc = ResNet(depth, width=4, dilated=True, rng=np.random.default_rng(0))
    x = Tensor(np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32))
    outs = enc(x)
    assert [o.shape[2:] for o in outs] == [(16, 16), (8, 8), (8, 8), (8, 8)]      # 1/4, 1/8, 1/8, 1/8
    assert [o.shape[1] for o in outs] == enc.out_channels
    assert enc.output_strides == [4, 8, 8, 8]
    conv = "conv1" if depth == 18 else "conv2"           # the (first) 3x3 conv of each block
    dil = [getattr(b, conv).dilation for layer in (enc.layer3, enc.layer4) for b in layer]
    # torchvision: a layer's first block keeps the previous dilation
    assert dil[:2] == [1, 2] and dil[len(enc.layer3)] == 2 and dil[-1] == 4
    for layer in (enc.layer3, enc.layer4):
        assert layer[0].downsample[0].stride == 1
        for b in layer:
            c = getattr(b, conv)
            assert c.stride == 1 and c.padding == c.dilation   # 'same' size for a dilated 3x3


@pytest.mark.parametrize("depth", [18, 50])
def test_undilated_encoder_unchanged(depth):
    plain = ResNet(depth, width=4, rng=np.random.default_rng(0))
    dilated = ResNet(depth, width=4, dilated=True, rng=np.random.default_rng(0))
    a, b = plain.state_dict(), dilated.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)      # dilation adds no weights
    assert all(np.array_equal(a[k], b[k]) for k in a)                            # same draws, same order
    assert all(m.dilation == 1 for m in plain.modules() if isinstance(m, Conv2d))
    assert plain.output_strides == [4, 8, 16, 32]
    x = Tensor(np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32))
    assert [o.shape[2:] for o in plain(x)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    # the 3x3 convs keep stride 2 at the start of layer2..4 and padding 1
    for layer in (plain.layer2, plain.layer3, plain.layer4):
        c = layer[0].conv1 if depth == 18 else layer[0].conv2
        assert (c.stride, c.padding) == (2, 1)
    # RefineNet's encoder (built without the flag) has the same names and shapes as before
    ref = RefineNet(3, f"resnet{depth}", features=8, encoder_width=4).encoder.state_dict()
    assert list(ref) == list(a) and all(ref[k].shape == a[k].shape for k in a)


def test_plot_grad_flow_weights_only_with_dict_needs_model():
    model = _tiny_refinenet()
    norms = analysis.gradient_norms(model, *_batch())
    names, values = plot_grad_flow(norms, weights_only=True, model=model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert names == [n for n in norms if len(shapes[n]) > 1] and len(names) < len(norms)
    np.testing.assert_array_equal(values, [norms[n] for n in names])
    with pytest.raises(ValueError):
        plot_grad_flow(norms, weights_only=True)
    plt.close("all")
