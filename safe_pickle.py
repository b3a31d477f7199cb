"""Reading pickles and zip containers that users hand us: no code runs and memory stays bounded.

``pickle.load`` imports and calls any global a stream names (``os.system`` included), and the C unpickler
allocates what the stream *claims* before reading it: ``LONG_BINPUT 2**31`` grows (and zero-fills) a memo of
2**32 pointers, a few bytes that cost tens of GiB. This module

* scans a stream's opcodes before unpickling (``check_stream``): memo indices must follow the entries actually
  stored, counted lengths must fit in the bytes that remain, and out-of-band buffers / extension codes are refused;
* rebuilds only allow-listed globals (``RestrictedUnpickler``): numpy arrays, dtypes and scalars of plain numeric
  or string dtypes (never ``object``), checked against their data *before* numpy allocates; every other global is
  refused with an error naming it;
* refuses containers nested deeper than ``MAX_DEPTH`` or holding themselves (``check_nesting``), which would
  exhaust the stack of any recursive consumer;
* checks zip members' declared sizes (absolute, against the compressed size and against the archive's size on
  disk) before decompressing (``check_zip``), and reads ``.npz`` files through it (``load_npz``).

Every refusal is an ``UnsafeFileError`` (a ``ValueError``) whose one-line message names the file.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Iterable, Optional, Union

import numpy as np

__all__ = ["UnsafeFileError", "check_stream", "RestrictedUnpickler", "numpy_global", "loads", "load_file",
           "check_nesting", "plain", "plain_dtype", "check_zip", "load_npz", "MAX_DEPTH", "MAX_MEMBER_BYTES",
           "MAX_COMPRESSION_RATIO"]

MAX_DEPTH = 100                    # container nesting; real checkpoints and CIFAR batches nest < 10 deep
MAX_MEMBER_BYTES = 16 << 30        # one zip member, uncompressed
MAX_COMPRESSION_RATIO = 1100       # deflate cannot exceed ~1032:1; more is a crafted size
SLACK_BYTES = 1 << 20              # allowance for tiny members (headers, empty storages)
MAX_OPCODES = 1 << 22              # default opcode budget of one stream (~256 MiB of objects at worst)

# Numeric and string dtypes: nothing an array of them holds can refer to Python objects.
PLAIN_DTYPE_KINDS = "biufcSU"
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_COUNTED = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
            "BINSTRING", "SHORT_BINSTRING", "BYTEARRAY8", "LONG1", "LONG4"}


class UnsafeFileError(ValueError):
    """A file refused because reading it would run code, exhaust memory, or it is malformed."""


# ---- opcode scan ------------------------------------------------------------------------------------------------


def check_stream(data: Union[bytes, BinaryIO], what: str, allow_persistent: bool = False,
                 max_ops: int = MAX_OPCODES) -> None:
    """Refuse a pickle stream whose opcodes would make the unpickler allocate more than the stream holds.

    Memo indices must not exceed the number of entries stored so far (a pickler numbers them 0, 1, 2, ...);
    frames must fit in the remaining bytes; counted strings/bytes are checked by the scan itself (it reads them).
    At most ``max_ops`` opcodes: each can create an object of ~64 bytes (``]`` is an empty list), so a caller
    whose stream was decompressed passes a limit proportional to the file's size on disk.
    ``data``: the stream's bytes, or a seekable binary file positioned at its start (read to the end).
    """
    memo = 0
    if isinstance(data, (bytes, bytearray)):
        size, data = len(data), io.BytesIO(data)
    else:
        start = data.tell()
        size = data.seek(0, io.SEEK_END) - start
        data.seek(start)
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(data)):
            name = op.name
            if count >= max_ops:
                raise UnsafeFileError(f"{what}: more than {max_ops} pickle opcodes (each may build an object); "
                                      f"more than a file of this size holds")
            if name in _REFUSED_OPCODES or (not allow_persistent and name in ("PERSID", "BINPERSID")):
                raise UnsafeFileError(f"{what}: pickle opcode {name} at byte {pos} is not allowed")
            if name in _MEMO_PUTS:
                if not 0 <= int(arg) <= memo:
                    raise UnsafeFileError(f"{what}: pickle memo index {arg} at byte {pos} skips ahead of the "
                                          f"{memo} entries stored so far (would allocate a huge memo)")
                memo += int(arg) == memo
            elif name == "MEMOIZE":
                memo += 1
            elif name == "FRAME" and arg > size - pos:
                raise UnsafeFileError(f"{what}: pickle frame of {arg} bytes at byte {pos} is longer than the "
                                      f"{size - pos} bytes left")
    except UnsafeFileError:
        raise
    except Exception as e:  # truncated counted strings, unknown opcodes, missing STOP, bad decimal arguments ...
        raise UnsafeFileError(f"{what}: corrupt pickle, cannot unpickle it ({type(e).__name__}: {str(e)[:200]})") from e


# ---- allow-listed numpy globals ------------------------------------------------------------------------------------


def plain_dtype(dtype: Any, what: str = "array") -> np.dtype:
    """A fresh copy of a numeric/string dtype (dropping any flags a pickled ``__setstate__`` may have set)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in PLAIN_DTYPE_KINDS or dtype.fields is not None \
            or dtype.subdtype is not None:
        raise UnsafeFileError(f"{what} of dtype {str(dtype)!r} refused: only numeric and string dtypes are read")
    return np.dtype(dtype.str)


