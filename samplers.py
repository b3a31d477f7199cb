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

import inspect
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sde_lib import SDE, _qualified, batch_broadcast
from utils import lazy_import


diffrax = lazy_import("diffrax")  # 0.4 s of every start-up (with equinox, lineax, optimistix): ODE solvers only

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


def check_eps(sde: SDE, eps: Optional[float], name: str = "eps") -> float:
    """The smallest sampling time: ``eps`` or the SDE's own; must lie in (0, T)."""
    eps = sde.eps if eps is None else float(eps)
    if not 0.0 < eps < sde.T:
        raise ValueError(f"sampling {name}={eps} must lie in (0, T={sde.T}) (option {name!r} / "
                         f"config.sampling.{name})")
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
    if ald_step_size is None:
        _positive("snr", snr)
    eps = 2 * snr**2 * sigma_L**2 if ald_step_size is None else ald_step_size
    _positive("ald_step_size", eps)

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
def batch_sharding(shape, mesh: Optional[Mesh] = None) -> Optional[NamedSharding]:
    """Sharding of the batch axis over all devices of ``mesh`` (None, or a mesh of one device: no sharding).
    Samplers never build a mesh; the caller passes its own. The batch must divide evenly over the devices."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
    n = mesh.devices.size
    if n == 1:
        return None
    if shape[0] % n:
        raise ValueError(f"batch size {shape[0]} (shape {tuple(shape)}) is not divisible by the {n} devices of the "
                         f"mesh; use a multiple of {n} or pass mesh=None to sample on one device")
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def _shard(x: Array, sharding) -> Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _jit(fn: Callable, sharding, trajectory: bool = False) -> SamplerFn:
    """jit a ``(key, x_init=None) -> (x, nfe[, trajectory])`` function, with x (and the trajectory's x) sharded
    over the batch when ``sharding`` is given."""
    if sharding is None:
        return jax.jit(fn)
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    out = (sharding, replicated)
    if trajectory:
        out += ({"t": replicated, "x": NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))},)
    return jax.jit(fn, out_shardings=out)


def _initial(sde: SDE, key: Array, shape, x_init: Optional[Array], sharding) -> Array:
    """The sampler's starting point: ``x_init`` when given (its shape must be ``shape``), else a prior sample
    drawn from ``key``."""
    if x_init is None:
        return _shard(sde.prior_sampling(key, shape), sharding)
    if tuple(jnp.shape(x_init)) != tuple(shape):
        raise ValueError(f"x_init has shape {tuple(jnp.shape(x_init))} but the sample shape is {tuple(shape)}")
    return _shard(jnp.asarray(x_init, jnp.float32), sharding)


def _outputs(x: Array, nfe, ts: Array, x0: Array, xs: Optional[Array]) -> tuple:
    """``(x, nfe)``, plus ``{"t": ts (K,), "x": (K, *shape)}`` (x at every grid time, from the start x0 to
    before denoising) when the loop recorded its steps ``xs``."""
    if xs is None:
        return x, jnp.asarray(nfe)
    return x, jnp.asarray(nfe), {"t": ts, "x": jnp.concatenate([x0[None], xs])}


def _with_default_x_init(run: Callable, x_init: Optional[Array]) -> Callable:
    """``run(key, x_init=None)`` whose missing x_init falls back to the builder's ``x_init``."""
    if x_init is None:
        return run
    default = x_init

    def fn(key, x_init=None):
        return run(key, default if x_init is None else x_init)

    return fn


# ---- time grids passed as arrays ------------------------------------------------------------------------------
def check_time_array(sde: SDE, ts) -> Array:
    """A user's time grid: a strictly decreasing 1-D array of >= 2 times in (0, T] (shape (K,), float32)."""
    ts = np.asarray(ts, np.float64)
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"a time grid array must be 1-D with >= 2 times, got shape {ts.shape}")
    if not np.all(np.isfinite(ts)) or not np.all(np.diff(ts) < 0):
        raise ValueError(f"a time grid array must be finite and strictly decreasing (T towards 0), got {ts}")
    if ts[0] > sde.T * (1 + 1e-6) or ts[-1] <= 0:
        raise ValueError(f"time grid times must lie in (0, T={sde.T}], got [{ts[-1]:g}, {ts[0]:g}]")
    return jnp.asarray(ts, jnp.float32)


