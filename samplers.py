"""Samplers for score-based models: every method is one jitted on-device loop driven by ``(sde, score_fn)``.

Entry points: ``sample(key, sde, score_fn, shape, method="pc", **options) -> (x, nfe)`` and
``sample_from_config(key, sde, score_fn, shape, sampling_cfg)``. ``score_fn(x, t)`` takes x (batch, ...) and
t (batch,) and returns ∇x log p_t(x). Samplers never branch on the SDE type: they use only its methods
(``sde``, ``alpha_sigma``, ``discretize``, ``ancestral_step``, ``langevin_alpha``, ``prior_sampling``, ...).

Methods (``SAMPLERS``): ``pc`` (predictor-corrector, SDE paper Alg. 1-5), ``ode`` (probability flow with
diffrax), ``ddim``, ``dpm_solver++`` (2M/3M), ``heun`` (EDM), ``langevin`` (plain Langevin at one noise level)
and ``annealed_langevin`` (NCSN). ``nfe`` counts score evaluations of the whole batch.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sde_lib import SDE, batch_broadcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
SamplerFn = Callable[[Array], Tuple[Array, Array]]   # key -> (samples, nfe)


# ---- shared helpers ------------------------------------------------------------------------------------------
def _tb(t, x: Array) -> Array:
    """A scalar time broadcast to the batch: shape (batch,)."""
    return jnp.full((x.shape[0],), t, x.dtype)


def _alpha_sigma(sde: SDE, t) -> Tuple[Array, Array]:
    """α(t), σ(t) of a scalar time as scalars."""
    alpha, sigma = sde.alpha_sigma(jnp.reshape(jnp.asarray(t, jnp.float32), (1,)))
    return alpha[0], sigma[0]


def tweedie(sde: SDE, score_fn: ScoreFn, x: Array, t) -> Array:
    """Tweedie's denoiser E[x_0 | x_t] = (x + σ(t)² ∇log p_t(x)) / α(t) (one score evaluation)."""
    alpha, sigma = _alpha_sigma(sde, t)
    return (x + sigma**2 * score_fn(x, _tb(t, x))) / alpha


def _noise(key: Array, x: Array) -> Array:
    return jax.random.normal(key, x.shape, x.dtype)


def check_eps(sde: SDE, eps: Optional[float]) -> float:
    """The smallest sampling time: ``eps`` or the SDE's own; must lie in (0, T)."""
    eps = sde.eps if eps is None else float(eps)
    if not 0.0 < eps < sde.T:
        raise ValueError(f"sampling eps={eps} must lie in (0, T={sde.T}) (option 'eps' / config.sampling.eps)")
    return eps


def _positive(name: str, value) -> None:
    if value is None or not value > 0:
        raise ValueError(f"sampling option {name!r} must be > 0, got {value!r}")


def _lookup(registry: Dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(registry)}")
    return registry[name]


# ---- predictors: x at time t -> x at t_next < t -----------------------------------------------------------
class Predictor(NamedTuple):
    """``step(key, x, t, t_next) -> x``; ``nfe`` score evaluations per step; ``chain``: follows the SDE's
    discrete chain of ``sde.N`` steps (then the sampler must use exactly ``sde.N`` noise levels)."""

    step: Callable
    nfe: int
    chain: bool = False


def euler_maruyama(sde: SDE, score_fn: ScoreFn, **_) -> Predictor:
    """Reverse SDE by Euler–Maruyama: x ← x + [f - g² s] Δt + g √|Δt| z with Δt = t_next - t < 0."""
    rsde = sde.reverse(score_fn)

    def step(key, x, t, t_next):
        drift, g = rsde.sde(x, _tb(t, x))
        dt = t_next - t
        return x + drift * dt + batch_broadcast(g, x) * jnp.sqrt(-dt) * _noise(key, x)

    return Predictor(step, 1)


