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

from sde_lib import SDE, DDPMChain, _qualified, batch_broadcast

Array = jax.Array
LossFn = Callable[[dict, Array, dict], Tuple[Array, Dict[str, Array]]]

LOSSES: Dict[str, Callable] = {}

# What a discrete objective needs from the SDE: an attribute every SDE declares, None when it has no such chain
# (decided by the SDE's value, never by its class).
CHAINS: Dict[str, str] = {
    "chain": "the DDPM Markov chain (sde.chain: β_i, ᾱ_i, posterior q(x_{i-1}|x_i,x_0)), e.g. vpsde",
    "discrete_sigmas": "the SMLD/NCSN noise ladder σ_i (sde.discrete_sigmas), e.g. vesde",
}
CONTINUOUS_TIME = set()  # losses that draw t ∈ [eps, T] and accept likelihood weighting / importance sampling
PROJECTIONS = ("gaussian", "rademacher")
TRACES = ("exact", "hutchinson")
VLB_VARIANCES = ("beta", "posterior")


def register_loss(name: str, needs: Tuple[str, ...] = (), continuous_time: bool = False):
    """Function decorator adding a loss factory ``factory(config, sde, model) -> loss_fn`` to ``LOSSES``.

    ``needs`` names the SDE attributes of ``CHAINS`` that must not be None; ``continuous_time`` marks losses over
    t ∈ [eps, T] (which accept ``likelihood_weighting`` and ``importance_sampling``).
    """
    unknown = [n for n in needs if n not in CHAINS]
    if unknown:
        raise ValueError(f"loss {name!r} needs unknown SDE attribute(s) {unknown}; known: {sorted(CHAINS)}")

    def wrap(fn):
        old = LOSSES.get(name)
        if old is not None and _qualified(old) != _qualified(fn):
            raise ValueError(f"loss name {name!r} is already registered to {_qualified(old)}")
        LOSSES[name] = fn
        fn.needs = tuple(needs)
        if continuous_time:
            CONTINUOUS_TIME.add(name)
        return fn

    return wrap


def provides(sde: SDE, needs: Tuple[str, ...]) -> bool:
    """Whether every attribute in ``needs`` (keys of ``CHAINS``) is set (not None) on ``sde``."""
    return all(getattr(sde, a) is not None for a in needs)


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


@register_loss("dsm", continuous_time=True)
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


def time_of(sde: SDE, target, which: str = "sigma", t_max: float | None = None, what: str | None = None,
            grid_size: int = 100_001) -> np.ndarray:
    """Continuous times t ∈ [0, t_max (default T)] with σ(t) = target (``which="sigma"``) or α(t) = target
    (``"alpha"``), by interpolation on a fine grid (σ increases, α decreases in t for the SDEs here).
    ``what`` names the target in error messages (e.g. a config key)."""
    grid = np.linspace(0.0, float(sde.T if t_max is None else t_max), grid_size)
    alpha, sigma = (np.asarray(a, np.float64) for a in sde.alpha_sigma(jnp.asarray(grid, jnp.float32)))
    values = sigma if which == "sigma" else -np.log(alpha)
    target = np.asarray(target, np.float64)
    target = target if which == "sigma" else -np.log(target)
    if np.any(np.diff(values) < 0) or values[-1] <= values[0]:
        raise ValueError(f"{type(sde).__name__}: {which}(t) is not strictly monotone on [0, T]; cannot invert it")
    if np.any(target < values[0]) or np.any(target > values[-1]):
        raise ValueError(f"{what or which}={np.exp(-target) if which == 'alpha' else target} is outside the "
                         f"range of {which}(t) of {type(sde).__name__} on [0, {grid[-1]:g}]: "
                         f"[{np.exp(-values[-1]) if which == 'alpha' else values[0]:g}, "
                         f"{np.exp(-values[0]) if which == 'alpha' else values[-1]:g}]")
    return np.interp(target, values, grid)


# ---- discrete chains: SMLD/NCSN and single-σ DSM --------------------------------------------------------------
def step_time(sde: SDE, i: Array) -> Array:
    """Time t_i = i T / (N - 1) of the 0-based discrete step i: the label a network sees for step i
    (``index`` -> i, ``t999`` -> i for N = 1000, ``sigma`` -> σ_i and ``sigma_index`` -> N-1-i on VE)."""
    return i.astype(jnp.float32) * (sde.T / (sde.N - 1))


