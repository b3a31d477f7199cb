"""Read PyTorch ``torch.save`` and TorchScript zip files with numpy alone (no torch import).

A ``torch.save`` file (torch >= 1.6) is a zip archive ``<root>/data.pkl`` + ``<root>/data/<key>`` where each
``data/<key>`` holds the raw little-endian bytes of one storage. The pickle refers to a storage by a persistent
id ``("storage", <StorageType>, key, location, numel)`` and builds tensors with
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``: element (i_0, ..., i_k) of the tensor is
``storage[offset + Σ_j i_j stride_j]``. We rebuild exactly that as an ``np.ndarray`` (a copy, C-contiguous).

A TorchScript archive (``torch.jit.save``) has the same layout plus ``code/`` and ``constants.pkl`` (whose storages
live in ``constants/<key>``); its modules unpickle here as ``ScriptObject`` records (class name + state dict).

Public functions: ``load(path)`` (the unpickled object, tensors as np.ndarray), ``load_torchscript(path)`` (the
module tree) and ``torchscript_state_dict(path)`` (flat ``{"a.b.weight": array}`` of a TorchScript module).
Nothing from the file is executed: unknown classes become inert ``PickledObject`` records. Memory is bounded by
the file: zip members' declared sizes and the pickle's opcodes are checked before anything is decompressed or
unpickled (``safe_pickle``), and tensors are rebuilt only after the bytes each produces (size x itemsize, whatever
its strides) is checked against its storage and a budget of ``VIEW_BUDGET_FACTOR`` x the storage bytes read.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

import safe_pickle

__all__ = ["TorchLoadError", "load", "load_torchscript", "torchscript_state_dict", "PickledObject",
           "ScriptObject", "STORAGE_DTYPES"]

# torch storage class name -> numpy dtype (little-endian, as torch writes them on every platform it supports).
STORAGE_DTYPES: Dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"), "UntypedStorage": np.dtype("u1"),
    "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
}
# torch dtype objects (``torch float32``) as pickled in newer formats -> numpy dtype.
TORCH_DTYPES: Dict[str, np.dtype] = {
    "float64": np.dtype("<f8"), "double": np.dtype("<f8"), "float32": np.dtype("<f4"), "float": np.dtype("<f4"),
    "float16": np.dtype("<f2"), "half": np.dtype("<f2"), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"), "long": np.dtype("<i8"), "int32": np.dtype("<i4"), "int": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "short": np.dtype("<i2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"),
    "bool": np.dtype("?"), "complex64": np.dtype("<c8"), "complex128": np.dtype("<c16"),
}


VIEW_BUDGET_FACTOR = 4        # a tensor (and all of them together) may produce 4x the storage bytes they view ...
VIEW_BUDGET_SLACK = 1 << 20   # ... plus 1 MiB (broadcast scalars, tiny tensors)
MAX_STEP_INT = (1 << 63) - 1  # sizes/strides/offsets are int64 in torch


class TorchLoadError(ValueError):
    """A file that is not a readable torch zip archive (corrupt, truncated, legacy or unsupported content)."""


@dataclasses.dataclass
class PickledObject:
    """Inert record of an object whose class we do not rebuild: ``module.name(*args)`` then ``state``."""

    module: str
    name: str
    args: tuple = ()
    state: Any = None

    def __setstate__(self, state):  # called by pickle's BUILD opcode
        self.state = state


@dataclasses.dataclass
class ScriptObject:
    """A TorchScript module/object: its ``__torch__`` class name and its attributes (``state``)."""

    qualified_name: str
    state: Any = None

    def __setstate__(self, state):
        self.state = state


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage as referenced by a persistent id, loaded lazily from the archive."""

    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(eq=False)
class _StorageArray:
    """A loaded storage: archive member ``name`` as a read-only 1-D array."""

    name: str
    array: np.ndarray


@dataclasses.dataclass(eq=False)
class _LazyTensor:
    """``_rebuild_tensor_v2``'s arguments, rebuilt into an array only after the checks of ``_strided_view``."""

    storage: Any
    offset: Any
    size: Any
    stride: Any


def _class_stub(module: str, name: str):
    """A callable standing in for an unknown class; calling it or ``cls.__new__`` yields a ``PickledObject``."""

    class Stub:
        def __new__(cls, *args, **kwargs):
            return PickledObject(module, name, args)

    Stub.__name__ = Stub.__qualname__ = name
    return Stub