def resolve_grid(sde: SDE, grid, num_steps: int, eps: Optional[float]) -> Array:
    """The times T..eps a grid sampler visits: ``grid`` names a kind of ``time_grid`` (``num_steps`` nodes down
    to ``eps``) or is the times themselves as an array (which then fixes the number of steps and eps)."""
    if isinstance(grid, str):
        return time_grid(sde, int(num_steps), check_eps(sde, eps), grid)
    return check_time_array(sde, grid)


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
             ancestral_variance: Optional[str] = None, grid="uniform", mesh: Optional[Mesh] = None,
             project: Optional[Callable] = None, x_init: Optional[Array] = None,
             trajectory: bool = False) -> Tuple[SamplerFn, int]:
    """PC sampler on ``num_steps`` (default ``sde.N``) times t_i from T to eps (``grid``, see ``resolve_grid``:
    a kind, "uniform" is t_i = linspace(T, eps, num_steps) and the only one for chain predictors, or an array of
    times): at each t_i run the corrector, then predict to t_{i+1}; at t = eps run the corrector and (``denoise``)
    Tweedie's denoiser. Starts from ``x_init`` (builder or call argument) or a prior sample; ``trajectory``:
    also return x at every grid time (see ``_outputs``).

    NFE = (num_steps - 1)·P + num_steps·C·n_steps + denoise, with P, C the per-step costs (0 for "none").
    ``project(key, x, t) -> x`` (optional) runs on the prior sample and after every corrector and predictor step,
    at the time that step ends at (e.g. inpainting's replacement of the known pixels); not after denoising."""
    ts = resolve_grid(sde, grid, sde.N if num_steps is None else num_steps, eps)
    num_steps, eps = len(ts), float(ts[-1])
    if n_steps < 0:
        raise ValueError(f"sampling option 'n_steps' (corrector steps per level) must be >= 0, got {n_steps}")
    pred = _lookup(PREDICTORS, predictor, "predictor")(sde, score_fn, ancestral_variance=ancestral_variance)
    _check_chain(sde, pred, predictor, num_steps, grid)
    sigma_L = float(_alpha_sigma(sde, eps)[1])
    corr = _lookup(CORRECTORS, corrector, "corrector")(sde, score_fn, snr=snr, n_steps=n_steps, sigma_L=sigma_L,
                                                       ald_step_size=ald_step_size)
    if project is not None:
        pred, corr = _projected(pred, corr, project)
    sharding = batch_sharding(shape, mesh)
    step = pc_step_fn(sde, score_fn, pred, corr)
    nfe = (num_steps - 1) * pred.nfe + num_steps * corr.nfe + int(denoise)

    def run(key, x_init=None):
        k_prior, k_loop = jax.random.split(key)
        x = x0 = _initial(sde, k_prior, shape, x_init, sharding)
        if project is not None:
            x = x0 = project(jax.random.fold_in(k_prior, 1), x, ts[0])

        def body(x, i):
            x = step(jax.random.fold_in(k_loop, i), x, ts[i], ts[i + 1])
            return x, (x if trajectory else None)

        x, xs = jax.lax.scan(body, x, jnp.arange(num_steps - 1))
        x = corr.step(jax.random.fold_in(k_loop, num_steps - 1), x, ts[-1])
        if denoise:
            x = tweedie(sde, score_fn, x, ts[-1])
        return _outputs(x, nfe, ts, x0, xs)

    return _jit(_with_default_x_init(run, x_init), sharding, trajectory), nfe


def _check_chain(sde: SDE, pred: Predictor, name: str, num_steps: int, grid) -> None:
    """A chain predictor (``Predictor.chain``) runs only on the SDE's own uniform grid of sde.N steps."""
    if pred.chain and (num_steps != sde.N or not isinstance(grid, str) or grid != "uniform"):
        raise ValueError(f"predictor {name!r} follows the SDE's discrete chain of sde.N={sde.N} uniform steps "
                         f"but num_steps={num_steps}, grid={grid!r}; build the SDE with N={num_steps} or use "
                         f"'euler_maruyama'")


def _projected(pred: Predictor, corr: Corrector, project: Callable) -> Tuple[Predictor, Corrector]:
    """The predictor and corrector, each followed by ``project(key, x, t)`` at the time its step ends at."""
    sub = lambda key: jax.random.fold_in(key, 0x5EED)
    p_step = lambda key, x, t, t_next: project(sub(key), pred.step(key, x, t, t_next), t_next)
    c_step = lambda key, x, t: project(sub(key), corr.step(key, x, t), t)
    return pred._replace(step=p_step), corr._replace(step=c_step)


