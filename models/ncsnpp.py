"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs"), one U-Net family.

The two differ only in options: NCSN++ uses BigGAN residual blocks with FIR resampling, Gaussian Fourier
features of log σ (labels = σ) and divides its output by σ (``scale_by_sigma``; the output is then the score);
DDPM++ uses sinusoidal embeddings of 999·t and no FIR. Progressive growing of inputs (``input_skip`` /
``residual``) and outputs (``output_skip`` / ``residual``) follows StyleGAN2. Numerically the same function as
score_sde's ``NCSNpp`` (tested against checkpoints written by score_sde_pytorch); ``params_from_torch`` converts
those checkpoints.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, register_model, torch_mapping

Array = jax.Array

PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
EMBEDDINGS = ("fourier", "positional")
RESBLOCKS = ("biggan", "ddpm")
ACTIVATIONS = {"swish": nn.swish, "silu": nn.silu, "elu": nn.elu, "relu": nn.relu,
               "lrelu": lambda x: nn.leaky_relu(x, 0.2)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _choice(value: str, valid: Sequence[str], key: str) -> str:
    value = str(value).lower()
    if value not in valid:
        raise ValueError(f"config.model.{key}={value!r}; expected one of {tuple(valid)}")
    return value


def activation(name: str):
    """Nonlinearity by config name (``config.model.nonlinearity``)."""
    return ACTIVATIONS[_choice(name, tuple(ACTIVATIONS), "nonlinearity")]


def compute_dtype(name) -> Any:
    """Compute dtype by config name (``config.model.dtype``); parameters stay float32."""
    return DTYPES[_choice(name or "float32", tuple(DTYPES), "dtype")]


def check_resolutions(image_size: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int], model: str):
    """The image size must halve cleanly at every level and every attention resolution must be reached."""
    levels = len(ch_mult)
    if image_size % (2 ** (levels - 1)):
        raise ValueError(f"{model}: data.image_size={image_size} is not divisible by 2^{levels - 1} "
                         f"(model.ch_mult={tuple(ch_mult)} has {levels} resolutions)")
    reached = [image_size // 2 ** i for i in range(levels)]
    never = [r for r in attn_resolutions if r not in reached]
    if never:
        raise ValueError(f"{model}: model.attn_resolutions={tuple(attn_resolutions)} contains {never}, never "
                         f"reached with data.image_size={image_size} and ch_mult={tuple(ch_mult)} "
                         f"(resolutions {reached})")


def sigma_ladder(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
    """σ_i geometric from σ_max (i = 0) down to σ_min (i = N−1), as score_sde's ``get_sigmas``."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


@register_model("ncsnpp")
class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net on (B, H, W, C) images with labels (B,) (σ for Fourier, 999 t or index otherwise)."""

    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    image_size: int = 32
    num_channels: int = 3
    centered: bool = True
    conditional: bool = True
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    scale_by_sigma: bool = False
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    nonlinearity: str = "swish"
    dtype: Any = jnp.float32

    def __post_init__(self):
        check_resolutions(self.image_size, self.ch_mult, self.attn_resolutions, type(self).__name__)
        _choice(self.progressive, PROGRESSIVE, "progressive")
        _choice(self.progressive_input, PROGRESSIVE_INPUT, "progressive_input")
        _choice(self.progressive_combine, ("sum", "cat"), "progressive_combine")
        _choice(self.embedding_type, EMBEDDINGS, "embedding_type")
        _choice(self.resblock_type, RESBLOCKS, "resblock_type")
        activation(self.nonlinearity)
        super().__post_init__()

    @classmethod
    def from_config(cls, model_cfg, data_cfg) -> "NCSNpp":
        g = model_cfg.get
        return cls(
            nf=model_cfg.nf, ch_mult=tuple(model_cfg.ch_mult), num_res_blocks=model_cfg.num_res_blocks,
            attn_resolutions=tuple(g("attn_resolutions", (16,))), dropout=model_cfg.dropout,
            resamp_with_conv=g("resamp_with_conv", True), image_size=data_cfg.image_size,
            num_channels=data_cfg.num_channels, centered=data_cfg.centered, conditional=g("conditional", True),
            fir=g("fir", False), fir_kernel=tuple(g("fir_kernel", (1, 3, 3, 1))), skip_rescale=g("skip_rescale", True),
            resblock_type=g("resblock_type", "biggan").lower(), progressive=g("progressive", "none").lower(),
            progressive_input=g("progressive_input", "none").lower(),
            progressive_combine=g("progressive_combine", "sum").lower(),
            embedding_type=g("embedding_type", "positional").lower(), fourier_scale=g("fourier_scale", 16.0),
            init_scale=g("init_scale", 0.0), scale_by_sigma=g("scale_by_sigma", False),
            sigma_min=g("sigma_min", 0.01), sigma_max=g("sigma_max", 50.0), num_scales=g("num_scales", 1000),
            nonlinearity=g("nonlinearity", "swish"), dtype=compute_dtype(g("dtype", "float32")))

    # ---- building blocks -------------------------------------------------------------------------------------
    def _resblock(self, name: str, out_ch: Optional[int] = None, up: bool = False, down: bool = False):
        act = activation(self.nonlinearity)
        if self.resblock_type == "ddpm":
            return layers.ResnetBlockDDPM(out_ch, dropout=self.dropout, skip_rescale=self.skip_rescale,
                                          init_scale=self.init_scale, act=act, dtype=self.dtype, name=name)
        return layers.ResnetBlockBigGAN(out_ch, up=up, down=down, dropout=self.dropout, fir=self.fir,
                                        fir_kernel=self.fir_kernel, skip_rescale=self.skip_rescale,
                                        init_scale=self.init_scale, act=act, dtype=self.dtype, name=name)

    def _attn(self, name: str):
        return layers.AttnBlock(None, self.skip_rescale, self.init_scale, self.dtype, name=name)

    def _norm_conv(self, h: Array, level: int, features: int, init_scale: float) -> Array:
        """conv3x3(act(GroupNorm(h))) of the output pyramid at ``level``."""
        h = layers.group_norm(h.shape[-1], None, self.dtype, name=f"up_{level}_pyramid_norm")(h)
        return layers.conv3x3(features, init_scale=init_scale, dtype=self.dtype,
                              name=f"up_{level}_pyramid_conv")(activation(self.nonlinearity)(h))

    def _embedding(self, labels: Array):
        """Time/noise embedding (B, 4 nf) or None, and σ per example for ``scale_by_sigma``."""
        act = activation(self.nonlinearity)
        if self.embedding_type == "fourier":
            used_sigmas = labels
            temb = layers.GaussianFourierProjection(self.nf, self.fourier_scale, name="fourier")(jnp.log(labels))
        else:
            used_sigmas = jnp.asarray(sigma_ladder(self.sigma_min, self.sigma_max, self.num_scales),
                                      jnp.float32)[labels.astype(jnp.int32)]
            temb = layers.get_timestep_embedding(labels, self.nf)
        if not self.conditional:
            return None, used_sigmas
        temb = layers.dense(self.nf * 4, self.dtype, name="temb_0")(temb)
        temb = layers.dense(self.nf * 4, self.dtype, name="temb_1")(act(temb))
        return temb, used_sigmas

    # ---- the U-Net ------------------------------------------------------------------------------------------------
    def _down(self, x: Array, temb, train: bool) -> List[Array]:
        """Encoder: returns the skip list hs (the last entry is the bottleneck input)."""
        input_pyramid = x
        hs = [layers.conv3x3(self.nf, dtype=self.dtype, name="conv_in")(x)]
        for level, mult in enumerate(self.ch_mult):
            for block in range(self.num_res_blocks):
                h = self._resblock(f"down_{level}_res_{block}", self.nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn(f"down_{level}_attn_{block}")(h)
                hs.append(h)
            if level == len(self.ch_mult) - 1:
                break
            if self.resblock_type == "ddpm":
                h = layers.Downsample(with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=self.fir_kernel,
                                      dtype=self.dtype, name=f"down_{level}_down")(hs[-1])
            else:
                h = self._resblock(f"down_{level}_down", down=True)(hs[-1], temb, train)
            if self.progressive_input == "input_skip":
                input_pyramid = layers.Downsample(fir=self.fir, fir_kernel=self.fir_kernel)(input_pyramid)
                h = layers.Combine(self.progressive_combine, self.dtype, name=f"down_{level}_combine")(input_pyramid, h)
            elif self.progressive_input == "residual":
                input_pyramid = layers.Downsample(h.shape[-1], with_conv=True, fir=self.fir, fir_kernel=self.fir_kernel,
                                                  dtype=self.dtype, name=f"down_{level}_pyramid")(input_pyramid)
                input_pyramid = h = layers.residual(input_pyramid, h, self.skip_rescale)
            hs.append(h)
        return hs

    def _pyramid(self, h: Array, pyramid, level: int, channels: int):
        """Output pyramid update at ``level``: returns (h, pyramid)."""
        top = level == len(self.ch_mult) - 1
        if self.progressive == "output_skip":
            out = self._norm_conv(h, level, channels, self.init_scale)
            if not top:
                out = layers.Upsample(fir=self.fir, fir_kernel=self.fir_kernel)(pyramid) + out
            return h, out
        if top:  # residual
            return h, self._norm_conv(h, level, h.shape[-1], 1.0)
        pyramid = layers.Upsample(h.shape[-1], with_conv=True, fir=self.fir, fir_kernel=self.fir_kernel,
                                  dtype=self.dtype, name=f"up_{level}_pyramid_up")(pyramid)
        pyramid = layers.residual(pyramid, h, self.skip_rescale)
        return pyramid, pyramid

    def _up(self, h: Array, hs: List[Array], temb, train: bool, channels: int):
        """Decoder: consumes hs, returns (h, pyramid)."""
        pyramid = None
        for level in reversed(range(len(self.ch_mult))):
            for block in range(self.num_res_blocks + 1):
                h = self._resblock(f"up_{level}_res_{block}", self.nf * self.ch_mult[level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
            if h.shape[1] in self.attn_resolutions:
                h = self._attn(f"up_{level}_attn")(h)
            if self.progressive != "none":
                h, pyramid = self._pyramid(h, pyramid, level, channels)
            if level != 0:
                if self.resblock_type == "ddpm":
                    h = layers.Upsample(with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=self.fir_kernel,
                                        dtype=self.dtype, name=f"up_{level}_up")(h)
                else:
                    h = self._resblock(f"up_{level}_up", up=True)(h, temb, train)
        assert not hs
        return h, pyramid

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.num_channels):
            raise ValueError(f"{type(self).__name__} built for images ({self.image_size}, {self.image_size}, "
                             f"{self.num_channels}) (config.data), got input of shape {x.shape}")
        temb, used_sigmas = self._embedding(labels)
        out_dtype = x.dtype
        h = x if self.centered else 2 * x - 1.0
        hs = self._down(h.astype(self.dtype), temb, train)
        h = self._resblock("mid_res_0")(hs[-1], temb, train)
        h = self._attn("mid_attn")(h)
        h = self._resblock("mid_res_1")(h, temb, train)
        h, pyramid = self._up(h, hs, temb, train, x.shape[-1])
        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = layers.group_norm(h.shape[-1], None, self.dtype, name="norm_out")(h)
            h = layers.conv3x3(x.shape[-1], init_scale=self.init_scale, dtype=self.dtype,
                               name="conv_out")(activation(self.nonlinearity)(h))
        h = h.astype(out_dtype)
        if self.scale_by_sigma:
            h = h / used_sigmas.reshape((-1, 1, 1, 1)).astype(out_dtype)
        return h

    # ---- checkpoint interop -------------------------------------------------------------------------------------
    def torch_module_names(self) -> List[str]:
        """Flax names of score_sde_pytorch's ``all_modules`` entries, in that list's order."""
        names = (["fourier"] if self.embedding_type == "fourier" else []) + (
            ["temb_0", "temb_1"] if self.conditional else []) + ["conv_in"]
        for level in range(len(self.ch_mult)):
            for block in range(self.num_res_blocks):
                names.append(f"down_{level}_res_{block}")
                if self.image_size // 2 ** level in self.attn_resolutions:
                    names.append(f"down_{level}_attn_{block}")
            if level != len(self.ch_mult) - 1:
                names.append(f"down_{level}_down")
                names += {"none": [], "input_skip": [f"down_{level}_combine"],
                          "residual": [f"down_{level}_pyramid"]}[self.progressive_input]
        names += ["mid_res_0", "mid_attn", "mid_res_1"]
        for level in reversed(range(len(self.ch_mult))):
            names += [f"up_{level}_res_{block}" for block in range(self.num_res_blocks + 1)]
            if self.image_size // 2 ** level in self.attn_resolutions:
                names.append(f"up_{level}_attn")
            if self.progressive == "output_skip" or (self.progressive == "residual" and level == len(self.ch_mult) - 1):
                names += [f"up_{level}_pyramid_norm", f"up_{level}_pyramid_conv"]
            elif self.progressive == "residual":
                names.append(f"up_{level}_pyramid_up")
            if level != 0:
                names.append(f"up_{level}_up")
        if self.progressive != "output_skip":
            names += ["norm_out", "conv_out"]
        return names


def torch_non_trainable(model_cfg) -> tuple:
    """State-dict entries absent from score_sde_pytorch's EMA list: the σ buffer and the fixed Fourier W."""
    fourier = str(model_cfg.get("embedding_type", "positional")).lower() == "fourier"
    return ("sigmas", "all_modules.0.W") if fourier else ("sigmas",)


@torch_mapping.register_converter("ncsnpp", non_trainable=torch_non_trainable)
def params_from_torch(state_dict: Mapping[str, np.ndarray], model_cfg, data_cfg) -> dict:
    """Flax params of ``NCSNpp.from_config(model_cfg, data_cfg)`` from a score_sde_pytorch ``ncsnpp`` state dict.

    Strict: unmapped tensors, missing parameters and shape mismatches raise ``ValueError`` listing them.
    """
    module = NCSNpp.from_config(model_cfg, data_cfg)
    expected = torch_mapping.expected_shapes(module, data_cfg.image_size, data_cfg.num_channels)
    return torch_mapping.map_state_dict(state_dict, module.torch_module_names(), expected, "ncsnpp")
