"""The whole RefineNet: gradients, state dicts, variants, BatchNorm modes, gradient paths."""
import importlib.util

import numpy as np
import pytest

import tinyrefine as tr
from tinyrefine import analysis
from tinyrefine.models import RefineNet
from tinyrefine.nn import BatchNorm2d

TINY = dict(num_classes=3, encoder="resnet18", encoder_width=4, features=4)


def tiny(**kwargs):
    return RefineNet(**{**TINY, **kwargs})


def images(seed=0, shape=(2, 3, 32, 32), dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def labels(seed=0, shape=(2, 32, 32), classes=3):
    target = np.random.default_rng(seed).integers(0, classes, shape)
    target[:, :5, :7] = 255                      # some ignored pixels
    return target


CHECKED = ["encoder.conv1.weight", "encoder.layer1.0.conv2.weight", "encoder.layer2.0.downsample.0.weight",
           "encoder.layer4.1.conv2.weight", "adapt1.weight", "adapt4.weight", "refine4.crp.convs.3.weight",
           "refine3.fusion.convs.0.weight", "refine2.rcus.1.0.conv1.bias", "refine1.out_rcu.conv2.weight",
           "head.rcus.1.conv1.weight", "head.classifier.weight", "head.classifier.bias"]


# --------------------------------------------------------------------------- gradients
def test_whole_model_gradcheck():
    model = tiny().astype(np.float64)
    params = dict(model.named_parameters())
    checked = [params[name] for name in CHECKED]
    for name, p in zip(CHECKED, checked):
        p.name = name
    x = tr.Tensor(images(), requires_grad=True)
    assert tr.gradcheck(model, [x], params=checked, n_samples=4)


def test_whole_model_gradcheck_with_batch_statistics():
    model = tiny(freeze_bn=False, cascade=2, improved_crp=True).astype(np.float64).train()
    params = dict(model.named_parameters())
    names = ["encoder.bn1.weight", "encoder.layer3.1.bn2.bias", "encoder.layer2.0.conv1.weight", "refine1.crp.convs.1.weight"]
    x = tr.Tensor(images(1), requires_grad=True)
    assert tr.gradcheck(model, [x], params=[params[n] for n in names], n_samples=3)


def test_gradient_norms_cover_the_trainable_parameters_in_module_order():
    model = tiny().astype(np.float64)
    norms = analysis.gradient_norms(model, images(), labels())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(norms) == trainable
    assert "encoder.bn1.weight" not in norms          # frozen
    assert all(np.isfinite(v) and v > 0 for v in norms.values())
    assert all(p.grad is None for p in model.parameters())   # the model is left as it was


# --------------------------------------------------------------------------- long-range connections
@pytest.mark.parametrize("cascade", [4, 1])
def test_gradient_at_c1_is_the_sum_over_its_paths(cascade):
    model = tiny(cascade=cascade).astype(np.float64)
    x, t = images(2), labels(2)
    paths = analysis.encoder_gradient_paths(model, x, t, block=1)
    total, long_range, encoder = paths["total"], paths["long_range"], paths["encoder"]
    assert np.linalg.norm(long_range) > 0 and np.linalg.norm(encoder) > 0
    np.testing.assert_allclose(total, long_range + encoder, rtol=1e-10, atol=1e-12 * np.abs(total).max())
    # the same total caught by Tensor hooks on the plain forward's encoder outputs
    hooked = analysis.encoder_output_gradients(model, x, t)
    np.testing.assert_allclose(hooked[0], total, rtol=1e-12, atol=1e-15)
    norms = analysis.encoder_block_gradients(model, x, t)
    assert list(norms) == ["layer1", "layer2", "layer3", "layer4"]
    assert norms["layer1"] == pytest.approx(np.linalg.norm(total))


def test_gradient_paths_add_up_in_the_two_scale_variant():
    model = tiny(two_scale=True, n_crp=2).astype(np.float64)
    x, t = images(5, shape=(1, 3, 56, 54)), labels(5, shape=(1, 56, 54))
    paths = analysis.encoder_gradient_paths(model, x, t, block=1)
    assert paths["total"].shape == (1, 4, 17, 17)          # c1 of the 1.2x encoder (67x65 input)
    np.testing.assert_allclose(paths["total"], paths["long_range"] + paths["encoder"], rtol=1e-10,
                               atol=1e-12 * np.abs(paths["total"]).max())
    np.testing.assert_allclose(analysis.encoder_output_gradients(model, x, t)[0], paths["total"], rtol=1e-12, atol=1e-15)


def test_gradient_paths_of_block_2_also_add_up():
    model = tiny().astype(np.float64)
    paths = analysis.encoder_gradient_paths(model, images(3), labels(3), block=2)
    np.testing.assert_allclose(paths["total"], paths["long_range"] + paths["encoder"], rtol=1e-10, atol=1e-18)


def test_without_long_range_connections_the_long_range_gradient_is_zero():
    x, t = images(4), labels(4)
    cut = tiny(long_range=False).astype(np.float64)
    paths = analysis.encoder_gradient_paths(cut, x, t, block=1)
    assert not np.any(paths["long_range"])
    np.testing.assert_array_equal(paths["total"], paths["encoder"])
    # the forward pass is unchanged by the ablation
    full = tiny().astype(np.float64)
    with tr.no_grad():
        np.testing.assert_array_equal(cut(tr.Tensor(x)).numpy(), full(tr.Tensor(x)).numpy())


def test_feature_hook_sees_the_encoder_outputs_and_may_replace_them():
    model = tiny()
    seen = []
    model.feature_hook = lambda feats: seen.append([f.shape for f in feats])
    model(tr.Tensor(images(dtype=np.float32)))
    assert seen == [[(2, 4, 8, 8), (2, 8, 4, 4), (2, 16, 2, 2), (2, 32, 1, 1)]]
    model.feature_hook = lambda feats: [f * 0.0 for f in feats]
    with tr.no_grad():
        a = model(tr.Tensor(images(0, dtype=np.float32))).numpy()
        b = model(tr.Tensor(images(1, dtype=np.float32))).numpy()
    np.testing.assert_array_equal(a, b)   # no image information reaches the decoder any more


# --------------------------------------------------------------------------- state dicts
def test_state_dict_names():
    model = tiny()
    names = list(model.state_dict())
    expected = ["encoder.conv1.weight", "encoder.bn1.weight", "encoder.bn1.running_mean", "encoder.bn1.num_batches_tracked",
                "encoder.layer1.0.conv1.weight", "encoder.layer2.0.downsample.0.weight", "encoder.layer2.0.downsample.1.running_var",
                "encoder.layer4.1.bn2.bias", "adapt1.weight", "adapt4.weight",
                "refine4.rcus.0.0.conv1.weight", "refine4.rcus.0.0.conv1.bias", "refine4.rcus.0.1.conv2.weight",
                "refine3.rcus.1.1.conv1.bias", "refine3.fusion.convs.0.weight", "refine3.fusion.convs.1.weight",
                "refine4.crp.convs.0.weight", "refine4.crp.convs.3.weight", "refine1.out_rcu.conv1.weight",
                "refine1.out_rcu.conv2.weight", "head.rcus.0.conv1.weight", "head.rcus.1.conv2.weight",
                "head.classifier.weight", "head.classifier.bias"]
    for name in expected:
        assert name in names, name
    assert not any(n.startswith("refine4.fusion") for n in names)        # one path: no fusion convs
    assert not any(n.startswith("encoder.fc") or n.startswith("encoder.avgpool") for n in names)
    assert "refine4.rcus.0.0.conv2.bias" not in names
    assert len(names) == len(set(names))


def test_load_state_dict_strict_errors():
    model, other = tiny(seed=0), tiny(seed=1)
    state = dict(other.state_dict())
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.adapt1.weight.numpy(), other.adapt1.weight.numpy())

    missing = {k: v for k, v in state.items() if k not in ("adapt2.weight", "head.classifier.bias")}
    with pytest.raises(KeyError) as err:
        model.load_state_dict(missing)
    assert "adapt2.weight" in str(err.value) and "head.classifier.bias" in str(err.value)

    with pytest.raises(KeyError, match="encoder.fc.weight"):
        model.load_state_dict({**state, "encoder.fc.weight": np.zeros((3, 32), np.float32)})

    bad = {**state, "adapt3.weight": np.zeros((4, 16, 1, 1), np.float32), "head.classifier.weight": np.zeros((5, 4, 1, 1))}
    with pytest.raises(ValueError) as err:
        model.load_state_dict(bad)
    assert "adapt3.weight" in str(err.value) and "head.classifier.weight" in str(err.value)

    got_missing, got_unexpected = model.load_state_dict({**missing, "extra": np.zeros(1)}, strict=False)
    assert sorted(got_missing) == ["adapt2.weight", "head.classifier.bias"] and got_unexpected == ["extra"]