# ---- time grids for the fast solvers --------------------------------------------------------------------------
def log_snr(sde: SDE, t: Array) -> Array:
    """λ(t) = log(α(t)/σ(t)), decreasing in t (shape of t)."""
    alpha, sigma = sde.alpha_sigma(t)
    return jnp.log(alpha) - jnp.log(sigma)


def t_from_log_snr(sde: SDE, lam: Array, iters: int = 60) -> Array:
    """Inverse of λ(t) on [0, T] by bisection (λ is monotone for every SDE here); lam of shape (n,)."""
    lam = jnp.asarray(lam, jnp.float32)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = log_snr(sde, mid) > lam           # λ(mid) > λ  <=>  mid < t(λ)
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(lam), jnp.full_like(lam, sde.T)))
    return 0.5 * (lo + hi)


def time_grid(sde: SDE, n: int, eps: float, kind: str = "uniform", rho: float = 7.0) -> Array:
    """n times from T down to eps: ``uniform`` in t, uniform in ``log_snr`` λ, or ``karras`` (EDM, Karras et al.
    2022 Eq. 5): σ̃_i = (σ̃_max^{1/ρ} + i/(n-1) (σ̃_min^{1/ρ} - σ̃_max^{1/ρ}))^ρ with σ̃ = σ/α = e^{-λ}."""
    _lookup(GRIDS, kind, "time grid")
    if n < 2:
        raise ValueError(f"a time grid needs num_steps >= 2, got {n}")
    if kind == "uniform":
        return jnp.asarray(np.linspace(sde.T, eps, n), jnp.float32)
    lam_T, lam_eps = (float(v) for v in log_snr(sde, jnp.array([sde.T, eps], jnp.float32)))
    if kind == "log_snr":
        lam = np.linspace(lam_T, lam_eps, n)
    else:
        s_max, s_min = np.exp(-lam_T), np.exp(-lam_eps)
        lam = -rho * np.log(s_max ** (1 / rho) + np.linspace(0, 1, n) * (s_min ** (1 / rho) - s_max ** (1 / rho)))
    ts = t_from_log_snr(sde, jnp.asarray(lam, jnp.float32))
    return ts.at[0].set(sde.T).at[-1].set(eps)


GRIDS = {"uniform": "uniform in t", "log_snr": "uniform in λ = log(α/σ)", "karras": "EDM, ρ=7 in σ/α"}


# ---- the grid-step protocol: DDIM, DPM-Solver++, Heun and user samplers ---------------------------------------------
class GridStep(NamedTuple):
    """One step of a grid sampler: ``step(key, x, state, i, t, t_next) -> (x, state)`` moves x (batch, ...) from
    the grid time t = ts[i] to t_next = ts[i + 1] with ``nfe`` score evaluations of the batch; ``init(x) -> state``
    is what the loop carries between steps (a multistep solver's history; default nothing)."""

    step: Callable
    nfe: int
    init: Callable = lambda x: ()


def grid_sampler(sde: SDE, score_fn: ScoreFn, shape, ts, step: GridStep, denoise: bool = True,
                 mesh: Optional[Mesh] = None, project: Optional[Callable] = None, x_init: Optional[Array] = None,
                 trajectory: bool = False) -> Tuple[SamplerFn, int]:
    """The jitted ``fn(key, x_init=None) -> (x, nfe[, trajectory])`` of ``step`` on the times ``ts`` (K,), and its
    NFE = (K - 1)·step.nfe + denoise: x = ``x_init`` or a prior sample at ts[0], one step per interval, then
    Tweedie's denoiser at ts[-1] (``denoise``). The batch is sharded over ``mesh`` (None: one device).
    ``project(key, x, t) -> x`` (optional, e.g. inpainting) runs on the start and after every step at the time
    it ends at; the state keeps the unprojected values. ``trajectory``: also x at every grid time (``_outputs``)."""
    sharding, nfe = batch_sharding(shape, mesh), (len(ts) - 1) * step.nfe + int(denoise)
    advance = step.step if project is None else _projected_grid_step(step.step, project)

    def run(key, x_init=None):
        k_prior, k_loop = jax.random.split(key)
        x = x0 = _initial(sde, k_prior, shape, x_init, sharding)
        if project is not None:
            x = x0 = project(jax.random.fold_in(k_prior, 1), x, ts[0])

        def body(carry, i):
            x, state = advance(jax.random.fold_in(k_loop, i), *carry, i, ts[i], ts[i + 1])
            return (x, state), (x if trajectory else None)

        (x, _), xs = jax.lax.scan(body, (x, step.init(x)), jnp.arange(len(ts) - 1))
        x = tweedie(sde, score_fn, x, ts[-1]) if denoise else x
        return _outputs(x, nfe, ts, x0, xs)

    return _jit(_with_default_x_init(run, x_init), sharding, trajectory), nfe


