"""convert: score_sde_pytorch checkpoints -> Flax params, checked against outputs computed by score_sde_pytorch
(../shared/data/interop/ncsnv2_ve_small*) and against closed forms of the layout changes."""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert
import models
import sde_lib
import torch_io
from conftest import shared_data_path
from models import torch_mapping

SMALL = "ncsnv2_ve_small"


def small_config(**model):
    """The interop fixture's config: NCSNv2 CIFAR-10 (σ 50 -> 0.01, 232 levels) with nf = 16."""
    config = importlib.import_module("configs.ve.ncsn.ncsnv2_cifar10").get_config()
    config.model.nf = 16
    for k, v in model.items():
        if k in ("image_size",):
            config.data[k] = v
        elif k in ("N",):
            config.sde[k] = v
        else:
            config.model[k] = v
    return config


def run_convert(config, workdir):
    """``--mode=convert`` as ``main.py`` runs it: ``convert.run(experiment, workdir)``."""
    experiment = pytest.importorskip("experiment")
    return convert.run(experiment.Experiment.from_config(config), workdir)


@pytest.fixture(scope="module")
def checkpoint():
    return torch_io.load(shared_data_path("interop", f"{SMALL}.pth"))


@pytest.fixture(scope="module")
def converted(checkpoint):
    return convert.convert_loaded(checkpoint, small_config(), SMALL)


# ---- reproducing score_sde_pytorch ----------------------------------------------------------------------------------


def test_small_ncsnv2_reproduces_reference_scores(converted):
    """EMA and raw weights, through the whole path t -> σ index label -> network -> score.

    The network output is f(x)/σ_label; the reference is float32 torch (then divided by a float64 σ), and its own
    float32 rounding is ~1e-6 on f(x) (our float64 forward differs from it by 1.8e-4 at σ = 0.012, where the score
    reaches 72). So f(x) = σ·score is compared at 1e-5, and the score at 1e-4 where σ >= 0.1."""
    params, ema_params, step = converted
    ref = np.load(shared_data_path("interop", f"{SMALL}_reference.npz"))
    config = small_config()
    model, sde = models.create_model(config), sde_lib.get_sde(config.sde)
    t = jnp.asarray(ref["t"])
    np.testing.assert_array_equal(sde.model_time(t, model.time_input), ref["labels"])

    @jax.jit
    def scores(ema_params, params, x):
        return model.score(ema_params, sde, x, t), model.score(params, sde, x, t)

    with jax.default_matmul_precision("highest"):
        s_ema, s_raw = (np.asarray(s, np.float64) for s in scores(ema_params, params, jnp.asarray(ref["x_nhwc"])))
    sigma = np.exp(np.linspace(np.log(50.0), np.log(0.01), 232))[ref["labels"]][:, None, None, None]
    big = sigma[:, 0, 0, 0] >= 0.1
    for ours, theirs in ((s_ema, ref["score_nhwc"]), (s_raw, ref["score_model_nchw"].transpose(0, 2, 3, 1))):
        err = np.abs(ours - theirs)
        assert (err * sigma).max() <= 1e-5, (err * sigma).max()
        assert err[big].max() <= 1e-4, err[big].max()
        assert err.max() <= 2.5e-4, err.max()
    np.testing.assert_array_equal(ref["out_nhwc"], ref["score_nhwc"])  # NCSNv2's output is the score
    assert np.abs(s_ema - s_raw).max() > 1.0 and step == 3  # EMA and raw weights really differ


def test_ema_and_raw_tensors_are_placed_with_layout_change(checkpoint, converted):
    params, ema_params, _ = converted
    model, shadow = checkpoint["model"], checkpoint["ema"]["shadow_params"]
    np.testing.assert_array_equal(params["begin_conv"]["kernel"], model["module.begin_conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(ema_params["begin_conv"]["kernel"], shadow[0].transpose(2, 3, 1, 0))
    # the last trainable tensor (state-dict order minus the sigmas buffer) is the last shadow parameter
    last = [k for k in model if k != "module.sigmas"][-1]
    path = models.ncsnv2.flax_path(last[len("module."):])
    leaf = ema_params
    for p in path:
        leaf = leaf[p]
    np.testing.assert_array_equal(leaf, shadow[-1].transpose(2, 3, 1, 0) if shadow[-1].ndim == 4 else shadow[-1])


def test_prefix_free_state_dict_and_bare_state_dict(checkpoint, converted):
    bare = {k[len("module."):]: v for k, v in checkpoint["model"].items()}
    params, ema_params, step = convert.convert_loaded(bare, small_config(), "bare")
    assert step == 0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(converted[0])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ema_params), jax.tree.leaves(converted[0])):  # no EMA: raw weights
        np.testing.assert_array_equal(a, b)


