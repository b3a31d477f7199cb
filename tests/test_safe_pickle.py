"""safe_pickle: what the restricted, bounded unpickler rebuilds, and what it refuses before allocating."""
import pickle

import numpy as np
import pytest

import safe_pickle


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_scalars_and_builtins_round_trip(protocol):
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "f": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
           "half": np.array([1.5], ">f2"), "s": np.array("text"), "scalar": np.float32(2.5), "int": np.int64(-7),
           "nested": [(1, 2.0, None, True), {"x": b"bytes"}]}
    out = safe_pickle.loads(pickle.dumps(obj, protocol=protocol), "t")
    for k in ("f", "half", "s"):
        assert type(out[k]) is np.ndarray and out[k].dtype.newbyteorder("=") == obj[k].dtype.newbyteorder("=")
        np.testing.assert_array_equal(out[k], obj[k])
    assert type(out[b"data"]) is np.ndarray
    np.testing.assert_array_equal(out[b"data"], obj[b"data"])
    assert out["scalar"] == np.float32(2.5) and out["int"] == -7
    assert out["nested"] == obj["nested"]


def test_pickled_dtype_state_never_changes_numpy_singletons():
    """pickle's BUILD calls ``dtype.__setstate__`` on what ``numpy.dtype(...)`` returned: it must be a copy, or a
    stream could flip the byte order of float32 for the whole process."""
    stream = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x88\x87R(K\x03X\x01\x00\x00\x00>NNNJ\xff\xff\xff\xffJ" \
             b"\xff\xff\xff\xffK\x00tb."
    out = safe_pickle.loads(stream, "t")
    assert out == np.dtype(">f4") and np.dtype("f4").byteorder == "="


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("builtins", "getattr"),
                                         ("numpy.testing._private.utils", "runstring"), ("numpy", "load"),
                                         ("subprocess", "Popen")])
def test_globals_outside_the_allow_list_are_refused_by_name(module, name):
    stream = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    with pytest.raises(safe_pickle.UnsafeFileError, match=f"refers to {module}.{name}, which is not allowed"):
        safe_pickle.loads(stream, "t")


@pytest.mark.parametrize("stream,message", [
    (b"\x80\x02]r\xff\xff\xff\xff.", "memo index 4294967295"),           # would zero-fill a 64 GiB memo
    (b"\x80\x02]p99999999\n.", "memo index 99999999"),
    (b"\x80\x04\x95" + (1 << 40).to_bytes(8, "little") + b"N.", "frame of 1099511627776 bytes"),
    (b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"x.", "corrupt pickle"),
    (b"\x80\x02\x82\x01.", "opcode EXT1"),
    (b"\x80\x02NQ.", "opcode BINPERSID"),
    (b"\x80\x02" + b"]" * 200 + b"a" * 199 + b".", "nested more than 100 deep"),
    (b"\x80\x02]q\x00h\x00a.", "contains itself"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R(K\x01J\x00\x00\x00\x40"
     b"\x85cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R\x89C\x00tb.", "data is 0 bytes, not 8589934592"),
])
def test_streams_that_would_allocate_are_refused_first(stream, message):
    with pytest.raises(safe_pickle.UnsafeFileError, match=message):
        safe_pickle.loads(stream, "t")


def test_shared_subtrees_are_checked_once_by_their_longest_path():
    x = [1]
    for _ in range(60):  # 2**60 paths, 61 levels: linear time, accepted
        x = [x, x]
    safe_pickle.check_nesting(x, "t")
    deep = [x]
    for _ in range(45):
        deep = [deep]
    with pytest.raises(safe_pickle.UnsafeFileError, match="nested more than 100"):
        safe_pickle.check_nesting([deep, x], "t")


def test_a_pickled_dag_of_2_to_the_60_paths_loads_in_linear_time():
    """pickle memoises shared objects: 60 levels of [x, x] are ~400 bytes; every walk visits each list once."""
    x = [np.arange(3)]
    for _ in range(60):
        x = [x, x]
    out = safe_pickle.loads(pickle.dumps(x, protocol=2), "t")
    for _ in range(60):
        assert out[0] is out[1]
        out = out[0]
    assert type(out[0]) is np.ndarray


def test_load_file_refuses_oversized_files_unread(tmp_path):
    path = tmp_path / "big.pkl"
    with open(path, "wb") as f:
        f.truncate(2 << 20)
    with pytest.raises(safe_pickle.UnsafeFileError, match=r"big.pkl: 2.0 MiB is more than the 1 MiB"):
        safe_pickle.load_file(str(path), 1 << 20)
