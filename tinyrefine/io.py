"""Reading PyTorch checkpoints without torch, and writing our own files safely.

Three tools live here:

* ``load_torch_checkpoint(path)`` reads a ``.pth`` / ``.pt`` written by
  ``torch.save`` (the zip format, the default since torch 1.6) into a dict of
  NumPy arrays, so pretrained weights can be used without installing torch.
* ``save_npz`` / ``load_npz`` / ``load_npz_meta`` store our own weights as a
  plain ``.npz`` archive with an optional JSON metadata record, never pickled.
* ``atomic_open`` / ``atomic_write_bytes`` write a file so that a crash
  half-way leaves the old file intact instead of a truncated one.

The zip layout of a torch checkpoint
------------------------------------
``torch.save(obj, "x.pth")`` writes a zip archive (members stored
uncompressed) whose members all sit under one folder, the "prefix" ("x" here)::

    x/data.pkl          a pickle of ``obj``, tensors replaced by references
    x/data/0, x/data/1  one raw storage per member: the bytes of the elements
    x/byteorder         "little" or "big" (absent in old files: little)
    x/version, x/.format_version, ...   bookkeeping we do not need

Inside ``data.pkl`` each tensor is pickled as a call::

    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
                                    requires_grad, backward_hooks[, metadata])

where ``storage`` is a *persistent id*, the tuple
``('storage', torch.FloatStorage, '0', 'cpu', numel)`` naming the zip member
``x/data/0`` holding ``numel`` elements of the storage's dtype. Several tensors
may share one storage (a slice and the tensor it was sliced from), and
``size`` / ``stride`` / ``storage_offset`` (counted in elements) say which
elements of the storage make the tensor, exactly like NumPy strides.

Why a restricted unpickler
--------------------------
A pickle is a small program: its GLOBAL opcode imports any ``module.name``
and its REDUCE opcode calls it with arguments of the file's choosing, so
``pickle.load`` on a downloaded ``.pth`` can run ``os.system("...")``. Every
import goes through ``Unpickler.find_class``, so we override it with an
allow-list: the handful of names a state dict needs (OrderedDict, the tensor
rebuild functions, the storage type names), each mapped to *our own* small
functions. Anything else is refused with ``UnsafeCheckpointError`` before it
is imported, let alone called. The rebuild function also checks that the
requested view stays inside its storage, since ``as_strided`` would otherwise
read arbitrary memory.

What comes back
---------------
Only tensors. A state dict maps names to tensors, so ``load_torch_checkpoint``
returns ``{name: np.ndarray}``; non-tensor entries (an ``epoch`` int, a
``config`` string) are dropped, and ``state_dict._metadata`` (the per-module
version numbers torch attaches) is ignored. Training checkpoints of the form
``{'state_dict': {...}, 'epoch': 3}`` or ``{'model': {...}, ...}`` are unwrapped,
and a leading ``'module.'`` (added by ``nn.DataParallel``) is stripped from
keys. Tensors keep their dtype, except bfloat16 which NumPy lacks: it becomes
float32 (exactly, bfloat16 is the top half of a float32). The legacy pre-1.6
format is not supported; the error says how to re-save the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import sys
import zipfile
from collections import OrderedDict
from typing import IO, Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

__all__ = ["UnsafeCheckpointError", "atomic_open", "atomic_write_bytes", "load_npz", "load_npz_meta",
           "load_torch_checkpoint", "save_npz", "META_KEY"]

META_KEY = "__meta__"  # reserved npz member holding the JSON metadata as uint8 bytes


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle asked for something other than tensors and dicts."""


# ---------------------------------------------------------------------------
# torch checkpoints
# ---------------------------------------------------------------------------

class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only a dtype tag.

    It is an instance, not a class, so a hostile pickle that tries to call or
    instantiate it gets an error instead of an object."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype  # NumPy type code without byte order: 'f4', 'i8', ...

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(f"torch.{self.name} may only appear inside a storage reference")

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


# 'bf16' is our own tag: read as uint16, widened to float32 below.
_STORAGE_TYPES = {name: _StorageType(name, code) for name, code in [
    ("DoubleStorage", "f8"), ("FloatStorage", "f4"), ("HalfStorage", "f2"), ("BFloat16Storage", "bf16"),
    ("LongStorage", "i8"), ("IntStorage", "i4"), ("ShortStorage", "i2"), ("CharStorage", "i1"),
    ("ByteStorage", "u1"), ("BoolStorage", "b1"),
]}


