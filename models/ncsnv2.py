"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): RefineNet score networks with dilated convolutions.

Backbone: a ResNet of ``ResidualBlock`` pairs (ELU, InstanceNorm++; the deepest stages use dilated 3×3 convs padded
by their dilation so that they keep the resolution), then a cascade of RefineNet ``RefineBlock``s (residual conv
units RCU, multi-resolution fusion MSF with bilinear ``align_corners=True`` upsampling, chained residual pooling
CRP) from the deepest feature map back to full resolution.

* ``ncsnv2``: unconditional; the score is s(x, i) = f(x) / σ_i, with ``labels`` the integer index i of σ on the
  geometric ladder σ_0 = σ_max > ... > σ_{L-1} = σ_min (``time_input="sigma_index"``, ``prediction="score"``).
  Depth follows the image size as in the paper: 4 stages up to 64 px, 5 up to 128 px, 6 up to 256 px.
* ``ncsn``: every normalisation is conditional instance norm++ (per-σ γ, α, β) and the output is the score itself.

Parameter count (CIFAR-10, nf 128): 29,694,083 = 29.69M, the figure of score_sde_pytorch, whose layers have the
shapes of the paper's code (ermongroup/ncsnv2: RefineBlock widths 2nf, 2nf, nf, nf). score_sde's JAX NCSNv2 gives
33.97M because its third RefineBlock is 2nf wide (and the fourth then adapts a 2nf input); ``refine_mults=(2, 2, 2,
1)`` reproduces that count exactly (tests/test_ncsn_models.py). score_sde_pytorch's forward fails at 32 px because
its dilated convs are padded by 1 instead of by the dilation; here they are padded as in the paper's code. The "++"
standardisation of channel means uses torch's unbiased variance over channels, as the papers' code does.

