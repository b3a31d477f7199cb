"""Tests of losses.py against closed forms (Gaussian data N(μ, s² I)) and by training a 2-D mixture toy."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
from analytic import GaussianMixture
from configs.base import get_base_config
from sde_lib import get_sde

MU, S, D = 0.7, 0.5, 3


def make_config(loss="dsm", sde="vpsde", **training):
    config = get_base_config()
    config.training.loss = loss
    config.sde.name = sde
    for k, v in training.items():
        config.training[k] = v
    return config


@dataclasses.dataclass(frozen=True)
class AnalyticModel:
    """Stand-in for models.ScoreModel whose score is the exact perturbed score of ``mixture``."""

    mixture: GaussianMixture
    prediction: str = "score"

    def score(self, params, sde, x, t, train=False, key=None):
        return self.mixture.score_t(sde, x, t)

    def output(self, params, sde, x, t, train=False, key=None):
        return sde.output_from_score(self.score(params, sde, x, t), x, t, self.prediction)


GAUSS = GaussianMixture(np.ones(1), np.full((1, D), MU), np.full((1, D), S))


def gaussian_dsm_integrand(sde, t, likelihood_weighting, reduce_mean):
    """w(t) E‖σ s* + z‖² = w(t) D m²s²/(m²s² + σ²) at the optimal score, w = 1 or g²/σ²."""
    t = jnp.asarray(t, jnp.float32)
    m, sigma = (np.asarray(a, np.float64) for a in sde.alpha_sigma(t))
    value = m**2 * S**2 / (m**2 * S**2 + sigma**2) * (1 if reduce_mean else D)
    if likelihood_weighting:
        value = value * np.asarray(losses.diffusion_sq(sde, t), np.float64) / sigma**2
    return value


def mc_mean(loss_fn, n_batches=8, b=8192, seed=0):
    x = GAUSS.sample(jax.random.key(seed + 1000), n_batches * b).reshape(n_batches, b, D)
    f = jax.jit(lambda k, x: loss_fn({}, k, {"x": x, "label": jnp.zeros(b, jnp.int32)})[0])
    vals = np.concatenate([np.asarray(f(jax.random.key(seed + i), x[i])) for i in range(n_batches)])
    return vals.mean(), vals.std() / np.sqrt(vals.size)


@pytest.mark.parametrize("sde_name,lw,is_,reduce_mean", [
    ("vpsde", False, False, True), ("vpsde", True, False, False), ("vpsde", True, True, True),
    ("vesde", False, False, False), ("subvpsde", True, True, False), ("vesde", True, True, True)])
def test_dsm_optimal_score_matches_closed_form(sde_name, lw, is_, reduce_mean):
    config = make_config("dsm", sde_name, likelihood_weighting=lw, importance_sampling=is_,
                         reduce_mean=reduce_mean)
    sde = get_sde(config.sde)
    eps = losses.training_eps(config, sde)
    mean, se = mc_mean(losses.get_loss_fn(config, sde, AnalyticModel(GAUSS)))
    grid = np.exp(np.linspace(np.log(eps), np.log(sde.T), 200_001))
    exact = np.trapezoid(gaussian_dsm_integrand(sde, grid, lw, reduce_mean), grid) / (sde.T - eps)
    print(f"{sde_name} lw={lw} is={is_}: MC {mean:.5f} ± {se:.5f}, exact {exact:.5f}")
    assert abs(mean - exact) < 4 * se + 1e-4 * abs(exact)
