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
from typing import Callable, Optional, Tuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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

SOLVERS = {  # name -> (diffrax solver, adaptive) for ``samplers.solve_ode``; always adaptive here
    "tsit5": (diffrax.Tsit5, True),
    "dopri5": (diffrax.Dopri5, True),
    "rk45": (diffrax.Dopri5, True),      # scipy's solve_ivp RK45 (score_sde's likelihood): see samplers.ODE_SOLVERS
    "dopri8": (diffrax.Dopri8, True),
    "heun": (diffrax.Heun, True),
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
    import losses

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
    import losses

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
        import losses

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
# main.py --mode=likelihood
# --------------------------------------------------------------------------------------------------------------

METHODS = ("ode", "ddpm_bound")


def data_space(config) -> DataSpace:
    """The data convention of ``config.data``: 8-bit images in [0, 1] or [-1, 1], or continuous toy vectors."""
    import datasets

    if not isinstance(datasets.get_data_transform(config), datasets.ImageTransform):
        return DataSpace(bits=None, centered=bool(config.data.centered))
    bits = int(config.eval.likelihood.bits)
    if bits != 8:
        raise ValueError(f"config.eval.likelihood.bits={bits}: the image pipeline (datasets.py) loads 8-bit data")
    return DataSpace(bits=8, centered=bool(config.data.centered))


def likelihood_settings(config, sde) -> dict:
    """Every setting that produces the figure, validated; errors name the config key."""
    lik = config.eval.likelihood
    for key, valid in (("method", METHODS), ("divergence", DIVERGENCES), ("solver", SOLVERS),
                       ("dequantization", DEQUANTIZATIONS), ("ddpm_variance", ("beta", "posterior"))):
        _check_choice(lik[key], valid, f"config.eval.likelihood.{key}")
    space = data_space(config)
    out = {"method": lik.method, "split": lik.split, "data_bits": space.bits, "centered": space.centered,
           "ema": bool(config.eval.use_ema), "sde": type(sde).__name__, "seed": int(config.seed),
           "batch_size": int(config.eval.batch_size)}
    if lik.method == "ddpm_bound":
        import losses

        check_ddpm_bound_inputs(sde, space, lik.ddpm_num_steps)
        chain = losses.resolve_loss_name(config, sde) in ("ddpm", "ddpm_vlb")  # trained on the chain's labels
        return {**out, "ddpm_variance": lik.ddpm_variance, "ddpm_num_steps": lik.ddpm_num_steps or sde.N,
                "ddpm_exact_sum": lik.ddpm_num_steps is None, "is_bound": True,
                "ddpm_eps": "network at step labels" if chain else "score at t with alpha(t) = sqrt(abar_i)"}
    dequantization = "none" if space.bits is None else lik.dequantization
    if int(lik.num_draws) < 1 or int(lik.num_probes) < 1:
        raise ValueError("config.eval.likelihood.num_draws and .num_probes must be >= 1")
    return {**out, "estimator": lik.divergence, "num_probes": int(lik.num_probes) if lik.divergence != "exact"
            else 0, "rtol": float(lik.rtol), "atol": float(lik.atol), "solver": lik.solver,
            "max_steps": int(lik.max_steps), "eps": float(sde.eps if lik.eps is None else lik.eps),
            "dequantization": dequantization, "num_draws": int(lik.num_draws) if dequantization == "uniform" else 1,
            "is_bound": dequantization == "uniform"}


def likelihood_work(settings: dict, limit: Optional[int]) -> str:
    """One line saying how much work ``run`` is about to do, before it starts."""
    what = f"every {settings['split']} example" if limit is None else \
        f"the first {limit} {settings['split']} example{'s' if limit != 1 else ''}"
    if settings["method"] == "ddpm_bound":
        return (f"DDPM bound on {what}: {settings['ddpm_num_steps']} network evaluations each "
                f"(config.eval.likelihood.num_examples, .ddpm_num_steps)")
    return (f"likelihood on {what} ({settings['solver']}, rtol {settings['rtol']:g}, {settings['estimator']} "
            f"divergence, {settings['num_draws']} dequantization draw(s)): one adaptive ODE solve per example and "
            f"draw, whose network evaluations grow as rtol shrinks (config.eval.likelihood.num_examples, .rtol; "
            f"the result records nfe_mean)")


def _batch_evaluator(config, ev, settings: dict, space: DataSpace, mesh: Optional[Mesh]) -> Callable:
    """``evaluate(key, x) -> (bpd (b,), nfe (b,))`` for one batch of model-space data as loaded."""
    score_fn_of = functools.partial(_model_score_fn, ev.model, ev.sde)
    if settings["method"] == "ddpm_bound":
        eps_fn_of = None
        if settings["ddpm_eps"].startswith("network"):
            eps_fn_of, score_fn_of = functools.partial(_model_eps_fn, ev.model, ev.sde), None
        fn = ddpm_bound_fn(ev.sde, eps_fn_of=eps_fn_of, score_fn_of=score_fn_of, space=space, mesh=mesh,
                           variance=settings["ddpm_variance"], num_steps=config.eval.likelihood.ddpm_num_steps)
        return lambda key, x: (fn(ev.params, key, x)["bpd"], jnp.full((x.shape[0],), settings["ddpm_num_steps"]))
    ll = log_likelihood_fn(ev.sde, score_fn_of, divergence=settings["estimator"], mesh=mesh,
                           num_probes=max(settings["num_probes"], 1), rtol=settings["rtol"], atol=settings["atol"],
                           eps=settings["eps"], solver=settings["solver"], max_steps=settings["max_steps"])

    def model_logp(key, xm):
        logp, _, nfe = ll(ev.params, key, xm)
        return logp, nfe

    def evaluate(key, x):
        out = data_log_likelihood(key, model_logp, x, space, dequantization=settings["dequantization"],
                                  num_draws=settings["num_draws"])
        return out["bpd"], out["nfe"]

    return evaluate


def _model_score_fn(model, sde, params):
    return model.score_fn(params, sde)


def _model_eps_fn(model, sde, params):
    import losses

    return lambda x, i: losses.model_eps(model, params, sde, x, i)


def _lattice_batch(x, transform, space: DataSpace) -> np.ndarray:
    """Model-space data as loaded -> the 8-bit lattice (undoing the pipeline's own dequantization, if any)."""
    if space.bits is None or not getattr(transform, "uniform_dequantization", False):
        return np.asarray(x)
    return np.asarray(space.lattice(transform.inverse(np.asarray(x))))


def _evaluate_split(config, evaluate: Callable, space: DataSpace, split: str, limit: Optional[int],
                    progress: Optional[Callable[[], None]] = None):
    """Per-example bits/dim and NFE of this process's share of ``split`` (padding dropped), up to ``limit``;
    ``progress()`` (optional) is called after each batch and may raise to stop."""
    import datasets

    transform = datasets.get_data_transform(config)
    key = jax.random.fold_in(jax.random.key(int(config.seed)), jax.process_index())
    bpd, nfe = [], []
    for i, batch in enumerate(datasets.get_dataset(config, split, infinite=False, seed=config.seed)):
        b_bpd, b_nfe = evaluate(jax.random.fold_in(key, i), _lattice_batch(batch["x"], transform, space))
        mask = np.asarray(batch.get("mask", np.ones(len(batch["x"]), bool)))
        bpd.append(np.asarray(b_bpd)[mask])
        nfe.append(np.asarray(b_nfe)[mask])
        if progress is not None:
            progress()
        if limit is not None and sum(map(len, bpd)) >= limit:
            break
    bpd, nfe = np.concatenate(bpd), np.concatenate(nfe)
    return (bpd[:limit], nfe[:limit]) if limit is not None else (bpd, nfe)


def _gather(a: np.ndarray) -> np.ndarray:
    """Concatenate per-process arrays (possibly of different lengths) on every process."""
    if jax.process_count() == 1:
        return a
    from jax.experimental import multihost_utils

    n = multihost_utils.process_allgather(np.array([len(a)]))
    padded = np.zeros(int(n.max()), a.dtype)
    padded[:len(a)] = a
    allv = multihost_utils.process_allgather(padded)
    return np.concatenate([allv[p, :int(n[p, 0])] for p in range(len(n))])


def run(config, workdir: str) -> dict:
    """``--mode=likelihood``: bits/dim of a checkpoint on ``config.eval.likelihood.split``, written with every
    setting that produced it to ``<workdir>/likelihood/step_<k>_<method>_<split>.json``."""
    import pathlib
    import time

    import experiment
    import utils

    import sde_lib

    settings = likelihood_settings(config, sde_lib.get_sde(config.sde))  # fail before restoring anything
    ev = experiment.restore_eval_state(experiment.Experiment.from_config(config), workdir, config.eval.checkpoint)
    space = data_space(config)
    n_local = len(jax.local_devices())
    mesh = Mesh(np.array(jax.local_devices()), ("data",)) if n_local > 1 else None
    b = int(config.eval.batch_size) // jax.process_count()
    if b % n_local:
        raise ValueError(f"config.eval.batch_size={config.eval.batch_size} gives {b} examples per process, not "
                         f"divisible by its {n_local} devices")
    limit = config.eval.likelihood.num_examples
    local_limit = None if limit is None else -(-int(limit) // jax.process_count())
    if jax.process_index() == 0:
        print(likelihood_work(settings, limit), flush=True)
    start = time.time()
    progress = utils.Progress(f"likelihood ({settings['method']})", None if local_limit is None else
                              -(-local_limit // b), detail=f"{'all' if limit is None else limit} {settings['split']} "
                              f"examples in batches of {config.eval.batch_size}")
    try:
        bpd, nfe = _evaluate_split(config, _batch_evaluator(config, ev, settings, space, mesh), space,
                                   settings["split"], local_limit, progress.update)
    except utils.Stopped as e:
        e.message += "; no result written"
        raise
    bpd, nfe = _gather(bpd.astype(np.float64)), _gather(nfe.astype(np.float64))
    result = {"bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd)))
              if len(bpd) > 1 else None, "num_examples": int(len(bpd)), "nfe_mean": float(nfe.mean()),
              "checkpoint_step": int(ev.step), "wall_time_s": round(time.time() - start, 2), **settings}
    out = pathlib.Path(workdir) / "likelihood" / f"step_{ev.step}_{settings['method']}_{settings['split']}.json"
    if jax.process_index() == 0:
        utils.atomic_write_json(out, result)
        print(f"{settings['method']} bits/dim on {settings['split']} ({len(bpd)} examples, step {ev.step}, "
              f"{'EMA' if settings['ema'] else 'raw (non-EMA)'} weights): "
              f"{result['bpd']:.4f} ± {result['bpd_stderr'] or 0:.4f}; wrote {out}")
    return result