class _Storage:
    """A storage read from the zip: a flat, read-only, native-order array."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> np.ndarray:
    # requires_grad, backward_hooks and metadata describe autograd state we do not keep.
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not from a storage reference")
    flat = storage.array
    size, stride, offset = _check_view(flat.size, storage_offset, size, stride)
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(s * flat.itemsize for s in stride), writeable=False)
    # Copy: the result owns C-contiguous memory and no longer pins the whole storage.
    return np.array(view, copy=True, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride) -> np.ndarray:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> np.ndarray:
    # An nn.Parameter is a tensor plus a requires_grad flag: keep the tensor.
    if not isinstance(data, np.ndarray):
        raise UnsafeCheckpointError("parameter rebuilt from something other than a tensor")
    return data


def _check_view(numel: int, offset, size, stride) -> Tuple[tuple, tuple, int]:
    """Validate a (offset, size, stride) view so ``as_strided`` cannot read past the storage."""
    def ints(xs, what):
        if not isinstance(xs, (tuple, list)) or not all(type(x) is int and x >= 0 for x in xs):
            raise pickle.UnpicklingError(f"bad tensor {what}: {xs!r}")
        return tuple(xs)

    size, stride = ints(size, "size"), ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError(f"bad tensor view: offset={offset!r} size={size} stride={stride}")
    if 0 in size:
        return size, stride, min(offset, numel)  # an empty tensor reads nothing
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
        raise pickle.UnpicklingError(
            f"tensor view (offset={offset}, size={size}, stride={stride}) reaches element {last} "
            f"of a storage with {numel} elements")
    return size, stride, offset


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` allowing only tensors and (ordered) dicts."""

    def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder, self.source = archive, prefix, byteorder, source
        self.storages: Dict[str, _Storage] = {}  # tensors that share a storage share one read

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {module}.{name} from {self.source}: only tensors and ordered dicts "
                f"are allowed") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id in {self.source}: {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type in {self.source}: {storage_type!r}")
        if not isinstance(key, str) or "/" in key or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"bad storage reference in {self.source}: {pid!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(self._read_storage(storage_type, key, numel))
        return self.storages[key]

    def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
        member = f"{self.prefix}/data/{key}"
        try:
            raw = self.archive.read(member)
        except KeyError:
            raise pickle.UnpicklingError(f"{self.source} has no member {member}") from None
        order = "<" if self.byteorder == "little" else ">"
        code = "u2" if storage_type.dtype == "bf16" else "u1" if storage_type.dtype == "b1" else storage_type.dtype
        dtype = np.dtype(order + code)
        if len(raw) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"{member} in {self.source} holds {len(raw)} bytes, {numel} x {dtype.itemsize} expected")
        array = np.frombuffer(raw, dtype=dtype, count=numel)
        if storage_type.dtype == "bf16":
            # bfloat16 is the top 16 bits of a float32: shift them up and reinterpret.
            return (array.astype(np.uint32) << 16).view(np.float32)
        if storage_type.dtype == "b1":
            return array != 0  # any nonzero byte is True; never expose odd bool bytes
        return array.astype(dtype.newbyteorder("="), copy=False)


def load_torch_checkpoint(path: "str | os.PathLike[str]") -> "OrderedDict[str, np.ndarray]":
    """Read a ``torch.save`` file into ``{name: np.ndarray}`` without importing torch.

    Accepts a state dict, or a training checkpoint dict holding one under
    ``'state_dict'`` or ``'model'``; strips a leading ``'module.'`` from keys.
    Non-tensor entries are dropped (see the module docstring). Raises
    ``FileNotFoundError`` for a missing file, ``UnsafeCheckpointError`` when the
    pickle asks for anything but tensors and dicts, and ``ValueError`` naming the
    file when it is not a readable torch zip checkpoint.
    """
    source = os.fspath(path)
    with open(source, "rb") as f:  # FileNotFoundError carries the path
        head = f.read(4)
        if not zipfile.is_zipfile(f):
            if head[:1] == b"\x80":  # a bare pickle: the legacy (torch < 1.6) format
                raise ValueError(
                    f"{source} uses the legacy torch (< 1.6) serialization, which tinyrefine does not read; "
                    f"re-save it with a newer torch: torch.save(torch.load(p), p)")
            raise ValueError(f"{source} is not a PyTorch checkpoint (not a zip archive)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                obj = _unpickle_archive(archive, source)
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, KeyError,
                AttributeError, IndexError, OSError) as exc:
            # Truncated or corrupt archives and malformed pickles all end up here.
            raise ValueError(f"cannot read torch checkpoint {source}: {exc}") from exc
    return _extract_state_dict(obj, source)


def _unpickle_archive(archive: zipfile.ZipFile, source: str) -> Any:
    # torch writes every member under one folder; data.pkl sits directly in it.
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"{source} is a zip but not a torch checkpoint: "
                         f"expected one <prefix>/data.pkl, found {len(pickles)}")
    prefix = pickles[0].split("/")[0]
    byteorder = "little"
    if f"{prefix}/byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{source}: unknown byteorder {byteorder!r}")
    with archive.open(pickles[0]) as data_pkl:
        return _CheckpointUnpickler(data_pkl, archive, prefix, byteorder, source).load()