def _projected_grid_step(step: Callable, project: Callable) -> Callable:
    """``step`` followed by ``project`` at t_next (the multistep state keeps the unprojected predictions)."""

    def projected(key, x, state, i, t, t_next):
        x, state = step(key, x, state, i, t, t_next)
        return project(jax.random.fold_in(key, 0x5EED), x, t_next), state

    return projected


def grid_method(make_step: Callable, num_steps: int = 50, grid="uniform") -> Callable:
    """A ``SAMPLERS`` builder from ``make_step(sde, score_fn, ts, **options) -> GridStep``: ``builder(sde,
    score_fn, shape, num_steps, grid, denoise=True, eps=None, mesh=None, project=None, x_init=None,
    trajectory=False, **options)`` takes ``num_steps`` times of the named ``grid`` down to ``eps``, or the array
    ``grid`` (``resolve_grid``), and runs ``grid_sampler``. make_step's keyword parameters are its further options."""
    def build(sde, score_fn, shape, num_steps=num_steps, grid=grid, denoise=True, eps=None, mesh=None,
              project=None, x_init=None, trajectory=False, **options):
        ts = resolve_grid(sde, grid, num_steps, eps)
        return grid_sampler(sde, score_fn, shape, ts, make_step(sde, score_fn, ts, **options), denoise, mesh,
                            project, x_init, trajectory)

    keyword = inspect.Parameter.KEYWORD_ONLY
    common = list(inspect.signature(build).parameters.values())[:-1]
    own = [p.replace(kind=keyword) for p in list(inspect.signature(make_step).parameters.values())[3:]]
    build.__signature__ = inspect.Signature(common + own)
    build.__module__, build.__name__, build.__qualname__ = (make_step.__module__, make_step.__name__,
                                                            make_step.__qualname__)
    build.__doc__ = make_step.__doc__
    return build


# ---- DDIM --------------------------------------------------------------------------------------------------------
def ddim_step(sde: SDE, score_fn: ScoreFn, ts: Array, eta: float = 0.0) -> GridStep:
    """DDIM (Song et al. 2021, Eq. 12) for any α, σ, η=0 deterministic, η=1 DDPM-like: with x̂0 = (x + σ² s)/α and
    ε̂ = -σ s, x' = α' x̂0 + √(σ'² - c²) ε̂ + c z, c = η σ' √(1 - (α σ' / (α' σ))²) (the posterior std times η).
    NFE = num_steps - 1 + denoise (the final Tweedie step is DDIM's last x̂0)."""
    if eta < 0:
        raise ValueError(f"sampling option 'eta' must be >= 0, got {eta}")

    def step(key, x, state, i, t, t_next):
        (a, s), (a2, s2) = _alpha_sigma(sde, t), _alpha_sigma(sde, t_next)
        score = score_fn(x, _tb(t, x))
        x0, eps_hat = (x + s**2 * score) / a, -s * score
        c = eta * s2 * jnp.sqrt(jnp.maximum(1 - (a * s2 / (a2 * s)) ** 2, 0.0))
        return a2 * x0 + jnp.sqrt(s2**2 - c**2) * eps_hat + c * _noise(key, x), state

    return GridStep(step, 1)


build_ddim = grid_method(ddim_step, num_steps=100, grid="uniform")


