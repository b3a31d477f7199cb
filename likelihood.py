"""Exact likelihoods: the probability-flow ODE, bits/dim conventions, and the DDPM variational bound.

Probability-flow ODE (Song et al. 2021, Eq. 13 and App. D.2), for any SDE:

    dx/dt = f̃(x, t) = f(x, t) - ½ g(t)² ∇x log p_t(x)
    log p_ε(x(ε)) = log p_T(x(T)) + ∫_ε^T ∇·f̃(x(t), t) dt                  (instantaneous change of variables)

``log_likelihood`` integrates the augmented state (x, ∫∇·f̃) from ε to T with diffrax and returns
``prior_logp(z) + ∫∇·f̃`` with z = x(T): the exact log-density of the ODE's model (the prior pushed back through
the flow) up to the solver tolerance. The divergence is the exact Jacobian trace (``"exact"``, D Jacobian-vector
products, for low dimension) or Hutchinson's estimator ``vᵀ (∂f̃/∂x) v`` with Gaussian or Rademacher probes v
drawn once per example and held fixed over the whole solve (an unbiased estimate of log p, since the solve is
linear in the divergence).

Bits/dim (``DataSpace``, ``data_log_likelihood``): 8-bit data k ∈ {0..255}^D enter model space through the affine
map x = T(v) = lo + (hi - lo) v / 256 of v = k + u ∈ [0, 256)^D ([lo, hi] = [0, 1] or centred [-1, 1]). With
uniform dequantization u ~ U[0, 1)^D, Jensen gives

    log P(k) ≥ E_u [ log p_model(T(k + u)) + log|det ∂T/∂v| ]        (K draws of u averaged)
    bits/dim = -log P(k) / (D ln 2)

and the log-determinant is computed from T itself (a JVP of the elementwise map), not typed in as an offset.
Continuous data (``bits=None``) take bits/dim = -log p(x) / (D ln 2) in model space.

The DDPM bound (Ho et al. 2020, Eq. 5) L = L_T + Σ_{t>1} L_{t-1} + L_0 is in ``ddpm_bound_bpd``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import losses
import samplers

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

EXACT_TRACE_MAX_DIM = 1024  # the exact trace costs D JVPs per drift evaluation; beyond this use Hutchinson


# --------------------------------------------------------------------------------------------------------------
# Divergence estimators: div(f_jvp, x, probes) for one example, f_jvp the linearized drift at x
# --------------------------------------------------------------------------------------------------------------

def exact_divergence(f_jvp: Callable, x: Array, probes: Optional[Array]) -> Array:
    """tr ∂f̃/∂x = Σ_i e_iᵀ J e_i with one JVP per basis vector e_i (x: one example, any shape)."""
    d = x.size
    basis = jnp.eye(d, dtype=x.dtype).reshape((d,) + x.shape)
    columns = jax.vmap(f_jvp)(basis).reshape(d, d)  # row i = J e_i
    return jnp.trace(columns)


def hutchinson_divergence(f_jvp: Callable, x: Array, probes: Array) -> Array:
    """(1/P) Σ_p v_pᵀ J v_p with fixed probes v_p (P, *x.shape); unbiased when E[v vᵀ] = I."""
    jv = jax.vmap(f_jvp)(probes)
    return jnp.mean(jnp.sum((probes * jv).reshape(probes.shape[0], -1), axis=-1))


def _gaussian_probes(key, shape, dtype):
    return jax.random.normal(key, shape, dtype)


def _rademacher_probes(key, shape, dtype):
    return jax.random.rademacher(key, shape, dtype)


# name -> (divergence function, probe sampler or None)
DIVERGENCES = {
    "exact": (exact_divergence, None),
    "gaussian": (hutchinson_divergence, _gaussian_probes),
    "rademacher": (hutchinson_divergence, _rademacher_probes),
}

SOLVERS = {  # name -> (diffrax solver class name, adaptive) for ``samplers.solve_ode``; always adaptive here
    "tsit5": ("Tsit5", True),
    "dopri5": ("Dopri5", True),
    "rk45": ("Dopri5", True),      # scipy's solve_ivp RK45 (score_sde's likelihood): see samplers.ODE_SOLVERS
    "dopri8": ("Dopri8", True),
    "heun": ("Heun", True),
}


def _check_choice(value: str, valid, what: str):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {sorted(valid)}")


# --------------------------------------------------------------------------------------------------------------
# The probability-flow ODE
# --------------------------------------------------------------------------------------------------------------

def _flow_vector_field(sde, score_fn: ScoreFn, divergence: str) -> Callable:
    """diffrax vector field of one example: (t, (x, ∫div), probes) -> (f̃(x, t), ∇·f̃(x, t))."""
    div_fn = DIVERGENCES[divergence][0]
    flow = sde.reverse(score_fn, probability_flow=True)

    def vector_field(t, state, probes):
        x, _ = state

        def drift(y):
            return flow.sde(y[None], jnp.reshape(t, (1,)).astype(y.dtype))[0][0]

        fx, f_jvp = jax.linearize(drift, x)
        return fx, div_fn(f_jvp, x, probes).astype(x.dtype)

    return vector_field


def _solve_one(vector_field, solver, rtol, atol, t0, t1, max_steps, x, probes):
    """Integrate one example from t0 to t1; returns (x(t1), ∫div, NFE, or -1 when the solve failed, e.g. ran out
    of max_steps). No error is raised inside the computation (``throw=False``): that would need a host callback,
    which keeps the compiled function out of JAX's persistent compilation cache."""
    y0 = (x, jnp.zeros((), x.dtype))
    (z, delta), nfe, ok = samplers.solve_ode(vector_field, y0, t0, t1, solver, rtol, atol, num_steps=None,
                                             max_steps=max_steps, args=probes, throw=False, solvers=SOLVERS)
    return z, delta, jnp.where(ok, nfe, -1)


