"""Networks for controllable generation: a noise-conditional classifier p_t(y | x) and a class-conditional
wrapper s_θ(x, t, y) of any registered score network (for classifier-free guidance).

Both are called like every model, ``module.apply(params, x, labels, train=...)``, with ``labels`` the time/noise
conditioning; the wrapper also takes ``y`` (batch,) class indices, ``y = num_classes`` (or None) being the null
label ∅ of classifier-free guidance.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import get_model, register_model
from models.small import ResBlock, TimeMLP


@register_model("classifier")
class NoiseConditionalClassifier(nn.Module):
    """Logits (B, num_classes) of p_t(y | x_t): for images a ResBlock/stride-2 CNN with an additive time
    embedding and global average pooling; for vectors (B, D) a residual MLP with the same embedding."""

    num_classes: int = 10
    nf: int = 32
    ch_mult: Sequence[int] = (1, 2)
    embed_dim: int = 32

    @classmethod
    def from_config(cls, model_cfg, data_cfg):
        return cls(num_classes=int(data_cfg.num_classes), nf=model_cfg.get("nf", 32),
                   ch_mult=tuple(model_cfg.get("ch_mult", (1, 2))), embed_dim=model_cfg.get("embed_dim", 32))

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        emb = TimeMLP(self.embed_dim)(labels)
        if x.ndim == 2:
            h = nn.Dense(self.nf * 4)(x)
            for _ in range(2):
                h = h + nn.Dense(self.nf * 4)(nn.silu(nn.Dense(self.nf * 4)(nn.silu(h)) + nn.Dense(self.nf * 4)(emb)))
        elif x.ndim == 4:
            h = nn.Conv(self.nf, (3, 3))(x)
            for level, mult in enumerate(self.ch_mult):
                h = ResBlock(self.nf * mult)(h, emb, train)
                if level < len(self.ch_mult) - 1:
                    h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
            h = jnp.mean(nn.silu(nn.GroupNorm(min(8, h.shape[-1]))(h)), axis=(1, 2))
        else:
            raise ValueError(f"classifier expects images (B, H, W, C) or vectors (B, D), got shape {x.shape}")
        return nn.Dense(self.num_classes)(nn.silu(h))


@register_model("class_conditional")
class ClassConditional(nn.Module):
    """s_θ(x, t, y) from the registered network ``config.model.base``: a learned embedding of y ∈ {0..K} (K = ∅,
    the null label) fed as ``cond_channels`` extra input channels (features for vectors); the base network's
    output keeps the first C channels. The base must return as many channels as it is given."""

    base: nn.Module
    num_classes: int = 10
    cond_channels: int = 4

    @classmethod
    def from_config(cls, model_cfg, data_cfg):
        base_name = model_cfg.get("base", "small_unet")
        if base_name == "class_conditional":
            raise ValueError("config.model.base must name a score network, not 'class_conditional'")
        return cls(base=get_model(base_name).from_config(model_cfg, data_cfg), num_classes=int(data_cfg.num_classes),
                   cond_channels=model_cfg.get("cond_channels", 4))

    @nn.compact
    def __call__(self, x, labels, train: bool = False, y: Optional[jax.Array] = None):
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
        c = nn.Embed(self.num_classes + 1, self.cond_channels)(y)            # (B, cond_channels)
        c = jnp.broadcast_to(c.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1,)),
                             x.shape[:-1] + (self.cond_channels,))
        out = self.base(jnp.concatenate([x, c.astype(x.dtype)], axis=-1), labels, train=train)
        if out.shape[-1] != x.shape[-1] + self.cond_channels:
            raise ValueError(f"config.model.base={type(self.base).__name__} returned {out.shape[-1]} channels for "
                             f"{x.shape[-1] + self.cond_channels} input channels; class conditioning by extra "
                             f"input channels needs a network whose output follows its input channels")
        return out[..., : x.shape[-1]]