def _dtype(spec, align=False, copy=False) -> np.dtype:
    """``numpy.dtype(spec, align, copy)``: always a copy, since pickle's BUILD then calls its ``__setstate__``
    (on numpy's shared dtype singletons that would change float32 for the whole process)."""
    if not isinstance(spec, str):
        raise UnsafeFileError(f"numpy.dtype({str(spec)[:40]!r}) refused: only dtypes named by a string are read")
    plain_dtype(np.dtype(spec), "numpy.dtype")
    return np.dtype(spec, False, True)


def _shape_numel(shape: Any) -> int:
    if not isinstance(shape, tuple) or len(shape) > 64 or not all(type(n) is int and n >= 0 for n in shape):
        raise UnsafeFileError(f"array shape {str(shape)[:80]} refused: expected up to 64 non-negative ints")
    return int(np.prod(shape, dtype=object))


class CheckedArray(np.ndarray):
    """What ``numpy.core.multiarray._reconstruct`` rebuilds here: ``__setstate__`` checks the state first."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and type(state[0]) is int):
            raise UnsafeFileError(f"numpy array state {str(state)[:80]} refused: not (version, shape, dtype, "
                                  f"fortran, bytes)")
        version, shape, dtype, fortran, raw = state
        dtype = plain_dtype(dtype)
        if not isinstance(raw, bytes) or _shape_numel(shape) * dtype.itemsize != len(raw):
            raise UnsafeFileError(f"numpy array of shape {shape} and dtype {dtype} refused: its data is "
                                  f"{len(raw) if isinstance(raw, bytes) else type(raw).__name__} bytes, not "
                                  f"{_shape_numel(shape) * dtype.itemsize}")
        super().__setstate__((version, shape, dtype, bool(fortran), raw))


def _reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray and cls is not CheckedArray:
        raise UnsafeFileError(f"numpy array subclass {getattr(cls, '__name__', cls)!r} refused")
    return _core().multiarray._reconstruct(CheckedArray, (0,), b"b")


def _scalar(dtype, raw=None):
    dtype = plain_dtype(dtype, "numpy scalar")
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise UnsafeFileError(f"numpy scalar of dtype {dtype} refused: its data is not {dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype)[0]


def _frombuffer(buf, dtype, shape, order="C"):
    """``numpy.core.numeric._frombuffer``, which protocol-5 pickles of arrays call with in-band bytes."""
    dtype = plain_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray)) or _shape_numel(shape) * dtype.itemsize != len(buf):
        raise UnsafeFileError(f"numpy array of shape {str(shape)[:80]} and dtype {dtype} refused: its data does "
                              f"not have {dtype.itemsize} bytes per element")
    return np.frombuffer(bytearray(buf), dtype).reshape(shape, order="F" if order == "F" else "C")


def _encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeFileError(f"_codecs.encode(..., {str(encoding)[:40]!r}) refused: only latin1 text is read")
    return text.encode("latin1")


def _core():
    return getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core


_NUMPY_GLOBALS: Dict[tuple, Callable] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar, ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype, ("_codecs", "encode"): _encode,
}


def numpy_global(module: str, name: str) -> Optional[Callable]:
    """The checked stand-in for an allow-listed global that rebuilds numpy arrays (or bytes), else None."""
    return _NUMPY_GLOBALS.get((module, name))


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds builtin containers/scalars and plain numpy arrays; any other global is an ``UnsafeFileError``."""

    what = "pickle"

    def find_class(self, module: str, name: str):
        found = numpy_global(module, name)
        if found is None:
            raise UnsafeFileError(f"{self.what}: refers to {module}.{name}, which is not allowed here (only numpy "
                                  f"arrays, dicts, lists, tuples, bytes, str and numbers are read)")
        return found

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self.what}: persistent id {str(pid)[:80]} is not allowed here")