# ---- strictness --------------------------------------------------------------------------------------------------


def test_wrong_width_names_first_mismatching_tensors(checkpoint):
    with pytest.raises(torch_mapping.ConversionError) as info:
        convert.convert_loaded(checkpoint, small_config(nf=32), SMALL)
    msg = str(info.value)
    assert "shape mismatches" in msg and "begin_conv.weight -> begin_conv/kernel" in msg
    assert "checkpoint (3, 3, 3, 16) (torch (16, 3, 3, 3)) vs model (3, 3, 3, 32)" in msg and SMALL in msg


def test_wrong_depth_lists_missing_parameters(checkpoint):
    config = small_config(image_size=128)  # the 5-stage network: res5 and refine5 are missing from the file
    with pytest.raises(torch_mapping.ConversionError, match="model parameters with no checkpoint tensor: refine5/"):
        convert.convert_loaded(checkpoint, config, SMALL)


def test_wrong_noise_ladder(checkpoint):
    with pytest.raises(torch_mapping.ConversionError, match="σ ladder.*num_scales=100"):
        convert.convert_loaded(checkpoint, small_config(N=100), SMALL)


def test_extra_and_missing_tensors(checkpoint):
    model = dict(checkpoint["model"])
    model["module.extra.weight"] = np.zeros((2, 2, 3, 3), np.float32)
    with pytest.raises(torch_mapping.ConversionError, match=r"converted tensors the model does not have: extra\.weight"):
        convert.convert_state_dict(model, small_config(), "extra")
    model = dict(checkpoint["model"])
    del model["module.res2.0.shortcut.conv.bias"]
    with pytest.raises(torch_mapping.ConversionError, match="no checkpoint tensor: res2_0/shortcut/conv/bias"):
        convert.convert_state_dict(model, small_config(), "missing")


def test_unread_tensors_are_listed():
    sd = torch_mapping.StateDict({"a.weight": np.ones((2, 3)), "b.bias": np.ones(2)}, "file.pth")
    params = {"a": sd.dense("a", bias=False)}
    with pytest.raises(torch_mapping.ConversionError, match=r"(?s)file.pth .*left unmapped: b\.bias"):
        convert.check_mapping(params, {"a/kernel": (3, 2)}, sd, "model")
    with pytest.raises(torch_mapping.ConversionError, match="tensor 'c.weight' needed by the configured model"):
        sd["c.weight"]


def test_ema_list_that_does_not_line_up(checkpoint):
    bad = dict(checkpoint, ema=dict(checkpoint["ema"], shadow_params=checkpoint["ema"]["shadow_params"][1:]))
    with pytest.raises(torch_mapping.ConversionError, match="shadow_params has 152 tensors .* 153 trainable"):
        convert.convert_loaded(bad, small_config(), SMALL)
    swapped = list(checkpoint["ema"]["shadow_params"])
    swapped[0], swapped[1] = swapped[1], swapped[0]
    bad = dict(checkpoint, ema=dict(checkpoint["ema"], shadow_params=swapped))
    with pytest.raises(torch_mapping.ConversionError, match="do not line up.*begin_conv.weight"):
        convert.convert_loaded(bad, small_config(), SMALL)


def test_unknown_model_has_no_converter(checkpoint):
    config = small_config()
    config.model.name = "small_unet"
    with pytest.raises(torch_mapping.ConversionError, match="no score_sde_pytorch converter .* 'ncsnv2'"):
        convert.convert_loaded(checkpoint, config, SMALL)


# ---- layout helpers against closed forms ----------------------------------------------------------------------


def test_conv_kernel_layout_matches_torch_cross_correlation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)  # torch (out, in, kh, kw)
    b = rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(1, 3, 5, 6)).astype(np.float32)  # NCHW
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    torch_out = np.zeros((1, 4, 5, 6))
    for i in range(5):
        for j in range(6):
            torch_out[0, :, i, j] = np.einsum("oikl,ikl->o", w, xp[0, :, i:i + 3, j:j + 3]) + b
    conv = nn.Conv(4, (3, 3), padding=1)
    out = conv.apply({"params": {"kernel": torch_mapping.conv_kernel(w), "bias": b}}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), torch_out, atol=1e-5)


