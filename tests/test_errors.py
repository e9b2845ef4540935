"""Bad inputs fail early with an error that names the problem."""
import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F


def randn(*shape, seed=0, requires_grad=False):
    return tr.Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=requires_grad)


X = randn(2, 3, 6, 5)
W = randn(4, 3, 3, 3)


# --------------------------------------------------------------------------- conv2d
def test_conv2d_rank():
    with pytest.raises(ValueError, match=r"4-D input.*\(3, 6, 5\)"):
        F.conv2d(randn(3, 6, 5), W)


def test_conv2d_weight_rank():
    with pytest.raises(ValueError, match=r"weight must be 4-D.*\(4, 3, 3\)"):
        F.conv2d(X, randn(4, 3, 3))


def test_conv2d_channel_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"channel mismatch.*\(2, 3, 6, 5\).*\(4, 2, 3, 3\)"):
        F.conv2d(X, randn(4, 2, 3, 3))


def test_conv2d_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"kernel \(7, 3\).*padded input is only 6"):
        F.conv2d(X, randn(4, 3, 7, 3))
    with pytest.raises(ValueError, match="spans 5"):  # a 3x3 with dilation 2 spans 5 > width 4
        F.conv2d(randn(1, 3, 6, 4), W, dilation=2)


@pytest.mark.parametrize("stride", [0, -1, (1, 0)])
def test_conv2d_bad_stride(stride):
    with pytest.raises(ValueError, match="stride must be >= 1"):
        F.conv2d(X, W, stride=stride)


def test_conv2d_negative_padding():
    with pytest.raises(ValueError, match="padding must be >= 0"):
        F.conv2d(X, W, padding=-1)


@pytest.mark.parametrize("stride", [1.5, (1, 2, 3), "2"])
def test_conv2d_non_integer_stride(stride):
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        F.conv2d(X, W, stride=stride)


def test_conv2d_integer_input():
    with pytest.raises(TypeError, match="dtype int"):
        F.conv2d(tr.Tensor(np.ones((2, 3, 6, 5), dtype=np.int64)), W)


def test_conv2d_bias_shape():
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(3,\)"):
        F.conv2d(X, W, randn(3))


# --------------------------------------------------------------------------- max_pool2d
def test_max_pool2d_padding_more_than_half_the_kernel():
    with pytest.raises(ValueError, match="padding .* at most half the kernel"):
        F.max_pool2d(X, 3, 1, 2)


def test_max_pool2d_kernel_bigger_than_input():
    with pytest.raises(ValueError, match="larger than the padded input"):
        F.max_pool2d(X, 7)


def test_max_pool2d_rank_and_dtype():
    with pytest.raises(ValueError, match="4-D input"):
        F.max_pool2d(randn(6, 5), 2)
    with pytest.raises(TypeError, match="dtype"):
        F.max_pool2d(tr.Tensor(np.ones((1, 1, 4, 4), dtype=np.int32)), 2)


# --------------------------------------------------------------------------- interpolate
def test_interpolate_both_size_and_scale():
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        F.interpolate(X, size=(4, 4), scale_factor=2)


def test_interpolate_neither_size_nor_scale():
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        F.interpolate(X)


def test_interpolate_nearest_mode_is_refused():
    with pytest.raises(ValueError, match="bilinear.*'nearest'"):
        F.interpolate(X, size=(4, 4), mode="nearest")


@pytest.mark.parametrize("scale", [-2.0, 0, (1.5, -1.0)])
def test_interpolate_non_positive_scale(scale):
    with pytest.raises(ValueError, match="scale_factor must be positive"):
        F.interpolate(X, scale_factor=scale)


def test_interpolate_scale_to_empty_output():
    with pytest.raises(ValueError, match="empty output"):
        F.interpolate(X, scale_factor=0.1)


def test_interpolate_bad_size():
    with pytest.raises(ValueError, match="size must be >= 1"):
        F.interpolate(X, size=(0, 3))


# --------------------------------------------------------------------------- cross_entropy
def test_cross_entropy_target_shape_mismatch():
    with pytest.raises(ValueError, match=r"target shape \(2, 6\) does not fit logits \(2, 3, 6, 5\)"):
        F.cross_entropy(X, np.zeros((2, 6), dtype=np.int64))


def test_cross_entropy_float_target():
    with pytest.raises(TypeError, match="integer class indices.*float64"):
        F.cross_entropy(X, np.zeros((2, 6, 5)))


def test_cross_entropy_target_out_of_range_lists_the_values():
    t = np.zeros((2, 6, 5), dtype=np.int64)
    t[0, 0, 0], t[1, 2, 3], t[1, 1, 1] = 3, -2, 255
    with pytest.raises(ValueError, match=r"values \[-2, 3\] outside 0..2"):
        F.cross_entropy(X, t)


def test_cross_entropy_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(X, np.zeros((2, 6, 5), dtype=np.int64), reduction="avg")


# --------------------------------------------------------------------------- batch_norm, concat, pad
def test_batch_norm_stat_shape_and_eval_without_stats():
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        F.batch_norm(X, np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="eval mode needs running_mean"):
        F.batch_norm(X, None, None, training=False)
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batch_norm(randn(1, 3, 1, 1), None, None, training=True)


def test_concat_shape_mismatch():
    with pytest.raises(ValueError, match=r"shapes \(2, 3, 6, 5\) and \(2, 3, 5, 5\)"):
        F.concat([X, randn(2, 3, 5, 5)], axis=1)


def test_pad_bad_widths():
    with pytest.raises(ValueError, match="non-negative"):
        F.pad(X, (1, -1))
    with pytest.raises(ValueError, match="pairs"):
        F.pad(X, (1, 2, 3))


# --------------------------------------------------------------------------- engine
def test_backward_on_non_scalar_without_grad():
    y = randn(2, 3, requires_grad=True) * 2.0
    with pytest.raises(RuntimeError, match=r"single-element tensor, got shape \(2, 3\)"):
        y.backward()


def test_backward_with_wrong_grad_shape():
    y = randn(2, 3, requires_grad=True) * 2.0
    with pytest.raises(ValueError, match=r"gradient shape \(3, 2\) does not match tensor shape \(2, 3\)"):
        y.backward(np.ones((3, 2)))


def test_backward_without_requires_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        randn(2).sum().backward()


def test_requires_grad_on_integer_array():
    with pytest.raises(TypeError, match="floating-point.*int64"):
        tr.Tensor(np.arange(3), requires_grad=True)


def test_matmul_of_vectors():
    with pytest.raises(ValueError, match="rank >= 2"):
        randn(3) @ randn(3, 2)


@pytest.mark.skipif(tr.cuda_available(), reason="a GPU is present: .to('cuda') works here")
def test_to_cuda_without_a_gpu():
    with pytest.raises(RuntimeError, match="cupy|GPU"):
        randn(2).to("cuda")


def test_to_unknown_device():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        randn(2).to("tpu")
