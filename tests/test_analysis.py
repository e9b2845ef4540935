"""Gradient-flow helpers of tinyrefine.analysis used by notebook 05: one-pass flow, module grouping, decoder inits."""
import numpy as np
import pytest

from tinyrefine import analysis
from tinyrefine.models import RefineNet

TINY = dict(num_classes=3, encoder="resnet18", encoder_width=4, features=4)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 3, 32, 32)), rng.integers(0, 3, (2, 32, 32))


def test_gradient_flow_matches_the_two_separate_passes():
    model = RefineNet(**TINY).astype(np.float64)
    x, t = batch()
    blocks, norms = analysis.gradient_flow(model, x, t)
    assert blocks == pytest.approx(analysis.encoder_block_gradients(model, x, t), rel=1e-12)
    assert norms == pytest.approx(analysis.gradient_norms(model, x, t), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_module_gradient_norms_group_by_name_prefix():
    norms = {"encoder.conv1.weight": 3.0, "encoder.layer1.0.conv1.weight": 1.0, "encoder.layer1.1.conv2.weight": 1.0,
             "adapt1.weight": 2.0, "refine4.rcus.0.1.conv2.weight": 4.0, "refine4.crp.convs.0.weight": 5.0,
             "head.classifier.weight": 3.0, "head.classifier.bias": 4.0}
    grouped = analysis.module_gradient_norms(norms)
    assert list(grouped) == ["encoder.conv1", "encoder.layer1", "adapt1", "refine4.rcus", "refine4.crp",
                             "head.classifier"]
    assert grouped["encoder.layer1"] == pytest.approx(np.sqrt(2))
    assert grouped["head.classifier"] == pytest.approx(5.0)
    assert list(analysis.module_gradient_norms(norms, depth=1)) == ["encoder", "adapt1", "refine4", "head"]
    with pytest.raises(ValueError):
        analysis.module_gradient_norms(norms, depth=0)


def test_init_decoder_schemes():
    base = RefineNet(**TINY, seed=1)
    state = {k: v.copy() for k, v in base.state_dict().items()}
    he = analysis.init_decoder(RefineNet(**TINY, seed=1), "he", seed=0)
    for name, p in he.named_parameters():
        if name.startswith("encoder") or p.data.ndim != 4:
            np.testing.assert_array_equal(p.data, state[name])          # encoder and biases untouched
        else:
            assert not np.array_equal(p.data, state[name])
    big = RefineNet(**{**TINY, "features": 64}, seed=1)
    w = analysis.init_decoder(big, "he").refine1.out_rcu.conv1.weight.data
    assert w.std() == pytest.approx(np.sqrt(2 / (64 * 9)), rel=0.05)
    zero = analysis.init_decoder(RefineNet(**TINY, seed=1), "zero")
    assert not zero.refine2.rcus[0][1].conv2.weight.data.any() and not zero.head.rcus[0].conv2.weight.data.any()
    assert not zero.refine3.crp.convs[2].weight.data.any() and zero.refine3.rcus[0][1].conv1.weight.data.any()
    default = analysis.init_decoder(RefineNet(**TINY, seed=1), "default")
    for name, value in default.state_dict().items():
        np.testing.assert_array_equal(value, state[name])
    with pytest.raises(ValueError):
        analysis.init_decoder(base, "xavier")
    with pytest.raises(ValueError):
        analysis.init_decoder(RefineNet(**TINY, shortcuts=False), "zero")
