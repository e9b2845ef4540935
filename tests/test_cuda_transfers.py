"""Host<->device traffic of a CUDA training step, read from the CuPy emulator's transfer log.

Only under ../shared/tools/fakecupy (first on PYTHONPATH, as .ci/run does): it logs every upload
(H2D), download (D2H) and scalar read-back (SYNC) with its call site, as ``FAKECUPY_LOG`` writes
it. A steady-state step may upload its batch (images and masks) and read back the loss, nothing
more, so a round-trip (taps built on the host, ``int(x.sum())`` in a loss, ...) cannot creep back.
"""
import collections
import json

import numpy as np
import pytest

import tinyrefine

cp = tinyrefine.backend._cupy if tinyrefine.cuda_available() else None
pytestmark = pytest.mark.skipif(not getattr(cp, "_EMULATED", False),
                                reason="needs the CuPy emulator's transfer log (../shared/tools/fakecupy on PYTHONPATH)")

TRAFFIC = ("H2D", "H2D(py)", "H2D(index)", "D2H", "D2H(repr)", "SYNC")
PROBLEMS = ("REFUSED", "ORDER-DEPENDENT", "KERNEL-OOB", "KERNEL-ARG", "NO-CUPY-FUNC")


@pytest.fixture
def transfer_log(tmp_path, monkeypatch):
    """``with transfer_log() as events:`` collects the emulator's JSON-lines log of the block."""
    import contextlib
    from cupy._emu import log

    @contextlib.contextmanager
    def record():
        path = tmp_path / "fakecupy.jsonl"
        path.unlink(missing_ok=True)
        events = []
        monkeypatch.setattr(log, "_path", str(path))
        try:
            yield events
        finally:
            monkeypatch.setattr(log, "_path", None)
            if path.exists():
                events.extend(json.loads(line) for line in path.read_text().splitlines())
    return record


def kinds(events, wanted=TRAFFIC + PROBLEMS) -> dict:
    return dict(collections.Counter(e["kind"] for e in events if e["kind"] in wanted))


def sites(events, kind: str) -> list:
    return [e["site"].split(" <- ")[0] for e in events if e["kind"] == kind]


def make_run(optimizer: str):
    """A demo-like training setup on the shapes set, built as train.train builds it."""
    from tinyrefine import train as T
    from tinyrefine.data.loader import DataLoader
    from tinyrefine.data.transforms import train_transform
    from tinyrefine.optim import PolyLR

    config = T.TrainConfig(data="shapes:32", encoder="resnet18", encoder_width=8, features=16, n_crp=2, crop=32,
                           batch_size=2, iters=10, optimizer=optimizer, lr=1e-3, freeze_bn=False, device="cuda")
    train_set, _, num_classes = T.build_datasets(config)
    model = T.build_model(config, num_classes).train()
    opt = T.build_optimizer(config, model)
    schedule = PolyLR(opt, config.iters)
    loader = DataLoader(train_set, config.batch_size, shuffle=True, seed=0, drop_last=True,
                        transform=train_transform(config.crop, (config.scale_min, config.scale_max)), device="cuda")
    batches = loader.iter_from(0, 0)

    def step(iteration: int) -> float:  # what train.train does per iteration
        import tinyrefine.functional as F
        images, masks = next(batches)
        schedule.step(iteration)
        loss = F.cross_entropy(model(tinyrefine.Tensor(images)), masks, ignore_index=255)
        value = float(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return value
    return model, opt, step


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_one_training_step_reads_back_only_the_loss(optimizer, resumed, transfer_log):
    model, opt, step = make_run(optimizer)
    step(0)                                        # warm-up: kernels compiled, tables cached, state made
    if resumed:                                    # a --resume: state from a checkpoint (host arrays)
        opt.load_state_dict({k: tinyrefine.backend.as_numpy(v) for k, v in opt.state_dict().items()})
        model.load_state_dict({k: tinyrefine.backend.as_numpy(v) for k, v in model.state_dict().items()})
    with transfer_log() as events:
        loss = step(1)
    assert np.isfinite(loss)
    # before issue 9: 48 uploads of interpolation taps, 2 syncs in the loss, 1 download of the loss
    assert kinds(events) == {"H2D": 2, "SYNC": 1}, "\n".join(f"{e['kind']} {e['site']}" for e in events
                                                              if e["kind"] != "LAUNCH")
    assert all("backend.py" in s and "to_device" in s for s in sites(events, "H2D"))   # the batch, by the loader
    assert sites(events, "SYNC") == [s for s in sites(events, "SYNC") if "item" in s]  # loss.item()


def test_loading_a_gpu_state_dict_stays_on_the_device(transfer_log):
    from tinyrefine.models import RefineNet
    a = RefineNet(4, "resnet18", n_crp=1, features=8, encoder_width=8, seed=1).to("cuda")
    b = RefineNet(4, "resnet18", n_crp=1, features=8, encoder_width=8, seed=2).to("cuda")
    with transfer_log() as events:
        a.load_state_dict(b.state_dict())
    assert kinds(events) == {}
    assert all(x.data is not y.data for x, y in zip(a.parameters(), b.parameters()))


def test_loss_and_interpolation_need_no_transfer(transfer_log):
    import tinyrefine.functional as F
    F.interpolation_tables.cache_clear()                                # whatever earlier tests built
    x = tinyrefine.Tensor(cp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 4))), requires_grad=True)
    t = cp.asarray(np.random.default_rng(1).integers(0, 3, (2, 9, 7)))
    F.cross_entropy(F.interpolate(x, size=(9, 7)), t).backward()      # tables built here
    with transfer_log() as events:
        for reduction in ("mean", "sum", "none"):
            F.cross_entropy(F.interpolate(x, size=(9, 7)), t, reduction=reduction).sum().backward()
        F.interpolate(x, scale_factor=0.6).sum().backward()
    assert set(kinds(events)) == {"H2D"}             # the new scale's tables, uploaded once ...
    assert all("interpolation_tables" in e["site"] for e in events if e["kind"] == "H2D")
    with transfer_log() as events:
        F.interpolate(x, scale_factor=0.6).sum().backward()
    assert kinds(events) == {}                       # ... and cached


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernels_are_order_independent_under_race_replay(dtype, transfer_log, monkeypatch):
    """Every launch replayed in a shuffled thread order gives the same bits (bilinear_bwd used atomicAdd)."""
    import tinyrefine.functional as F
    from cupy._emu import kernel
    monkeypatch.setattr(kernel, "RACECHECK", True)
    x = tinyrefine.Tensor(cp.asarray(np.random.default_rng(2).standard_normal((2, 3, 6, 5)).astype(dtype)),
                          requires_grad=True)
    w = tinyrefine.Tensor(cp.asarray(np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(dtype)),
                          requires_grad=True)
    with transfer_log() as events:
        y = F.max_pool2d(F.conv2d(F.interpolate(x, scale_factor=2.5), w, padding=1), 3, 1, 1)
        F.interpolate(y, size=(4, 3)).sum().backward()
    launched = {e["site"].split("<")[0] for e in events if e["kind"] == "LAUNCH"}
    assert launched == {"kernel " + k for k in ("bilinear_fwd", "bilinear_bwd", "im2col", "col2im",
                                                "maxpool_fwd", "maxpool_bwd")}
    assert kinds(events, PROBLEMS) == {}
