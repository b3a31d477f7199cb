"""Training objectives of score-based generative modelling, selected by ``config.training.loss``.

Every loss is built by a factory ``factory(config, sde, model) -> loss_fn`` registered in ``LOSSES``, and
``loss_fn(params, key, batch) -> (per_example_loss (b,), metrics)`` is pure and jittable; ``batch["x"]`` is
(b, ...). Metrics are per-example arrays (b,); the train step averages them over the batch and devices.

Convention of the denoising family (as in the SDE paper's code): with x_t = α(t) x_0 + σ(t) z, the loss is
λ(t) ‖s_θ(x_t, t) + z / σ(t)‖² without a factor ½, which with λ = σ² is ‖σ s_θ + z‖² (= ‖ε̂ - z‖² for an
ε-predicting network). ``reduce_mean`` averages over data dimensions instead of summing.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sde_lib import SDE, batch_broadcast

Array = jax.Array
LossFn = Callable[[dict, Array, dict], Tuple[Array, Dict[str, Array]]]

LOSSES: Dict[str, Callable] = {}


def register_loss(name: str):
    """Function decorator adding a loss factory ``factory(config, sde, model) -> loss_fn`` to ``LOSSES``."""

    def wrap(fn):
        if name in LOSSES and LOSSES[name] is not fn:
            raise ValueError(f"loss name {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return wrap


# ---- helpers -----------------------------------------------------------------------------------------------
def reduce_dims(x: Array, reduce_mean: bool) -> Array:
    """Mean (``reduce_mean``) or sum over all non-batch axes: (b, ...) -> (b,)."""
    x = x.reshape(x.shape[0], -1)
    return jnp.mean(x, axis=-1) if reduce_mean else jnp.sum(x, axis=-1)


def training_eps(config, sde: SDE) -> float:
    """Smallest training time: ``config.training.eps`` or, when unset, the SDE's ``eps``."""
    eps = config.training.get("eps", None)
    return float(sde.eps if eps is None else eps)


def diffusion_sq(sde: SDE, t: Array) -> Array:
    """g(t)² (shape of t) of the forward SDE."""
    return sde.sde(jnp.zeros((t.shape[0], 1)), t)[1] ** 2


def denoising_error(score: Array, z: Array, sigma: Array) -> Array:
    """The DSM residual σ s + z per element (the ε-prediction error ε̂ - z up to sign); σ of shape (b,)."""
    return batch_broadcast(sigma, score) * score + z


# ---- continuous-time denoising score matching ---------------------------------------------------------------
class TimeSampler:
    """Draws t on [eps, T] for the DSM loss and returns the matching estimator weight.

    Uniform: t ~ U[eps, T], weight λ(t)/σ(t)². Importance sampling: t ~ q(t) ∝ λ(t)/σ(t)² (the weight of
    ‖σ s + z‖²), drawn by inverting the piecewise-linear CDF of a fine log-spaced grid, with weight
    λ(t)/(σ(t)² q(t) (T - eps)) under the *actual* piecewise-constant density q, so that both estimate the
    same E_{t~U[eps,T]}[λ(t)/σ(t)² ‖σ s + z‖²] exactly in expectation.
    """

    def __init__(self, sde: SDE, eps: float, likelihood_weighting: bool, importance_sampling: bool,
                 grid_size: int = 4096):
        self.sde, self.eps, self.T = sde, eps, float(sde.T)
        self.likelihood_weighting, self.importance_sampling = likelihood_weighting, importance_sampling
        if importance_sampling:
            grid = np.exp(np.linspace(np.log(eps), np.log(self.T), grid_size))
            w = np.asarray(self.weight(jnp.asarray(grid, jnp.float32)), np.float64)
            mass = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(grid))])
            self.grid, self.cdf = jnp.asarray(grid, jnp.float32), jnp.asarray(mass / mass[-1], jnp.float32)
            self.density = jnp.asarray(np.diff(mass / mass[-1]) / np.diff(grid), jnp.float32)

    def weight(self, t: Array) -> Array:
        """λ(t)/σ(t)²: 1 for λ = σ², g(t)²/σ(t)² for likelihood weighting."""
        if not self.likelihood_weighting:
            return jnp.ones_like(t)
        return diffusion_sq(self.sde, t) / self.sde.alpha_sigma(t)[1] ** 2

    def __call__(self, key: Array, b: int) -> Tuple[Array, Array]:
        """(t (b,), estimator weight (b,))."""
        u = jax.random.uniform(key, (b,))
        if not self.importance_sampling:
            t = self.eps + u * (self.T - self.eps)
            return t, self.weight(t)
        k = jnp.clip(jnp.searchsorted(self.cdf, u, side="right") - 1, 0, self.density.shape[0] - 1)
        t = self.grid[k] + (u - self.cdf[k]) / self.density[k]
        t = jnp.clip(t, self.grid[k], self.grid[k + 1])
        return t, self.weight(t) / (self.density[k] * (self.T - self.eps))


def dsm_at(score: Array, z: Array, sigma: Array, weight: Array, reduce_mean: bool) -> Array:
    """Per-example weight · reduce ‖σ s + z‖² (b,); weight = λ(t)/σ(t)² times any importance weight."""
    return weight * reduce_dims(denoising_error(score, z, sigma) ** 2, reduce_mean)


@register_loss("dsm")
def get_dsm_loss(config, sde: SDE, model) -> LossFn:
    """Continuous DSM (SDE paper Eq. 7): E_t λ(t) E ‖s_θ(x_t, t) + z/σ(t)‖², t ~ U[eps, T] (or importance
    sampled), λ = σ² (default) or g² (``likelihood_weighting``, the score-flow bound)."""
    tc = config.training
    sampler = TimeSampler(sde, training_eps(config, sde), tc.likelihood_weighting, tc.importance_sampling)

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_t, k_z, k_drop = jax.random.split(key, 3)
        t, weight = sampler(k_t, x.shape[0])
        x_t, z, sigma = sde.perturb(k_z, x, t)
        score = model.score(params, sde, x_t, t, train=True, key=k_drop)
        losses = dsm_at(score, z, sigma, weight, tc.reduce_mean)
        return losses, {"t": t, "sigma": sigma}

    return loss_fn


# ---- config-time checks and selection -------------------------------------------------------------------------
def resolve_loss_name(config, sde: SDE) -> str:
    """The registered loss ``config.training`` selects (``dsm`` with ``continuous=False`` is the SDE's chain)."""
    name = config.training.loss
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} in config.training.loss; registered losses: {sorted(LOSSES)}")
    return name


def check_loss_config(config, sde: SDE) -> None:
    """Raise a ValueError naming the config key when the objective is unknown or incompatible with ``sde``."""
    resolve_loss_name(config, sde)


def get_loss_fn(config, sde: SDE, model) -> LossFn:
    """``loss_fn(params, key, batch) -> (per_example_loss (b,), metrics)`` of ``config.training.loss``."""
    check_loss_config(config, sde)
    return LOSSES[resolve_loss_name(config, sde)](config, sde, model)