def _script_class(qualified_name: str):
    class ScriptClass:
        def __new__(cls, *args, **kwargs):
            return ScriptObject(qualified_name)

    ScriptClass.__name__ = ScriptClass.__qualname__ = qualified_name.rsplit(".", 1)[-1]
    return ScriptClass


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc. in a persistent id."""

    name: str


# ---- tensor rebuilding ------------------------------------------------------------------------------------------


def _ints(value, what: str, name: str) -> Tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > 64 or not all(type(v) is int for v in value):
        shown = str(value) if len(str(value)) <= 80 else f"{str(value)[:80]}..."
        raise TorchLoadError(f"tensor {name}: {what} {shown} is not a tuple of at most 64 ints")
    if any(not 0 <= v <= MAX_STEP_INT for v in value):
        raise TorchLoadError(f"tensor {name}: {what} {value} has an entry outside [0, 2**63)")
    return value


def _view_nbytes(t: _LazyTensor, name: str) -> Tuple[np.ndarray, int]:
    """Check a tensor's arguments against its storage; return the storage array and the bytes the view makes."""
    if not isinstance(t.storage, _StorageArray):
        raise TorchLoadError(f"tensor {name}: its storage is a {type(t.storage).__name__}, not a storage record")
    storage = t.storage.array
    size, stride = _ints(t.size, "size", name), _ints(t.stride, "stride", name)
    (offset,) = _ints((t.offset,), "storage offset", name)
    if len(size) != len(stride):
        raise TorchLoadError(f"tensor {name}: size {size} and stride {stride} have different lengths")
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and last >= storage.size:
        raise TorchLoadError(f"tensor {name} of size {size}, stride {stride}, offset {offset} reads past its "
                             f"storage {t.storage.name!r} of {storage.size} elements")
    nbytes = numel * storage.dtype.itemsize
    limit = VIEW_BUDGET_FACTOR * storage.nbytes + VIEW_BUDGET_SLACK
    if nbytes > limit:
        raise TorchLoadError(f"tensor {name} of size {size}, stride {stride} would produce {nbytes} bytes from "
                             f"its {storage.nbytes}-byte storage {t.storage.name!r} (limit {limit}); crafted "
                             f"strides?")
    return storage, nbytes


def _strided_view(storage: np.ndarray, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]) -> np.ndarray:
    """Tensor[i] = storage[offset + Σ_j i_j stride_j], copied into a C-contiguous array of shape ``size``
    (arguments already checked by ``_view_nbytes``)."""
    if 0 in size:
        return np.zeros(size, storage.dtype)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride), writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
    if not isinstance(data, np.ndarray):
        raise TorchLoadError(f"_rebuild_device_tensor_from_numpy of a {type(data).__name__}, not an array")
    dtype = safe_pickle.plain_dtype(np.dtype(dtype) if isinstance(dtype, str) else dtype, "tensor from numpy")
    if data.size * dtype.itemsize > VIEW_BUDGET_FACTOR * data.nbytes + VIEW_BUDGET_SLACK:
        raise TorchLoadError(f"tensor from numpy: {data.dtype} -> {dtype} of {data.size} elements is too large")
    return np.asarray(data, dtype=dtype)


def _identity_first(obj, *unused):
    return obj


_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_device_tensor_from_numpy,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("torch.jit._pickle", "restore_type_tag"): _identity_first,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "build_genericlist"): list,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


def _safe_global(module: str, name: str):
    """Classes/functions we rebuild for real: torch tensors, containers, numpy arrays and scalars."""
    if (module, name) in _TORCH_GLOBALS:
        return _TORCH_GLOBALS[(module, name)]
    if module == "torch" and name.endswith("Storage"):
        return _StorageType(name)
    if module == "torch" and name in TORCH_DTYPES:
        return TORCH_DTYPES[name]
    return safe_pickle.numpy_global(module, name)  # numpy arrays (checked before allocating) and bytes


# ---- the archive and the unpickler ------------------------------------------------------------------------------


