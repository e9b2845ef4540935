"""Reading PyTorch checkpoints without torch, and writing our own files safely.

Three tools live here:

* ``load_torch_checkpoint(path)`` reads a ``.pth`` / ``.pt`` written by
  ``torch.save`` (the zip format, the default since torch 1.6, or the legacy
  stream of older files) into a dict of NumPy arrays, so pretrained weights can
  be used without installing torch.
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

The legacy layout (torch < 1.6)
-------------------------------
Older files, and ``torch.save(obj, p, _use_new_zipfile_serialization=False)``,
are one stream of five pickles followed by raw bytes::

    MAGIC_NUMBER (0x1950A86A20F9469CFC6C)   a pickled int
    PROTOCOL_VERSION (1001)                  a pickled int
    sys_info                                 {'little_endian': ..., 'type_sizes': {...}}
    obj                                      as data.pkl above, persistent ids
                                             ('storage', type, key, location, numel, view)
    storage keys                             a pickled list of the keys, in write order
    then per key: numel as an int64, then numel elements (both little-endian)

The storages come after the pickle that refers to them, so tensors of a legacy
file are first rebuilt as pending views and made into arrays once the bytes
have been read. ``view`` (very old files) names a slice ``(view_key, offset,
numel)`` of the storage ``key``. The even older tar format (torch < 0.4) is not
read.

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
float32 (exactly, bfloat16 is the top half of a float32).
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
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Tuple

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
    """A storage: a flat, read-only, native-order array (None until a legacy file's bytes are read)."""

    __slots__ = ("array", "pending")

    def __init__(self, array: Optional[np.ndarray] = None):
        self.array = array
        self.pending: List["_PendingTensor"] = []   # a legacy file's tensors waiting for the bytes


class _PendingTensor:
    """A legacy file's tensor, rebuilt before its storage's bytes were read; ``array`` is set after."""

    __slots__ = ("storage", "offset", "size", "stride", "array")

    def __init__(self, storage: _Storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.array: Optional[np.ndarray] = None

    def resolve(self) -> None:
        self.array = _view(self.storage.array, self.offset, self.size, self.stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> "np.ndarray | _PendingTensor":
    # requires_grad, backward_hooks and metadata describe autograd state we do not keep.
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not from a storage reference")
    if storage.array is None:  # a legacy file: the bytes come after the pickle
        _check_view(0, storage_offset, size, stride, bounds=False)
        storage.pending.append(_PendingTensor(storage, storage_offset, size, stride))
        return storage.pending[-1]
    return _view(storage.array, storage_offset, size, stride)


def _view(flat: np.ndarray, storage_offset, size, stride) -> np.ndarray:
    size, stride, offset = _check_view(flat.size, storage_offset, size, stride)
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(s * flat.itemsize for s in stride), writeable=False)
    # Copy: the result owns C-contiguous memory and no longer pins the whole storage.
    return np.array(view, copy=True, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride) -> np.ndarray:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> "np.ndarray | _PendingTensor":
    # An nn.Parameter is a tensor plus a requires_grad flag: keep the tensor.
    if not isinstance(data, (np.ndarray, _PendingTensor)):
        raise UnsafeCheckpointError("parameter rebuilt from something other than a tensor")
    return data


def _check_view(numel: int, offset, size, stride, bounds: bool = True) -> Tuple[tuple, tuple, int]:
    """Validate a (offset, size, stride) view so ``as_strided`` cannot read past the storage
    (``bounds=False``: the types only, for a storage not read yet)."""
    def ints(xs, what):
        if not isinstance(xs, (tuple, list)) or not all(type(x) is int and x >= 0 for x in xs):
            raise pickle.UnpicklingError(f"bad tensor {what}: {xs!r}")
        return tuple(xs)

    size, stride = ints(size, "size"), ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError(f"bad tensor view: offset={offset!r} size={size} stride={stride}")
    if not bounds:
        return size, stride, offset
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
    # files saved from a GPU by old torch name the CUDA storage classes: the same dtype tags (read to the host)
    **{("torch.cuda", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles allowing only the names in ``_ALLOWED``; a persistent id (a storage) is refused."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {module}.{name} from {self.source}: only tensors and ordered dicts "
                f"are allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"unexpected persistent id in {self.source}: {pid!r}")


class _CheckpointUnpickler(_RestrictedUnpickler):
    """Unpickles ``data.pkl`` allowing only tensors and (ordered) dicts."""

    def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
        super().__init__(file, source)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: Dict[str, _Storage] = {}  # tensors that share a storage share one read

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
        return _storage_array(raw, storage_type, numel, self.byteorder, f"{member} in {self.source}")


def _element_dtype(storage_type: _StorageType, byteorder: str = "little") -> np.dtype:
    order = "<" if byteorder == "little" else ">"
    code = "u2" if storage_type.dtype == "bf16" else "u1" if storage_type.dtype == "b1" else storage_type.dtype
    return np.dtype(order + code)


def _storage_array(raw: bytes, storage_type: _StorageType, numel: int, byteorder: str, what: str) -> np.ndarray:
    """``numel`` elements of ``storage_type`` from ``raw``, as a native-order array."""
    dtype = _element_dtype(storage_type, byteorder)
    if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"{what} holds {len(raw)} bytes, {numel} x {dtype.itemsize} expected")
    array = np.frombuffer(raw, dtype=dtype, count=numel)
    if storage_type.dtype == "bf16":
        # bfloat16 is the top 16 bits of a float32: shift them up and reinterpret.
        return (array.astype(np.uint32) << 16).view(np.float32)
    if storage_type.dtype == "b1":
        return array != 0  # any nonzero byte is True; never expose odd bool bytes
    return array.astype(dtype.newbyteorder("="), copy=False)


_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001   # torch/serialization.py's constants


class _LegacyUnpickler(_RestrictedUnpickler):
    """Unpickles a legacy file's object: storages are recorded (their bytes come later), tensors pend."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file, source)
        self.roots: Dict[str, Tuple[_StorageType, int, _Storage]] = {}   # key -> (type, numel, storage)
        self.views: Dict[str, Tuple[str, int, int, _Storage]] = {}       # key -> (root key, offset, numel, storage)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id in {self.source}: {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type in {self.source}: {storage_type!r}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"bad storage reference in {self.source}: {pid!r}")
        if key not in self.roots:
            self.roots[key] = (storage_type, numel, _Storage())
        elif self.roots[key][:2] != (storage_type, numel):
            raise pickle.UnpicklingError(f"storage {key} of {self.source} is referenced with two types or sizes")
        if view is None:
            return self.roots[key][2]
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and all(type(v) is int and v >= 0 for v in view[1:])):
            raise pickle.UnpicklingError(f"bad storage view in {self.source}: {view!r}")
        view_key, offset, view_numel = view
        if view_key not in self.views:
            self.views[view_key] = (key, offset, view_numel, _Storage())
        return self.views[view_key][3]


def _load_legacy(f: IO[bytes], source: str) -> Any:
    """The object of a legacy (torch < 1.6) stream, its tensors as arrays (see the module docstring)."""
    def plain() -> Any:  # the small pickles around the object hold no tensors
        return _RestrictedUnpickler(f, source).load()

    if plain() != _LEGACY_MAGIC:
        raise ValueError(f"{source} is a pickle but not a torch checkpoint (wrong magic number)")
    protocol = plain()
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{source}: legacy torch protocol {protocol!r}, only {_LEGACY_PROTOCOL} is known")
    sys_info = plain()
    if not isinstance(sys_info, dict):
        raise ValueError(f"{source}: the legacy header's sys_info is a {type(sys_info).__name__}, not a dict")
    unpickler = _LegacyUnpickler(f, source)
    obj = unpickler.load()
    keys = plain()
    if not isinstance(keys, list) or sorted(keys) != sorted(unpickler.roots):
        raise ValueError(f"{source}: the storage key list does not match the storages the pickle refers to")
    for key in keys:  # torch writes each storage's numel and bytes little-endian, whatever the machine
        storage_type, numel, storage = unpickler.roots[key]
        header = f.read(8)
        if len(header) < 8 or int.from_bytes(header, "little", signed=True) != numel:
            raise ValueError(f"{source}: storage {key} should hold {numel} elements; its header says "
                             f"{int.from_bytes(header, 'little', signed=True) if len(header) == 8 else 'nothing'}")
        raw = f.read(numel * _element_dtype(storage_type).itemsize)
        storage.array = _storage_array(raw, storage_type, numel, "little", f"storage {key} of {source}")
    for view_key, (key, offset, numel, storage) in unpickler.views.items():
        root = unpickler.roots[key][2].array
        if offset + numel > root.size:
            raise ValueError(f"{source}: storage view {view_key} ({offset}+{numel}) passes the end of "
                             f"storage {key} ({root.size} elements)")
        storage.array = root[offset:offset + numel]
    for _, _, storage in unpickler.roots.values():
        for pending in storage.pending:
            pending.resolve()
    for *_, storage in unpickler.views.values():
        for pending in storage.pending:
            pending.resolve()
    return obj


def load_torch_checkpoint(path: "str | os.PathLike[str]") -> "OrderedDict[str, np.ndarray]":
    """Read a ``torch.save`` file into ``{name: np.ndarray}`` without importing torch.

    Accepts a state dict, or a training checkpoint dict holding one under
    ``'state_dict'`` or ``'model'``; strips a leading ``'module.'`` from keys.
    Non-tensor entries are dropped (see the module docstring). Raises
    ``FileNotFoundError`` for a missing file, ``UnsafeCheckpointError`` when the
    pickle asks for anything but tensors and dicts, and ``ValueError`` naming the
    file when it is not a readable torch checkpoint (zip or legacy).
    """
    source = os.fspath(path)
    with open(source, "rb") as f:  # FileNotFoundError carries the path
        head = f.read(4)
        legacy = not zipfile.is_zipfile(f)
        if legacy and head[:1] != b"\x80":  # the legacy format starts with a pickle's PROTO opcode
            raise ValueError(f"{source} is not a PyTorch checkpoint (neither a zip archive nor a legacy "
                             f"torch pickle stream)")
        f.seek(0)
        try:
            if legacy:
                obj = _load_legacy(f, source)
            else:
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
        if isinstance(value, _PendingTensor):  # a legacy file's tensor, resolved once its storage was read
            value = value.array
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