@register_loss("smld", needs=("discrete_sigmas",))
def get_smld_loss(config, sde: SDE, model) -> LossFn:
    """NCSN (Song & Ermon 2019): i ~ U{0..N-1}, x̃ = x + σ_i z, loss λ(σ_i) ‖s_θ(x̃, σ_i) + z/σ_i‖², λ = σ²."""
    reduce_mean = config.training.reduce_mean
    sigmas = jnp.asarray(sde.discrete_sigmas, jnp.float32)

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_i, k_z, k_drop = jax.random.split(key, 3)
        i = jax.random.randint(k_i, (x.shape[0],), 0, sde.N)
        sigma, t = sigmas[i], step_time(sde, i)
        z = jax.random.normal(k_z, x.shape, x.dtype)
        score = model.score(params, sde, x + batch_broadcast(sigma, x) * z, t, train=True, key=k_drop)
        return dsm_at(score, z, sigma, jnp.ones_like(sigma), reduce_mean), {"sigma": sigma}

    return loss_fn


@register_loss("dsm_single")
def get_single_sigma_dsm_loss(config, sde: SDE, model) -> LossFn:
    """Vincent (2011) DSM at one noise level σ = ``config.training.single_sigma``: x̃ = α(t₀) x + σ z at the
    time t₀ with σ(t₀) = σ (x̃ = x + σ z on VE), loss ‖σ s_θ(x̃, t₀) + z‖²."""
    reduce_mean = config.training.reduce_mean
    t0 = float(time_of(sde, config.training.get("single_sigma", 0.1)))

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_z, k_drop = jax.random.split(key)
        t = jnp.full((x.shape[0],), t0, jnp.float32)
        x_t, z, sigma = sde.perturb(k_z, x, t)
        score = model.score(params, sde, x_t, t, train=True, key=k_drop)
        return dsm_at(score, z, sigma, jnp.ones_like(sigma), reduce_mean), {"sigma": sigma}

    return loss_fn


# ---- DDPM: L_simple and the variational bound ----------------------------------------------------------------
def ddpm_perturb(chain: DDPMChain, key: Array, x0: Array, i: Array) -> Tuple[Array, Array]:
    """x_i = √ᾱ_i x_0 + √(1-ᾱ_i) ε for 0-based steps i (b,) of the DDPM ``chain``. Returns (x_i, ε)."""
    abar = jnp.asarray(chain.alphas_cumprod, jnp.float32)[i]
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    return batch_broadcast(jnp.sqrt(abar), x0) * x0 + batch_broadcast(jnp.sqrt(1 - abar), x0) * noise, noise


def model_eps(model, params, sde: SDE, x: Array, i: Array, *, train: bool = False, key=None) -> Array:
    """ε̂(x_i, i) of a model at DDPM step i (label time ``step_time``): its raw output when it predicts ε,
    otherwise -√(1-ᾱ_i) times its score (exact on the chain only up to σ(t_i) vs √(1-ᾱ_i))."""
    t = step_time(sde, i)
    if model.prediction == "eps":
        return model.output(params, sde, x, t, train=train, key=key)
    std = jnp.sqrt(1.0 - jnp.asarray(sde.chain.alphas_cumprod, jnp.float32)[i])
    return -batch_broadcast(std, x) * model.score(params, sde, x, t, train=train, key=key)


@register_loss("ddpm", needs=("chain",))
def get_ddpm_loss(config, sde: SDE, model) -> LossFn:
    """DDPM L_simple (Ho et al. 2020 Eq. 14): i ~ U{0..N-1}, ‖ε - ε̂_θ(√ᾱ_i x_0 + √(1-ᾱ_i) ε, i)‖².

    With s = -ε̂/σ_i, σ_i = √(1-ᾱ_i), this is ‖σ_i s + ε‖²: DSM with λ = σ² at the chain's noise levels.
    """
    reduce_mean, chain = config.training.reduce_mean, sde.chain

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_i, k_z, k_drop = jax.random.split(key, 3)
        i = jax.random.randint(k_i, (x.shape[0],), 0, chain.N)
        x_i, noise = ddpm_perturb(chain, k_z, x, i)
        eps_hat = model_eps(model, params, sde, x_i, i, train=True, key=k_drop)
        return reduce_dims((eps_hat - noise) ** 2, reduce_mean), {"step": i.astype(jnp.float32)}

    return loss_fn