# ---- DPM-Solver++ (multistep, data prediction) --------------------------------------------------------------------
def _dpmpp_update(order: int):
    """x_t from x_s with data predictions m0 (at s), m1, m2 (earlier) and log-SNRs (Lu et al. 2022, DPM-Solver++
    Alg. 2 and the official third-order multistep rule); φ1 = e^{-h} - 1, φ2 = φ1/h + 1, φ3 = φ2/h - ½."""

    def update(x, m, lam, lam_t, ratio, alpha_t):
        h = lam_t - lam[0]
        phi1 = jnp.expm1(-h)
        out = ratio * x - alpha_t * phi1 * m[0]
        if order == 1:
            return out
        r0 = (lam[0] - lam[1]) / h
        d1_0 = (m[0] - m[1]) / r0
        if order == 2:
            return out - 0.5 * alpha_t * phi1 * d1_0
        r1 = (lam[1] - lam[2]) / h
        d1_1 = (m[1] - m[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi2 = phi1 / h + 1
        return out + alpha_t * phi2 * d1 - alpha_t * (phi2 / h - 0.5) * d2

    return update


def dpmpp_step(sde: SDE, score_fn: ScoreFn, ts: Array, order: int = 2) -> GridStep:
    """DPM-Solver++(2M / 3M), default grid uniform in λ; state = (previous data predictions (2, ...), their λ
    (2,)). The first steps use lower orders (not enough history) and, below 10 steps, so do the last
    (``lower_order_final``). NFE = num_steps - 1 + denoise."""
    if order not in (1, 2, 3):
        raise ValueError(f"sampling option 'order' of dpm_solver++ must be 1, 2 or 3, got {order}")
    updates, n_steps_total = [_dpmpp_update(k) for k in (1, 2, 3)], len(ts) - 1

    def step(key, x, state, i, t, t_next):
        m_prev, lam_prev = state
        (a, s), (a2, s2) = _alpha_sigma(sde, t), _alpha_sigma(sde, t_next)
        m0 = (x + s**2 * score_fn(x, _tb(t, x))) / a
        lam0, lam_t = jnp.log(a / s), jnp.log(a2 / s2)
        m, lam = jnp.concatenate([m0[None], m_prev]), jnp.concatenate([lam0[None], lam_prev])
        k = jnp.minimum(order, i + 1)
        if n_steps_total < 10:
            k = jnp.minimum(k, n_steps_total - i)
        x = jax.lax.switch(k - 1, updates, x, m, lam, lam_t, s2 / s, a2)
        return x, (m[:2], lam[:2])

    init = lambda x: (jnp.zeros((2,) + x.shape, x.dtype), jnp.zeros((2,), jnp.float32))
    return GridStep(step, 1, init)


build_dpm_solver_pp = grid_method(dpmpp_step, num_steps=20, grid="log_snr")


# ---- Heun (EDM) ----------------------------------------------------------------------------------------------------
def heun_step(sde: SDE, score_fn: ScoreFn, ts: Array) -> GridStep:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1), default the Karras (ρ=7) grid: Heun's
    2nd-order step of the probability-flow ODE in x̃ = x/α, σ̃ = σ/α, dx̃/dσ̃ = (x̃ - D(x̃; σ̃)) / σ̃ with D Tweedie's
    x̂0; the final Euler step to σ̃ = 0 is Tweedie's denoiser. NFE = 2 (num_steps - 1) + denoise (35 for 18)."""

    def step(key, x, state, i, t, t_next):
        (a, s), (a2, s2) = _alpha_sigma(sde, t), _alpha_sigma(sde, t_next)
        sg, sg2 = s / a, s2 / a2
        xt = x / a
        d = (xt - tweedie(sde, score_fn, x, t)) / sg
        xt2 = xt + (sg2 - sg) * d
        d2 = (xt2 - tweedie(sde, score_fn, a2 * xt2, t_next)) / sg2
        return a2 * (xt + (sg2 - sg) * 0.5 * (d + d2)), state

    return GridStep(step, 2)


build_heun = grid_method(heun_step, num_steps=18, grid="karras")


# ---- probability-flow ODE (diffrax) ---------------------------------------------------------------------------------
ODE_SOLVERS = {"tsit5": ("Tsit5", True), "dopri5": ("Dopri5", True), "rk45": ("Dopri5", True),
               "euler": ("Euler", False), "heun": ("Heun", False)}   # name -> (diffrax solver class name, adaptive)
# "rk45" is Dopri5 under diffrax's I controller, which is scipy's solve_ivp RK45 (score_sde's ODE sampler and
# likelihood): the same Dormand-Prince 5(4) pair, RMS error norm of err / (atol + rtol max(|y0|, |y1|)), error
# exponent 1/5, safety 0.9, step factors in [0.2, 10]; its NFE at equal rtol/atol is scipy's to within a few per
# cent. The default Tsit5 estimates its error more conservatively and takes ~25% more. See docs/conventions.md.


def ode_nfe(solver: diffrax.AbstractSolver, num_steps: Array) -> Array:
    """Vector-field evaluations of a diffrax solve of ``num_steps`` attempted (accepted or rejected) steps: the
    stages of the Runge–Kutta tableau per step, less a first-same-as-last (FSAL) stage reused from the step
    before, plus that one once at the start; Euler one per step. Tsit5 / Dopri5: 1 + 6n, Heun: 2n, Dopri8:
    1 + 13n. (diffrax 0.7's PID controller picks its first step without evaluating the field.)"""
    tableau = getattr(solver, "tableau", None)
    if tableau is None:
        if not isinstance(solver, diffrax.Euler):
            raise ValueError(f"no evaluation count for the ODE solver {type(solver).__name__} (no tableau)")
        return num_steps
    fsal = int(bool(tableau.fsal))
    return fsal + num_steps * (tableau.num_stages - fsal)


def solve_ode(field: Callable, y0, t0, t1, solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5,
              num_steps: Optional[int] = 100, max_steps: int = 16384, save_ts: Optional[Array] = None, args=None,
              throw: bool = True, solvers: Dict = ODE_SOLVERS):
    """Every diffrax solve of the repository: dy/dt = ``field(t, y, args)`` from t0 to t1 (either direction) with
    ``solvers[solver]`` = (diffrax solver class name, adaptive). Adaptive: PID controller on rtol/atol, first step
    (t1 - t0)/num_steps, or diffrax's own choice when num_steps is None; otherwise num_steps fixed steps.
    Returns (y(t1), or y at ``save_ts`` (times ending at t1; leading axis K); nfe (``ode_nfe``); success), with
    failures (e.g. max_steps used up) raised, or with ``throw=False`` only reported in ``success``."""
    name, adaptive = _lookup(solvers, solver, "ODE solver")
    cls = getattr(diffrax, name)
    if num_steps is not None or not adaptive:
        _positive("num_steps", num_steps)
    if adaptive:
        _positive("rtol", rtol)
        _positive("atol", atol)
    controller = diffrax.PIDController(rtol=rtol, atol=atol) if adaptive else diffrax.ConstantStepSize()
    dt0 = None if num_steps is None else (t1 - t0) / num_steps
    saveat = diffrax.SaveAt(t1=True) if save_ts is None else diffrax.SaveAt(ts=save_ts)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(field), cls(), t0, t1, dt0, y0, args=args, saveat=saveat,
                              stepsize_controller=controller, max_steps=max_steps, throw=throw)
    ys = jax.tree.map(lambda y: y[-1], sol.ys) if save_ts is None else sol.ys
    return ys, ode_nfe(cls(), sol.stats["num_steps"]), sol.result == diffrax.RESULTS.successful


