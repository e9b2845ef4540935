"""Parity with a PyTorch twin: same state dict, same logits, same gradients, same counts."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tinyrefine as tr                                     # noqa: E402
import tinyrefine.functional as F                           # noqa: E402
from tinyrefine.interop.torch_twin import TorchRefineNet, twin_from   # noqa: E402
from tinyrefine.models import RefineNet                     # noqa: E402
from tinyrefine.summary import conv_flops_by_layer, count_flops, count_parameters   # noqa: E402

SMALL = dict(num_classes=5, encoder_width=8, features=16)


def data(seed=0, n=2, size=64, classes=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, size, size))
    t = rng.integers(0, classes, (n, size, size))
    t[:, :9, :] = 255
    t[0, 20:30, 40:] = 255
    return x, t


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def compare(model, seed=0, tol=1e-8):
    """Forward logits and every parameter gradient of the same loss, ours vs the twin's."""
    twin = twin_from(model)
    x, t = data(seed)
    ours = model(tr.Tensor(x))
    loss = F.cross_entropy(ours, t, ignore_index=255)
    loss.backward()
    theirs = twin(torch.from_numpy(x))
    tloss = torch.nn.functional.cross_entropy(theirs, torch.from_numpy(t), ignore_index=255)
    tloss.backward()
    worst = {"logits": rel_err(ours.numpy(), theirs.detach().numpy()), "loss": rel_err(loss.numpy(), tloss.detach().numpy())}
    tparams = dict(twin.named_parameters())
    assert list(tparams) == [n for n, _ in model.named_parameters()]
    grad_err = 0.0
    for name, p in model.named_parameters():
        tp = tparams[name]
        assert p.requires_grad == tp.requires_grad, name
        if not p.requires_grad:
            assert p.grad is None and tp.grad is None, name
            continue
        assert p.grad is not None and tp.grad is not None, name
        err = rel_err(p.grad, tp.grad.numpy())
        assert err < tol, f"{name}: relative gradient error {err:.3g}"
        grad_err = max(grad_err, err)
    worst["grads"] = grad_err
    assert worst["logits"] < tol and worst["loss"] < tol, worst
    # BatchNorm buffers evolve alike (frozen: not at all)
    tbuffers = dict(twin.named_buffers())
    for name, b in model.named_buffers():
        np.testing.assert_allclose(b.numpy(), tbuffers[name].numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    return worst


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50"])
def test_twin_parity(encoder):
    model = RefineNet(encoder=encoder, **SMALL).astype(np.float64)
    worst = compare(model)
    print(encoder, worst)


@pytest.mark.parametrize("cascade,improved_crp", [(1, False), (2, False), (4, True)])
def test_twin_parity_variants(cascade, improved_crp):
    model = RefineNet(encoder="resnet18", cascade=cascade, improved_crp=improved_crp, n_crp=3, **SMALL)
    print(cascade, improved_crp, compare(model.astype(np.float64), seed=cascade))


def test_twin_parity_two_scale():
    model = RefineNet(encoder="resnet18", two_scale=True, n_crp=2, **SMALL).astype(np.float64)
    print("two_scale", compare(model, seed=5))


def test_twin_parity_two_scale_batch_statistics_no_long_range():
    model = RefineNet(encoder="resnet18", two_scale=True, freeze_bn=False, long_range=False, n_crp=2, **SMALL)
    print("two_scale, BN train, no long range", compare(model.astype(np.float64).train(), seed=6))


def test_twin_parity_with_batch_statistics_and_ablations():
    model = RefineNet(encoder="resnet18", freeze_bn=False, long_range=False, crp_relu=False, **SMALL)
    print(compare(model.astype(np.float64).train(), seed=3))


def test_twin_parity_without_shortcuts():
    model = RefineNet(encoder="resnet18", shortcuts=False, **SMALL)
    print(compare(model.astype(np.float64), seed=4))


def test_twin_keeps_frozen_bn_in_eval():
    twin = TorchRefineNet(**SMALL, encoder="resnet18")
    twin.train()
    bns = [m for m in twin.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    assert twin.training and twin.head.training
    unfrozen = TorchRefineNet(**SMALL, encoder="resnet18", freeze_bn=False).train()
    assert all(m.training for m in unfrozen.encoder.modules())


def test_twin_loads_float32_state_dict_and_follows_eval_mode():
    model = RefineNet(encoder="resnet50", **SMALL).eval()
    twin = twin_from(model)
    assert not twin.training and next(twin.parameters()).dtype == torch.float32
    x = data(5, n=1, size=32)[0].astype(np.float32)
    with tr.no_grad():
        ours = model(tr.Tensor(x)).numpy()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x)).numpy()
    assert rel_err(ours, theirs) < 1e-4


# --------------------------------------------------------------------------- counts
def torch_conv_flops(twin, shape):
    total = {}

    def hook(name):
        def record(module, inputs, output):
            c_out, c_in, kh, kw = module.weight.shape
            n, _, ho, wo = output.shape
            total[name] = total.get(name, 0) + 2 * n * c_out * ho * wo * c_in * kh * kw
        return record
    handles = [m.register_forward_hook(hook(n)) for n, m in twin.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            twin(torch.zeros(shape, dtype=next(twin.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("encoder,cascade,two_scale", [("resnet18", 4, False), ("resnet50", 4, False),
                                                       ("resnet50", 2, False), ("resnet18", 1, False),
                                                       ("resnet50", 4, True)])
def test_counts_match_the_twin(encoder, cascade, two_scale):
    model = RefineNet(encoder=encoder, cascade=cascade, two_scale=two_scale, **SMALL)
    twin = twin_from(model)
    assert count_parameters(model) == sum(p.numel() for p in twin.parameters())
    assert count_parameters(model, trainable_only=True) == sum(p.numel() for p in twin.parameters() if p.requires_grad)
    shape = (2, 3, 64, 96)
    ours = conv_flops_by_layer(model, shape)
    theirs = torch_conv_flops(twin, shape)
    assert ours == theirs
    assert count_flops(model, shape) == float(sum(theirs.values()))
    assert count_flops(model, shape, dry_run=False) == count_flops(model, shape)
    assert not any("forward" in vars(m) for m in model.modules())     # the wrappers are gone


def test_full_width_resnet101_parameter_count_matches_the_twin():
    model = RefineNet(num_classes=21, encoder="resnet101")
    twin = TorchRefineNet(num_classes=21, encoder="resnet101")
    assert count_parameters(model) == sum(p.numel() for p in twin.parameters())
    assert count_parameters(model, trainable_only=True) == sum(p.numel() for p in twin.parameters() if p.requires_grad)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in twin.state_dict().items()}