@pytest.mark.skipif(importlib.util.find_spec("tinyrefine.io") is None, reason="tinyrefine.io not present")
def test_npz_roundtrip(tmp_path):
    io = pytest.importorskip("tinyrefine.io")
    if not all(hasattr(io, f) for f in ("save_npz", "load_npz")):
        pytest.skip("tinyrefine.io has no save_npz/load_npz")
    model, fresh = tiny(seed=0), tiny(seed=5)
    io.save_npz(tmp_path / "m.npz", model.state_dict())
    fresh.load_state_dict(io.load_npz(tmp_path / "m.npz"))
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    x = tr.Tensor(images(dtype=np.float32))
    with tr.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), fresh(x).numpy())


# --------------------------------------------------------------------------- variants and modes
@pytest.mark.parametrize("cascade", [1, 2, 4])
@pytest.mark.parametrize("improved_crp", [False, True])
def test_cascade_variants_forward(cascade, improved_crp):
    model = tiny(cascade=cascade, improved_crp=improved_crp, n_crp=2)
    x = tr.Tensor(images(shape=(2, 3, 40, 36), dtype=np.float32))
    with tr.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 40, 36) and y.dtype == np.float32
    assert np.all(np.isfinite(y.numpy()))
    blocks = {n for n, _ in model.named_children() if n.startswith("refine")}
    assert blocks == {1: {"refine1"}, 2: {"refine1", "refine2"}, 4: {"refine1", "refine2", "refine3", "refine4"}}[cascade]


