"""Adding a model is one registered ``flax.linen`` Module: an MLP whose hidden units are modulated by the noise
label through FiLM (Perez et al. 2018), h ← h ⊙ (1 + γ(label)) + β(label).

The contract (models/__init__.py): ``__call__(x, labels, train)`` with x (B, D) or (B, H, W, C) and labels (B,)
from ``sde.model_time`` returns an output shaped like x; ``from_config(model_cfg, data_cfg)`` reads the config
once. What the output means (``config.model.prediction``) and what the label is (``config.model.time_input``)
are set in the config, not in the network. Train the two-moons toy with it:

    python main.py --config=examples/film_mlp.py --workdir=/tmp/film
"""
import flax.linen as nn
import jax.numpy as jnp

import models
from configs import toy
from models.small import timestep_embedding


@models.register_model("film_mlp")
class FiLMMLP(nn.Module):
    """``num_layers`` blocks h ← h + Dense(silu(FiLM(Dense(h)))) on vectors (B, D); zero-initialised output."""

    width: int = 128
    num_layers: int = 3
    embed_dim: int = 32

    @classmethod
    def from_config(cls, model_cfg, data_cfg) -> "FiLMMLP":
        return cls(width=model_cfg.get("width", 128), num_layers=model_cfg.get("num_layers", 3),
                   embed_dim=model_cfg.get("embed_dim", 32))

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"film_mlp expects vectors (B, D), got shape {x.shape}")
        emb = nn.silu(nn.Dense(self.width)(timestep_embedding(labels, self.embed_dim)))
        h = nn.Dense(self.width)(x)
        for _ in range(self.num_layers):
            gamma, beta = jnp.split(nn.Dense(2 * self.width)(emb), 2, axis=-1)
            u = nn.Dense(self.width)(nn.silu(h)) * (1 + gamma) + beta
            h = h + nn.Dense(self.width)(nn.silu(u))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(nn.silu(h))


def get_config():
    """The two-moons toy (configs/toy.py) with ``film_mlp`` as the score network."""
    config = toy.get_config("two_moons")
    config.model.name = "film_mlp"
    config.model.width = 96
    config.model.num_layers = 3
    return config
