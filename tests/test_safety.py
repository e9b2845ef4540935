"""Calls that used to corrupt or drop gradients with no error (issue 10): each test failed on the old code.

The numbers in the comments are what the old code did."""
import threading

import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine.engine import Tensor, no_grad


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- 1. casts and moves carry the gradient
def test_astype_passes_the_gradient_back_in_the_original_dtype():
    w = Tensor(rng().standard_normal(5).astype(np.float32), requires_grad=True)
    (w * 2.0).astype(np.float64).sum().backward()          # old: w.grad None (astype made a new leaf)
    assert w.grad is not None and w.grad.dtype == np.float32
    np.testing.assert_array_equal(w.grad, np.full(5, 2.0, np.float32))


def test_astype_to_the_same_dtype_and_to_the_same_device_are_the_tensor_itself():
    w = Tensor(np.ones(3, np.float32), requires_grad=True)
    assert w.astype(np.float32) is w and w.to("cpu") is w


def test_a_cast_inside_a_graph_is_differentiable_both_ways():
    x = Tensor(rng(1).standard_normal((2, 3)), requires_grad=True)  # float64
    y = (x.astype(np.float32) * x.astype(np.float32)).astype(np.float64).sum()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * x.data, rtol=1e-6)


# --------------------------------------------------------------------------- 2. a Function node is one-shot
def test_calling_a_function_object_twice_raises():
    op = F.ReLUFunction()
    op(Tensor(np.ones(2), requires_grad=True))
    with pytest.raises(RuntimeError, match="already called.*one node of one graph"):
        op(Tensor(np.ones(2), requires_grad=True))           # old: a.grad None, b.grad wrong, silently


def test_functional_classes_do_not_share_names_with_nn_layers():
    import tinyrefine.nn as nn
    clashes = {name for name in vars(F) if isinstance(getattr(F, name), type) and hasattr(nn, name)}
    assert not clashes, f"F and nn both define {sorted(clashes)}"


# --------------------------------------------------------------------------- 3. in-place edits between forward and backward
def test_editing_a_saved_input_in_place_makes_backward_refuse():
    a = Tensor(rng().standard_normal(4), requires_grad=True)
    b = Tensor(rng(1).standard_normal(4), requires_grad=True)
    b.name = "b"
    c = (a * b).sum()
    b.data *= 10                                            # old: a.grad silently 10x too large
    with pytest.raises(RuntimeError, match=r"Mul needs its input 1 'b' \(shape \(4,\)\).*modified in place"):
        c.backward()


def test_editing_a_saved_output_in_place_makes_backward_refuse():
    x = Tensor(rng().standard_normal(3), requires_grad=True)
    y = x.exp()
    y.data *= 2
    with pytest.raises(RuntimeError, match="Exp needs its output"):
        y.sum().backward()


def test_replacing_the_array_is_not_an_in_place_edit_and_ops_that_keep_no_input_do_not_care():
    a = Tensor(np.full(3, 2.0), requires_grad=True)
    b = Tensor(np.full(3, 3.0), requires_grad=True)
    c = (a * b).sum()
    b.data = b.data * 10                     # a new array: Mul still holds the old one
    c.backward()
    np.testing.assert_array_equal(a.grad, np.full(3, 3.0))
    d = Tensor(np.ones(3), requires_grad=True)
    e = (d + 1.0).sum()
    d.data += 1                              # Add keeps no input: its gradient does not depend on d
    e.backward()
    np.testing.assert_array_equal(d.grad, np.ones(3))


def test_an_optimizer_step_between_forward_and_backward_is_caught():
    from tinyrefine.nn import Conv2d
    from tinyrefine.optim import SGD
    conv = Conv2d(2, 2, 3, 1, 1, rng=rng())
    loss = conv(Tensor(rng().standard_normal((1, 2, 4, 4)).astype(np.float32))).sum()
    for p in conv.parameters():
        p.grad = np.ones_like(p.data)
    SGD(conv.parameters(), lr=0.1).step()
    with pytest.raises(RuntimeError, match="Conv2dFunction needs its input 1"):
        loss.backward()


# --------------------------------------------------------------------------- 4. hooks get gradients no other branch shares
def test_a_hook_editing_its_gradient_in_place_does_not_change_the_other_branch():
    x = Tensor(np.ones(3), requires_grad=True)
    u, v = x * 1.0, x * 1.0
    u.register_hook(lambda g: g.data.__imul__(100))       # edits the array it was given
    w = Tensor(np.ones(3), requires_grad=True)
    v2 = v * w
    (u + v2).sum().backward()   # Add hands the same gy to u and v2; old: w.grad became 100
    np.testing.assert_array_equal(w.grad, np.ones(3))
    np.testing.assert_array_equal(x.grad, np.full(3, 101.0))


