"""Closed-form distributions for testing samplers, likelihoods and losses against exact answers.

A Gaussian mixture p_0 = Σ_k w_k N(μ_k, diag(s_k²)) pushed through any affine SDE stays a Gaussian mixture:
p_t = Σ_k w_k N(α(t) μ_k, diag(α(t)² s_k² + σ(t)²)), so its score ∇x log p_t and density log p_t are exact.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Σ_k w_k N(μ_k, diag(s_k²)) on R^D. ``means`` (K, D); ``stds`` (K, D) or (K,); ``weights`` (K,)."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    def __post_init__(self):
        w = np.asarray(self.weights, np.float64)
        mu = np.atleast_2d(np.asarray(self.means, np.float64))
        s = np.asarray(self.stds, np.float64)
        s = np.broadcast_to(s.reshape(s.shape + (1,) * (2 - s.ndim)), mu.shape).copy()
        if w.shape != (mu.shape[0],) or np.any(w < 0) or not np.isclose(w.sum(), 1.0):
            raise ValueError(f"weights must be K={mu.shape[0]} non-negative numbers summing to 1, got {w}")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "stds", s)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, key: Array, n: int, return_components: bool = False):
        """n samples (n, D); with ``return_components`` also the component index of each."""
        kc, kz = jax.random.split(key)
        comp = jax.random.choice(kc, len(self.weights), (n,), p=jnp.asarray(self.weights))
        z = jax.random.normal(kz, (n, self.dim))
        x = jnp.asarray(self.means)[comp] + jnp.asarray(self.stds)[comp] * z
        return (x, comp) if return_components else x

    def _component_terms(self, x: Array, mean: Array, var: Array) -> Tuple[Array, Array]:
        """log w_k + log N(x; mean_k, var_k) (batch, K) and per-component scores (batch, K, D)."""
        diff = x[:, None, :] - mean
        log_n = -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
        return jnp.log(jnp.asarray(self.weights, x.dtype)) + log_n, -diff / var

    def _perturbed_params(self, sde, t: Array):
        alpha, sigma = sde.alpha_sigma(t)
        mean = alpha[:, None, None] * jnp.asarray(self.means, jnp.float32)
        var = (alpha[:, None, None] * jnp.asarray(self.stds, jnp.float32)) ** 2 + sigma[:, None, None] ** 2
        return mean, var

    def log_prob_t(self, sde, x: Array, t: Array) -> Array:
        """log p_t(x) (batch,) under ``sde``; x of shape (batch, D) (or (batch, ...) flattened)."""
        x = x.reshape(x.shape[0], -1)
        mean, var = self._perturbed_params(sde, t)
        log_terms, _ = self._component_terms(x, mean, var)
        return logsumexp(log_terms, axis=-1)

    def score_t(self, sde, x: Array, t: Array) -> Array:
        """∇x log p_t(x) = Σ_k r_k(x) (-(x - α μ_k) / var_k), r_k the component responsibilities."""
        shape = x.shape
        x = x.reshape(shape[0], -1)
        mean, var = self._perturbed_params(sde, t)
        log_terms, scores = self._component_terms(x, mean, var)
        resp = jax.nn.softmax(log_terms, axis=-1)
        return jnp.sum(resp[..., None] * scores, axis=1).reshape(shape)

    def responsibilities_t(self, sde, x: Array, t: Array) -> Array:
        """p_t(k | x) (batch, K): the exact noise-conditional posterior over components."""
        mean, var = self._perturbed_params(sde, t)
        log_terms, _ = self._component_terms(x.reshape(x.shape[0], -1), mean, var)
        return jax.nn.softmax(log_terms, axis=-1)

    def score_fn(self, sde):
        """``score_fn(x, t)`` of the perturbed mixture, for samplers and likelihoods."""
        return lambda x, t: self.score_t(sde, x, t)

    def log_prob(self, x: Array) -> Array:
        """log p_0(x) (batch,)."""
        log_terms, _ = self._component_terms(x.reshape(x.shape[0], -1), jnp.asarray(self.means, x.dtype),
                                             jnp.asarray(self.stds, x.dtype) ** 2)
        return logsumexp(log_terms, axis=-1)


def sliced_wasserstein(key: Array, x: Array, y: Array, n_projections: int = 128) -> Array:
    """Sliced 1-Wasserstein distance between two equal-size samples (n, D): mean over random unit directions
    of the 1-D W1 distance between sorted projections."""
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {x.shape} and {y.shape}")
    theta = jax.random.normal(key, (x.shape[1], n_projections))
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    px, py = jnp.sort(x @ theta, axis=0), jnp.sort(y @ theta, axis=0)
    return jnp.mean(jnp.abs(px - py))
