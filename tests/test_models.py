"""DDPM U-Net and NCSN++/DDPM++: paper parameter counts, tiny-variant forward/backward, FIR resampling, errors."""
import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from models import create_model, get_model
from models import up_or_down_sampling as updown
from models.ddpm import DDPM
from models.ncsnpp import NCSNpp

# parameter counts of the 2021 reference implementation (score_sde_pytorch state dicts, incl. the Fourier W)
PAPER_COUNTS = {
    "vp.cifar10_ddpm": 35_218_947,
    "vp.cifar10_ddpmpp_continuous": 61_804_419,
    "vp.cifar10_ddpmpp_deep_continuous": 106_632_579,
    "subvp.cifar10_ddpmpp_continuous": 61_804_419,
    "subvp.cifar10_ddpmpp_deep_continuous": 106_632_579,
    "ve.cifar10_ncsnpp_continuous": 62_758_915,
    "ve.cifar10_ncsnpp_deep_continuous": 107_587_075,
    "ve.celebahq_256_ncsnpp_continuous": 65_574_549,
    "ve.ffhq_1024_ncsnpp_continuous": 105_785_896,
}
ROUNDED_M = {  # the figures of the issue, in millions (to 0.01M)
    "vp.cifar10_ddpm": 35.22, "vp.cifar10_ddpmpp_continuous": 61.80, "vp.cifar10_ddpmpp_deep_continuous": 106.63,
    "subvp.cifar10_ddpmpp_continuous": 61.80, "subvp.cifar10_ddpmpp_deep_continuous": 106.63,
    "ve.cifar10_ncsnpp_continuous": 62.76, "ve.cifar10_ncsnpp_deep_continuous": 107.59,
    "ve.celebahq_256_ncsnpp_continuous": 65.57, "ve.ffhq_1024_ncsnpp_continuous": 105.79,
}


def load_config(name):
    return importlib.import_module(f"configs.{name}").get_config()


def param_count(module, size, channels=3):
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.float32)
    shapes = jax.eval_shape(lambda a, b: module.init({"params": jax.random.key(0)}, a, b), x, labels)
    return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(name):
    config = load_config(name)
    n = param_count(create_model(config).module, config.data.image_size, config.data.num_channels)
    assert n == PAPER_COUNTS[name]
    assert round(n / 1e6, 2) == ROUNDED_M[name]


def test_ddpm_paper_count_with_original_decoder_attention():
    """Ho et al.'s 35.7M: attention after each of the 3 decoder blocks at 16×16 (two more than score_sde)."""
    n = param_count(DDPM(attn_every_up_block=True), 32)
    assert n == 35_218_947 + 2 * (2 * 256 + 4 * (256 * 256 + 256)) == 35_746_307
    assert round(n / 1e6, 1) == 35.7


# ---- tiny variants -------------------------------------------------------------------------------------------

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16, init_scale=0.1,
            dropout=0.5)
VARIANTS = {
    "ddpmpp": dict(),
    "ncsnpp_residual": dict(fir=True, embedding_type="fourier", progressive_input="residual", centered=False,
                            scale_by_sigma=True),
    "ncsnpp_skip": dict(fir=True, embedding_type="fourier", progressive="output_skip",
                        progressive_input="input_skip", scale_by_sigma=True),
    "ddpm_blocks_residual_out": dict(resblock_type="ddpm", progressive="residual", progressive_input="residual",
                                     progressive_combine="cat", fir=True),
    "ddpm_blocks_cat": dict(resblock_type="ddpm", progressive_input="input_skip", progressive_combine="cat",
                            skip_rescale=False),
}


def tiny_module(kind):
    if kind == "ddpm":
        return DDPM(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16, dropout=0.5)
    return NCSNpp(**TINY, **VARIANTS[kind])