Module names mirror score_sde_pytorch (``res1_0``, ``refine2/adapt_convs_1/1_2_conv``...) so that checkpoints map
by renaming (``torch_params`` below, registered in ``models.torch_mapping.TORCH_CONVERTERS``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import register_model
from models.torch_mapping import ConversionError, conv_kernel, register_converter

ACTIVATIONS = {"elu": nn.elu, "relu": nn.relu, "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
               "swish": nn.swish}
EPS = 1e-5
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_activation(name: str) -> Callable:
    if name.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown config.model.nonlinearity {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name.lower()]


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> np.ndarray:
    """σ_i = exp(log σ_max + i/(L-1) (log σ_min - log σ_max)), i = 0..L-1 (descending, float64)."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


# ---- layers -----------------------------------------------------------------------------------------------------


def torch_default_init(scale: float = 1.0):
    """PyTorch's default conv init U(±1/sqrt(fan_in)) (variance_scaling(1/3, fan_in, uniform))."""
    return nn.initializers.variance_scaling(scale / 3.0, "fan_in", "uniform")


def conv3x3(features: int, dilation: int = 1, use_bias: bool = True, name: Optional[str] = None,
            dtype: Any = jnp.float32) -> nn.Conv:
    """3×3 conv padded by ``dilation`` (resolution-preserving, as in the NCSN papers' ``dilated_conv3x3``)."""
    return nn.Conv(features, (3, 3), padding=dilation, kernel_dilation=dilation, use_bias=use_bias,
                   kernel_init=torch_default_init(), dtype=dtype, name=name)


def conv1x1(features: int, name: Optional[str] = None, dtype: Any = jnp.float32) -> nn.Conv:
    return nn.Conv(features, (1, 1), padding=0, kernel_init=torch_default_init(), dtype=dtype, name=name)


def _ones_plus_noise(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _instance_stats(x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Instance-normalised x (biased variance over H, W) and the standardised channel means (B, C): the "++" term
    (m_c - mean_c m) / sqrt(var_c m + eps), with the unbiased variance over channels as in the papers' code."""
    x = x.astype(jnp.float32)  # statistics in float32 whatever the compute dtype
    means = jnp.mean(x, axis=(1, 2))
    h = (x - means[:, None, None, :]) / jnp.sqrt(jnp.var(x, axis=(1, 2), keepdims=True) + EPS)
    mu = jnp.mean(means, axis=-1, keepdims=True)
    var = jnp.var(means, axis=-1, keepdims=True, ddof=1)
    return h, (means - mu) / jnp.sqrt(var + EPS)


class InstanceNormPlus(nn.Module):
    """InstanceNorm++: y = γ (IN(x) + α m̃) + β, m̃ the standardised channel means."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h, means = _instance_stats(x)
        alpha = self.param("alpha", _ones_plus_noise, (c,))
        gamma = self.param("gamma", _ones_plus_noise, (c,))
        beta = self.param("beta", nn.initializers.zeros, (c,))
        return (gamma * (h + means[:, None, None, :] * alpha) + beta).astype(x.dtype)


class CondInstanceNormPlus(nn.Module):
    """Conditional InstanceNorm++: γ_y, α_y, β_y are rows of an embedding (num_classes, 3C) indexed by label y."""

    num_classes: int

    @nn.compact
    def __call__(self, x, y):
        c = x.shape[-1]
        h, means = _instance_stats(x)

        def init(key, shape, dtype=jnp.float32):
            return jnp.concatenate([_ones_plus_noise(key, (shape[0], 2 * c), dtype), jnp.zeros((shape[0], c))], -1)

        embed = self.param("embed", init, (self.num_classes, 3 * c))
        gamma, alpha, beta = jnp.split(embed[y], 3, axis=-1)
        out = gamma[:, None, None] * (h + means[:, None, None, :] * alpha[:, None, None]) + beta[:, None, None]
        return out.astype(x.dtype)


def resize_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to ``size`` with ``align_corners=True``: src = dst (in-1)/(out-1)."""
    for axis, n_out in zip((1, 2), size):
        n_in = x.shape[axis]
        if n_in == n_out:
            continue
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        lo = np.floor(src).astype(np.int32)
        hi = np.minimum(lo + 1, n_in - 1)
        w = jnp.asarray(src - lo, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1 - axis))
        x = jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w
    return x


def mean_pool2(x: jax.Array) -> jax.Array:
    """Average of the four 2×2 phases: (B, H, W, C) -> (B, H/2, W/2, C)."""
    return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4.0


class ConvMeanPool(nn.Module):
    """Conv (k×k, 'same') followed by 2×2 mean pooling."""

    features: int
    kernel_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        return mean_pool2(nn.Conv(self.features, (k, k), padding=k // 2, kernel_init=torch_default_init(),
                                  dtype=self.dtype, name="conv")(x))


def normalize(x, y, num_classes: Optional[int], name: str):
    """InstanceNorm++ (``num_classes`` None) or its σ-conditional version, as a submodule called ``name``."""
    if num_classes is None:
        return InstanceNormPlus(name=name)(x)
    return CondInstanceNormPlus(num_classes, name=name)(x, y)


# ---- blocks (``num_classes`` set: the noise-conditional NCSN versions) ----------------------------------------


class ResidualBlock(nn.Module):
    """norm-act-conv-norm-act-conv plus shortcut. ``resample="down"``: 2×2 mean pooling after the second conv,
    unless dilated (then the resolution is kept and only the channels change)."""

    features: int
    resample: Optional[str] = None
    dilation: int = 1
    act: Callable = nn.elu
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y=None):
        c_in, down, d, dt = x.shape[-1], self.resample == "down", self.dilation, self.dtype
        h = self.act(normalize(x, y, self.num_classes, "normalize1"))
        h = conv3x3(c_in if down else self.features, d, name="conv1", dtype=dt)(h)
        h = self.act(normalize(h, y, self.num_classes, "normalize2"))
        if down and d == 1:
            return (ConvMeanPool(self.features, 3, dt, name="conv2")(h)
                    + ConvMeanPool(self.features, 1, dt, name="shortcut")(x))
        h = conv3x3(self.features, d, name="conv2", dtype=dt)(h)
        if not down and c_in == self.features:
            return x + h
        shortcut = (conv3x3(self.features, d, name="shortcut", dtype=dt) if (down or d > 1)
                    else conv1x1(self.features, "shortcut", dt))
        return shortcut(x) + h


class RCUBlock(nn.Module):
    """Residual conv unit: ``n_blocks`` × (x ← x + [norm-]act-conv repeated ``n_stages`` times), convs without bias."""

    features: int
    n_blocks: int
    n_stages: int
    act: Callable = nn.elu
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y=None):
        for i in range(1, self.n_blocks + 1):
            residual = x
            for j in range(1, self.n_stages + 1):
                if self.num_classes is not None:
                    x = normalize(x, y, self.num_classes, f"{i}_{j}_norm")
                x = conv3x3(self.features, use_bias=False, name=f"{i}_{j}_conv", dtype=self.dtype)(self.act(x))
            x = x + residual
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: x ← act(x); path ← conv(pool5×5(path)); x ← x + path, ``n_stages`` times.
    Max pooling (NCSNv2) or, with ``num_classes``, norm + average pooling counting the zero padding (NCSN)."""

    features: int
    n_stages: int = 2
    act: Callable = nn.elu
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y=None):
        x = self.act(x)
        path = x
        for i in range(self.n_stages):
            if self.num_classes is None:
                path = nn.max_pool(path, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)))
            else:
                path = normalize(path, y, self.num_classes, f"norms_{i}")
                path = nn.avg_pool(path, (5, 5), strides=(1, 1), padding=((2, 2), (2, 2)), count_include_pad=True)
            path = conv3x3(self.features, use_bias=False, name=f"convs_{i}", dtype=self.dtype)(path)
            x = path + x
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: Σ_i upsample_{align_corners}(conv_i([norm_i] x_i)) at the spatial ``shape``."""

    features: int
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs, y, shape):
        out = 0.0
        for i, x in enumerate(xs):
            if self.num_classes is not None:
                x = normalize(x, y, self.num_classes, f"norms_{i}")
            out = out + resize_align_corners(conv3x3(self.features, name=f"convs_{i}", dtype=self.dtype)(x), shape)
        return out