def solve_flow(sde: SDE, score_fn: ScoreFn, x: Array, t0: float, t1: float, solver: str = "tsit5",
               rtol: float = 1e-5, atol: float = 1e-5, num_steps: int = 100, max_steps: int = 16384,
               save_ts: Optional[Array] = None) -> Tuple[Array, Array]:
    """Integrate the probability-flow ODE dx/dt = f(x, t) - ½ g(t)² s(x, t) from t0 to t1 (either direction) with
    ``solve_ode``: Tsit5/Dopri5/RK45 are adaptive (I controller on rtol/atol, first step (t1-t0)/num_steps; "rk45"
    = Dopri5, scipy's RK45 with its NFE at equal rtol/atol); Euler/Heun take ``num_steps`` fixed steps. Returns
    (x(t1), nfe), or with ``save_ts`` (times ending at t1) (x at save_ts (K, ...), nfe)."""
    rsde = sde.reverse(score_fn, probability_flow=True)
    field = lambda t, y, args: rsde.sde(y, _tb(t, y))[0]
    x, nfe, _ = solve_ode(field, x, t0, t1, solver, rtol, atol, num_steps, max_steps, save_ts)
    return x, nfe


def build_ode(sde: SDE, score_fn: ScoreFn, shape, solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5,
              num_steps: int = 100, denoise: bool = True, eps: Optional[float] = None, mesh: Optional[Mesh] = None,
              x_init: Optional[Array] = None, trajectory: bool = False) -> Tuple[SamplerFn, None]:
    """Probability-flow ODE sampler: x(T) = ``x_init`` or a prior sample, solve to eps, then Tweedie's denoiser.
    NFE from diffrax's step counts (+1 for denoising); it is only known after solving, so the returned static
    NFE is None. ``trajectory``: x at ``num_steps`` times uniform in [eps, T] (the solver's own steps differ)."""
    eps, sharding = check_eps(sde, eps), batch_sharding(shape, mesh)
    _lookup(ODE_SOLVERS, solver, "ODE solver")
    ts = jnp.linspace(sde.T, eps, num_steps) if trajectory else None

    def run(key, x_init=None):
        x0 = _initial(sde, jax.random.split(key)[0], shape, x_init, sharding)
        xs, nfe = solve_flow(sde, score_fn, x0, sde.T, eps, solver, rtol, atol, num_steps, save_ts=ts)
        x = xs if ts is None else xs[-1]
        if denoise:
            x, nfe = tweedie(sde, score_fn, x, eps), nfe + 1
        return _outputs(x, nfe, ts, x0, None if ts is None else xs[1:])

    return _jit(_with_default_x_init(run, x_init), sharding, trajectory), None


