"""Layers shared by the DDPM U-Net and the NCSN++/DDPM++ family (NHWC, flax.linen).

Initialisation follows the 2021 score_sde code: convolutions and dense layers use
``variance_scaling(scale, "fan_avg", "uniform")`` (scale 0 is replaced by 1e-10), biases start at zero, and the
NIN (1×1, "network in network") projections use scale 0.1. Sub-module names (``GroupNorm_0``, ``Conv_0``,
``Dense_0``, ``NIN_0``, ...) are those of score_sde_pytorch, so that checkpoint conversion is a renaming.
Every module takes ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``); parameters stay float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import up_or_down_sampling as updown

Array = jax.Array
Dtype = Any


def default_init(scale: float = 1.0):
    """score_sde's DDPM initialiser: uniform variance scaling with fan_avg (scale 0 -> 1e-10)."""
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def conv3x3(features: int, init_scale: float = 1.0, stride: int = 1, padding=((1, 1), (1, 1)),
            dtype: Dtype = None, name: Optional[str] = None) -> nn.Conv:
    """3×3 convolution with bias, padding 1 (as ``ddpm_conv3x3``)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, kernel_init=default_init(init_scale),
                   dtype=dtype, name=name)


def conv1x1(features: int, init_scale: float = 1.0, dtype: Dtype = None, name: Optional[str] = None) -> nn.Conv:
    """1×1 convolution with bias (as ``ddpm_conv1x1``)."""
    return nn.Conv(features, (1, 1), padding="VALID", kernel_init=default_init(init_scale), dtype=dtype, name=name)


def dense(features: int, dtype: Dtype = None, name: Optional[str] = None) -> nn.Dense:
    """Dense layer with the default initialiser and a zero bias."""
    return nn.Dense(features, kernel_init=default_init(), dtype=dtype, name=name)


def nin(features: int, init_scale: float = 0.1, dtype: Dtype = None, name: Optional[str] = None) -> nn.Dense:
    """NIN: a per-pixel linear map over channels, y = x W + b (W of shape (C_in, C_out))."""
    return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype, name=name)


def group_norm(channels: int, num_groups: Optional[int], dtype: Dtype = None,
               name: Optional[str] = None) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 and ``num_groups`` groups (None: min(C // 4, 32), the NCSN++ rule)."""
    groups = min(channels // 4, 32) if num_groups is None else num_groups
    if groups < 1 or channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels cannot be split into {groups} groups")
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def residual(x: Array, h: Array, skip_rescale: bool) -> Array:
    """x + h, divided by √2 when ``skip_rescale`` (keeps the variance of the sum)."""
    return (x + h) / np.sqrt(2.0).astype(np.float32) if skip_rescale else x + h


def get_timestep_embedding(timesteps: Array, embedding_dim: int, max_positions: float = 10_000.0) -> Array:
    """DDPM sinusoidal embedding (B,) -> (B, dim): [sin(t ω_k), cos(t ω_k)], ω_k = max_positions^(-k/(half-1))."""
    if timesteps.ndim != 1:
        raise ValueError(f"time labels must have shape (batch,), got {timesteps.shape}")
    half = embedding_dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_positions) / (half - 1)))
    emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar (B,) -> (B, 2E): [sin(2π x W), cos(2π x W)], W ~ N(0, scale²).

    W is a parameter (so it is saved and converted) but never trained (stop_gradient).
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        w = jax.lax.stop_gradient(w)
        x_proj = x.astype(jnp.float32)[:, None] * w[None, :] * 2 * np.pi
        return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class Combine(nn.Module):
    """Merge the input pyramid x into features y: conv1x1(x) + y ("sum") or concat([conv1x1(x), y]) ("cat")."""

    method: str = "cat"
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        h = conv1x1(y.shape[-1], dtype=self.dtype, name="Conv_0")(x)
        if self.method == "cat":
            return jnp.concatenate([h, y], axis=-1)
        if self.method == "sum":
            return h + y
        raise ValueError(f"progressive_combine={self.method!r}; expected 'sum' or 'cat'")


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions: x + NIN_3(softmax(q kᵀ / √C) v), q, k, v = NIN(GroupNorm(x)).

    ``num_groups`` None uses min(C // 4, 32) groups (NCSN++); DDPM uses 32. With ``skip_rescale`` the
    residual sum is divided by √2.
    """

    num_groups: Optional[int] = None
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = group_norm(c, self.num_groups, self.dtype, name="GroupNorm_0")(x)
        q = nin(c, dtype=self.dtype, name="NIN_0")(h)
        k = nin(c, dtype=self.dtype, name="NIN_1")(h)
        v = nin(c, dtype=self.dtype, name="NIN_2")(h)
        w = jnp.einsum("bhwc,bijc->bhwij", q, k).astype(jnp.float32) * (c ** -0.5)
        w = jax.nn.softmax(w.reshape(b, height, width, height * width), axis=-1)
        w = w.reshape(b, height, width, height, width).astype(v.dtype)
        h = jnp.einsum("bhwij,bijc->bhwc", w, v)
        h = nin(c, init_scale=self.init_scale, dtype=self.dtype, name="NIN_3")(h)
        return residual(x, h, self.skip_rescale)


class FIRConv2d(nn.Module):
    """Convolution fused with FIR up- or down-sampling (``up_or_down_sampling.Conv2d`` of score_sde)."""

    out_ch: int
    kernel: int = 3
    up: bool = False
    down: bool = False
    resample_kernel: Sequence[int] = (1, 3, 3, 1)
    use_bias: bool = True
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("kernel", default_init(), (self.kernel, self.kernel, x.shape[-1], self.out_ch))
        dtype = self.dtype or x.dtype
        x, w = x.astype(dtype), w.astype(dtype)
        if self.up:
            x = updown.upsample_conv_2d(x, w, k=self.resample_kernel)
        elif self.down:
            x = updown.conv_downsample_2d(x, w, k=self.resample_kernel)
        else:
            pad = self.kernel // 2
            x = jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.out_ch,)).astype(dtype)
        return x


class Upsample(nn.Module):
    """×2 upsampling: nearest (+ conv3x3) or, with ``fir``, FIR upsampling (fused with a conv3x3 if with_conv)."""

    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            h = updown.naive_upsample_2d(x, 2)
            return conv3x3(out_ch, dtype=self.dtype, name="Conv_0")(h) if self.with_conv else h
        if not self.with_conv:
            return updown.upsample_2d(x, self.fir_kernel, factor=2)
        return FIRConv2d(out_ch, up=True, resample_kernel=self.fir_kernel, dtype=self.dtype, name="Conv2d_0")(x)


class Downsample(nn.Module):
    """×2 downsampling: stride-2 conv3x3 (padding right/bottom) or 2×2 average; with ``fir``, FIR filtering."""

    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            if self.with_conv:
                return conv3x3(out_ch, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype, name="Conv_0")(x)
            return updown.naive_downsample_2d(x, 2)
        if not self.with_conv:
            return updown.downsample_2d(x, self.fir_kernel, factor=2)
        return FIRConv2d(out_ch, down=True, resample_kernel=self.fir_kernel, dtype=self.dtype, name="Conv2d_0")(x)


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block: h = Conv_1(drop(act(GN(Conv_0(act(GN(x))) + Dense_0(act(temb)))))), out = x' + h.

    x' is x, or NIN_0(x) / Conv_2(x) when the channel count changes. The DDPM U-Net uses 32 groups, Conv_1
    init scale 0 and no rescaling; DDPM++ ("ddpm" resblock type) uses min(C//4, 32) groups and divides by √2.
    """

    out_ch: Optional[int] = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    num_groups: Optional[int] = None
    act: Any = nn.swish
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = self.act(group_norm(in_ch, self.num_groups, self.dtype, name="GroupNorm_0")(x))
        h = conv3x3(out_ch, dtype=self.dtype, name="Conv_0")(h)
        if temb is not None:
            h = h + dense(out_ch, self.dtype, name="Dense_0")(self.act(temb))[:, None, None, :]
        h = self.act(group_norm(out_ch, self.num_groups, self.dtype, name="GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(out_ch, init_scale=self.init_scale, dtype=self.dtype, name="Conv_1")(h)
        if in_ch != out_ch:
            if self.conv_shortcut:
                x = conv3x3(out_ch, dtype=self.dtype, name="Conv_2")(x)
            else:
                x = nin(out_ch, dtype=self.dtype, name="NIN_0")(x)
        return residual(x, h, self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN residual block of NCSN++/DDPM++, optionally resampling ×2 (``up``/``down``) inside the block.

    h = Conv_1(drop(act(GN(Conv_0(resample(act(GN(x)))) + Dense_0(act(temb)))))); out = (x' + h)/√2 with
    x' = Conv_2(resample(x)) (1×1) when channels change or the block resamples.
    """

    out_ch: Optional[int] = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    act: Any = nn.swish
    dtype: Dtype = None

    def _resample(self, x: Array) -> Array:
        if self.up:
            return updown.upsample_2d(x, self.fir_kernel, factor=2) if self.fir else updown.naive_upsample_2d(x, 2)
        if self.down:
            return (updown.downsample_2d(x, self.fir_kernel, factor=2) if self.fir
                    else updown.naive_downsample_2d(x, 2))
        return x

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = self.act(group_norm(in_ch, None, self.dtype, name="GroupNorm_0")(x))
        h, x = self._resample(h), self._resample(x)
        h = conv3x3(out_ch, dtype=self.dtype, name="Conv_0")(h)
        if temb is not None:
            h = h + dense(out_ch, self.dtype, name="Dense_0")(self.act(temb))[:, None, None, :]
        h = self.act(group_norm(out_ch, None, self.dtype, name="GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(out_ch, init_scale=self.init_scale, dtype=self.dtype, name="Conv_1")(h)
        if in_ch != out_ch or self.up or self.down:
            x = conv1x1(out_ch, dtype=self.dtype, name="Conv_2")(x)
        return residual(x, h, self.skip_rescale)