# --------------------------------------------------------------------------- 5. and 10. threads
def test_convolutions_in_two_threads_do_not_share_scratch_buffers():
    weights = rng(2).standard_normal((8, 4, 3, 3)).astype(np.float32)
    inputs = [rng(s).standard_normal((2, 4, 9 + s, 9 + s)).astype(np.float32) for s in range(6)]
    expected = [F.conv2d(Tensor(x), Tensor(weights), padding=1).data.copy() for x in inputs]
    wrong = []

    def work(order):
        for _ in range(15):
            for i in order:
                if not np.array_equal(F.conv2d(Tensor(inputs[i]), Tensor(weights), padding=1).data, expected[i]):
                    wrong.append(i)
    threads = [threading.Thread(target=work, args=(order,)) for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} wrong outputs"     # old: ~100 of 300 wrong


def test_no_grad_in_one_thread_leaves_other_threads_recording():
    barrier = threading.Barrier(2)
    seen = []

    def evaluate():
        with no_grad():
            barrier.wait()          # both threads are inside no_grad() at once
            seen.append(tr.is_grad_enabled())
            barrier.wait()

    def train():
        barrier.wait()
        seen.append(tr.is_grad_enabled())
        barrier.wait()
    threads = [threading.Thread(target=evaluate), threading.Thread(target=train)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == [False, True]
    x = Tensor(np.ones(2), requires_grad=True)
    (x * 2).sum().backward()        # old: "does not require grad" after two overlapping no_grad threads
    assert tr.is_grad_enabled() and x.grad is not None


def test_enable_grad_inside_no_grad():
    with no_grad():
        with tr.enable_grad():
            assert tr.is_grad_enabled()
        assert not tr.is_grad_enabled()


# --------------------------------------------------------------------------- 7. max-pool offsets past 255
def test_max_pool_kernel_over_256_taps_routes_the_gradient_to_the_max():
    x = Tensor(rng().standard_normal((1, 1, 2, 300)), requires_grad=True)
    x.data[0, 0, 1, 280] = 10.0
    y = F.max_pool2d(x, (1, 300), 1)
    y.backward(np.array([[[[1.0], [1.0]]]]))
    hit = np.argwhere(x.grad[0, 0] != 0)
    assert [1, 280] in hit.tolist() and y.data[0, 0, 1, 0] == 10.0   # old: offset 280 stored as 24 (uint8)
    assert x.grad[0, 0, 0, int(np.argmax(x.data[0, 0, 0]))] == 1.0


# --------------------------------------------------------------------------- 8. dtype policy
def test_a_float32_parameter_gets_a_float32_gradient_whatever_it_met():
    w = Tensor(np.ones(3, np.float32), requires_grad=True)
    y = w * np.ones(3, np.float64)          # an array is data: the product is float64, as in torch
    assert y.dtype == np.float64
    y.sum().backward()
    assert w.grad.dtype == np.float32       # old: float64


def test_kernels_refuse_mixed_float_dtypes():
    x = Tensor(np.ones((1, 2, 4, 4), np.float64))
    with pytest.raises(TypeError, match="conv2d.*float64.*float32"):
        F.conv2d(x, Tensor(np.ones((2, 2, 3, 3), np.float32)))
    with pytest.raises(TypeError, match="conv_transpose2d input is float64 but its weight is float32"):
        F.conv_transpose2d(x, Tensor(np.ones((2, 3, 3, 3), np.float32)))
    with pytest.raises(TypeError, match="conv_transpose2d input is float64 but its bias is float32"):
        F.conv_transpose2d(x, Tensor(np.ones((2, 3, 3, 3))), Tensor(np.ones(3, np.float32)))


# --------------------------------------------------------------------------- 9. interpolate's scale factor
@pytest.mark.parametrize("scale", [1.2, 1.1, (1.2, 0.9), np.float32(1.5)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_interpolate_scale_factor_matches_torch_where_an_axis_keeps_its_size(scale, align_corners):
    torch = pytest.importorskip("torch")
    x = rng().standard_normal((1, 2, 9, 4))
    torch_scale = tuple(float(s) for s in scale) if isinstance(scale, tuple) else float(scale)
    expected = torch.nn.functional.interpolate(torch.tensor(x), scale_factor=torch_scale, mode="bilinear",
                                               align_corners=align_corners).numpy()
    ours = F.interpolate(Tensor(x), scale_factor=scale, align_corners=align_corners).data
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-12)   # old: error 1.03 at (9, 4) x 1.2


# --------------------------------------------------------------------------- 12. scratch buffers can be released
def test_empty_cache_releases_the_scratch_buffers():
    F.conv2d(Tensor(np.ones((2, 8, 32, 32), np.float32)), Tensor(np.ones((8, 8, 3, 3), np.float32)), padding=1)
    assert tr.memory.cache_nbytes()["scratch"] > 0
    released = tr.empty_cache()
    assert released["scratch"] > 0 and tr.memory.cache_nbytes()["scratch"] == 0
    y = F.conv2d(Tensor(np.ones((1, 1, 5, 5), np.float32)), Tensor(np.ones((1, 1, 3, 3), np.float32)), padding=1)
    assert y.data[0, 0, 2, 2] == 9.0        # and the next call allocates again


def test_scratch_hands_out_the_same_view_until_its_buffer_grows_or_is_released():
    """scratch() keeps the views it made (a small conv asks ~18 times): the same one comes back for the same
    role, shape and dtype, and never one of a buffer that grew since or that empty_cache() let go."""
    from tinyrefine.functional import common
    first = common.scratch("test.role", (4, 5), np.float32)
    assert common.scratch("test.role", (4, 5), np.float32) is first
    other = common.scratch("test.role", (5, 4), np.float32)             # same buffer, another shape
    assert other is not first and np.shares_memory(other, first)
    grown = common.scratch("test.role", (64, 64), np.float32)           # a larger one replaces the buffer
    again = common.scratch("test.role", (4, 5), np.float32)
    assert again is not first and np.shares_memory(again, grown) and not np.shares_memory(again, first)
    tr.empty_cache()
    after = common.scratch("test.role", (4, 5), np.float32)
    assert after is not again and not np.shares_memory(after, again)
    assert common.scratch_nbytes() >= after.nbytes                       # counted: the buffer is the role's again


# --------------------------------------------------------------------------- 6. resume resumes only what it can
def _tiny_run(tmp_path, **changes):
    from tinyrefine.train import TrainConfig
    base = dict(data="shapes:32", encoder="resnet18", encoder_width=4, features=8, n_crp=1, crop=32, batch_size=2,
                iters=2, eval_every=0, optimizer="sgd", lr=0.01, out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **changes})


def test_resume_with_another_freeze_bn_is_refused_by_name(tmp_path):
    from tinyrefine.train import train
    train(_tiny_run(tmp_path, freeze_bn=True), progress=False)
    with pytest.raises(ValueError, match="freeze_bn: checkpoint True vs now False"):   # old: a broadcast error
        train(_tiny_run(tmp_path, freeze_bn=False, iters=3), resume=True, progress=False)


def test_resume_with_a_new_lr_takes_effect(tmp_path, capsys):
    from tinyrefine.io import load_npz
    from tinyrefine.train import train
    train(_tiny_run(tmp_path, iters=2, warmup_iters=0), progress=False)
    train(_tiny_run(tmp_path, iters=3, lr=0.5, warmup_iters=0), resume=True, progress=False)  # old: lr 0.01 kept
    assert "decoder base lr 0.01 -> 0.5" in capsys.readouterr().out
    saved = load_npz(tmp_path / "run" / "checkpoint.npz")
    assert float(saved["optim.group1.initial_lr"]) == 0.5


def test_optimizer_state_is_matched_by_name_and_shape():
    from tinyrefine.nn import Parameter
    from tinyrefine.optim import SGD
    a, b = Parameter(np.ones(3, np.float32)), Parameter(np.ones(1, np.float32))
    opt = SGD([{"params": [a, b], "names": ["a", "b"], "lr": 0.1}], momentum=0.9)
    a.grad, b.grad = np.ones(3, np.float32), np.ones(1, np.float32)
    opt.step()
    state = opt.state_dict()
    assert {"state.a.momentum", "state.b.momentum"} <= set(state)
    # the same names in another order: matched by name, not position
    b2, a2 = Parameter(np.ones(1, np.float32)), Parameter(np.ones(3, np.float32))
    other = SGD([{"params": [b2, a2], "names": ["b", "a"], "lr": 0.1}], momentum=0.9)
    other.load_state_dict(state)
    assert other.state[1]["momentum"].shape == (3,)
    # shapes that broadcast but differ: refused, naming the parameter (old: loaded by position, silently)
    c, d = Parameter(np.ones(1, np.float32)), Parameter(np.ones(3, np.float32))
    unnamed = SGD([c, d], lr=0.1, momentum=0.9)
    c.grad, d.grad = np.ones(1, np.float32), np.ones(3, np.float32)
    unnamed.step()
    e, f = Parameter(np.ones(3, np.float32)), Parameter(np.ones(1, np.float32))
    with pytest.raises(ValueError, match=r"0.momentum: saved shape \(1,\), parameter shape \(3,\)"):
        SGD([e, f], lr=0.1, momentum=0.9).load_state_dict(unnamed.state_dict())


def test_scratch_of_a_finished_thread_is_freed_and_train_releases_its_own(tmp_path):
    from tinyrefine.functional import common
    from tinyrefine.train import train
    tr.empty_cache()
    worker = threading.Thread(target=lambda: F.conv2d(Tensor(np.ones((1, 4, 16, 16), np.float32)),
                                                      Tensor(np.ones((4, 4, 3, 3), np.float32)), padding=1))
    worker.start()
    worker.join()
    del worker
    import gc
    gc.collect()
    assert common.scratch_nbytes() == 0          # the dead thread's buffers went with it
    train(_tiny_run(tmp_path), progress=False)
    assert common.scratch_nbytes() == 0          # train() gives its buffers back when it returns