def _draw_probes(key, divergence: str, num_probes: int, x: Array):
    """Per-example probes (B, P, *example_shape), from fold_in(key, i): independent of device layout."""
    sampler = DIVERGENCES[divergence][1]
    if sampler is None:
        return jnp.zeros((x.shape[0], 0), x.dtype)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
    return jax.vmap(lambda k: sampler(k, (num_probes,) + x.shape[1:], x.dtype))(keys)


def _log_likelihood(params, key, x, *, sde, score_fn_of, divergence, num_probes, rtol, atol, eps, solver,
                    max_steps, mesh):
    def solve_batch(params, x, probes):
        vf = _flow_vector_field(sde, score_fn_of(params), divergence)
        return jax.vmap(functools.partial(_solve_one, vf, solver, rtol, atol, eps, sde.T, max_steps))(x, probes)

    probes = _draw_probes(key, divergence, num_probes, x)
    if mesh is not None:  # each device solves its own examples: no collectives inside the adaptive loop
        spec = P("data")
        solve_batch = jax.shard_map(solve_batch, mesh=mesh, in_specs=(P(), spec, spec),
                                    out_specs=(spec, spec, spec), check_vma=False)
        sharding = NamedSharding(mesh, spec)
        x, probes = jax.lax.with_sharding_constraint((x, probes), (sharding, sharding))
    z, delta, nfe = solve_batch(params, x, probes)
    logp = jnp.where(nfe < 0, jnp.nan, sde.prior_logp(z) + delta)
    return logp, z, nfe


_jitted_log_likelihood = jax.jit(
    _log_likelihood,
    static_argnames=("sde", "score_fn_of", "divergence", "num_probes", "rtol", "atol", "eps", "solver",
                     "max_steps", "mesh"))


@dataclasses.dataclass(frozen=True)
class _NoParams:
    """``params -> fn`` for a score (or ε) function without parameters; hashes by the function, so jit caches hit."""

    score_fn: ScoreFn

    def __call__(self, params):
        return self.score_fn


def check_likelihood_inputs(x, divergence: str, solver: str, num_probes: int, mesh: Optional[Mesh]):
    """Clear errors for an unknown estimator/solver, a missing batch axis, or an unshardable batch."""
    _check_choice(divergence, DIVERGENCES, "divergence estimator")
    _check_choice(solver, SOLVERS, "ODE solver")
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"x must have a batch axis and data axes, (batch, D) or (batch, H, W, C); "
                         f"got shape {getattr(x, 'shape', None)}")
    dim = math.prod(x.shape[1:])
    if divergence == "exact" and dim > EXACT_TRACE_MAX_DIM:
        raise ValueError(f"divergence='exact' needs {dim} JVPs per drift evaluation for data of shape "
                         f"{tuple(x.shape[1:])} (limit {EXACT_TRACE_MAX_DIM}); use 'gaussian' or 'rademacher'")
    if divergence != "exact" and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1 for the Hutchinson estimator, got {num_probes}")
    if mesh is not None:
        n = mesh.shape["data"]
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n} devices of the 'data' mesh axis")