def reverse_diffusion(sde: SDE, score_fn: ScoreFn, **_) -> Predictor:
    """Reverse of the SDE's discrete chain (SDE paper Eq. 46): x ← x - f_i + G_i² s + G_i z."""
    rsde = sde.reverse(score_fn)

    def step(key, x, t, t_next):
        f, G = rsde.discretize(x, _tb(t, x))
        return x - f + batch_broadcast(G, x) * _noise(key, x)

    return Predictor(step, 1, chain=True)


def ancestral_sampling(sde: SDE, score_fn: ScoreFn, ancestral_variance: Optional[str] = None, **_) -> Predictor:
    """Ancestral sampling of the discrete chain (DDPM for VP, SMLD for VE): x ← mean + std z from
    ``sde.ancestral_step``; ``ancestral_variance`` picks the chain's variance ("beta" or "beta_tilde")."""
    kwargs = {} if ancestral_variance is None else {"variance": ancestral_variance}

    def step(key, x, t, t_next):
        tb = _tb(t, x)
        mean, std = sde.ancestral_step(x, tb, score_fn(x, tb), **kwargs)
        return mean + batch_broadcast(std, x) * _noise(key, x)

    return Predictor(step, 1, chain=True)


def no_predictor(sde: SDE, score_fn: ScoreFn, **_) -> Predictor:
    """Identity (corrector-only sampling, e.g. annealed Langevin dynamics)."""
    return Predictor(lambda key, x, t, t_next: x, 0)


PREDICTORS = {"euler_maruyama": euler_maruyama, "reverse_diffusion": reverse_diffusion,
              "ancestral_sampling": ancestral_sampling, "none": no_predictor}


# ---- correctors: n_steps of Langevin MCMC targeting p_t ------------------------------------------------------
class Corrector(NamedTuple):
    """``step(key, x, t) -> x`` runs all ``n_steps`` inner steps; ``nfe`` score evaluations per call."""

    step: Callable
    nfe: int


def _langevin_loop(score_fn: ScoreFn, step_size: Callable, n_steps: int):
    """n_steps of x ← x + h s(x) + √(2h) z with h = step_size(x, t, s, z) (per example, shape (batch,))."""

    def run(key, x, t):
        tb = _tb(t, x)

        def body(j, x):
            s, z = score_fn(x, tb), _noise(jax.random.fold_in(key, j), x)
            h = batch_broadcast(step_size(x, tb, s, z), x)
            return x + h * s + jnp.sqrt(2 * h) * z

        return jax.lax.fori_loop(0, n_steps, body, x)

    return run


def _norm(v: Array) -> Array:
    return jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1)


def langevin(sde: SDE, score_fn: ScoreFn, snr: float, n_steps: int, **_) -> Corrector:
    """Langevin corrector (SDE paper Alg. 4/5): h = 2 α_i (snr ‖z‖ / ‖s‖)² with the norms averaged over the
    (global) batch as in the paper; per-example norms make h explode where ‖s‖ ≈ 0 in low dimension."""
    _positive("snr", snr)

    def step_size(x, t, s, z):
        return 2 * sde.langevin_alpha(t) * (snr * jnp.mean(_norm(z)) / jnp.mean(_norm(s))) ** 2

    return Corrector(_langevin_loop(score_fn, step_size, n_steps), n_steps)


def ald(sde: SDE, score_fn: ScoreFn, snr: float, n_steps: int, sigma_L: float,
        ald_step_size: Optional[float] = None, **_) -> Corrector:
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Alg. 1): h_i = ε σ_i² / σ_L², σ_L the smallest
    noise level of the schedule. Default ε = 2 snr² σ_L², i.e. h_i = 2 (snr σ_i)² as score_sde's ALD corrector."""
    eps = 2 * snr**2 * sigma_L**2 if ald_step_size is None else ald_step_size
    _positive("snr" if ald_step_size is None else "ald_step_size", eps)

    def step_size(x, t, s, z):
        return eps * sde.alpha_sigma(t)[1] ** 2 / sigma_L**2

    return Corrector(_langevin_loop(score_fn, step_size, n_steps), n_steps)