def ddpm_model_variance(chain: DDPMChain, variance: str = "beta") -> np.ndarray:
    """σ_i² (N,) of p_θ(x_{i-1}|x_i) = N(μ_θ, σ_i² I): β_i (``"beta"``) or β̃_i (``"posterior"``, with β̃_0 = 0
    replaced by β̃_1 as in Ho et al.'s clipped log-variance)."""
    if variance not in VLB_VARIANCES:
        raise ValueError(f"unknown DDPM decoder variance {variance!r}; expected one of {VLB_VARIANCES}")
    if variance == "beta":
        return np.asarray(chain.betas, np.float64)
    post = np.asarray(chain.posterior_variance, np.float64)
    return np.concatenate([post[1:2], post[1:]])


def ddpm_vlb_weights(chain: DDPMChain, variance: str = "beta") -> np.ndarray:
    """λ_i = β_i² / (2 σ_i² α_i (1-ᾱ_i)) (N,) with L_{i-1} = C_i + λ_i ‖ε - ε̂‖² = C_i + λ_i ‖σ s + ε‖²
    (σ = √(1-ᾱ_i), s = -ε̂/σ): each KL term of the bound is DSM with this weight (Ho et al. Eq. 12)."""
    betas, abar = np.asarray(chain.betas, np.float64), np.asarray(chain.alphas_cumprod, np.float64)
    return betas**2 / (2 * ddpm_model_variance(chain, variance) * (1 - betas) * (1 - abar))


def ddpm_vlb_constants(chain: DDPMChain, variance: str = "beta") -> np.ndarray:
    """C_i per dimension (N,): ½ (log(σ_i²/β̃_i) + β̃_i/σ_i² - 1), the KL of the variances (nats); C_0 unused."""
    var, post = ddpm_model_variance(chain, variance), np.asarray(chain.posterior_variance, np.float64)
    post = np.where(post > 0, post, var)
    return 0.5 * (np.log(var / post) + post / var - 1)