def test_dense_kernel_layout():
    rng = np.random.default_rng(1)
    w, b, x = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=(2, 3))
    out = nn.Dense(5).apply({"params": {"kernel": torch_mapping.dense_kernel(w), "bias": b}}, x)
    np.testing.assert_allclose(out, x @ w.T + b, rtol=1e-5)
    with pytest.raises(torch_mapping.ConversionError, match="4-D conv weight"):
        torch_mapping.conv_kernel(w)


# ---- --mode=convert ------------------------------------------------------------------------------------------------


def test_run_requires_a_source(tmp_path):
    config = small_config()
    with pytest.raises(ValueError, match="--config.convert.checkpoint"):
        run_convert(config, str(tmp_path))
    config.convert.checkpoint = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        run_convert(config, str(tmp_path))


def test_run_writes_a_train_state_checkpoint(tmp_path, checkpoint, converted):
    """The orbax checkpoint holds step 3, raw and EMA params and torch's Adam moments (restored here into a
    template built from the converted params, without initialising the network)."""
    experiment, utils = pytest.importorskip("experiment"), pytest.importorskip("utils")
    config = small_config()
    config.convert.checkpoint = str(shared_data_path("interop", f"{SMALL}.pth"))
    run_convert(config, str(tmp_path))
    assert (tmp_path / "config.json").exists() and (tmp_path / "converted_from.json").exists()
    params, ema_params, _ = converted
    opt = experiment.get_optimizer(config.optim)
    template = experiment.TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.zeros_like, params),
                                     ema_params=jax.tree.map(jnp.zeros_like, params), opt_state=opt.init(params))
    state = utils.CheckpointManager(tmp_path / "checkpoints", config).restore(template)
    assert int(state.step) == 3
    for got, expected in ((state.params, params), (state.ema_params, ema_params)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)
    adam = [n for n in jax.tree.leaves(state.opt_state, is_leaf=lambda n: hasattr(n, "mu")) if hasattr(n, "mu")]
    torch_state = checkpoint["optimizer"]["state"][0]  # parameter 0 = begin_conv.weight
    assert len(adam) == 1 and int(adam[0].count) == 3 == int(torch_state["step"])
    np.testing.assert_array_equal(adam[0].mu["begin_conv"]["kernel"], torch_state["exp_avg"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(adam[0].nu["begin_conv"]["kernel"],
                                  torch_state["exp_avg_sq"].transpose(2, 3, 1, 0))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(torch_mapping.ConversionError, match="checkpoints already has a checkpoint for step 3; "):
        run_convert(config, str(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.slow
def test_converted_checkpoint_restores_and_samples_through_experiment(tmp_path, converted):
    """--mode=convert then the eval path (experiment.restore_eval_state) and a tiny ALD sampling run."""
    experiment = pytest.importorskip("experiment")
    config = small_config()
    config.convert.checkpoint = str(shared_data_path("interop", f"{SMALL}.pth"))
    run_convert(config, str(tmp_path))
    state = experiment.restore_eval_state(experiment.Experiment.from_config(config), str(tmp_path))
    assert state.step == 3
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(converted[1])):
        np.testing.assert_array_equal(a, b)
    config.sde.N, config.sampling.n_steps = 3, 1
    exp = experiment.Experiment.from_config(config)
    x, nfe = exp.sample(jax.random.key(0), state.params, 2)
    assert x.shape == (2, 32, 32, 3) and np.isfinite(np.asarray(x)).all()


def _torch_name(path):
    """Inverse of the renaming, written independently: (res1_0, conv1, kernel) -> res1.0.conv1.weight."""
    import re
    parts = [re.sub(r"^(.*[a-z])_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    leaf = {"kernel": "weight", "embed": "embed.weight"}.get(path[-1], path[-1])
    return ".".join(parts + [leaf])


@pytest.mark.parametrize("name,size", [("ncsn", 32), ("ncsnv2", 256)])
def test_round_trip_through_torch_names(name, size):
    """Random Flax params of NCSN (conditional norms: ``embed`` tables) and of the 6-stage NCSNv2 (res31/refine31),
    written out under torch names with torch layouts, convert back exactly."""
    config = small_config(image_size=size)
    config.model.name = name
    shapes = convert.expected_shapes(config)
    rng = np.random.default_rng(0)
    flax_flat = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
    torch_sd = {"module.sigmas": np.exp(np.linspace(np.log(50.0), np.log(0.01), 232))}
    for p, a in flax_flat.items():
        torch_sd["module." + _torch_name(tuple(p.split("/")))] = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
    params = convert.convert_state_dict(torch_sd, config, name)
    flat = convert._flatten(params)
    assert set(flat) == set(flax_flat)
    for p in flat:
        np.testing.assert_array_equal(flat[p], flax_flat[p])
    if name == "ncsn":
        assert any(k.endswith("normalize1.embed.weight") for k in torch_sd)


@pytest.mark.slow
def test_bfloat16_compute_stays_close(converted):
    """config.model.dtype=bfloat16: convolutions in bfloat16 (params and norm statistics float32); the converted
    network's output stays within a few % (relative L2) of score_sde_pytorch's float32 output (measured 3.3%)."""
    ref = np.load(shared_data_path("interop", f"{SMALL}_reference.npz"))
    config = small_config(dtype="bfloat16")
    module = models.create_model(config).module
    out = jax.jit(lambda p, x, y: module.apply({"params": p}, x, y))(converted[1], jnp.asarray(ref["x_nhwc"]),
                                                                   jnp.asarray(ref["labels"]))
    assert out.dtype == jnp.float32
    r = ref["out_nhwc"]
    assert np.linalg.norm(np.asarray(out, np.float64) - r) / np.linalg.norm(r) < 0.1


def test_ermongroup_list_layout_with_named_ema(checkpoint, converted):
    """ermongroup/ncsnv2 saves [model, optimizer, epoch, step, ema_helper.state_dict()] with a named EMA dict."""
    model = checkpoint["model"]
    trainable = [k for k in model if k != "module.sigmas"]
    named_ema = dict(zip(trainable, checkpoint["ema"]["shadow_params"]))
    legacy = [model, checkpoint["optimizer"], 7, 3, named_ema]
    params, ema_params, step = convert.convert_loaded(legacy, small_config(), "ermongroup")
    assert step == 3
    for a, b in zip(jax.tree.leaves((params, ema_params)), jax.tree.leaves(converted[:2])):
        np.testing.assert_array_equal(a, b)
    legacy[4] = dict(named_ema, **{"module.bogus": np.zeros(1)})
    with pytest.raises(torch_mapping.ConversionError, match="EMA tensors with no counterpart in the model: bogus"):
        convert.convert_loaded(legacy, small_config(), "ermongroup")
    with pytest.raises(torch_mapping.ConversionError, match="not a score_sde_pytorch checkpoint"):
        convert.convert_loaded({"foo": 1}, small_config(), "odd")


# ---- malformed checkpoints, non-finite weights, workdir safety ----------------------------------------------------


def _edited(checkpoint, case):
    """A shallow copy of the real checkpoint with one part replaced by what a malformed file unpickles to."""
    ck = dict(checkpoint)
    if case == "model_object":
        ck["model"] = torch_io.PickledObject("foo", "Bar")
    elif case == "model_list_of_lists":
        ck["model"] = [[]]
    elif case == "model_entry_not_a_tensor":
        ck["model"] = {**checkpoint["model"], "module.extra": [1, 2]}
    elif case == "step_2_40":
        ck["step"] = 2 ** 40
    elif case == "step_negative":
        ck["step"] = -5
    elif case == "step_text":
        ck["step"] = "3"
    elif case == "shadow_object":
        ck["ema"] = {**checkpoint["ema"], "shadow_params": torch_io.PickledObject("foo", "Bar")}
    elif case == "optimizer_groups":
        ck["optimizer"] = {**checkpoint["optimizer"], "param_groups": [{"params": "0"}]}
    elif case == "optimizer_state":
        ck["optimizer"] = {**checkpoint["optimizer"], "state": [1]}
    elif case == "adam_step_nan":
        state = dict(checkpoint["optimizer"]["state"])
        state[0] = {**state[0], "step": np.array(np.nan, np.float32)}
        ck["optimizer"] = {**checkpoint["optimizer"], "state": state}
    return ck


@pytest.mark.parametrize("case,message", [
    ("model_object", r"\['model'\] is an object of class foo.Bar, not a state dict"),
    ("model_list_of_lists", r"\['model'\] is a list, not a state dict"),
    ("model_entry_not_a_tensor", r"\['model'\] is a dict whose entry 'module.extra' is a list"),
    ("step_2_40", r"step 1099511627776 is not an integer in \[0, 2147483647\]"),
    ("step_negative", r"step -5 is not an integer in \[0, 2147483647\]"),
    ("step_text", r"step 3 is not an integer"),
    ("shadow_object", r"\['ema'\]\['shadow_params'\] is an object of class foo.Bar, not a list of tensors"),
    ("optimizer_groups", r"\['optimizer'\]\['param_groups'\] is not torch.optim's"),
    ("optimizer_state", r"\['optimizer'\]\['state'\] is not torch.optim's"),
    ("adam_step_nan", r"\['optimizer'\] Adam: step nan is not an integer"),
])
def test_malformed_checkpoints_are_one_line_conversion_errors(checkpoint, case, message):
    """What ``convert.run`` calls on a loaded file, for contents that used to end in TypeError ('PickledObject'
    object is not iterable), AttributeError ('list' object has no attribute 'startswith'), OverflowError (step
    2**40) or a silently converted negative step."""
    ck = _edited(checkpoint, case)
    with pytest.raises(torch_mapping.ConversionError, match=message) as info:
        if case.startswith(("optimizer", "adam")):
            convert.adam_moments(ck, small_config(), SMALL)
        else:
            convert.normalise_checkpoint(ck, SMALL)
    assert len(str(info.value).splitlines()) == 1 and SMALL in str(info.value)


@pytest.mark.parametrize("part", ["model", "ema", "optimizer"])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, part):
    ck = dict(checkpoint)
    bad = np.array(checkpoint["model"]["module.begin_conv.weight"])
    bad.flat[[0, 5]] = [np.nan, np.inf]
    if part == "model":
        ck["model"] = {**checkpoint["model"], "module.begin_conv.weight": bad}
        call, name = lambda: convert.convert_loaded(ck, small_config(), SMALL), "begin_conv.weight (2 of 432"
    elif part == "ema":
        ck["ema"] = {**checkpoint["ema"], "shadow_params": [bad, *checkpoint["ema"]["shadow_params"][1:]]}
        call, name = lambda: convert.convert_loaded(ck, small_config(), SMALL), "begin_conv.weight (2 of 432"
    else:
        state = dict(checkpoint["optimizer"]["state"])
        state[0] = {**state[0], "exp_avg": bad}
        ck["optimizer"] = {**checkpoint["optimizer"], "state": state}
        call, name = lambda: convert.adam_moments(ck, small_config(), SMALL), "begin_conv.weight (2 of 432"
    with pytest.raises(torch_mapping.ConversionError, match="non-finite") as info:
        call()
    assert name in str(info.value) and len(str(info.value).splitlines()) == 1


def _rewritten(src, dst, edit):
    """Copy the zip ``src`` to ``dst`` with member bytes passed through ``edit(name, data)``."""
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return dst


def test_run_refuses_a_nan_file_and_writes_nothing(tmp_path):
    """End to end: a .pth whose begin_conv.weight (storage 460) holds a NaN is refused; the workdir stays empty."""
    def nan_in_460(name, data):
        if name.endswith("/data/460"):
            values = np.frombuffer(data, "<f4").copy()
            values[3] = np.nan
            return values.tobytes()
        return data

    config = small_config()
    config.convert.checkpoint = str(_rewritten(shared_data_path("interop", f"{SMALL}.pth"), tmp_path / "nan.pth",
                                               nan_in_460))
    workdir = tmp_path / "work"
    with pytest.raises(torch_mapping.ConversionError, match=r"non-finite \(NaN/inf\) values in begin_conv.weight"):
        run_convert(config, str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("stray", ["checkpoints/500", "checkpoints/3", "checkpoints/notes.txt"])
def test_run_refuses_a_workdir_with_checkpoints_before_writing(tmp_path, stray, capsys):
    """Any entry in checkpoints/ (a stray higher step made orbax decline the save, while 'converted ... ->
    checkpoints/3' was printed) is refused in one line before the file is even read; nothing changes."""
    config = small_config()
    config.convert.checkpoint = str(shared_data_path("interop", f"{SMALL}.pth"))
    target = tmp_path / stray
    target.parent.mkdir(parents=True)
    target.mkdir() if not stray.endswith(".txt") else target.write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(torch_mapping.ConversionError, match=r"checkpoints (already has a checkpoint for step|is not empty)"):
        run_convert(config, str(tmp_path))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "converted" not in capsys.readouterr().out


def test_run_never_reports_a_save_that_did_not_happen(tmp_path, monkeypatch, capsys):
    """Fault injection: a save that writes nothing (as orbax does when it declines) is an error; no 'converted'
    line, no config.json, no converted_from.json."""
    utils = pytest.importorskip("utils")
    monkeypatch.setattr(utils.CheckpointManager, "save", lambda self, step, state: None)
    config = small_config()
    config.convert.checkpoint = str(shared_data_path("interop", f"{SMALL}.pth"))
    with pytest.raises(torch_mapping.ConversionError, match=r"checkpoints/3 does not exist after the save"):
        run_convert(config, str(tmp_path))
    assert "converted" not in capsys.readouterr().out
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "converted_from.json").exists()