# --------------------------------------------------------------------------- the 2-scale variant (Fig. 7c)
def test_two_scale_wiring_and_names():
    model = tiny(two_scale=True, n_crp=2)
    names = [n for n, _ in model.named_parameters()]
    # 7 encoder paths: 4 from the 1.2x encoder, 3 from the 0.6x one (its 1/4 map is unused)
    assert [n for n in names if n.startswith("adapt")] == [
        "adapt1.weight", "adapt2.weight", "adapt3.weight", "adapt4.weight",
        "adapt_small2.weight", "adapt_small3.weight", "adapt_small4.weight"]
    assert "encoder_small.layer4.1.conv2.weight" in names and "encoder_small.fc.weight" not in names
    paths = {m: len(getattr(model, f"refine{m}").rcus) for m in (1, 2, 3, 4)}
    assert paths == {4: 3, 3: 3, 2: 2, 1: 2} and sum(paths.values()) - 3 == 7   # minus the 3 cascade inputs
    assert model.refine4.fusion.convs[2].weight.shape == (8, 8, 3, 3)          # refine4 works at 2 * features
    # frozen BN in both encoders; the optimizer puts both in the encoder group
    assert not model.encoder_small.bn1.weight.requires_grad
    from tinyrefine.optim import encoder_decoder_groups
    encoder_group, decoder_group = encoder_decoder_groups(model, lr=1.0)
    assert len(encoder_group["params"]) == sum(1 for n in names if n.startswith("encoder"))
    assert len(encoder_group["params"]) + len(decoder_group["params"]) == len(names)