def no_corrector(sde: SDE, score_fn: ScoreFn, **_) -> Corrector:
    return Corrector(lambda key, x, t: x, 0)


CORRECTORS = {"langevin": langevin, "ald": ald, "none": no_corrector}


def ncsnv2_step_size(sigma_L: float, gamma: float, n_steps: int) -> float:
    """NCSNv2 (Song & Ermon 2020, Technique 4): the ε for which
    (1 - ε/σ_L²)^{2T} (γ² - 2ε/(σ_L² - σ_L²(1 - ε/σ_L²)²)) + 2ε/(σ_L² - σ_L²(1 - ε/σ_L²)²) is closest to 1,
    with γ = σ_{i-1}/σ_i > 1 the ratio of consecutive noise levels and T = n_steps per level."""
    eps = sigma_L**2 * np.logspace(-8, np.log10(0.999), 20000)
    a = 1 - eps / sigma_L**2
    b = 2 * eps / (sigma_L**2 - sigma_L**2 * a**2)
    value = a ** (2 * n_steps) * (gamma**2 - b) + b
    return float(eps[np.argmin(np.abs(value - 1.0))])


# ---- sharding -------------------------------------------------------------------------------------------------
def batch_sharding(shape, mesh="auto") -> Optional[NamedSharding]:
    """Sharding of the batch axis over all devices of ``mesh`` ("auto": every device; None: no sharding).

    Returns None when there is a single device. The batch must divide evenly over the devices."""
    if mesh is None:
        return None
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be a jax.sharding.Mesh, 'auto' or None, got {mesh!r}")
        if jax.device_count() == 1:
            return None
        mesh = Mesh(np.array(jax.devices()), ("data",))
    n = mesh.devices.size
    if n == 1:
        return None
    if shape[0] % n:
        raise ValueError(f"batch size {shape[0]} (shape {tuple(shape)}) is not divisible by the {n} devices of the "
                         f"mesh; use a multiple of {n} or pass mesh=None to sample on one device")
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def _shard(x: Array, sharding) -> Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _jit(fn: Callable, sharding) -> SamplerFn:
    """jit a ``key -> (x, nfe)`` function, with x sharded over the batch when ``sharding`` is given."""
    if sharding is None:
        return jax.jit(fn)
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    return jax.jit(fn, out_shardings=(sharding, replicated))


# ---- the predictor-corrector sampler ---------------------------------------------------------------------------
def pc_step_fn(sde: SDE, score_fn: ScoreFn, predictor: Predictor, corrector: Corrector) -> Callable:
    """One PC iteration ``(key, x, t, t_next) -> x``: correct at t, then predict to t_next."""

    def step(key, x, t, t_next):
        x = corrector.step(jax.random.fold_in(key, 0), x, t)
        return predictor.step(jax.random.fold_in(key, 1), x, t, t_next)

    return step


