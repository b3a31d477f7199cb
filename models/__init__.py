"""Score networks, selected by name from ``config.model.name``.

Every model is a ``flax.linen.Module`` called as ``module.apply({"params": p}, x, labels, train=...)`` with
``x`` of shape (batch, H, W, C) for images or (batch, D) for vectors, ``labels`` of shape (batch,) (the
time/noise conditioning produced by ``sde.model_time``), dropout drawn from the ``"dropout"`` rng, and an output
of the shape of ``x``. What the output means (``config.model.prediction``: eps, score or x0) and what the label
is (``config.model.time_input``) are conventions stored with checkpoints; the SDE turns the output into a score.
Hyper-parameters come from ``config.model`` (and image geometry from ``config.data``) through each class's
``from_config``, once, at this boundary.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Type

import flax.linen as nn
import jax

from sde_lib import PREDICTIONS, SDE, TIME_INPUTS, _qualified

MODELS: Dict[str, Type[nn.Module]] = {}
DISCRETE_TIME_INPUTS = ("index", "sigma_index")


def register_model(name: str):
    """Class decorator adding a model class to ``MODELS`` under ``name``."""

    def wrap(cls):
        old = MODELS.get(name)
        if old is not None and _qualified(old) != _qualified(cls):
            raise ValueError(f"model name {name!r} is already registered to {_qualified(old)}")
        MODELS[name] = cls
        return cls

    return wrap


def get_model(name: str) -> Type[nn.Module]:
    _import_all()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} in config.model.name; registered models: {sorted(MODELS)}")
    return MODELS[name]


def _import_all():
    """Import the model modules so that their ``@register_model`` decorators run."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """A network together with its conventions: what it predicts and what conditioning label it takes."""

    module: nn.Module
    prediction: str = "eps"
    time_input: str = "t999"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"config.model.prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"config.model.time_input={self.time_input!r}; expected one of {TIME_INPUTS}")

    @property
    def conventions(self) -> dict:
        return {"prediction": self.prediction, "time_input": self.time_input}

    def init(self, key: jax.Array, x: jax.Array):
        """Initial parameters for inputs shaped like ``x``."""
        labels = jax.numpy.ones((x.shape[0],))  # not 0: log-σ / Fourier embeddings are undefined there
        return self.module.init({"params": key, "dropout": key}, x, labels, train=False)["params"]

    def output(self, params, sde: SDE, x, t, *, train: bool = False, key: Optional[jax.Array] = None, **kw):
        """Raw network output at (x, t); ``key`` feeds dropout when ``train``."""
        labels = sde.model_time(t, self.time_input)
        rngs = {"dropout": key} if (train and key is not None) else {}
        return self.module.apply({"params": params}, x, labels, train=train, rngs=rngs, **kw)

    def score(self, params, sde: SDE, x, t, *, train=False, key=None, **kw):
        """∇x log p_t(x) as the network represents it."""
        out = self.output(params, sde, x, t, train=train, key=key, **kw)
        return sde.score_from_output(out, x, t, self.prediction, discrete=self.discrete)

    @property
    def discrete(self) -> bool:
        """Whether the network is conditioned on steps of the discrete chain (DDPM index, NCSN σ index)."""
        return self.time_input in DISCRETE_TIME_INPUTS

    def score_fn(self, params, sde: SDE, *, train=False, key=None, **kw) -> Callable:
        """``score_fn(x, t)`` for samplers and likelihoods, which never see networks."""
        return lambda x, t: self.score(params, sde, x, t, train=train, key=key, **kw)


def create_model(config) -> ScoreModel:
    """Build the ``ScoreModel`` of ``config.model`` for data of ``config.data``."""
    cls = get_model(config.model.name)
    module = cls.from_config(config.model, config.data)
    return ScoreModel(module, config.model.prediction, config.model.time_input)