def log_likelihood(key: Array, sde, score_fn: ScoreFn, x: Array, *, divergence: str = "exact",
                   num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, eps: Optional[float] = None,
                   solver: str = "tsit5", max_steps: int = 16_384,
                   mesh: Optional[Mesh] = None) -> Tuple[Array, Array, Array]:
    """log p(x) of the probability-flow ODE model, per example, in nats.

    x: (batch, ...) model-space data at time ``eps`` (default ``sde.eps``); ``score_fn(x, t)`` batched.
    Each example is its own adaptive solve (vmapped), so its result does not depend on the rest of the batch
    or on the device layout; with ``mesh`` the batch is split over the mesh's ``data`` axis (shard_map, no
    collectives). Hutchinson probes come from ``fold_in(key, i)`` for example i and stay fixed over the solve.
    Returns (logp (batch,), z = x(T) (shape of x), nfe (batch,) drift evaluations).
    """
    return log_likelihood_fn(sde, _NoParams(score_fn), divergence=divergence, num_probes=num_probes, rtol=rtol,
                             atol=atol, eps=eps, solver=solver, max_steps=max_steps, mesh=mesh)(None, key, x)


def log_likelihood_fn(sde, score_fn_of: Callable, *, divergence: str = "exact", num_probes: int = 1,
                      rtol: float = 1e-5, atol: float = 1e-5, eps: Optional[float] = None, solver: str = "tsit5",
                      max_steps: int = 16_384, mesh: Optional[Mesh] = None) -> Callable:
    """``fn(params, key, x) -> (logp, z, nfe)`` as ``log_likelihood`` with ``score_fn = score_fn_of(params)``;
    parameters stay jit arguments (not baked-in constants), so one compilation serves every batch."""
    eps = float(sde.eps if eps is None else eps)
    if not 0 < eps < sde.T:
        raise ValueError(f"eps={eps} must lie in (0, T={sde.T})")
    opts = dict(sde=sde, score_fn_of=score_fn_of, divergence=divergence, num_probes=int(num_probes),
                rtol=float(rtol), atol=float(atol), eps=eps, solver=solver, max_steps=int(max_steps), mesh=mesh)

    def fn(params, key, x):
        check_likelihood_inputs(x, divergence, solver, num_probes, mesh)
        out = _jitted_log_likelihood(params, key, jnp.asarray(x, jnp.float32), **opts)
        check_solved(out[2], opts)
        return out

    return fn


def check_solved(nfe, opts: dict):
    """Raise when some example's ODE solve failed (nfe -1): named with the settings to change."""
    try:
        failed = int(np.sum(np.asarray(jax.device_get(nfe)) < 0))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # inside a caller's jit: nothing to inspect
    if failed:
        raise RuntimeError(
            f"the probability-flow ODE ({opts['solver']}, rtol={opts['rtol']}, atol={opts['atol']}) did not reach "
            f"T for {failed} of {np.size(nfe)} examples within max_steps={opts['max_steps']}; raise max_steps "
            f"(config.eval.likelihood.max_steps) or loosen rtol/atol")


# --------------------------------------------------------------------------------------------------------------
# Data conventions and bits/dim
# --------------------------------------------------------------------------------------------------------------

DEQUANTIZATIONS = ("uniform", "none")


def _sum_except_batch(a: Array) -> Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


