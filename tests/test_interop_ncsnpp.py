"""score_sde_pytorch checkpoints of DDPM, DDPM++ and NCSN++ converted and run here reproduce that code's outputs.

Fixtures (``../shared/data/interop``, see its README): small models saved by score_sde_pytorch with inputs, the
labels the network received, raw outputs and scores (EMA and raw weights), plus the key lists of the full-size
CIFAR-10 models. Tolerance: max abs error <= 1e-4 in float32 with highest matmul precision, or 2e-6 of the largest
reference value where that exceeds 50 (``tolerance``): the VE models' outputs reach ~76, where float32 rounding
through the network alone gave 1.1e-4 on one CPU (1.4e-6 relative) while the VP models stay at ~2e-6.
"""
import importlib
import json

import jax
import numpy as np
import pytest

import convert
import sde_lib
import torch_io
from conftest import shared_data_path
from models import create_model, torch_mapping

TOL = 1e-4
FIXTURES = {  # fixture -> paper config it is a small variant of
    "ddpmpp_vp_small": "vp.cifar10_ddpmpp_continuous",
    "ncsnpp_ve_small": "ve.cifar10_ncsnpp_continuous",
    "ncsnpp_ve_small_residual": "ve.cifar10_ncsnpp_continuous",
    "ddpm_vp_small": "vp.cifar10_ddpm",
}
FULL_SIZE = {
    "cifar10_ddpmpp_continuous": "vp.cifar10_ddpmpp_continuous",
    "cifar10_ncsnpp_continuous": "ve.cifar10_ncsnpp_continuous",
    "cifar10_ddpm": "vp.cifar10_ddpm",
}


def fixture_config(name):
    """The paper config with the fixture's architecture overrides (from its ``_config.json``)."""
    meta = json.loads(shared_data_path("interop", f"{name}_config.json").read_text())
    config = importlib.import_module(f"configs.{FIXTURES[name]}").get_config()
    for key, value in meta["_fixture"]["overrides"].items():
        if value is not None and not key.startswith("optim_"):
            config.model[key] = tuple(value) if isinstance(value, list) else value
    assert config.data.centered == meta["data"]["centered"]
    return config


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def converted(request):
    name = request.param
    config = fixture_config(name)
    params, ema_params, step = convert.convert_checkpoint(shared_data_path("interop", f"{name}.pth"), config)
    ref = dict(np.load(shared_data_path("interop", f"{name}_reference.npz")))
    return name, config, params, ema_params, step, ref


def tolerance(reference) -> float:
    """``TOL``, relative (2e-6 of the largest magnitude) for references of magnitude above 50."""
    return TOL * max(1.0, float(np.abs(reference).max()) / 50)


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def test_outputs_match_reference_ema_and_raw(converted):
    name, config, params, ema_params, step, ref = converted
    assert step == 3
    model = create_model(config)
    with jax.default_matmul_precision("highest"):
        out_ema = model.module.apply({"params": ema_params}, ref["x_nhwc"], ref["labels"])
        out_raw = model.module.apply({"params": params}, ref["x_nhwc"], ref["labels"])
    err_ema = float(np.abs(np.asarray(out_ema) - ref["out_nhwc"]).max())
    err_raw = float(np.abs(np.asarray(out_raw) - nhwc(ref["out_model_nchw"])).max())
    print(f"{name}: max abs error EMA {err_ema:.2e}, raw {err_raw:.2e} (|out| <= {np.abs(ref['out_nhwc']).max():.1f})")
    assert err_ema <= tolerance(ref["out_nhwc"]) and err_raw <= tolerance(ref["out_model_nchw"])
    # the EMA and raw weights really differ, so both comparisons are informative
    assert float(np.abs(np.asarray(out_ema) - np.asarray(out_raw)).max()) > 100 * TOL