def _extract_state_dict(obj: Any, source: str) -> "OrderedDict[str, np.ndarray]":
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a dict of tensors")
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            continue  # scalar metadata (epoch, config strings, ...) is dropped on purpose
        if not isinstance(key, str):
            raise ValueError(f"{source}: tensor key {key!r} is not a string")
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise ValueError(f"{source}: key {name!r} appears both with and without the 'module.' prefix")
        out[name] = value
    if not out:
        raise ValueError(f"{source} contains no tensors (top-level keys: {list(obj)[:10]})")
    return out


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(path: "str | os.PathLike[str]", mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """Open ``path`` for writing so readers only ever see the old or the new file.

    Writes go to a temporary file in the same directory (so the final rename
    stays on one filesystem and is atomic); on a clean exit it is flushed,
    fsynced and ``os.replace``d over ``path``. If the block raises, the
    temporary file is removed and ``path`` is left untouched. ``mode`` is
    ``'w'`` (text, utf-8 unless ``encoding`` says otherwise) or ``'wb'``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            # 0o666 filtered by the umask, like a plain open(): NamedTemporaryFile would give 0o600.
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        try:
            if mode == "w":
                f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
            else:
                f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)  # fdopen failed, so nothing else owns the descriptor
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open directories.
    if sys.platform.startswith("win"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------
# npz archives
# ---------------------------------------------------------------------------

def save_npz(path: "str | os.PathLike[str]", arrays: Mapping[str, Any], meta: Optional[dict] = None) -> None:
    """Write ``arrays`` (NumPy or CuPy) and optional JSON ``meta`` to ``path`` atomically.

    The file is an ordinary ``.npz`` (``np.load`` reads it) written at exactly
    ``path`` (no ``.npz`` is appended). Keys may contain dots. ``meta`` must be
    JSON-serialisable; it is stored as UTF-8 bytes in a uint8 array under
    ``META_KEY``, so loading never needs pickle. Object arrays are refused.
    """
    for key in arrays:
        if not isinstance(key, str) or not key:
            raise TypeError(f"npz keys must be non-empty strings, got {key!r}")
        if key == META_KEY:
            raise ValueError(f"{META_KEY!r} is reserved for metadata; pass it as meta=")
    meta_bytes = None
    if meta is not None:
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        meta_bytes = json.dumps(meta, sort_keys=True, allow_nan=False).encode("utf-8")

    from .backend import as_numpy

    with atomic_open(path, "wb") as f:
        # What np.savez does, minus its keyword arguments: a key named 'file' or
        # 'allow_pickle' would clash with np.savez's own parameters.
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            items = list(arrays.items())
            if meta_bytes is not None:
                items.append((META_KEY, np.frombuffer(meta_bytes, dtype=np.uint8)))
            for key, value in items:
                # One array at a time: a GPU model is copied to the host piece by piece.
                array = np.asarray(as_numpy(value))
                if array.dtype.hasobject:
                    raise TypeError(f"array {key!r} has dtype {array.dtype}; npz files are written "
                                    f"with allow_pickle=False, so object arrays cannot be stored")
                with archive.open(key + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)


def _open_npz(path: "str | os.PathLike[str]"):
    source = os.fspath(path)
    f = open(source, "rb")  # FileNotFoundError / PermissionError carry the path
    try:
        npz = np.load(f, allow_pickle=False)
    except Exception as exc:
        f.close()
        raise ValueError(f"cannot read npz file {source}: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        f.close()
        raise ValueError(f"{source} is a single .npy array, not an .npz archive")
    return source, f, npz


def load_npz(path: "str | os.PathLike[str]") -> Dict[str, np.ndarray]:
    """Read every array written by ``save_npz`` (the metadata record excluded).

    Use ``load_npz_meta`` for the metadata. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file when it is corrupt or holds
    pickled (object) arrays.
    """
    source, f, npz = _open_npz(path)
    with f, npz:
        try:
            return {key: npz[key] for key in npz.files if key != META_KEY}
        except Exception as exc:  # truncated members, bad headers, object arrays
            raise ValueError(f"cannot read npz file {source}: {exc}") from exc


def load_npz_meta(path: "str | os.PathLike[str]") -> dict:
    """The JSON metadata stored by ``save_npz``; ``{}`` when none was stored.

    Only the metadata member is read, so this is cheap even for big files.
    """
    source, f, npz = _open_npz(path)
    with f, npz:
        if META_KEY not in npz.files:
            return {}
        try:
            meta = json.loads(npz[META_KEY].tobytes().decode("utf-8"))
        except Exception as exc:
            raise ValueError(f"cannot read metadata of npz file {source}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"metadata of {source} is a {type(meta).__name__}, not a JSON object")
    return meta