# ---- nesting ---------------------------------------------------------------------------------------------------------


def _children(obj) -> Iterable:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    return ()


def check_nesting(obj: Any, what: str, max_depth: int = MAX_DEPTH, children: Callable = _children) -> None:
    """Refuse containers nested deeper than ``max_depth`` or containing themselves (iterative, any size).

    Shared sub-containers are visited once: the height of each is memoised, so the cost is linear.
    """
    height: Dict[int, int] = {}
    on_path = set()
    stack = [(obj, iter(children(obj)), 0)]
    on_path.add(id(obj))
    while stack:
        node, it, best = stack[-1]
        child = next(it, stack)
        if child is stack:  # node done
            stack.pop()
            on_path.discard(id(node))
            height[id(node)] = best
            if stack:
                parent, pit, pbest = stack[-1]
                stack[-1] = (parent, pit, max(pbest, best + 1))
            continue
        kids = children(child)
        if not kids:
            continue
        if id(child) in on_path:
            raise UnsafeFileError(f"{what}: a {type(child).__name__} contains itself (cyclic data is not read)")
        if id(child) in height:
            if len(stack) + height[id(child)] >= max_depth:
                raise UnsafeFileError(f"{what}: containers nested more than {max_depth} deep")
            stack[-1] = (node, it, max(best, height[id(child)] + 1))
        elif len(stack) >= max_depth:
            raise UnsafeFileError(f"{what}: containers nested more than {max_depth} deep")
        else:
            on_path.add(id(child))
            stack.append((child, iter(kids), 0))