def perturbed_params(module, x, labels, seed=0):
    """Random parameters of the shapes ``module.init`` gives (numpy draws: no XLA compilation of initialisers).

    Kernels ~ N(0, 1/fan_in), GroupNorm scales 1 + 0.05 N, biases 0.05 N, Fourier W ~ N(0, 16²); unlike the
    zero-initialised output layers of the real init, every input dependence is visible.
    """
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, labels)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "W":
            return jnp.asarray(16.0 * rng.normal(size=shape), jnp.float32)
        if len(shape) >= 2:
            return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
        return jnp.asarray((name == "scale") + 0.05 * rng.normal(size=shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def labels_for(kind):
    fourier = VARIANTS.get(kind, {}).get("embedding_type") == "fourier"
    return jnp.array([0.5, 3.0]) if fourier else jnp.array([10.0, 500.0])


def forward_backward(module):
    """One jitted function: eval output, train output and gradient of a train loss (compiled once)."""

    def run(params, x, labels, key):
        apply = lambda p, train: module.apply({"params": p}, x, labels, train=train, rngs={"dropout": key})
        loss = lambda p: jnp.mean(apply(p, True) ** 2)
        return apply(params, False), apply(params, True), jax.grad(loss)(params)

    return jax.jit(run)


SLOW_VARIANTS = ("ddpmpp", "ncsnpp_residual", "ddpm_blocks_cat")  # the first two are also covered by interop tests


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_VARIANTS else k
                                  for k in ["ddpm", *VARIANTS]])
def test_tiny_forward_backward_conditioning_dropout(kind):
    module = tiny_module(kind)
    x = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3))
    labels = labels_for(kind)
    # batch of 4: (x0, l0), (x1, l1), (x0, l0), (x1, l0) -- the last one changes only the conditioning
    x4, l4 = jnp.concatenate([x, x]), jnp.concatenate([labels, labels[:1], labels[:1]])
    params = perturbed_params(module, x4, l4)
    run = forward_backward(module)
    out, train_a, grads = run(params, x4, l4, jax.random.key(5))
    assert out.shape == x4.shape and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(out[2]), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(out[1] - out[3]).max()) > 1e-3 * float(jnp.abs(out[1]).max())
    # dropout: eval mode ignores the rng; train mode depends on it, deterministically for a fixed key
    out_b, train_b, _ = run(params, x4, l4, jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_b))
    assert float(jnp.abs(train_a - train_b).max()) > 0 and float(jnp.abs(train_a - out).max()) > 0
    np.testing.assert_array_equal(np.asarray(train_a), np.asarray(run(params, x4, l4, jax.random.key(5))[1]))
    # gradients reach every trainable parameter (the Fourier W is fixed)
    flat = flax.traverse_util.flatten_dict(grads)
    zero = [k for k, g in flat.items() if not bool(jnp.any(g != 0)) and k[-1] != "W"]
    assert not zero, f"parameters without gradient: {zero}"
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat.values())


def test_bfloat16_compute_keeps_float32_params():
    kwargs = dict(TINY, **VARIANTS["ncsnpp_residual"], dropout=0.0)
    f32, bf16 = NCSNpp(**kwargs), NCSNpp(**kwargs, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3))
    labels = labels_for("ncsnpp_residual")
    params = perturbed_params(f32, x, labels)
    shapes = jax.eval_shape(lambda: bf16.init({"params": jax.random.key(0)}, x, labels)["params"])
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
    ref = jax.jit(f32.apply)({"params": params}, x, labels)
    low = jax.jit(bf16.apply)({"params": params}, x, labels)
    assert low.dtype == jnp.float32
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.05


def test_from_config_reads_model_and_data_sections():
    config = load_config("ve.cifar10_ncsnpp_continuous")
    module = create_model(config).module
    assert (module.nf, module.fir, module.embedding_type, module.progressive_input, module.centered) == \
           (128, True, "fourier", "residual", False)
    config.model.dtype = "bfloat16"
    assert create_model(config).module.dtype == jnp.bfloat16
    config.model.dtype = "float8"
    with pytest.raises(ValueError, match="config.model.dtype"):
        create_model(config)


# ---- errors ---------------------------------------------------------------------------------------------------


def test_unknown_model_name_lists_registered():
    config = load_config("vp.cifar10_ddpm")
    config.model.name = "ncsnpp_typo"
    with pytest.raises(ValueError, match=r"unknown model 'ncsnpp_typo'.*'ddpm'.*'ncsnpp'"):
        create_model(config)
    assert get_model("ncsnpp") is NCSNpp and get_model("ddpm") is DDPM


@pytest.mark.parametrize("cls", [NCSNpp, DDPM])
def test_attention_resolution_never_reached(cls):
    with pytest.raises(ValueError, match=r"attn_resolutions=\(12,\) contains \[12\], never reached"):
        cls(image_size=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(12,))
    with pytest.raises(ValueError, match="not divisible by 2"):
        cls(image_size=20, ch_mult=(1, 2, 2, 2), attn_resolutions=())


def test_config_inconsistent_with_image_size_fails_from_config():
    config = load_config("ve.cifar10_ncsnpp_continuous")
    config.data.image_size = 28
    with pytest.raises(ValueError, match="data.image_size=28"):
        create_model(config)