def ode_encode(sde: SDE, score_fn: ScoreFn, x: Array, eps: Optional[float] = None, **ode_options):
    """Data -> latent: solve the probability-flow ODE from eps to T. Returns (z, nfe)."""
    eps = check_eps(sde, eps)
    z, nfe = jax.jit(lambda x: solve_flow(sde, score_fn, x, eps, sde.T, **ode_options))(x)
    return z, int(nfe)


def ode_decode(sde: SDE, score_fn: ScoreFn, z: Array, eps: Optional[float] = None, **ode_options):
    """Latent -> data: solve the probability-flow ODE from T to eps (no denoising). Returns (x, nfe)."""
    eps = check_eps(sde, eps)
    x, nfe = jax.jit(lambda z: solve_flow(sde, score_fn, z, sde.T, eps, **ode_options))(z)
    return x, int(nfe)


# ---- Langevin dynamics ----------------------------------------------------------------------------------------------
def build_langevin(sde: SDE, score_fn: ScoreFn, shape, num_steps: int = 1000, step_size: Optional[float] = None,
                   t: Optional[float] = None, x_init: Optional[Array] = None, denoise: bool = False,
                   mesh: Optional[Mesh] = None, trajectory: bool = False) -> Tuple[SamplerFn, int]:
    """Plain Langevin dynamics with the score at ONE noise level t (default eps): K = ``num_steps`` steps
    x ← x + ε s(x, t) + √(2ε) z from ``x_init`` (default a prior sample). Default ε = 0.1 σ(t)² is stable but slow
    when the data are much wider than σ(t): pass ``step_size`` for your data scale. NFE = K + denoise."""
    t = check_eps(sde, t, "t")
    eps_step = 0.1 * float(_alpha_sigma(sde, t)[1]) ** 2 if step_size is None else step_size
    _positive("step_size", eps_step)
    _positive("num_steps", num_steps)
    loop = _langevin_loop(score_fn, lambda x, tb, s, z: jnp.full_like(tb, eps_step), 1)
    step = GridStep(lambda key, x, state, i, t_i, t_next: (loop(key, x, t_i), state), 1)
    return grid_sampler(sde, score_fn, shape, jnp.full((num_steps + 1,), t, jnp.float32), step, denoise, mesh,
                        x_init=x_init, trajectory=trajectory)


ALD_SIGMA_MIN = 0.01   # NCSN's smallest noise level σ_L (data in [0, 1] or [-1, 1])