class _Archive:
    """A torch zip archive: ``<root>/data.pkl``, ``<root>/data/<key>`` (and TorchScript extras)."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise TorchLoadError(f"{self.path}: no such file")
        if not zipfile.is_zipfile(self.path):
            raise TorchLoadError(f"{self.path}: {_describe_non_zip(self.path)}")
        try:
            self.zip = zipfile.ZipFile(self.path)
            names = self.zip.namelist()
            safe_pickle.check_zip(self.zip, self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise TorchLoadError(f"{self.path}: corrupt zip archive ({e})") from e
        except safe_pickle.UnsafeFileError as e:
            raise TorchLoadError(str(e)) from e
        roots = sorted((n[: -len("data.pkl")] for n in names if n.endswith("data.pkl") and n.count("/") == 1),
                       key=len)
        if not roots:
            raise TorchLoadError(f"{self.path}: zip archive without '<root>/data.pkl'; not written by torch.save "
                                 f"or torch.jit.save")
        self.root, self.names = roots[0], set(names)
        self.is_torchscript = f"{self.root}constants.pkl" in self.names or any(
            n.startswith(f"{self.root}code/") for n in names)
        byteorder = self.read(f"{self.root}byteorder", missing_ok=True)
        if byteorder not in (None, b"little"):
            raise TorchLoadError(f"{self.path}: byteorder {byteorder!r} is not supported (only little-endian)")
        self._cache: Dict[str, _StorageArray] = {}
        self.budget = VIEW_BUDGET_SLACK  # bytes all tensors together may produce: grows with each storage read
        # torch writes data.pkl uncompressed, ~5+ bytes per opcode; a deflated pickle may not build more objects
        self.max_ops = (1 << 16) + os.path.getsize(self.path) // 2

    def read(self, name: str, missing_ok: bool = False, size: Optional[int] = None):
        """Member ``name`` (its first ``size`` bytes when given: a storage's data, not what the member claims)."""
        if name not in self.names:
            if missing_ok:
                return None
            raise TorchLoadError(f"{self.path}: archive member {name!r} is missing")
        try:
            with self.zip.open(name) as f:
                return f.read() if size is None or size >= self.zip.getinfo(name).file_size else f.read(size)
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # e.g. CRC errors of corrupt members
            raise TorchLoadError(f"{self.path}: corrupt archive member {name!r} ({e})") from e

    def storage(self, folder: str, ref: _Storage) -> _StorageArray:
        """The storage ``<root>/<folder>/<key>`` as a read-only 1-D array of ``ref.numel`` elements."""
        name = f"{self.root}{folder}/{ref.key}"
        if name not in self._cache:
            if ref.numel < 0:
                raise TorchLoadError(f"{self.path}: storage {name!r} has a negative size {ref.numel}")
            need = ref.numel * ref.dtype.itemsize
            raw = self.read(name, size=need)
            if len(raw) < need:
                raise TorchLoadError(f"{self.path}: storage {name!r} has {len(raw)} bytes, expected {need} "
                                     f"({ref.numel} x {ref.dtype}); truncated file?")
            self._cache[name] = _StorageArray(name, np.frombuffer(raw, ref.dtype, count=ref.numel))
            self.budget += VIEW_BUDGET_FACTOR * need
        return self._cache[name]

    def unpickle(self, member: str, storage_folder: str) -> Any:
        """Unpickle ``member`` (opcodes checked first), then check nesting and rebuild its tensors."""
        data = self.read(f"{self.root}{member}")
        try:
            safe_pickle.check_stream(data, member, allow_persistent=True, max_ops=self.max_ops)
            obj = _Unpickler(data, self, storage_folder).load()
            safe_pickle.check_nesting(obj, member, children=_children)
            return _materialize(obj, "", self, {})
        except (TorchLoadError, safe_pickle.UnsafeFileError) as e:
            if self.path in str(e):
                raise
            raise TorchLoadError(f"{self.path}: {e if str(e).startswith(member) else f'{member}: {e}'}") from e
        except Exception as e:  # malformed pickle streams raise many types
            raise TorchLoadError(f"{self.path}: cannot unpickle {member} ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from e


def _children(obj) -> list:
    """Sub-objects of containers and inert records (what ``_materialize`` descends into)."""
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, PickledObject):
        return [obj.args, obj.state]
    if isinstance(obj, ScriptObject):
        return [obj.state]
    return []


def _materialize(obj: Any, name: str, archive: _Archive, done: Dict[int, tuple]) -> Any:
    """``obj`` with each ``_LazyTensor`` replaced by its array, after checking the bytes it produces against its
    storage and the archive's remaining budget (``name``: the path of ``obj``, e.g. ``['model']['conv.weight']``).
    Shared objects are handled once (``done``: id -> (original, result)), so a DAG costs linear time."""
    if id(obj) in done:
        return done[id(obj)][1]
    result = obj
    if isinstance(obj, _LazyTensor):
        storage, nbytes = _view_nbytes(obj, name or "<top level>")
        if nbytes > archive.budget:
            raise TorchLoadError(f"tensor {name} would take the tensors' total past {VIEW_BUDGET_FACTOR} x "
                                 f"the storage bytes in the file; crafted views of shared storages?")
        archive.budget -= nbytes
        result = _strided_view(storage, obj.offset, obj.size, obj.stride)
    elif isinstance(obj, safe_pickle.CheckedArray):
        result = obj.view(np.ndarray)
    elif isinstance(obj, _StorageArray):  # a storage handed to something we keep as a record: its read-only array
        result = obj.array
    elif isinstance(obj, dict):
        for k in list(obj):
            if isinstance(k, _LazyTensor):
                raise TorchLoadError(f"{name or 'a dict'} uses a tensor as a key")
            obj[k] = _materialize(obj[k], f"{name}[{k!r}]", archive, done)
    elif isinstance(obj, list):
        obj[:] = [_materialize(v, f"{name}[{i}]", archive, done) for i, v in enumerate(obj)]
    elif isinstance(obj, tuple):
        result = tuple(_materialize(v, f"{name}[{i}]", archive, done) for i, v in enumerate(obj))
    elif isinstance(obj, (set, frozenset)) and any(isinstance(v, _LazyTensor) for v in obj):
        raise TorchLoadError(f"{name or 'a set'} holds tensors")
    elif isinstance(obj, PickledObject):
        obj.args = _materialize(obj.args, f"{name}.args", archive, done)
        obj.state = _materialize(obj.state, f"{name}.state", archive, done)
    elif isinstance(obj, ScriptObject):
        obj.state = _materialize(obj.state, f"{name}.{obj.qualified_name}" if not name else name, archive, done)
    done[id(obj)] = (obj, result)  # keeps ``obj`` alive, so its id is not reused during the walk
    return result


def _describe_non_zip(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80":
        return "not a torch zip archive (looks like the legacy pre-1.6 torch.save format; re-save it with " \
               "torch>=1.6 (torch.save(torch.load(f), f2)) to read it without torch)"
    if head[:4] == b"PK\x03\x04":
        return "truncated or corrupt zip archive (it starts like one but has no end-of-central-directory record)"
    if not head:
        return "empty file, not a torch zip archive"
    return f"not a torch zip archive (first bytes {head[:8]!r})"


class _Unpickler(pickle.Unpickler):
    """Rebuilds tensors as numpy arrays; never imports or calls anything outside a small allow-list."""

    def __init__(self, data: bytes, archive: _Archive, storage_folder: str):
        import io
        super().__init__(io.BytesIO(data))
        self.archive, self.storage_folder = archive, storage_folder

    def find_class(self, module: str, name: str):
        found = _safe_global(module, name)
        if found is not None:
            return found
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        return _class_stub(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise TorchLoadError(f"{self.archive.path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if type(numel) is not int or not isinstance(key, (str, int)):
            raise TorchLoadError(f"storage {str(key)[:40]!r}: malformed persistent id (numel {str(numel)[:40]})")
        if isinstance(storage_type, np.dtype):  # newer pickles may pass a dtype directly
            dtype = safe_pickle.plain_dtype(storage_type, "storage")
        elif isinstance(storage_type, _StorageType) and storage_type.name in STORAGE_DTYPES:
            dtype = STORAGE_DTYPES[storage_type.name]
        else:
            raise TorchLoadError(f"{self.archive.path}: unsupported storage type {storage_type!r}; known: "
                                 f"{sorted(STORAGE_DTYPES)}")
        return self.archive.storage(self.storage_folder, _Storage(str(key), dtype, int(numel)))


# ---- public API ---------------------------------------------------------------------------------------------------


def load(path: str) -> Any:
    """Unpickle a ``torch.save`` zip file: tensors become np.ndarray, (Ordered)dicts/lists/scalars stay Python.

    Raises ``TorchLoadError`` naming ``path`` for missing, corrupt, truncated, legacy-format or unsupported files.
    """
    archive = _Archive(path)
    return archive.unpickle("data.pkl", "data")


def load_torchscript(path: str) -> ScriptObject:
    """The module tree of a ``torch.jit.save`` archive: ``ScriptObject``s whose ``state`` holds the attributes."""
    archive = _Archive(path)
    if not archive.is_torchscript:
        raise TorchLoadError(f"{archive.path}: not a TorchScript archive (no constants.pkl); use torch_io.load")
    return archive.unpickle("data.pkl", "data")


def torchscript_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Every array attribute of a TorchScript module, by dotted name (``"net.layers.conv.weight"``)."""
    out: Dict[str, np.ndarray] = {}
    _flatten(load_torchscript(path), "", out)
    return out


def _flatten(obj: Any, prefix: str, out: Dict[str, np.ndarray]) -> None:
    if isinstance(obj, (ScriptObject, PickledObject)):
        obj = obj.state
    if isinstance(obj, np.ndarray):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