def test_bad_option_names_and_input_shape():
    with pytest.raises(ValueError, match="config.model.progressive='skip'"):
        NCSNpp(**TINY, progressive="skip")
    with pytest.raises(ValueError, match="config.model.resblock_type"):
        NCSNpp(**TINY, resblock_type="resnet")
    module = NCSNpp(**TINY)
    with pytest.raises(ValueError, match=r"built for images \(16, 16, 3\).*\(1, 32, 32, 3\)"):
        module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))


# ---- FIR resampling against independent references ------------------------------------------------------------


def upfirdn_reference(x, k, up, down, pad):
    """scipy version of upfirdn2d on one (H, W) channel: zero-insert, pad, full 2-D convolution, subsample."""
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    z[::up, ::up] = x
    z = np.pad(z, [(max(pad[0], 0), max(pad[1], 0))] * 2)
    z = z[max(-pad[0], 0):z.shape[0] - max(-pad[1], 0), max(-pad[0], 0):z.shape[1] - max(-pad[1], 0)]
    return signal.convolve2d(z, k, mode="valid")[::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (-1, 2)), (2, 2, (0, 3))])
def test_upfirdn2d_matches_scipy(up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 9, 9, 2)).astype(np.float32)
    k = rng.normal(size=(4, 4)).astype(np.float32)  # asymmetric: checks convolution (not correlation)
    got = np.asarray(updown.upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=pad))
    for c in range(2):
        np.testing.assert_allclose(got[0, :, :, c], upfirdn_reference(x[0, :, :, c], k, up, down, pad), atol=1e-5)


def test_fir_resampling_closed_forms():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    np.testing.assert_allclose(updown.upsample_2d(x, (1, 1)), updown.naive_upsample_2d(x), atol=1e-6)
    np.testing.assert_allclose(updown.downsample_2d(x, (1, 1)), updown.naive_downsample_2d(x), atol=1e-6)
    const = jnp.full((1, 8, 8, 1), 3.0)  # the [1,3,3,1] filters keep constants away from the border
    np.testing.assert_allclose(updown.upsample_2d(const, (1, 3, 3, 1))[0, 2:-2, 2:-2], 3.0, rtol=1e-6)
    np.testing.assert_allclose(updown.downsample_2d(const, (1, 3, 3, 1))[0, 1:-1, 1:-1], 3.0, rtol=1e-6)
    assert updown.upsample_2d(x, (1, 3, 3, 1)).shape == (2, 16, 16, 3)
    assert updown.downsample_2d(x, (1, 3, 3, 1)).shape == (2, 4, 4, 3)


def test_fused_upsample_conv_equals_upsample_then_conv_inside():
    """upsample_conv_2d is FIR upsampling followed by a 3×3 conv, padded once: equal away from the border."""
    x = jax.random.normal(jax.random.key(0), (1, 12, 12, 2))
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 3))
    fused = updown.upsample_conv_2d(x, w, k=(1, 3, 3, 1))
    up = updown.upsample_2d(x, (1, 3, 3, 1))
    two_step = jax.lax.conv_general_dilated(up, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert fused.shape == two_step.shape == (1, 24, 24, 3)
    np.testing.assert_allclose(fused[:, 4:-4, 4:-4], two_step[:, 4:-4, 4:-4], atol=1e-4)
    down = updown.conv_downsample_2d(x, w, k=(1, 3, 3, 1))
    assert down.shape == (1, 6, 6, 3)


def test_timestep_embedding_formula():
    from models.layers import get_timestep_embedding
    t = jnp.array([0.0, 7.0, 999.0])
    emb = np.asarray(get_timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10_000) * np.arange(4) / 3)
    np.testing.assert_allclose(emb, np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], 1),
                               atol=1e-4)


@pytest.mark.parametrize("kind", ["ddpm", *VARIANTS])
def test_torch_module_order_lists_every_parameterised_module_once(kind):
    """The score_sde_pytorch ``all_modules`` order used by the converters names each Flax sub-module once."""
    module = tiny_module(kind)
    x, labels = jnp.zeros((1, 16, 16, 3)), labels_for(kind)[:1]
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, labels)["params"])
    names = module.torch_module_names()
    assert len(names) == len(set(names))
    assert set(names) == set(shapes), (set(names) ^ set(shapes))


def test_original_ddpm_decoder_has_no_torch_layout():
    with pytest.raises(ValueError, match="attn_every_up_block=True has no torch counterpart"):
        DDPM(attn_every_up_block=True).torch_module_names()