def gaussian_kl(mean1: Array, var1: Array, mean2: Array, var2: Array) -> Array:
    """Elementwise KL(N(mean1, var1) ‖ N(mean2, var2)) in nats."""
    return 0.5 * (jnp.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def _log_ndtr_diff(upper: Array, lower: Array) -> Array:
    """log(Φ(upper) - Φ(lower)) for upper > lower, stable in both tails (uses Φ(-x) = 1 - Φ(x))."""
    flip = lower > 0
    a, b = jnp.where(flip, -lower, upper), jnp.where(flip, -upper, lower)
    log_a = jax.scipy.special.log_ndtr(a)
    return log_a + jnp.log(-jnp.expm1(jnp.minimum(jax.scipy.special.log_ndtr(b) - log_a, -1e-30)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, std: Array, bins: int = 256) -> Array:
    """Elementwise log P(x) of the discretized Gaussian decoder (Ho et al. Eq. 13) for data in [-1, 1] on a
    grid of ``bins`` levels: ∫ N(y; mean, std²) over [x - δ, x + δ] (δ = 1/(bins-1)), edge bins to ±∞."""
    delta = 1.0 / (bins - 1)
    upper = jnp.where(x > 1 - 1e-3, jnp.inf, (x + delta - mean) / std)
    lower = jnp.where(x < -1 + 1e-3, -jnp.inf, (x - delta - mean) / std)
    return _log_ndtr_diff(upper, lower)


def ddpm_model_mean(chain: DDPMChain, x_i: Array, eps_hat: Array, i: Array) -> Array:
    """μ_θ(x_i, i) = (x_i - β_i / √(1-ᾱ_i) ε̂) / √α_i (Ho et al. Eq. 11)."""
    beta = batch_broadcast(jnp.asarray(chain.betas, jnp.float32)[i], x_i)
    abar = batch_broadcast(jnp.asarray(chain.alphas_cumprod, jnp.float32)[i], x_i)
    return (x_i - beta / jnp.sqrt(1 - abar) * eps_hat) / jnp.sqrt(1 - beta)


def ddpm_vlb_step(chain: DDPMChain, x0: Array, x_i: Array, eps_hat: Array, i: Array,
                  variance: str = "beta") -> Array:
    """Term i of the bound in nats (b,): L_0 = -log p_θ(x_0|x_i) (discretized decoder) where i == 0, else
    L_{i-1} = KL(q(x_{i-1}|x_i, x_0) ‖ p_θ(x_{i-1}|x_i)) summed over dimensions. i: 0-based steps (b,)."""
    var = batch_broadcast(jnp.asarray(ddpm_model_variance(chain, variance), jnp.float32)[i], x0)
    mean = ddpm_model_mean(chain, x_i, eps_hat, i)
    post_mean, post_var = chain.posterior(x_i, x0, i)
    post_var = batch_broadcast(jnp.where(i == 0, 1.0, post_var), x0)  # i = 0 takes the decoder branch
    kl = reduce_dims(gaussian_kl(post_mean, post_var, mean, var), reduce_mean=False)
    nll = -reduce_dims(discretized_gaussian_log_likelihood(x0, mean, jnp.sqrt(var)), reduce_mean=False)
    return jnp.where(i == 0, nll, kl)


def ddpm_prior_kl(chain: DDPMChain, x0: Array) -> Array:
    """L_T = KL(q(x_{N-1}|x_0) ‖ N(0, I)) in nats (b,)."""
    abar = float(chain.alphas_cumprod[-1])
    const = -abar - np.log1p(-abar)  # (1 - ᾱ) - 1 - log(1 - ᾱ) without cancellation
    return 0.5 * reduce_dims(abar * x0**2 + const, reduce_mean=False)


def _eps_fn_from_score(sde: SDE, score_fn, score_times=None):
    """ε̂(x_i, i) = -√(1-ᾱ_i) s(x_i, t̂_i), by default at the times where α(t̂_i) = √ᾱ_i (the continuous
    marginal equal to the chain's; for the last steps slightly beyond T, where the SDE formulas still hold)."""
    if score_times is None:
        score_times = time_of(sde, np.sqrt(sde.chain.alphas_cumprod), "alpha", t_max=1.2 * sde.T)
    times = jnp.asarray(score_times, jnp.float32)
    std = jnp.sqrt(1.0 - jnp.asarray(sde.chain.alphas_cumprod, jnp.float32))
    return lambda x, i: -batch_broadcast(std[i], x) * score_fn(x, times[i])


def ddpm_vlb_terms(sde: SDE, x0: Array, key: Array, *, eps_fn=None, score_fn=None, score_times=None,
                   steps=None, variance: str = "beta") -> Dict[str, Array]:
    """The DDPM variational bound L_T + Σ_{i≥1} L_{i-1} + L_0 of a batch x0 (b, ...) of 8-bit data in [-1, 1],
    in bits/dim. Give ``eps_fn(x_i, i) -> ε̂`` (i: 0-based steps (b,) int32) or ``score_fn(x, t) -> score``
    (called at ``score_times[i]``, default: α(t) = √ᾱ_i). ``steps``: the 0-based steps to evaluate (default
    all N; a uniform random subset gives an unbiased estimate). Returns ``prior`` (b,), ``terms`` (b, n) and
    ``total`` = prior + N · mean(terms) (b,), exact when all steps are evaluated.
    """
    if (eps_fn is None) == (score_fn is None):
        raise ValueError("ddpm_vlb_terms needs exactly one of eps_fn or score_fn")
    eps_fn = eps_fn if score_fn is None else _eps_fn_from_score(sde, score_fn, score_times)
    chain = sde.chain
    steps = jnp.arange(chain.N) if steps is None else jnp.asarray(steps, jnp.int32)
    b, bpd = x0.shape[0], 1.0 / (np.prod(x0.shape[1:]) * np.log(2.0))

    def term(step):
        i = jnp.full((b,), step, jnp.int32)
        x_i, _ = ddpm_perturb(chain, jax.random.fold_in(key, step), x0, i)
        return ddpm_vlb_step(chain, x0, x_i, eps_fn(x_i, i), i, variance)

    terms = jax.lax.map(term, steps).T * bpd
    prior = ddpm_prior_kl(chain, x0) * bpd
    return {"prior": prior, "terms": terms, "total": prior + chain.N * jnp.mean(terms, axis=1)}


@register_loss("ddpm_vlb", needs=("chain",))
def get_ddpm_vlb_loss(config, sde: SDE, model) -> LossFn:
    """One-step unbiased estimate of the DDPM bound in bits/dim: L_T + N L_i, i ~ U{0..N-1}."""
    variance, chain = config.training.get("vlb_variance", "beta"), sde.chain

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_i, k_z, k_drop = jax.random.split(key, 3)
        i = jax.random.randint(k_i, (x.shape[0],), 0, chain.N)
        x_i, _ = ddpm_perturb(chain, k_z, x, i)
        eps_hat = model_eps(model, params, sde, x_i, i, train=True, key=k_drop)
        nats = ddpm_prior_kl(chain, x) + chain.N * ddpm_vlb_step(chain, x, x_i, eps_hat, i, variance)
        return nats / (np.prod(x.shape[1:]) * np.log(2.0)), {"step": i.astype(jnp.float32)}

    return loss_fn


# ---- implicit and sliced score matching ------------------------------------------------------------------------
def projections(key: Array, shape, kind: str = "gaussian", n: int = 1) -> Array:
    """n random directions (n, *shape) with E[v vᵀ] = I: standard Gaussian or Rademacher (±1)."""
    if kind == "gaussian":
        return jax.random.normal(key, (n,) + tuple(shape))
    if kind == "rademacher":
        return jax.random.rademacher(key, (n,) + tuple(shape)).astype(jnp.float32)
    raise ValueError(f"unknown projection {kind!r}; expected one of {PROJECTIONS}")


def jacobian_trace(score_fn, x: Array) -> Tuple[Array, Array]:
    """(s(x), tr ∇ₓ s(x) (b,)) exactly, with one JVP per data dimension (low dimension only). ``score_fn``
    maps (b, ...) -> (b, ...) with examples independent, so one JVP gives every example's column."""
    d = int(np.prod(x.shape[1:]))
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
    jvp = lambda e: jax.jvp(score_fn, (x,), (jnp.broadcast_to(e, x.shape),))
    s, cols = jax.vmap(jvp, out_axes=(None, 0))(basis)
    diag = jnp.einsum("dbd->b", cols.reshape(d, x.shape[0], d))
    return s, diag


def projected_jacobian(score_fn, x: Array, v: Array) -> Tuple[Array, Array]:
    """(s(x), vᵀ ∇ₓ s(x) v (n, b)) for directions v (n, b, ...)."""
    s, jv = jax.vmap(lambda u: jax.jvp(score_fn, (x,), (u,)), out_axes=(None, 0))(v)
    return s, jnp.sum((v * jv).reshape(v.shape[0], x.shape[0], -1), axis=-1)


def ism_objective(score_fn, x: Array, key: Array | None = None, *, trace: str = "exact",
                  projection: str = "rademacher", n_projections: int = 1) -> Array:
    """Hyvärinen's implicit score matching ½‖s(x)‖² + tr ∇ₓ s(x) (b,), the trace exact or a Hutchinson
    estimate mean_v vᵀ ∇ₓs v. Equals ½ E‖s - ∇log p‖² minus a constant in expectation over x ~ p."""
    if trace == "exact":
        s, tr = jacobian_trace(score_fn, x)
    elif trace == "hutchinson":
        s, vjv = projected_jacobian(score_fn, x, projections(key, x.shape, projection, n_projections))
        tr = jnp.mean(vjv, axis=0)
    else:
        raise ValueError(f"unknown trace estimator {trace!r}; expected one of {TRACES}")
    return 0.5 * reduce_dims(s**2, reduce_mean=False) + tr


def ssm_objective(score_fn, x: Array, key: Array, *, variance_reduction: bool = False,
                  projection: str = "gaussian", n_projections: int = 1) -> Array:
    """Sliced score matching (Song et al. 2019) (b,): mean_v [vᵀ ∇ₓs v + ½ (vᵀ s)²]; SSM-VR replaces
    ½ (vᵀ s)² by its expectation ½ ‖s‖². Both are unbiased estimates of ``ism_objective``."""
    v = projections(key, x.shape, projection, n_projections)
    s, vjv = projected_jacobian(score_fn, x, v)
    if variance_reduction:
        return jnp.mean(vjv, axis=0) + 0.5 * reduce_dims(s**2, reduce_mean=False)
    vs = jnp.sum((v * s).reshape(v.shape[0], x.shape[0], -1), axis=-1)
    return jnp.mean(vjv + 0.5 * vs**2, axis=0)


def noise_conditional_loss(config, sde: SDE, model, objective) -> LossFn:
    """Apply a score-matching ``objective(score_fn, x_t, key) -> (b,)`` at x_t ~ p_t, t drawn as in DSM.

    Loss 2 λ(t) objective (divided by the dimension with ``reduce_mean``): since E objective = ½ E‖s - ∇log p_t‖²
    - C_t, this has the same expected gradient as the DSM loss λ(t) ‖s + z/σ‖².
    """
    tc = config.training
    sampler = TimeSampler(sde, training_eps(config, sde), tc.likelihood_weighting, tc.importance_sampling)

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_t, k_z, k_drop, k_v = jax.random.split(key, 4)
        t, weight = sampler(k_t, x.shape[0])
        x_t, _, sigma = sde.perturb(k_z, x, t)
        score_fn = lambda y: model.score(params, sde, y, t, train=True, key=k_drop)
        obj = objective(score_fn, x_t, k_v) / (np.prod(x.shape[1:]) if tc.reduce_mean else 1)
        return 2 * weight * sigma**2 * obj, {"t": t, "sigma": sigma, "objective": obj}

    return loss_fn


def _projection_options(config) -> dict:
    tc = config.training
    return {"projection": tc.get("projection", "rademacher"), "n_projections": tc.get("n_projections", 1)}


@register_loss("ism", continuous_time=True)
def get_ism_loss(config, sde: SDE, model) -> LossFn:
    """Implicit score matching on p_t; ``config.training.ism_trace``: exact (low dimension) or hutchinson."""
    opts = dict(trace=config.training.get("ism_trace", "exact"), **_projection_options(config))
    return noise_conditional_loss(config, sde, model, lambda f, x, k: ism_objective(f, x, k, **opts))


@register_loss("ssm", continuous_time=True)
def get_ssm_loss(config, sde: SDE, model) -> LossFn:
    """Sliced score matching on p_t with ``config.training.projection`` / ``n_projections`` directions."""
    opts = _projection_options(config)
    return noise_conditional_loss(config, sde, model, lambda f, x, k: ssm_objective(f, x, k, **opts))


@register_loss("ssm_vr", continuous_time=True)
def get_ssm_vr_loss(config, sde: SDE, model) -> LossFn:
    """Sliced score matching with variance reduction (SSM-VR) on p_t."""
    opts = _projection_options(config)
    return noise_conditional_loss(
        config, sde, model, lambda f, x, k: ssm_objective(f, x, k, variance_reduction=True, **opts))


# ---- guidance: a noise-conditional classifier and classifier-free guidance -------------------------------------
@register_loss("classifier")
def get_classifier_loss(config, sde: SDE, model) -> LossFn:
    """Noise-conditional classifier: cross-entropy -log p_θ(y | x_t, t) on x_t ~ p_t(x_t | x_0), t ~ U[eps, T]
    (``batch["label"]`` the class). Metrics: accuracy and t."""
    eps = training_eps(config, sde)

    def loss_fn(params, key, batch):
        x, y = batch["x"], batch["label"].astype(jnp.int32)
        k_t, k_z, k_drop = jax.random.split(key, 3)
        t = eps + jax.random.uniform(k_t, (x.shape[0],)) * (sde.T - eps)
        x_t, _, _ = sde.perturb(k_z, x, t)
        logits = model.output(params, sde, x_t, t, train=True, key=k_drop)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_p, y[:, None], axis=1)[:, 0]
        return nll, {"accuracy": (jnp.argmax(logits, -1) == y).astype(jnp.float32), "t": t}

    return loss_fn


@register_loss("dsm_cfg", continuous_time=True)
def get_cfg_dsm_loss(config, sde: SDE, model) -> LossFn:
    """DSM of a class-conditional model s_θ(x, t, y) with label dropout: y replaced by the null label ∅ =
    ``config.data.num_classes`` with probability ``config.training.label_dropout`` (Ho & Salimans 2022)."""
    tc = config.training
    p_drop, null = float(tc.get("label_dropout", 0.1)), int(config.data.num_classes)
    sampler = TimeSampler(sde, training_eps(config, sde), tc.likelihood_weighting, tc.importance_sampling)

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_t, k_z, k_drop, k_y = jax.random.split(key, 4)
        y = jnp.where(jax.random.uniform(k_y, (x.shape[0],)) < p_drop, null, batch["label"].astype(jnp.int32))
        t, weight = sampler(k_t, x.shape[0])
        x_t, z, sigma = sde.perturb(k_z, x, t)
        score = model.score(params, sde, x_t, t, train=True, key=k_drop, y=y)
        return dsm_at(score, z, sigma, weight, tc.reduce_mean), {"t": t}

    return loss_fn


# ---- config-time checks and selection -------------------------------------------------------------------------
def resolve_loss_name(config, sde: SDE) -> str:
    """The registered loss ``config.training`` selects: ``loss``, except that ``dsm`` with ``continuous=False``
    is the discrete objective of the SDE's own chain (``ddpm`` for a DDPM chain, ``smld`` for a σ ladder)."""
    name = config.training.loss
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} in config.training.loss; registered losses: {sorted(LOSSES)}")
    if config.training.get("continuous", True) or name not in CONTINUOUS_TIME:
        return name
    if name != "dsm":
        raise ValueError(f"config.training.continuous=False is only defined for loss 'dsm' (it selects the SDE's "
                         f"discrete chain); config.training.loss={name!r} is a continuous-time objective")
    for chain, discrete in (("chain", "ddpm"), ("discrete_sigmas", "smld")):
        if provides(sde, (chain,)):
            return discrete
    raise ValueError(f"config.training.continuous=False with loss 'dsm' needs an SDE with a discrete chain "
                     f"(DDPM or SMLD); {type(sde).__name__} (config.sde.name) has none")