def build_annealed_langevin(sde: SDE, score_fn: ScoreFn, shape, num_steps: int = 100, n_steps: int = 10,
                            snr: float = 0.4, ald_step_size: Optional[float] = None, step_rule: str = "ncsn",
                            grid="log_snr", denoise: bool = True, eps: Optional[float] = None,
                            mesh: Optional[Mesh] = None, x_init: Optional[Array] = None,
                            trajectory: bool = False) -> Tuple[SamplerFn, int]:
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019, Alg. 1) over L = ``num_steps`` noise levels
    σ_i = σ(t_i) on a geometric ladder (``grid="log_snr"``: σ/α geometric, exactly NCSN's for VE), ``n_steps``
    steps of size ε σ_i²/σ_L² per level, then Tweedie's denoiser (NCSNv2). ``step_rule="ncsnv2"`` picks ε by NCSNv2's rule (``ncsnv2_step_size``).
    NFE = L·n_steps + denoise. Default ``eps``: the SDE's, raised where needed so that the smallest level is
    σ/α ≥ 0.01 (NCSN's σ_L; sub-VP's σ(1e-3) ≈ 1e-4 would spend a third of the ladder below any data scale)."""
    if not isinstance(grid, str):
        ts = check_time_array(sde, grid)
        num_steps, eps = len(ts), float(ts[-1])
    if eps is None:
        eps = max(sde.eps, float(t_from_log_snr(sde, jnp.array([-np.log(ALD_SIGMA_MIN)]))[0]))
    eps = check_eps(sde, eps)
    if step_rule not in ("ncsn", "ncsnv2"):
        raise ValueError(f"unknown step_rule {step_rule!r}; expected one of ['ncsn', 'ncsnv2']")
    if step_rule == "ncsnv2":
        sigma_max, sigma_L = (float(_alpha_sigma(sde, u)[1]) for u in (sde.T, eps))
        gamma = (sigma_max / sigma_L) ** (1.0 / max(num_steps - 1, 1))
        ald_step_size = ncsnv2_step_size(sigma_L, gamma, n_steps)
    return build_pc(sde, score_fn, shape, predictor="none", corrector="ald", snr=snr, n_steps=n_steps,
                    num_steps=num_steps, denoise=denoise, eps=eps, ald_step_size=ald_step_size, grid=grid,
                    mesh=mesh, x_init=x_init, trajectory=trajectory)


# ---- entry points -------------------------------------------------------------------------------------------------
SAMPLERS: Dict[str, Callable] = {"pc": build_pc, "ode": build_ode, "ddim": build_ddim,
                                 "dpm_solver++": build_dpm_solver_pp, "heun": build_heun,
                                 "langevin": build_langevin, "annealed_langevin": build_annealed_langevin}


def register_sampler(name: str, builder: Optional[Callable] = None):
    """Add ``builder(sde, score_fn, shape, **options) -> (jitted fn(key, x_init=None) -> (x, nfe), nfe)`` to
    ``SAMPLERS`` under ``name`` (a grid step becomes one with ``grid_method``); without ``builder``, a decorator.
    A name already registered to another function (by module and qualified name) is an error."""
    if builder is None:
        return lambda fn: register_sampler(name, fn)
    old = SAMPLERS.get(name)
    if old is not None and _qualified(old) != _qualified(builder):
        raise ValueError(f"sampler name {name!r} is already registered to {_qualified(old)}")
    SAMPLERS[name] = builder
    return builder


def methods_with(option: str) -> Tuple[str, ...]:
    """The registered sampling methods whose builder takes ``option`` (e.g. ``project``: the inpainting hook)."""
    return tuple(m for m, b in SAMPLERS.items() if option in inspect.signature(b).parameters)


def build_sampler(sde: SDE, score_fn: ScoreFn, shape, method: str = "pc", **options) -> Tuple[SamplerFn, object]:
    """The jitted sampler ``fn(key, x_init=None) -> (x, nfe)`` of ``method`` and its NFE (an int, or None when it
    is only known after solving, as for adaptive ODE solvers). Build once, call with many keys; ``x_init`` (same
    shape as the samples) replaces the prior sample; with option ``trajectory=True`` fn returns a third value
    {"t": (K,), "x": (K, *shape)}. Unknown options raise a ValueError listing the valid ones."""
    builder = _lookup(SAMPLERS, method, "sampling method")
    valid = [p for p in inspect.signature(builder).parameters if p not in ("sde", "score_fn", "shape")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampling method {method!r}; valid options: {valid}")
    return builder(sde, score_fn, tuple(shape), **options)


def sample(key: Array, sde: SDE, score_fn: ScoreFn, shape, method: str = "pc", **options) -> Tuple[Array, int]:
    """Draw samples of ``shape`` (batch first) with ``method``; returns (x, nfe) with nfe the number of
    batched score evaluations, and the trajectory dict third when ``trajectory=True``."""
    fn, _ = build_sampler(sde, score_fn, shape, method, **options)
    out = fn(key)
    return (out[0], int(out[1])) + tuple(out[2:])


def options_from_config(sampling_cfg, method: Optional[str] = None) -> dict:
    """The options of ``sampling_cfg.method`` found in the config section (None values mean 'default')."""
    method = sampling_cfg.method if method is None else method
    builder = _lookup(SAMPLERS, method, "config.sampling.method")
    names = [p for p in inspect.signature(builder).parameters if p not in ("sde", "score_fn", "shape", "mesh")]
    return {k: sampling_cfg[k] for k in names if k in sampling_cfg and sampling_cfg[k] is not None}


def sample_from_config(key: Array, sde: SDE, score_fn: ScoreFn, shape, sampling_cfg, mesh: Optional[Mesh] = None):
    """``sample`` with the method and options of ``config.sampling``."""
    return sample(key, sde, score_fn, shape, sampling_cfg.method, mesh=mesh, **options_from_config(sampling_cfg))