def plain(obj: Any, seen: Optional[Dict[int, tuple]] = None) -> Any:
    """``obj`` with every ``CheckedArray`` replaced by a plain ``np.ndarray`` view (after ``check_nesting``).
    Shared sub-containers are converted once (``seen``: id -> (original, result)), so a DAG costs linear time."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)][1]
    result = obj
    if isinstance(obj, CheckedArray):
        result = obj.view(np.ndarray)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = plain(v, seen)
    elif isinstance(obj, list):
        obj[:] = [plain(v, seen) for v in obj]
    elif isinstance(obj, tuple):
        result = tuple(plain(v, seen) for v in obj)
    seen[id(obj)] = (obj, result)  # keeps ``obj`` alive, so its id is not reused during the walk
    return result


# ---- whole pickles -----------------------------------------------------------------------------------------------


def loads(data: Union[bytes, BinaryIO], what: str, encoding: str = "ASCII", max_ops: int = MAX_OPCODES) -> Any:
    """Unpickle ``data`` (bytes, or a seekable binary file at the stream's start; named ``what`` in errors)
    allowing only builtins and plain numpy arrays."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    start = stream.tell()
    check_stream(stream, what, max_ops=max_ops)
    stream.seek(start)
    unpickler = RestrictedUnpickler(stream, encoding=encoding)
    unpickler.what = what
    try:
        obj = unpickler.load()
    except UnsafeFileError as e:
        raise e if str(e).startswith(what) else UnsafeFileError(f"{what}: {e}") from e
    except Exception as e:  # malformed streams raise many types
        raise UnsafeFileError(f"{what}: corrupt pickle, cannot unpickle it ({type(e).__name__}: "
                              f"{str(e)[:200]})") from e
    check_nesting(obj, what)
    return plain(obj)


def load_file(path: str, max_bytes: int, encoding: str = "ASCII", max_ops: int = MAX_OPCODES) -> Any:
    """``loads`` of the file at ``path``, refused before reading when it is larger than ``max_bytes``."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UnsafeFileError(f"{path}: {size / 2**20:.1f} MiB is more than the {max_bytes / 2**20:.0f} MiB "
                              f"such a file can hold")
    with open(path, "rb") as f:
        return loads(f, str(path), encoding, max_ops)


# ---- zip containers ----------------------------------------------------------------------------------------------


def check_zip(zf: zipfile.ZipFile, path: str, max_member: int = MAX_MEMBER_BYTES,
              max_ratio: float = MAX_COMPRESSION_RATIO) -> None:
    """Refuse an archive whose members declare sizes no real file of its size can hold, before decompressing.

    Each member: uncompressed size <= ``max_member`` and <= ``max_ratio`` x its compressed size (+1 MiB); all
    members together <= ``max_ratio`` x the archive's size on disk (+1 MiB), which also stops members that overlap
    the same compressed bytes.
    """
    disk = os.path.getsize(path)
    total = 0
    for info in zf.infolist():
        size, packed = info.file_size, info.compress_size
        if size > max_member or size > max_ratio * packed + SLACK_BYTES:
            raise UnsafeFileError(f"{path}: zip member {info.filename!r} claims {size} bytes uncompressed from "
                                  f"{packed} compressed (limits: {max_member} bytes, ratio {max_ratio})")
        if packed > disk:
            raise UnsafeFileError(f"{path}: zip member {info.filename!r} claims {packed} compressed bytes but the "
                                  f"file has {disk}; truncated or corrupt archive")
        total += size
    if total > max_ratio * disk + SLACK_BYTES:
        raise UnsafeFileError(f"{path}: zip members claim {total} bytes uncompressed in all, more than "
                              f"{max_ratio} x the {disk}-byte file (overlapping or crafted members)")


def _npz_member(zf: zipfile.ZipFile, name: str, path: str) -> np.ndarray:
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise UnsafeFileError(f"{path}: array {name!r} has unsupported .npy version {version}")
        shape, fortran, dtype = readers[version](f)
        dtype = plain_dtype(dtype, f"{path}: array {name[:-4]!r}")
        nbytes = _shape_numel(tuple(shape)) * dtype.itemsize
        left = zf.getinfo(name).file_size - f.tell()
        if nbytes != left:
            raise UnsafeFileError(f"{path}: array {name[:-4]!r} of shape {tuple(shape)} {dtype} needs {nbytes} "
                                  f"bytes but its member holds {left}; truncated or corrupt file")
        out = np.empty(nbytes, np.uint8)
        view, n = memoryview(out), 0
        while n < nbytes:  # 1 MiB reads: one huge read of a zip member is ~3x slower
            chunk = f.read(min(1 << 20, nbytes - n))
            if not chunk:
                raise UnsafeFileError(f"{path}: array {name[:-4]!r} is truncated")
            view[n:n + len(chunk)] = chunk
            n += len(chunk)
    return out.view(dtype).reshape(shape, order="F" if fortran else "C")


def load_npz(path, what: str = "npz file") -> Dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (``np.savez``/``savez_compressed``): numeric/string dtypes only (no
    pickled object arrays), sizes checked against the file before anything is decompressed or allocated."""
    path = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip(zf, path)
            names = [n for n in zf.namelist() if n.endswith(".npy")]
            return {n[:-4]: _npz_member(zf, n, path) for n in names}
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{what} {e}") from e
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UnsafeFileError(f"{what} {path}: unreadable ({type(e).__name__}: {str(e)[:200]})") from e