class RefineBlock(nn.Module):
    """RefineNet block: RCU(2×2) on each input, MSF fusion (when several inputs), CRP, RCU output (3 blocks at the
    end of the cascade, 1 otherwise)."""

    features: int
    end: bool = False
    act: Callable = nn.elu
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs, y, shape):
        kw = dict(act=self.act, num_classes=self.num_classes, dtype=self.dtype)
        hs = [RCUBlock(x.shape[-1], 2, 2, name=f"adapt_convs_{i}", **kw)(x, y) for i, x in enumerate(xs)]
        h = (MSFBlock(self.features, self.num_classes, self.dtype, name="msf")(hs, y, shape) if len(hs) > 1
             else hs[0])
        h = CRPBlock(self.features, 2, name="crp", **kw)(h, y)
        return RCUBlock(self.features, 3 if self.end else 1, 2, name="output_convs", **kw)(h, y)


# ---- networks ---------------------------------------------------------------------------------------------------

# Backbone stages (torch name, channel multiplier of nf, resample of the first block, dilation), shallow to deep,
# and RefineNet blocks (torch name, channel multiplier), deep to shallow, of the NCSNv2 paper's three depths.
ARCHITECTURES = {
    "ncsnv2_64": dict(
        stages=(("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 2), ("res4", 2, "down", 4)),
        refine=(("refine1", 2), ("refine2", 2), ("refine3", 1), ("refine4", 1))),
    "ncsnv2_128": dict(
        stages=(("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1), ("res4", 4, "down", 2),
                ("res5", 4, "down", 4)),
        refine=(("refine1", 4), ("refine2", 2), ("refine3", 2), ("refine4", 1), ("refine5", 1))),
    "ncsnv2_256": dict(
        stages=(("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1), ("res31", 2, "down", 1),
                ("res4", 4, "down", 2), ("res5", 4, "down", 4)),
        refine=(("refine1", 4), ("refine2", 2), ("refine31", 2), ("refine3", 2), ("refine4", 1), ("refine5", 1))),
}


def architecture_for(image_size: int) -> str:
    """The paper's depth for an image size: <96 px 4 stages, ≤128 px 5, ≤256 px 6 (as score_sde's get_network)."""
    if image_size < 96:
        return "ncsnv2_64"
    if image_size <= 128:
        return "ncsnv2_128"
    if image_size <= 256:
        return "ncsnv2_256"
    raise ValueError(f"config.data.image_size={image_size}: NCSNv2 has architectures up to 256 px only")


def _check_image_size(arch: str, image_size: int):
    n_down = sum(1 for _, _, r, d in ARCHITECTURES[arch]["stages"] if r == "down" and d == 1)
    if image_size % (2 ** n_down):
        raise ValueError(f"config.data.image_size={image_size} is not divisible by {2 ** n_down}, the "
                         f"downsampling factor of {arch}")


class RefineNet(nn.Module):
    """NCSN/NCSNv2 RefineNet; input (B, H, W, C) in [0, 1] (``centered=False``) or [-1, 1], labels (B,) int σ
    indices. Output (B, H, W, C): f(x)/σ_label (``scale_by_sigma``, NCSNv2) or f(x, label) (NCSN)."""

    nf: int = 128
    num_scales: int = 232
    sigma_max: float = 50.0
    sigma_min: float = 0.01
    arch: str = "ncsnv2_64"
    nonlinearity: str = "elu"
    centered: bool = False
    conditional: bool = False
    scale_by_sigma: bool = True
    refine_mults: Optional[Tuple[int, ...]] = None  # override of the RefineNet widths (see tests / README)
    dtype: Any = jnp.float32  # compute dtype of the convolutions (parameters and norm statistics stay float32)

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        act, spec = get_activation(self.nonlinearity), ARCHITECTURES[self.arch]
        y = labels.astype(jnp.int32)
        kw = dict(act=act, num_classes=self.num_scales if self.conditional else None, dtype=self.dtype)
        h = x if self.centered else 2.0 * x - 1.0
        h = conv3x3(self.nf, name="begin_conv", dtype=self.dtype)(h)
        layers = []
        for name, mult, resample, dilation in spec["stages"]:
            h = ResidualBlock(mult * self.nf, resample, dilation, name=f"{name}_0", **kw)(h, y)
            h = ResidualBlock(mult * self.nf, None, dilation, name=f"{name}_1", **kw)(h, y)
            layers.append(h)
        mults = self.refine_mults or tuple(m for _, m in spec["refine"])
        ref = None
        for j, ((name, _), mult) in enumerate(zip(spec["refine"], mults)):
            skip = layers[-1 - j]
            xs = [skip] if ref is None else [skip, ref]
            ref = RefineBlock(mult * self.nf, end=j == len(mults) - 1, name=name, **kw)(xs, y, skip.shape[1:3])
        h = act(normalize(ref, y, kw["num_classes"], "normalizer"))
        h = conv3x3(x.shape[-1], name="end_conv", dtype=self.dtype)(h).astype(x.dtype)
        if self.scale_by_sigma:
            sigmas = jnp.asarray(geometric_sigmas(self.sigma_max, self.sigma_min, self.num_scales), h.dtype)
            h = h / sigmas[y][:, None, None, None]
        return h


def _common_fields(model_cfg, data_cfg) -> dict:
    norm = model_cfg.get("normalization", "InstanceNorm++")
    if norm != "InstanceNorm++":
        raise ValueError(f"config.model.normalization={norm!r}: NCSN/NCSNv2 support only 'InstanceNorm++'")
    for key in ("nf", "num_scales", "sigma_max", "sigma_min"):
        if model_cfg.get(key) is None:
            raise ValueError(f"config.model.{key} is required by config.model.name={model_cfg.name!r}")
    dtype = model_cfg.get("dtype", None) or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    return dict(nf=int(model_cfg.nf), num_scales=int(model_cfg.num_scales), sigma_max=float(model_cfg.sigma_max),
                sigma_min=float(model_cfg.sigma_min), nonlinearity=model_cfg.get("nonlinearity", "elu"),
                centered=bool(data_cfg.centered), dtype=DTYPES[dtype])


@register_model("ncsnv2")
class NCSNv2(RefineNet):
    """NCSNv2 (unconditional, score = f(x)/σ); depth chosen from the image size (``architecture_for``)."""

    fixed_arch = None

    @classmethod
    def from_config(cls, model_cfg, data_cfg) -> "NCSNv2":
        arch = cls.fixed_arch or architecture_for(int(data_cfg.image_size))
        _check_image_size(arch, int(data_cfg.image_size))
        return cls(arch=arch, conditional=False, scale_by_sigma=True, **_common_fields(model_cfg, data_cfg))


@register_model("ncsnv2_64")
class NCSNv2_64(NCSNv2):
    """score_sde's name for the 4-stage NCSNv2 (CIFAR-10, CelebA 64)."""
    fixed_arch = "ncsnv2_64"


@register_model("ncsnv2_128")
class NCSNv2_128(NCSNv2):
    """score_sde's name for the 5-stage NCSNv2 (LSUN 96–128 px)."""
    fixed_arch = "ncsnv2_128"


@register_model("ncsnv2_256")
class NCSNv2_256(NCSNv2):
    """score_sde's name for the 6-stage NCSNv2 (FFHQ 256)."""
    fixed_arch = "ncsnv2_256"


@register_model("ncsn")
class NCSN(RefineNet):
    """NCSN (v1): the 4-stage RefineNet with σ-conditional InstanceNorm++ everywhere, output = score."""

    @classmethod
    def from_config(cls, model_cfg, data_cfg) -> "NCSN":
        _check_image_size("ncsnv2_64", int(data_cfg.image_size))
        return cls(arch="ncsnv2_64", conditional=True, scale_by_sigma=False, **_common_fields(model_cfg, data_cfg))


# ---- score_sde_pytorch checkpoints -------------------------------------------------------------------------------


def flax_path(torch_key: str) -> Tuple[str, ...]:
    """``res1.0.conv1.weight`` -> (res1_0, conv1, kernel); ``...normalize1.embed.weight`` -> (..., embed)."""
    parts = []
    for p in torch_key.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    if parts[-2:] == ["embed", "weight"]:
        return tuple(parts[:-1])
    if parts[-1] == "weight":
        return tuple(parts[:-1]) + ("kernel",)
    return tuple(parts)


def _check_sigmas(sd, model_cfg):
    if "sigmas" not in sd:
        return
    ours = geometric_sigmas(float(model_cfg.sigma_max), float(model_cfg.sigma_min), int(model_cfg.num_scales))
    theirs = np.asarray(sd["sigmas"], np.float64)
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-6):
        raise ConversionError(
            f"{sd.source}: the checkpoint's σ ladder (sigmas: {theirs.shape[0]} values, {theirs.max():g} .. "
            f"{theirs.min():g}) differs from config.model (num_scales={model_cfg.num_scales}, "
            f"sigma_max={model_cfg.sigma_max}, sigma_min={model_cfg.sigma_min})")


def torch_params(sd, model_cfg, data_cfg) -> dict:
    """Flax params of ``ncsn``/``ncsnv2`` from a score_sde_pytorch (or ermongroup) state dict, by renaming; conv
    weights OIHW -> HWIO. The ``sigmas`` buffer is checked against the config's σ ladder."""
    _check_sigmas(sd, model_cfg)
    params: dict = {}
    for key in sd:
        if key == "sigmas":
            continue
        path = flax_path(key)
        arr = sd.take(key, conv_kernel if path[-1] == "kernel" else None)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
    return params


for _name in ("ncsnv2", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256", "ncsn"):
    register_converter(_name)(torch_params)