def _compatible_losses(sde: SDE) -> list:
    return sorted(n for n, f in LOSSES.items() if provides(sde, f.needs))


def _check_options(config, sde: SDE, name: str) -> None:
    tc = config.training
    for key, valid in (("projection", PROJECTIONS), ("ism_trace", TRACES), ("vlb_variance", VLB_VARIANCES)):
        if tc.get(key, valid[0]) not in valid:
            raise ValueError(f"config.training.{key}={tc.get(key)!r}; expected one of {valid}")
    if int(tc.get("n_projections", 1)) < 1:
        raise ValueError(f"config.training.n_projections={tc.get('n_projections')} must be >= 1")
    eps = training_eps(config, sde)
    if not 0 < eps < sde.T:
        raise ValueError(f"config.training.eps={eps} must lie in (0, T={sde.T})")
    if name == "dsm_single":
        time_of(sde, tc.get("single_sigma", 0.1), "sigma", what="config.training.single_sigma")
    if name == "ddpm_vlb" and not config.data.get("centered", True):
        raise ValueError("loss 'ddpm_vlb' (discretized decoder) needs data in [-1, 1]: set config.data.centered=True")


def check_loss_config(config, sde: SDE) -> None:
    """Raise a ValueError naming the config key when the objective is unknown, incompatible with ``sde`` (decided
    by the SDE's chains, see ``CHAINS``), or given options it does not take."""
    name = resolve_loss_name(config, sde)
    for need in LOSSES[name].needs:
        if not provides(sde, (need,)):
            raise ValueError(
                f"config.training.loss={name!r} needs {CHAINS[need]}, which the SDE "
                f"config.sde.name={config.sde.get('name', type(sde).__name__)!r} does not provide; "
                f"losses usable with it: {_compatible_losses(sde)}")
    for flag in ("likelihood_weighting", "importance_sampling"):
        if config.training.get(flag, False) and name not in CONTINUOUS_TIME:
            raise ValueError(f"config.training.{flag}=True applies to continuous-time losses "
                             f"{sorted(CONTINUOUS_TIME)}, not to {name!r}")
    _check_options(config, sde, name)


def get_loss_fn(config, sde: SDE, model) -> LossFn:
    """``loss_fn(params, key, batch) -> (per_example_loss (b,), metrics)`` of ``config.training.loss``."""
    check_loss_config(config, sde)
    return LOSSES[resolve_loss_name(config, sde)](config, sde, model)
