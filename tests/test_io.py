"""tinyrefine.io: torch checkpoints read without torch, npz files, atomic writes."""
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from tinyrefine.io import (META_KEY, UnsafeCheckpointError, atomic_open, atomic_write_bytes, load_npz,
                           load_npz_meta, load_torch_checkpoint, save_npz)


# --------------------------------------------------------------------------- helpers

def _torch():
    return pytest.importorskip("torch")


def _conv_bn(torch, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(dtype)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 5, 5, dtype=dtype))  # moves running stats and num_batches_tracked
    return model


def _assert_same(ours, theirs):
    """ours: dict of numpy arrays; theirs: dict of torch tensors; exact equality."""
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = tensor.detach().numpy()
        got = ours[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > marker",))


def _write_torch_zip(path, payload: bytes, storages=None, prefix="archive"):
    """A zip laid out like torch.save's, holding any data.pkl we like."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", payload)
        z.writestr(f"{prefix}/byteorder", "little")
        z.writestr(f"{prefix}/version", "3\n")
        for key, data in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)


# --------------------------------------------------------------------------- torch checkpoints

@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_state_dict_roundtrip_exact(tmp_path, dtype_name):
    torch = _torch()
    sd = _conv_bn(torch, getattr(torch, dtype_name)).state_dict()
    torch.save(sd, tmp_path / "m.pth")
    ours = load_torch_checkpoint(tmp_path / "m.pth")
    _assert_same(ours, sd)
    assert ours["1.num_batches_tracked"].dtype == np.int64 and ours["1.num_batches_tracked"].shape == ()
    assert ours["1.num_batches_tracked"] == 1
    assert all(a.dtype == np.dtype(dtype_name) for k, a in ours.items() if "num_batches" not in k)


def test_non_contiguous_and_shared_storage(tmp_path):
    torch = _torch()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = OrderedDict(
        base=base,
        transposed=base.t(),                # stride (1, 6)
        sliced=base[1:3, 2:5],              # storage offset 8, row stride 6
        stepped=base[::2, ::3],             # strides (12, 3)
        row=base[3],                        # offset 18, 1-d
        expanded=torch.ones(1, 3).expand(4, 3),  # stride 0
        empty=torch.zeros(0, 5),
    )
    assert not tensors["transposed"].is_contiguous()
    torch.save(tensors, tmp_path / "views.pt")
    ours = load_torch_checkpoint(tmp_path / "views.pt")
    _assert_same(ours, tensors)
    for key, array in ours.items():
        assert array.flags.c_contiguous and array.flags.owndata and array.flags.writeable, key
    ours["base"][0, 0] = 100.0  # the copies do not alias one another
    assert ours["transposed"][0, 0] == 0.0


def test_dtypes(tmp_path):
    torch = _torch()
    tensors = OrderedDict(
        half=torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
        i32=torch.tensor([-(2 ** 31), 7], dtype=torch.int32),
        i16=torch.tensor([-3, 300], dtype=torch.int16),
        i8=torch.tensor([-128, 127], dtype=torch.int8),
        u8=torch.tensor([0, 255], dtype=torch.uint8),
        flag=torch.tensor([True, False, True]),
        i64=torch.tensor([2 ** 40, -1]),
    )
    bf16 = torch.tensor([1.0, -3.140625, 1e30, 0.0078125], dtype=torch.bfloat16)
    torch.save({**tensors, "bf16": bf16}, tmp_path / "dtypes.pt")
    ours = load_torch_checkpoint(tmp_path / "dtypes.pt")
    _assert_same(OrderedDict((k, ours[k]) for k in tensors), tensors)
    # bfloat16 widens to float32 exactly.
    assert ours["bf16"].dtype == np.float32
    np.testing.assert_array_equal(ours["bf16"], bf16.float().numpy())


def test_big_endian_byteorder(tmp_path):
    torch = _torch()
    tensors = {"f": torch.arange(5, dtype=torch.float64) / 3, "i": torch.tensor([1, -2, 70000], dtype=torch.int32)}
    torch.save(tensors, tmp_path / "le.pth")
    # Rewrite the file as a big-endian machine would have written it.
    with zipfile.ZipFile(tmp_path / "le.pth") as src, zipfile.ZipFile(tmp_path / "be.pth", "w") as dst:
        storage_dtypes = {"0": "f8", "1": "i4"}  # storages are numbered in pickling order
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name and not name.endswith("serialization_id"):
                code = storage_dtypes[name.rsplit("/", 1)[1]]
                data = np.frombuffer(data, "<" + code).astype(">" + code).tobytes()
            dst.writestr(name, data)
    ours = load_torch_checkpoint(tmp_path / "be.pth")
    _assert_same(ours, tensors)
    assert all(a.dtype.isnative for a in ours.values())


def test_parameters_saved_directly(tmp_path):
    torch = _torch()
    weight = torch.nn.Parameter(torch.randn(3, 2))
    torch.save({"weight": weight, "bias": torch.nn.Parameter(torch.zeros(3), requires_grad=False)},
               tmp_path / "params.pt")
    ours = load_torch_checkpoint(tmp_path / "params.pt")
    np.testing.assert_array_equal(ours["weight"], weight.detach().numpy())
    np.testing.assert_array_equal(ours["bias"], np.zeros(3, np.float32))


def test_training_checkpoint_wrappers_and_module_prefix(tmp_path):
    torch = _torch()
    model = _conv_bn(torch, torch.float32)
    sd = model.state_dict()
    parallel = OrderedDict(("module." + k, v) for k, v in sd.items())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 5, 5)).sum().backward()
    optimizer.step()

    torch.save({"state_dict": parallel, "epoch": 3, "arch": "conv-bn", "best": 0.5}, tmp_path / "a.pth")
    torch.save({"model": sd, "optimizer": optimizer.state_dict(), "epoch": 7}, tmp_path / "b.pth")
    torch.save(parallel, tmp_path / "c.pth")
    torch.save({**sd, "epoch": 2, "note": "hello", "lrs": [0.1, 0.01]}, tmp_path / "d.pth")
    for name in "abcd":
        _assert_same(load_torch_checkpoint(tmp_path / f"{name}.pth"), sd)


def test_prefix_collision_is_an_error(tmp_path):
    torch = _torch()
    torch.save({"w": torch.zeros(1), "module.w": torch.ones(1)}, tmp_path / "clash.pth")
    with pytest.raises(ValueError, match="module"):
        load_torch_checkpoint(tmp_path / "clash.pth")


def test_no_tensors_and_not_a_dict(tmp_path):
    torch = _torch()
    torch.save({"epoch": 3}, tmp_path / "none.pth")
    with pytest.raises(ValueError, match="no tensors"):
        load_torch_checkpoint(tmp_path / "none.pth")
    torch.save(torch.zeros(2), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="not a dict"):
        load_torch_checkpoint(tmp_path / "bare.pth")


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pth"
    _write_torch_zip(path, pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_checkpoint(path)
    message = str(info.value)
    assert f"{os.system.__module__}.system" in message and "checkpoint.pth" in message
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_payload_hidden_in_a_real_torch_file_is_refused(tmp_path, monkeypatch, protocol):
    torch = _torch()
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": torch.ones(2), "extra": _Evil()}, "trojan.pth", pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_checkpoint("trojan.pth")
    assert not (tmp_path / "marker").exists()


def test_view_outside_its_storage_is_refused(tmp_path):
    torch = _torch()

    class FakeTensor:  # pickles as _rebuild_tensor_v2 on a 4-element storage, asking for 100
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (FakeStorage(), 0, (100,), (1,), False, OrderedDict()))

    class FakeStorage:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, FakeStorage) else None

    import io
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": FakeTensor()})
    path = tmp_path / "oob.pth"
    _write_torch_zip(path, buffer.getvalue(), {"0": np.arange(4, dtype="<f4").tobytes()})
    with pytest.raises(ValueError, match="oob.pth"):
        load_torch_checkpoint(path)


def test_bad_files(tmp_path):
    torch = _torch()
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_checkpoint(tmp_path / "missing.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.pth"):
        load_torch_checkpoint(garbage)

    good = tmp_path / "good.pth"
    torch.save(_conv_bn(torch, torch.float32).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_torch_checkpoint(truncated)

    no_pickle = tmp_path / "nopickle.pth"
    with zipfile.ZipFile(no_pickle, "w") as z:
        z.writestr("archive/version", "3\n")
    with pytest.raises(ValueError, match="nopickle.pth.*data.pkl"):
        load_torch_checkpoint(no_pickle)

    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    cut = tmp_path / "legacy_truncated.pth"
    cut.write_bytes(legacy.read_bytes()[:-3])      # the last storage lacks 3 bytes
    with pytest.raises(ValueError, match="legacy_truncated.pth"):
        load_torch_checkpoint(cut)
    pickled = tmp_path / "plain_pickle.pth"
    pickled.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(ValueError, match="plain_pickle.pth.*magic"):
        load_torch_checkpoint(pickled)


def test_storage_member_missing(tmp_path):
    torch = _torch()
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(3)}, good)
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            if "/data/" not in name:
                dst.writestr(name, src.read(name))
    with pytest.raises(ValueError, match="broken.pth"):
        load_torch_checkpoint(broken)


@pytest.mark.parametrize("zip_format", [True, False])
def test_loading_does_not_import_torch(tmp_path, zip_format):
    torch = _torch()
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "w.pth", _use_new_zipfile_serialization=zip_format)
    code = ("import sys; sys.modules['torch'] = None; from tinyrefine.io import load_torch_checkpoint; "
            f"print(load_torch_checkpoint({str(tmp_path / 'w.pth')!r})['w'].sum())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "15.0"


# --------------------------------------------------------------------------- legacy (torch < 1.6) files
LEGACY = dict(_use_new_zipfile_serialization=False)
MAGIC, PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


def test_legacy_state_dict_views_and_dtypes_roundtrip(tmp_path):
    torch = _torch()
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = OrderedDict(_conv_bn(torch, torch.float32).state_dict())
    tensors.update(transposed=base.t(), sliced=base[1:3, 2:5], stepped=base[::2, ::3], empty=torch.zeros(0, 5),
                   half=torch.tensor([1.5, -2.25], dtype=torch.float16), i8=torch.tensor([-128, 127], dtype=torch.int8),
                   flag=torch.tensor([True, False, True]), i64=torch.tensor([2 ** 40, -1]))
    bf16 = torch.tensor([1.0, -3.140625, 1e30], dtype=torch.bfloat16)
    torch.save({"state_dict": {**tensors, "bf16": bf16}, "epoch": 7}, tmp_path / "old.pth", **LEGACY)
    assert not zipfile.is_zipfile(tmp_path / "old.pth")
    ours = load_torch_checkpoint(tmp_path / "old.pth")
    _assert_same(OrderedDict((k, ours[k]) for k in tensors), tensors)
    np.testing.assert_array_equal(ours["bf16"], bf16.float().numpy())
    assert ours["1.num_batches_tracked"].shape == () and ours["1.num_batches_tracked"] == 1
    assert all(a.flags.c_contiguous and a.flags.owndata for a in ours.values())


def test_legacy_and_zip_give_the_same_arrays(tmp_path):
    torch = _torch()
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(5, 2)).state_dict()
    torch.save(state, tmp_path / "new.pth")
    torch.save(state, tmp_path / "old.pth", **LEGACY)
    new, old = load_torch_checkpoint(tmp_path / "new.pth"), load_torch_checkpoint(tmp_path / "old.pth")
    assert list(new) == list(old) == list(state)
    for key in new:
        assert new[key].dtype == old[key].dtype and np.array_equal(new[key], old[key]), key


def _legacy_file(path, obj_pickle: bytes, keys, storages, header=(MAGIC, PROTOCOL, {"little_endian": True})):
    """A legacy stream built by hand: header pickles, the object pickle, the key list, the storages."""
    with open(path, "wb") as f:
        for item in header:
            f.write(item if isinstance(item, bytes) else pickle.dumps(item, protocol=2))
        f.write(obj_pickle)
        f.write(keys if isinstance(keys, bytes) else pickle.dumps(keys, protocol=2))
        for numel, data in storages:
            f.write(np.int64(numel).astype("<i8").tobytes() + data)


def _legacy_pickle(torch, obj, ids):
    """Pickle ``obj`` with persistent ids: ``ids`` maps id(stand-in object) -> the 6-tuple torch writes."""
    import io

    class Pickler(pickle.Pickler):
        def persistent_id(self, value):
            return ids.get(id(value))

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


class _Stand:  # stands in for a storage (its persistent id) or a tensor (its reduce)
    def __init__(self, reduce=None):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("where", ["magic", "protocol", "sys_info", "object", "keys"])
def test_legacy_payload_anywhere_in_the_stream_is_refused(tmp_path, monkeypatch, where):
    torch = _torch()
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps(_Evil(), protocol=2)
    header = [MAGIC, PROTOCOL, {"little_endian": True}]
    if where in ("magic", "protocol", "sys_info"):
        header[["magic", "protocol", "sys_info"].index(where)] = evil
    storage = _Stand()
    tensor = _Stand((torch._utils._rebuild_tensor_v2, (storage, 0, (2,), (1,), False, OrderedDict())))
    obj = {"w": tensor, "extra": _Evil()} if where == "object" else {"w": tensor}
    obj_pickle = _legacy_pickle(torch, obj, {id(storage): ("storage", torch.FloatStorage, "1", "cpu", 2, None)})
    _legacy_file("evil.pth", obj_pickle, evil if where == "keys" else ["1"],
                 [(2, np.ones(2, "<f4").tobytes())], header)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_checkpoint("evil.pth")
    assert not (tmp_path / "marker").exists()


def test_legacy_trojan_saved_by_torch_is_refused(tmp_path, monkeypatch):
    torch = _torch()
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": torch.ones(2), "extra": _Evil()}, "trojan.pth", **LEGACY)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_checkpoint("trojan.pth")
    assert not (tmp_path / "marker").exists()


def test_legacy_storage_views_and_malformed_streams(tmp_path):
    torch = _torch()
    root, view = _Stand(), _Stand()
    tensor = _Stand((torch._utils._rebuild_tensor_v2, (view, 1, (2,), (1,), False, OrderedDict())))
    whole = _Stand((torch._utils._rebuild_tensor_v2, (root, 0, (6,), (1,), False, OrderedDict())))
    ids = {id(root): ("storage", torch.DoubleStorage, "7", "cpu", 6, None),
           # very old files: storage "8" is elements 2..5 of storage "7"
           id(view): ("storage", torch.DoubleStorage, "7", "cpu", 6, ("8", 2, 4))}
    obj = _legacy_pickle(torch, {"part": tensor, "whole": whole}, ids)
    data = np.arange(6, dtype="<f8").tobytes()
    _legacy_file(tmp_path / "view.pth", obj, ["7"], [(6, data)])
    ours = load_torch_checkpoint(tmp_path / "view.pth")
    np.testing.assert_array_equal(ours["part"], [3.0, 4.0])
    np.testing.assert_array_equal(ours["whole"], np.arange(6.0))
    # old torch saved GPU tensors as torch.cuda.<Type>Storage at 'cuda:0': read to the host all the same
    gpu = _legacy_pickle(torch, {"whole": whole}, {id(root): ("storage", torch.cuda.DoubleStorage, "7", "cuda:0", 6, None)})
    assert b"torch.cuda" in gpu
    _legacy_file(tmp_path / "gpu.pth", gpu, ["7"], [(6, data)])
    np.testing.assert_array_equal(load_torch_checkpoint(tmp_path / "gpu.pth")["whole"], np.arange(6.0))

    bad = {
        "header_numel": (obj, ["7"], [(5, data)], "7 should hold 6 elements"),
        "keys": (obj, ["7", "9"], [(6, data)], "key list"),
        "short": (obj, ["7"], [(6, data[:-1])], "holds 47 bytes"),
        "beyond": (_legacy_pickle(torch, {"w": _Stand((torch._utils._rebuild_tensor_v2,
                                                       (root, 4, (3,), (1,), False, OrderedDict())))}, ids),
                   ["7"], [(6, data)], "reaches element 6"),
        "view_beyond": (_legacy_pickle(torch, {"w": tensor}, {**ids, id(view): ids[id(view)][:5] + (("8", 4, 4),)}),
                        ["7"], [(6, data)], "passes the end"),
    }
    for name, (obj_pickle, keys, storages, message) in bad.items():
        path = tmp_path / f"{name}.pth"
        _legacy_file(path, obj_pickle, keys, storages)
        with pytest.raises(ValueError, match=f"{name}.pth.*{message}|{message}.*{name}.pth"):
            load_torch_checkpoint(path)
    _legacy_file(tmp_path / "protocol.pth", obj, ["7"], [(6, data)], (MAGIC, 1000, {}))
    with pytest.raises(ValueError, match="protocol 1000"):
        load_torch_checkpoint(tmp_path / "protocol.pth")


# --------------------------------------------------------------------------- npz

def test_npz_roundtrip_with_dotted_keys_and_meta(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"layer1.0.conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "bn.num_batches_tracked": np.array(5, dtype=np.int64),
              "file": np.arange(3), "allow_pickle": np.array([True, False])}  # np.savez's own kwarg names
    meta = {"epoch": 3, "arch": "refinenet", "mean": [0.485, 0.456, 0.406], "nested": {"ok": None}}
    path = tmp_path / "weights.npz"
    save_npz(path, arrays, meta=meta)
    loaded = load_npz(path)
    assert set(loaded) == set(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    assert load_npz_meta(path) == meta
    with np.load(path, allow_pickle=False) as plain:  # an ordinary npz
        assert set(plain.files) == set(arrays) | {META_KEY}


def test_npz_without_meta(tmp_path):
    save_npz(tmp_path / "w.npz", {"a": np.ones(2)})
    assert load_npz_meta(tmp_path / "w.npz") == {}
    assert list(load_npz(tmp_path / "w.npz")) == ["a"]


class _Unconvertible:
    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("cannot convert")


@pytest.mark.parametrize("bad, error", [
    (np.array([object(), 1], dtype=object), TypeError),
    (_Unconvertible(), RuntimeError),
])
def test_npz_failed_save_leaves_old_file_and_no_temp(tmp_path, bad, error):
    path = tmp_path / "model.npz"
    save_npz(path, {"old": np.zeros(3)})
    before = path.read_bytes()
    with pytest.raises(error) as info:
        save_npz(path, {"good": np.ones((100, 100)), "bad": bad, "later": np.ones(1)})
    if error is TypeError:
        assert "allow_pickle" in str(info.value) and "bad" in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.npz"]


def test_npz_argument_errors(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError, match=META_KEY):
        save_npz(path, {META_KEY: np.zeros(1)})
    with pytest.raises(TypeError):
        save_npz(path, {"a": np.zeros(1)}, meta={"bad": object()})
    with pytest.raises(TypeError):
        save_npz(path, {1: np.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_npz_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_npz(tmp_path / "nothere.npz")
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_npz_meta(tmp_path / "nothere.npz")

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ValueError, match="corrupt.npz"):
        load_npz(corrupt)

    good = tmp_path / "good.npz"
    save_npz(good, {"a": np.arange(1000.0)})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_npz(truncated)

    pickled = tmp_path / "pickled.npz"
    with open(pickled, "wb") as f:
        np.savez(f, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz"):
        load_npz(pickled)

    single = tmp_path / "single.npy"
    np.save(single, np.zeros(2))
    with pytest.raises(ValueError, match="single.npy"):
        load_npz(single)


# --------------------------------------------------------------------------- atomic writes

def test_atomic_write_bytes_and_text(tmp_path):
    path = tmp_path / "log.json"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    with atomic_open(path, "w") as f:
        f.write('{"loss": 0.5}\n')
    assert path.read_text() == '{"loss": 0.5}\n'
    assert os.listdir(tmp_path) == ["log.json"]
    if os.name == "posix":  # same permissions as a plain open() would give, not mkstemp's 0o600
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_atomic_open_error_keeps_old_file(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyError):
        with atomic_open(path, "wb") as f:
            f.write(b"half-written")
            raise KeyError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(path, "a"):
            pass