def test_two_scale_forward_uses_both_scales():
    model = tiny(two_scale=True, n_crp=2)
    seen = {}
    for name in ("encoder", "encoder_small"):
        encoder = getattr(model, name)
        encoder.forward = (lambda f, n: lambda x: seen.setdefault(n, x.shape) and f(x))(encoder.forward, name)
    x = tr.Tensor(images(shape=(2, 3, 60, 70), dtype=np.float32))
    with tr.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 60, 70) and np.all(np.isfinite(y.numpy()))
    assert seen == {"encoder": (2, 3, 72, 84), "encoder_small": (2, 3, 36, 42)}    # x1.2 and x0.6, rounded


def test_two_scale_gradcheck():
    model = tiny(two_scale=True, n_crp=2).astype(np.float64)
    params = dict(model.named_parameters())
    names = ["encoder_small.layer3.0.conv1.weight", "adapt_small2.weight", "adapt_small4.weight",
             "refine4.fusion.convs.2.weight", "refine3.rcus.2.1.conv2.weight", "encoder.layer1.0.conv1.weight"]
    x = tr.Tensor(images(2, shape=(1, 3, 54, 56)), requires_grad=True)
    assert tr.gradcheck(model, [x], params=[params[n] for n in names], n_samples=3)


def test_two_scale_bad_config_and_input():
    with pytest.raises(ValueError, match="4-cascaded"):
        tiny(two_scale=True, cascade=2)
    with pytest.raises(ValueError, match="at least 53x53"):
        tiny(two_scale=True)(tr.Tensor(np.zeros((1, 3, 52, 64), np.float32)))
    with tr.no_grad():
        assert tiny(two_scale=True)(tr.Tensor(np.zeros((1, 3, 53, 53), np.float32))).shape == (1, 3, 53, 53)


def test_config_is_stored():
    model = tiny(cascade=2, n_crp=3, improved_crp=True, seed=7)
    assert model.config == dict(TINY, n_crp=3, cascade=2, freeze_bn=True, improved_crp=True, shortcuts=True,
                                long_range=True, crp_relu=True, two_scale=False, zero_init_residual=False,
                                dropout=0.0, classifier_kernel=1, input_scale=1.0, seed=7)
    rebuilt = RefineNet(**model.config)
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)


def _running_stats(model):
    return {k: v.copy() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_batchnorm_keeps_its_running_stats_in_train_mode(freeze_bn):
    model = tiny(freeze_bn=freeze_bn).train()
    before = _running_stats(model)
    model(tr.Tensor(images(dtype=np.float32)))
    after = _running_stats(model)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    bns = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    if freeze_bn:
        assert changed == []
        assert all(m.frozen and not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    else:
        assert len(changed) == 3 * len(bns)        # running_mean, running_var, num_batches_tracked of every BN
        assert all(m.weight.requires_grad for m in bns)
    # eval mode never touches them
    model.eval()
    model(tr.Tensor(images(dtype=np.float32)))
    assert all(np.array_equal(after[k], v) for k, v in _running_stats(model).items())


def test_train_and_eval_propagate():
    model = tiny()
    model.eval()
    assert all(not m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model.train(False)
    assert not model.encoder.layer3[0].bn1.training and not model.refine2.crp.training


def test_parameter_counts_and_frozen_bn():
    model = tiny()
    bn_params = sum(m.weight.size + m.bias.size for m in model.modules() if isinstance(m, BatchNorm2d))
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - bn_params


@pytest.mark.parametrize("shape,match", [((2, 4, 32, 32), r"\(N, 3, H, W\)"), ((3, 32, 32), r"\(N, 3, H, W\)"),
                                         ((1, 3, 16, 40), "at least 32x32")])
def test_bad_input_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        tiny()(tr.Tensor(np.zeros(shape, np.float32)))


def test_bad_config():
    with pytest.raises(ValueError, match="encoder"):
        RefineNet(encoder="resnet19")
    with pytest.raises(ValueError, match="cascade"):
        tiny(cascade=3)
