"""Small score networks for CPU work: an MLP for low-dimensional data and a compact U-Net for 8×8–32×32 images."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import register_model


def timestep_embedding(labels: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Transformer sinusoidal embedding of scalar labels (B,) -> (B, dim): [sin(l ω_k), cos(l ω_k)],
    ω_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = labels.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeMLP(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP, the usual conditioning pathway."""

    dim: int

    @nn.compact
    def __call__(self, labels):
        h = timestep_embedding(labels, self.dim)
        h = nn.Dense(self.dim * 4)(h)
        return nn.Dense(self.dim * 4)(nn.silu(h))


@register_model("mlp")
class MLP(nn.Module):
    """Residual MLP score network for vectors (B, D): h ← h + Dense(silu(Dense(h) + emb))."""

    hidden: int = 128
    num_layers: int = 3
    embed_dim: int = 32

    @classmethod
    def from_config(cls, model_cfg, data_cfg):
        return cls(hidden=model_cfg.get("hidden", 128), num_layers=model_cfg.get("num_layers", 3),
                   embed_dim=model_cfg.get("embed_dim", 32))

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        emb = TimeMLP(self.embed_dim)(labels)
        h = nn.Dense(self.hidden)(x)
        for _ in range(self.num_layers):
            u = nn.Dense(self.hidden)(nn.silu(h)) + nn.Dense(self.hidden)(emb)
            h = h + nn.Dense(self.hidden)(nn.silu(u))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(nn.silu(h))


class ResBlock(nn.Module):
    """GroupNorm–SiLU–Conv residual block with an additive time embedding (DDPM style)."""

    out_ch: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, emb, train: bool):
        groups = lambda c: min(8, c)
        h = nn.Conv(self.out_ch, (3, 3))(nn.silu(nn.GroupNorm(groups(x.shape[-1]))(x)))
        h = h + nn.Dense(self.out_ch)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(groups(self.out_ch))(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1))(x)
        return (x + h) / jnp.sqrt(2.0)


@register_model("small_unet")
class SmallUNet(nn.Module):
    """A compact U-Net: per resolution ``num_res_blocks`` ResBlocks, stride-2 conv down, nearest-neighbour up.

    Odd sizes (e.g. 7×7 from 28×28) are handled by resizing the upsampled map to the skip connection's shape.
    """

    nf: int = 32
    ch_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0

    @classmethod
    def from_config(cls, model_cfg, data_cfg):
        return cls(nf=model_cfg.nf, ch_mult=tuple(model_cfg.ch_mult), num_res_blocks=model_cfg.num_res_blocks,
                   dropout=model_cfg.dropout)

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"small_unet expects images (B, H, W, C), got shape {x.shape}")
        emb = TimeMLP(self.nf)(labels)
        h = nn.Conv(self.nf, (3, 3))(x)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.nf * mult, self.dropout)(h, emb, train)
                skips.append(h)
            if level < len(self.ch_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                skips.append(h)
        h = ResBlock(h.shape[-1], self.dropout)(h, emb, train)
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(self.nf * mult, self.dropout)(jnp.concatenate([h, skips.pop()], -1), emb, train)
            if level > 0:
                target = skips[-1].shape
                h = jax.image.resize(h, (h.shape[0], target[1], target[2], h.shape[-1]), "nearest")
                h = nn.Conv(h.shape[-1], (3, 3))(h)
        h = nn.silu(nn.GroupNorm(min(8, h.shape[-1]))(h))
        return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)