def test_scores_and_labels_match_reference(converted):
    """Through this codebase's conventions: t -> label (sde.model_time) -> output -> score (sde).

    score_sde turns the output of the discrete DDPM model into a score with the chain's √(1-ᾱ_i), not the
    continuous σ(t) of ``sde.score_from_output``; that case is checked with the chain's std.
    """
    name, config, params, ema_params, _, ref = converted
    model, sde = create_model(config), sde_lib.get_sde(config.sde)
    t = jax.numpy.asarray(ref["t"])
    np.testing.assert_allclose(np.asarray(sde.model_time(t, model.time_input)), ref["labels"], rtol=1e-5)
    with jax.default_matmul_precision("highest"):
        if model.time_input == "index":
            std = np.sqrt(1.0 - sde.chain.alphas_cumprod[np.round(ref["labels"]).astype(int)])
            np.testing.assert_allclose(std, ref["score_divisor_std"], rtol=1e-4)  # torch: float32 cumprod
            std = ref["score_divisor_std"]
            std = std[:, None, None, None]
            score = lambda p: -model.module.apply({"params": p}, ref["x_nhwc"], ref["labels"]) / std
        else:
            score = lambda p: model.score(p, sde, ref["x_nhwc"], t)
        score_ema, score_raw = score(ema_params), score(params)
    if "score_divisor_std" in ref and model.time_input != "index":
        np.testing.assert_allclose(np.asarray(sde.marginal_prob(ref["x_nhwc"], t)[1]), ref["score_divisor_std"],
                                   rtol=1e-5)
    err_ema = float(np.abs(np.asarray(score_ema) - ref["score_nhwc"]).max())
    err_raw = float(np.abs(np.asarray(score_raw) - nhwc(ref["score_model_nchw"])).max())
    print(f"{name}: score max abs error EMA {err_ema:.2e}, raw {err_raw:.2e}")
    assert err_ema <= tolerance(ref["score_nhwc"]) and err_raw <= tolerance(ref["score_model_nchw"])


@pytest.mark.parametrize("keys_name", sorted(FULL_SIZE))
def test_mapping_covers_full_size_key_lists(keys_name):
    entries = json.loads(shared_data_path("interop", f"{keys_name}_keys.json").read_text())["entries"]
    config = importlib.import_module(f"configs.{FULL_SIZE[keys_name]}").get_config()
    module = create_model(config).module
    params = torch_mapping.check_key_list([(e["key"], e["shape"]) for e in entries], module, 32, 3, keys_name)
    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    assert n == sum(int(np.prod(e["shape"])) for e in entries if e["key"] != "module.sigmas")


def test_wrong_config_names_first_mismatching_tensors():
    config = fixture_config("ncsnpp_ve_small")
    config.model.nf = 16
    with pytest.raises(ValueError, match=r"shape mismatches.*all_modules\.\d+\..*expects"):
        convert.convert_checkpoint(shared_data_path("interop", "ncsnpp_ve_small.pth"), config)
    config = fixture_config("ncsnpp_ve_small")
    config.model.progressive = "none"  # the checkpoint has output-pyramid layers this model lacks
    with pytest.raises(ValueError, match="torch tensors with no parameter"):
        convert.convert_checkpoint(shared_data_path("interop", "ncsnpp_ve_small.pth"), config)


def test_missing_and_extra_tensors_are_listed():
    config = fixture_config("ddpmpp_vp_small")
    sd = convert.strip_prefix(torch_io.load(shared_data_path("interop", "ddpmpp_vp_small.pth"))["model"])
    module = create_model(config).module
    expected = torch_mapping.expected_shapes(module, 32, 3)
    names = module.torch_module_names()
    missing = dict(sd)
    del missing["all_modules.3.Conv_1.weight"]
    with pytest.raises(ValueError, match=r"parameters missing from the checkpoint \(1\): down_0_res_0/Conv_1/kernel"):
        torch_mapping.map_state_dict(missing, names, expected, "ncsnpp")
    extra = dict(sd, **{"all_modules.3.Conv_9.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"torch tensors with no parameter \(1\): all_modules\.3\.Conv_9\.weight"):
        torch_mapping.map_state_dict(extra, names, expected, "ncsnpp")