def build_pc(sde: SDE, score_fn: ScoreFn, shape, predictor: str = "euler_maruyama", corrector: str = "langevin",
             snr: float = 0.16, n_steps: int = 1, num_steps: Optional[int] = None, denoise: bool = True,
             eps: Optional[float] = None, ald_step_size: Optional[float] = None,
             ancestral_variance: Optional[str] = None, mesh="auto") -> Tuple[SamplerFn, int]:
    """PC sampler on the grid t_i = linspace(T, eps, num_steps) (default ``sde.N``): at each t_i run the
    corrector, then predict to t_{i+1}; at t = eps run the corrector and (``denoise``) Tweedie's denoiser.

    NFE = (num_steps - 1)·P + num_steps·C·n_steps + denoise, with P, C the per-step costs (0 for "none")."""
    eps = check_eps(sde, eps)
    num_steps = sde.N if num_steps is None else int(num_steps)
    _positive("num_steps", num_steps)
    if n_steps < 0:
        raise ValueError(f"sampling option 'n_steps' (corrector steps per level) must be >= 0, got {n_steps}")
    pred = _lookup(PREDICTORS, predictor, "predictor")(sde, score_fn, ancestral_variance=ancestral_variance)
    if pred.chain and num_steps != sde.N:
        raise ValueError(f"predictor {predictor!r} follows the SDE's discrete chain of sde.N={sde.N} steps but "
                         f"num_steps={num_steps}; build the SDE with N={num_steps} or use 'euler_maruyama'")
    sigma_L = float(_alpha_sigma(sde, eps)[1])
    corr = _lookup(CORRECTORS, corrector, "corrector")(sde, score_fn, snr=snr, n_steps=n_steps, sigma_L=sigma_L,
                                                       ald_step_size=ald_step_size)
    sharding = batch_sharding(shape, mesh)
    ts = jnp.asarray(np.linspace(sde.T, eps, num_steps), jnp.float32)
    step = pc_step_fn(sde, score_fn, pred, corr)
    nfe = (num_steps - 1) * pred.nfe + num_steps * corr.nfe + int(denoise)

    def run(key):
        k_prior, k_loop = jax.random.split(key)
        x = _shard(sde.prior_sampling(k_prior, shape), sharding)

        def body(x, i):
            return step(jax.random.fold_in(k_loop, i), x, ts[i], ts[i + 1]), None

        x, _ = jax.lax.scan(body, x, jnp.arange(num_steps - 1))
        x = corr.step(jax.random.fold_in(k_loop, num_steps - 1), x, ts[-1])
        if denoise:
            x = tweedie(sde, score_fn, x, ts[-1])
        return x, jnp.asarray(nfe)

    return _jit(run, sharding), nfe


# ---- entry points -------------------------------------------------------------------------------------------------
SAMPLERS: Dict[str, Callable] = {"pc": build_pc}


def build_sampler(sde: SDE, score_fn: ScoreFn, shape, method: str = "pc", **options) -> Tuple[SamplerFn, object]:
    """The jitted sampler ``key -> (x, nfe)`` of ``method`` and its NFE (an int, or None when it is only known
    after solving, as for adaptive ODE solvers). Unknown options raise a ValueError listing the valid ones."""
    builder = _lookup(SAMPLERS, method, "sampling method")
    valid = [p for p in inspect.signature(builder).parameters if p not in ("sde", "score_fn", "shape")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampling method {method!r}; valid options: {valid}")
    return builder(sde, score_fn, tuple(shape), **options)


def sample(key: Array, sde: SDE, score_fn: ScoreFn, shape, method: str = "pc", **options) -> Tuple[Array, int]:
    """Draw samples of ``shape`` (batch first) with ``method``; returns (x, nfe) with nfe the number of
    batched score evaluations."""
    fn, _ = build_sampler(sde, score_fn, shape, method, **options)
    x, nfe = fn(key)
    return x, int(nfe)


def options_from_config(sampling_cfg, method: Optional[str] = None) -> dict:
    """The options of ``sampling_cfg.method`` found in the config section (None values mean 'default')."""
    method = sampling_cfg.method if method is None else method
    builder = _lookup(SAMPLERS, method, "config.sampling.method")
    names = [p for p in inspect.signature(builder).parameters if p not in ("sde", "score_fn", "shape", "mesh")]
    return {k: sampling_cfg[k] for k in names if k in sampling_cfg and sampling_cfg[k] is not None}


def sample_from_config(key: Array, sde: SDE, score_fn: ScoreFn, shape, sampling_cfg, mesh="auto"):
    """``sample`` with the method and options of ``config.sampling``."""
    return sample(key, sde, score_fn, shape, sampling_cfg.method, mesh=mesh, **options_from_config(sampling_cfg))