@dataclasses.dataclass(frozen=True)
class DataSpace:
    """How the data whose likelihood is reported map to model space.

    bits=8: integers k ∈ {0..255}^D; the data pipeline loads them as x = lo + (hi - lo) k / 255 (``lattice``),
    and likelihoods use the dequantization map x = T(v) = lo + (hi - lo) v / 256 of v = k + u ∈ [0, 256)^D.
    bits=None: continuous data, already in model space (T = identity). [lo, hi] = [-1, 1] if ``centered``
    else [0, 1].
    """

    bits: Optional[int] = 8
    centered: bool = True

    @property
    def bounds(self) -> Tuple[float, float]:
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    def to_model(self, v: Array) -> Array:
        """T(v): data units (v ∈ [0, 2^bits) for quantized data) -> model space."""
        if self.bits is None:
            return v
        lo, hi = self.bounds
        return lo + (hi - lo) * v / 2.0**self.bits

    def log_det(self, v: Array) -> Array:
        """log|det ∂T/∂v| per example (batch,), from a JVP of the elementwise map T (its Jacobian is diagonal)."""
        _, diag = jax.jvp(self.to_model, (v,), (jnp.ones_like(v),))
        return _sum_except_batch(jnp.log(jnp.abs(diag)))

    def lattice(self, k: Array) -> Array:
        """Integers k -> model space as loaded without dequantization: lo + (hi - lo) k / (2^bits - 1)."""
        lo, hi = self.bounds
        return lo + (hi - lo) * jnp.asarray(k, jnp.float32) / (2.0**self.bits - 1)

    def integers(self, x) -> np.ndarray:
        """Model-space lattice data (as loaded) -> integers k, with clear errors for data that are not."""
        x = np.asarray(x, np.float64)
        if x.ndim < 2:
            raise ValueError(f"data must have a batch axis, (batch, D) or (batch, H, W, C); got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("data contain NaN or infinite values")
        lo, hi = self.bounds
        if x.min() < lo - 1e-6 or x.max() > hi + 1e-6:
            raise ValueError(f"data outside the declared range [{lo:g}, {hi:g}] (config.data.centered="
                             f"{self.centered}): min {x.min():.4g}, max {x.max():.4g}")
        k = (x - lo) / (hi - lo) * (2**self.bits - 1)
        off = np.abs(k - np.round(k)).max()
        if off > 1e-3:
            raise ValueError(f"data are not {self.bits}-bit: values lie up to {off:.3g} levels off the lattice "
                             f"lo + (hi - lo) k / {2**self.bits - 1} (already dequantized? pass the integer data)")
        return np.round(k).astype(np.int32)

    def check_continuous(self, x) -> Array:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim < 2:
            raise ValueError(f"data must have a batch axis, (batch, D) or (batch, ...); got shape {x.shape}")
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError("data contain NaN or infinite values")
        return x


def bits_per_dim(logp: Array, dim: int, *, log_det=None) -> Array:
    """-(log p + log_det) / (D ln 2): nats per example -> bits per dimension of the data.

    ``log_det`` (required, nats per example or a scalar): log|det ∂T/∂v| of the map from data units to model space
    (``DataSpace.log_det``), so that a model-space density becomes a density of the data; 0.0 only when ``logp``
    already is in data units (``data_log_likelihood``) or the data are continuous and in model space. Without it
    an 8-bit image density in [-1, 1] reads about 7 bits/dim too low, often below zero; ``bits_per_dim_of_data``
    does the whole computation for real data."""
    if log_det is None:
        raise ValueError("bits_per_dim(logp, dim) needs log_det=: the log-Jacobian from data units to model space "
                         "(DataSpace.log_det; 0.0 for continuous data). For 8-bit data use "
                         "likelihood.bits_per_dim_of_data(key, sde, score_fn, x), which dequantizes and adds it")
    return -(logp + log_det) / (dim * math.log(2.0))


def dequantized_points(key: Array, k: Array, dequantization: str) -> Array:
    """v = k + u with u ~ U[0, 1)^D (uniform) or the lattice point v = k · 2^b/(2^b - 1) of T (none)."""
    if dequantization == "uniform":
        return k + jax.random.uniform(key, k.shape, jnp.float32)
    return k * (256.0 / 255.0)


def data_log_likelihood(key: Array, model_logp: Callable, x, space: DataSpace, *,
                        dequantization: str = "uniform", num_draws: int = 1) -> dict:
    """log-likelihood of data in data units and bits/dim, per example.

    ``model_logp(key, x_model) -> (logp (batch,) nats in model space, nfe (batch,))``. ``x``: model-space data
    as loaded (8-bit lattice, or continuous). 8-bit + uniform: K = ``num_draws`` dequantizations averaged,
    E_u[log p(T(k+u)) + log|det T'|] ≤ log P(k). 8-bit + none: the density at the lattice point times the bin
    volume (an approximation, not a bound). Continuous: log p(x) in model space, bits/dim without offset.
    Returns {"logp", "bpd", "nfe"} (each (batch,)).
    """
    _check_choice(dequantization, DEQUANTIZATIONS, "dequantization")
    if num_draws < 1:
        raise ValueError(f"num_draws (dequantization draws K) must be >= 1, got {num_draws}")
    if space.bits is None:
        if dequantization != "none":
            raise ValueError("continuous data (bits=None) take dequantization='none'")
        x = space.check_continuous(x)
        logp, nfe = model_logp(key, x)
        return {"logp": logp, "bpd": bits_per_dim(logp, math.prod(x.shape[1:]), log_det=0.0), "nfe": nfe}
    k = jnp.asarray(space.integers(x), jnp.float32)
    draws = num_draws if dequantization == "uniform" else 1
    total, total_nfe = 0.0, 0.0
    for j in range(draws):
        kj = jax.random.fold_in(key, j)
        v = dequantized_points(jax.random.fold_in(kj, 0), k, dequantization)
        logp, nfe = model_logp(jax.random.fold_in(kj, 1), space.to_model(v))
        total, total_nfe = total + logp + space.log_det(v), total_nfe + nfe
    logp = total / draws
    return {"logp": logp, "bpd": bits_per_dim(logp, math.prod(k.shape[1:]), log_det=0.0), "nfe": total_nfe / draws}


def bits_per_dim_of_data(key: Array, sde, score_fn: ScoreFn, x, *, space: DataSpace = DataSpace(8, True),
                         dequantization: str = "uniform", num_draws: int = 1, **ode_options) -> dict:
    """Bits/dim of real data under the probability-flow ODE of ``score_fn``: ``x`` as the data pipeline loads it
    (8-bit lattice in model space, or continuous data with ``space=DataSpace(bits=None)``), dequantized and with
    the change of units added by ``data_log_likelihood``. ``ode_options`` go to ``log_likelihood`` (divergence,
    rtol, atol, ...). Returns {"logp" (nats of the data), "bpd", "nfe"}, each (batch,)."""

    def model_logp(k, xm):
        logp, _, nfe = log_likelihood(k, sde, score_fn, xm, **ode_options)
        return logp, nfe

    if space.bits is None and dequantization == "uniform":
        dequantization = "none"
    return data_log_likelihood(key, model_logp, x, space, dequantization=dequantization, num_draws=num_draws)


# --------------------------------------------------------------------------------------------------------------
# The DDPM variational bound (Ho et al. 2020, Eq. 5), via losses.ddpm_vlb_terms
# --------------------------------------------------------------------------------------------------------------

def _ddpm_bound_batch(params, key, x0, score_times, *, sde, eps_fn_of, score_fn_of, variance, num_steps):
    steps = None
    if num_steps is not None:  # a uniform random subset of steps: N · mean is an unbiased estimate of Σ
        steps = jax.random.choice(jax.random.fold_in(key, 1), sde.N, (num_steps,), replace=False)
    return losses.ddpm_vlb_terms(sde, x0, jax.random.fold_in(key, 0), steps=steps, variance=variance,
                                 eps_fn=None if eps_fn_of is None else eps_fn_of(params),
                                 score_fn=None if score_fn_of is None else score_fn_of(params),
                                 score_times=score_times)


_jitted_ddpm_bound = jax.jit(_ddpm_bound_batch,
                             static_argnames=("sde", "eps_fn_of", "score_fn_of", "variance", "num_steps"))


def check_ddpm_bound_inputs(sde, space: DataSpace, num_steps: Optional[int]):
    if sde.chain is None:
        raise ValueError(f"the DDPM bound needs {losses.CHAINS['chain']}; "
                         f"{type(sde).__name__} does not provide it")
    if space.bits != 8 or not space.centered:
        raise ValueError(f"the DDPM bound (discretized decoder on 256 levels in [-1, 1]) needs 8-bit data in "
                         f"centred model space; got bits={space.bits}, centered={space.centered}")
    if num_steps is not None and not 1 <= num_steps <= sde.N:
        raise ValueError(f"num_steps={num_steps} must lie in [1, N={sde.N}] (None: all steps, exact)")


def ddpm_bound(key: Array, sde, x, *, eps_fn: Optional[Callable] = None, score_fn: Optional[ScoreFn] = None,
               variance: str = "beta", num_steps: Optional[int] = None,
               space: DataSpace = DataSpace(8, True)) -> dict:
    """DDPM bound -log P(k) ≤ L_T + Σ_{i≥1} L_{i-1} + L_0 in bits/dim per example, on 8-bit data.

    ``x``: model-space lattice data in [-1, 1] (b, ...); ``eps_fn(x_i, i)`` (0-based steps) or
    ``score_fn(x, t)``; ``variance``: decoder variance σ_i² = β_i ("beta") or β̃_i ("posterior");
    ``num_steps``: None for the exact sum over all N steps, else an unbiased estimate from that many random
    steps. This is a bound on the discrete probability of k itself, so no dequantization or offset enters.
    Returns {"bpd", "prior" (L_T), "terms" (b, steps)} in bits/dim.
    """
    fn = ddpm_bound_fn(sde, eps_fn_of=None if eps_fn is None else _NoParams(eps_fn),
                       score_fn_of=None if score_fn is None else _NoParams(score_fn), variance=variance,
                       num_steps=num_steps, space=space)
    return fn(None, key, x)


def ddpm_bound_fn(sde, *, eps_fn_of: Optional[Callable] = None, score_fn_of: Optional[Callable] = None,
                  variance: str = "beta", num_steps: Optional[int] = None, space: DataSpace = DataSpace(8, True),
                  mesh: Optional[Mesh] = None) -> Callable:
    """``fn(params, key, x) -> {"bpd", "prior", "terms"}`` as ``ddpm_bound`` with ε̂ or the score built from
    ``params``; with ``mesh`` the batch is placed on the ``data`` axis (the bound is per example)."""
    check_ddpm_bound_inputs(sde, space, num_steps)
    if (eps_fn_of is None) == (score_fn_of is None):
        raise ValueError("the DDPM bound needs exactly one of eps_fn or score_fn")

    score_times = None
    if score_fn_of is not None:  # continuous times with α(t) = √ᾱ_i, found on the host (numpy) outside jit
        score_times = losses.time_of(sde, np.sqrt(sde.chain.alphas_cumprod), "alpha", t_max=1.2 * sde.T)

    def fn(params, key, x):
        x0 = space.lattice(space.integers(x))
        if mesh is not None:
            x0 = jax.device_put(x0, NamedSharding(mesh, P("data")))
        out = _jitted_ddpm_bound(params, key, x0, score_times, sde=sde, eps_fn_of=eps_fn_of, score_fn_of=score_fn_of,
                                 variance=variance, num_steps=num_steps)
        return {"bpd": out["total"], "prior": out["prior"], "terms": out["terms"]}

    return fn


# --------------------------------------------------------------------------------------------------------------
# Bits/dim over a data split (``run_lib.likelihood`` is the --mode=likelihood runner)
# --------------------------------------------------------------------------------------------------------------

METHODS = ("ode", "ddpm_bound")   # bits_per_dim_of_data's probability-flow ODE, or ddpm_bound


def evaluate_batches(evaluate: Callable, batches: Iterable[dict], key: Array, limit: Optional[int] = None,
                     progress: Optional[Callable[[], None]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Per-example bits/dim and NFE over ``batches`` ({"x": (b, ...), optional "mask": (b,) with padding rows
    False}), padding dropped: batch i is ``evaluate(fold_in(key, i), x) -> (bpd (b,), nfe (b,))``. Stops once
    ``limit`` examples are in (None: every batch); ``progress()`` (optional) is called after each batch and may
    raise to stop. Returns (bpd, nfe), each (n,)."""
    bpd, nfe = [], []
    for i, batch in enumerate(batches):
        b_bpd, b_nfe = evaluate(jax.random.fold_in(key, i), batch["x"])
        mask = np.asarray(batch.get("mask", np.ones(len(batch["x"]), bool)))
        bpd.append(np.asarray(b_bpd)[mask])
        nfe.append(np.asarray(b_nfe)[mask])
        if progress is not None:
            progress()
        if limit is not None and sum(map(len, bpd)) >= limit:
            break
    bpd, nfe = np.concatenate(bpd), np.concatenate(nfe)
    return (bpd[:limit], nfe[:limit]) if limit is not None else (bpd, nfe)
