"""RefineNet's building blocks: float64 gradchecks and exact identity mappings."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine.models import ChainedResidualPooling, MultiResolutionFusion, RefineNetBlock, ResidualConvUnit


def randn(rng, *shape, requires_grad=True):
    return tr.Tensor(rng.standard_normal(shape), requires_grad=requires_grad)


def f64(module):
    return module.astype(np.float64)


def zero(*convs):
    for conv in convs:
        conv.weight.data[...] = 0
        if conv.bias is not None:
            conv.bias.data[...] = 0


def block_convs(block):
    return [m for m in block.modules() if type(m).__name__ == "Conv2d"]


# --------------------------------------------------------------------------- gradchecks
def test_rcu_gradcheck():
    rng = np.random.default_rng(0)
    rcu = f64(ResidualConvUnit(3, rng=rng))
    x = randn(rng, 2, 3, 6, 7)
    assert tr.gradcheck(rcu, [x], params=list(rcu.parameters()))


@pytest.mark.parametrize("sizes", [[(5, 5), (9, 9)], [(3, 4), (5, 7), (9, 13)]])
def test_fusion_gradcheck(sizes):
    rng = np.random.default_rng(1)
    channels = [4, 3, 2][:len(sizes)]
    fusion = f64(MultiResolutionFusion(channels, 3, rng=rng))
    xs = [randn(rng, 2, c, *hw) for c, hw in zip(channels, sizes)]
    y = fusion(xs)
    assert y.shape == (2, 3, *sizes[-1])
    assert tr.gradcheck(lambda *xs: fusion(list(xs)), xs, params=list(fusion.parameters()), n_samples=12)


@pytest.mark.parametrize("n_blocks", [2, 4])
@pytest.mark.parametrize("improved", [False, True])
def test_crp_gradcheck(n_blocks, improved):
    rng = np.random.default_rng(2 + n_blocks + improved)
    crp = f64(ChainedResidualPooling(3, n_blocks, improved=improved, rng=rng))
    x = randn(rng, 2, 3, 7, 6)
    assert tr.gradcheck(crp, [x], params=list(crp.parameters()), n_samples=15)


@pytest.mark.parametrize("in_channels,sizes", [([3], [(6, 6)]), ([4, 3], [(5, 5), (9, 8)])])
def test_refinenet_block_gradcheck(in_channels, sizes):
    rng = np.random.default_rng(3)
    block = f64(RefineNetBlock(in_channels, 3, n_crp=2, rng=rng))
    xs = [randn(rng, 2, c, *hw) for c, hw in zip(in_channels, sizes)]
    assert block(*xs).shape == (2, 3, *sizes[-1])
    assert tr.gradcheck(block, xs, params=list(block.parameters()), n_samples=6)


def test_shortcut_free_blocks_gradcheck():
    rng = np.random.default_rng(4)
    block = f64(RefineNetBlock([3, 3], 3, n_crp=2, shortcuts=False, rng=rng))
    xs = [randn(rng, 2, 3, 4, 4), randn(rng, 2, 3, 7, 7)]
    assert tr.gradcheck(block, xs, params=list(block.parameters()), n_samples=4)


# --------------------------------------------------------------------------- identity mappings
def test_rcu_with_zero_branch_is_identity():
    rng = np.random.default_rng(5)
    rcu = ResidualConvUnit(4, rng=rng)
    zero(rcu.conv1, rcu.conv2)
    x = tr.Tensor(rng.standard_normal((2, 4, 6, 9)).astype(np.float32))
    np.testing.assert_array_equal(rcu(x).numpy(), x.numpy())


@pytest.mark.parametrize("improved", [False, True])
def test_crp_with_zero_convs_is_relu(improved):
    rng = np.random.default_rng(6)
    crp = ChainedResidualPooling(4, 4, improved=improved, rng=rng)
    zero(*crp.convs)
    x = tr.Tensor(rng.standard_normal((2, 4, 7, 8)).astype(np.float32))
    np.testing.assert_array_equal(crp(x).numpy(), np.maximum(x.numpy(), 0))


def test_one_path_block_with_zero_convs_is_relu():
    rng = np.random.default_rng(7)
    block = RefineNetBlock([4], 4, rng=rng)
    zero(*block_convs(block))
    x = tr.Tensor(rng.standard_normal((2, 4, 6, 6)).astype(np.float32))
    np.testing.assert_array_equal(block(x).numpy(), np.maximum(x.numpy(), 0))


def test_two_path_block_passes_the_upsampled_coarse_path():
    rng = np.random.default_rng(8)
    block = f64(RefineNetBlock([4, 3], 4, rng=rng))
    zero(*block_convs(block))
    identity = np.zeros((4, 4, 3, 3))
    identity[np.arange(4), np.arange(4), 1, 1] = 1.0
    block.fusion.convs[0].weight.data[...] = identity      # coarse path: identity; fine path: zeros
    coarse = tr.Tensor(rng.standard_normal((2, 4, 5, 4)))
    fine = tr.Tensor(rng.standard_normal((2, 3, 9, 7)))
    expected = np.maximum(F.interpolate(coarse, size=(9, 7), align_corners=True).numpy(), 0)
    np.testing.assert_array_equal(block(coarse, fine).numpy(), expected)


def test_shortcuts_false_changes_the_output():
    xs = [tr.Tensor(np.random.default_rng(9).standard_normal((1, 3, 4, 4)).astype(np.float32)),
          tr.Tensor(np.random.default_rng(10).standard_normal((1, 3, 8, 8)).astype(np.float32))]
    with_ = RefineNetBlock([3, 3], 3, n_crp=2, rng=np.random.default_rng(0))(*xs).numpy()
    without = RefineNetBlock([3, 3], 3, n_crp=2, shortcuts=False, rng=np.random.default_rng(0))(*xs).numpy()
    assert with_.shape == without.shape
    assert np.abs(with_ - without).max() > 1e-3


def test_fusion_rejects_the_wrong_number_of_paths():
    fusion = MultiResolutionFusion([3, 3], 3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="expects 2 paths"):
        fusion([tr.Tensor(np.zeros((1, 3, 4, 4), np.float32))])
