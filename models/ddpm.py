"""The DDPM U-Net (Ho et al. 2020) as in score_sde: ε-prediction network conditioned on the step index.

CIFAR-10: nf 128, ch_mult (1, 2, 2, 2), 2 residual blocks per resolution, self-attention at 16×16, dropout 0.1,
sinusoidal embedding of the integer step followed by a 2-layer MLP (35.22M parameters). ``params_from_torch``
converts score_sde_pytorch ``ddpm`` checkpoints.

The DDPM paper reports 35.7M parameters: Ho et al.'s own code (diffusion_tf) applies self-attention after *each*
of the 3 decoder blocks at 16×16, score_sde once per resolution after them. The 2 extra attention blocks of
256 channels hold 2 × 263,680 parameters, 35,218,947 + 527,360 = 35,746,307 (``attn_every_up_block=True``).
"""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, register_model, torch_mapping
from models.ncsnpp import activation, check_resolutions, compute_dtype, sigma_ladder

Array = jax.Array


@register_model("ddpm")
class DDPM(nn.Module):
    """DDPM U-Net on (B, H, W, C) images with labels (B,) = the step index (float or int)."""

    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    image_size: int = 32
    num_channels: int = 3
    centered: bool = True
    conditional: bool = True
    scale_by_sigma: bool = False
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    nonlinearity: str = "swish"
    attn_every_up_block: bool = False  # True: Ho et al.'s diffusion_tf decoder (attention after every block)
    dtype: Any = jnp.float32

    def __post_init__(self):
        check_resolutions(self.image_size, self.ch_mult, self.attn_resolutions, type(self).__name__)
        activation(self.nonlinearity)
        super().__post_init__()

    @classmethod
    def from_config(cls, model_cfg, data_cfg) -> "DDPM":
        g = model_cfg.get
        return cls(nf=model_cfg.nf, ch_mult=tuple(model_cfg.ch_mult), num_res_blocks=model_cfg.num_res_blocks,
                   attn_resolutions=tuple(g("attn_resolutions", (16,))), dropout=model_cfg.dropout,
                   resamp_with_conv=g("resamp_with_conv", True), image_size=data_cfg.image_size,
                   num_channels=data_cfg.num_channels, centered=data_cfg.centered,
                   conditional=g("conditional", True), scale_by_sigma=g("scale_by_sigma", False),
                   sigma_min=g("sigma_min", 0.01), sigma_max=g("sigma_max", 50.0), num_scales=g("num_scales", 1000),
                   nonlinearity=g("nonlinearity", "swish"), attn_every_up_block=g("attn_every_up_block", False),
                   dtype=compute_dtype(g("dtype", "float32")))

    def _resblock(self, name: str, out_ch=None):
        return layers.ResnetBlockDDPM(out_ch, dropout=self.dropout, skip_rescale=False, init_scale=0.0,
                                      num_groups=32, act=activation(self.nonlinearity), dtype=self.dtype, name=name)

    def _attn(self, name: str):
        return layers.AttnBlock(32, False, 0.0, self.dtype, name=name)

    def _embedding(self, labels: Array):
        if not self.conditional:
            return None
        temb = layers.get_timestep_embedding(labels, self.nf)
        temb = layers.dense(self.nf * 4, self.dtype, name="temb_0")(temb)
        return layers.dense(self.nf * 4, self.dtype, name="temb_1")(activation(self.nonlinearity)(temb))

    def _down(self, h: Array, temb, train: bool) -> List[Array]:
        hs = [layers.conv3x3(self.nf, dtype=self.dtype, name="conv_in")(h)]
        for level, mult in enumerate(self.ch_mult):
            for block in range(self.num_res_blocks):
                h = self._resblock(f"down_{level}_res_{block}", self.nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn(f"down_{level}_attn_{block}")(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                hs.append(layers.Downsample(with_conv=self.resamp_with_conv, dtype=self.dtype,
                                            name=f"down_{level}_down")(hs[-1]))
        return hs

    def _up(self, h: Array, hs: List[Array], temb, train: bool) -> Array:
        for level in reversed(range(len(self.ch_mult))):
            for block in range(self.num_res_blocks + 1):
                h = self._resblock(f"up_{level}_res_{block}", self.nf * self.ch_mult[level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
                if self.attn_every_up_block and h.shape[1] in self.attn_resolutions:
                    h = self._attn(f"up_{level}_attn_{block}")(h)
            if not self.attn_every_up_block and h.shape[1] in self.attn_resolutions:
                h = self._attn(f"up_{level}_attn")(h)
            if level != 0:
                h = layers.Upsample(with_conv=self.resamp_with_conv, dtype=self.dtype, name=f"up_{level}_up")(h)
        assert not hs
        return h

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.num_channels):
            raise ValueError(f"DDPM built for images ({self.image_size}, {self.image_size}, {self.num_channels}) "
                             f"(config.data), got input of shape {x.shape}")
        temb = self._embedding(labels)
        h = x if self.centered else 2 * x - 1.0
        hs = self._down(h.astype(self.dtype), temb, train)
        h = self._resblock("mid_res_0")(hs[-1], temb, train)
        h = self._attn("mid_attn")(h)
        h = self._resblock("mid_res_1")(h, temb, train)
        h = self._up(h, hs, temb, train)
        h = activation(self.nonlinearity)(layers.group_norm(h.shape[-1], 32, self.dtype, name="norm_out")(h))
        h = layers.conv3x3(x.shape[-1], init_scale=0.0, dtype=self.dtype, name="conv_out")(h).astype(x.dtype)
        if self.scale_by_sigma:
            sigmas = jnp.asarray(sigma_ladder(self.sigma_min, self.sigma_max, self.num_scales), x.dtype)
            h = h / sigmas[labels.astype(jnp.int32)].reshape((-1, 1, 1, 1))
        return h

    def torch_module_names(self) -> List[str]:
        """Flax names of score_sde_pytorch's ``all_modules`` entries, in that list's order."""
        if self.attn_every_up_block:
            raise ValueError("score_sde_pytorch's DDPM has one decoder attention block per resolution; "
                             "config.model.attn_every_up_block=True has no torch counterpart")
        names = (["temb_0", "temb_1"] if self.conditional else []) + ["conv_in"]
        for level in range(len(self.ch_mult)):
            for block in range(self.num_res_blocks):
                names.append(f"down_{level}_res_{block}")
                if self.image_size // 2 ** level in self.attn_resolutions:
                    names.append(f"down_{level}_attn_{block}")
            if level != len(self.ch_mult) - 1:
                names.append(f"down_{level}_down")
        names += ["mid_res_0", "mid_attn", "mid_res_1"]
        for level in reversed(range(len(self.ch_mult))):
            names += [f"up_{level}_res_{block}" for block in range(self.num_res_blocks + 1)]
            if self.image_size // 2 ** level in self.attn_resolutions:
                names.append(f"up_{level}_attn")
            if level != 0:
                names.append(f"up_{level}_up")
        return names + ["norm_out", "conv_out"]


@torch_mapping.register_converter("ddpm", non_trainable=("sigmas",))
def params_from_torch(state_dict: Mapping[str, np.ndarray], model_cfg, data_cfg) -> dict:
    """Flax params of ``DDPM.from_config(model_cfg, data_cfg)`` from a score_sde_pytorch ``ddpm`` state dict.

    Strict: unmapped tensors, missing parameters and shape mismatches raise ``ValueError`` listing them.
    """
    module = DDPM.from_config(model_cfg, data_cfg)
    expected = torch_mapping.expected_shapes(module, data_cfg.image_size, data_cfg.num_channels)
    return torch_mapping.map_state_dict(state_dict, module.torch_module_names(), expected, "ddpm")
