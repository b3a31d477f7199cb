"""Stochastic differential equations of score-based generative modelling.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (ICLR 2021):

    forward SDE      dx = f(x, t) dt + g(t) dw
    reverse SDE      dx = [f(x, t) - g(t)^2 ∇x log p_t(x)] dt + g(t) dw̄          (Eq. 6)
    probability flow dx = [f(x, t) - ½ g(t)^2 ∇x log p_t(x)] dt                   (Eq. 13)

Every SDE here is affine, so the perturbation kernel is Gaussian, p_0t(x(t) | x(0)) = N(α(t) x(0), σ(t)² I), and
an SDE object owns *all* of its math: drift and diffusion, the marginal α(t), σ(t), the prior and its density,
the discrete Markov chain it is the limit of (DDPM for VP, SMLD/NCSN for VE), the reverse SDE/ODE, and the
conversion of a network's output into a score. The DDPM chain is a value, ``DDPMChain``, built from any β schedule
and owned by VP-type SDEs as ``sde.chain`` (None for the others). Nothing outside this module branches on the type
of an SDE: adding an SDE is writing one subclass (decorate it with ``@register_sde("name")`` to select it from
configs).

Conventions: ``x`` has a leading batch axis, ``t`` has shape (batch,), time runs in [0, T] with data at t=0.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Callable, Dict, Tuple, Type

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

PREDICTIONS = ("eps", "score", "x0")
TIME_INPUTS = ("t", "t999", "sigma", "index", "sigma_index")

SDES: Dict[str, Type["SDE"]] = {}


def register_sde(name: str):
    """Class decorator adding an SDE to the ``SDES`` registry under ``name`` (used by ``config.sde.name``)."""

    def wrap(cls):
        old = SDES.get(name)
        if old is not None and _qualified(old) != _qualified(cls):
            raise ValueError(f"SDE name {name!r} is already registered to {_qualified(old)}")
        SDES[name] = cls
        cls.registered_name = name
        return cls

    return wrap


def _qualified(obj) -> str:
    """module.qualname, so that re-executing a module (a notebook reload, a config file that is also imported)
    re-registers its classes instead of clashing with the previous copies."""
    return f"{obj.__module__}.{obj.__qualname__}"


def batch_broadcast(a: Array, x: Array) -> Array:
    """Reshape a per-example quantity of shape (batch,) so that it broadcasts against ``x`` (batch, ...)."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _sum_except_batch(x: Array) -> Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def standard_normal_logp(z: Array, scale=1.0) -> Array:
    """log N(z; 0, scale² I) per example: -D/2 log(2π scale²) - ||z||² / (2 scale²)."""
    d = np.prod(z.shape[1:])
    return -0.5 * d * jnp.log(2 * jnp.pi * scale**2) - _sum_except_batch(z**2) / (2 * scale**2)


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMChain:
    """The DDPM Markov chain (Ho et al. 2020) of a β schedule: q(x_i | x_{i-1}) = N(√(1-β_i) x_{i-1}, β_i I).

    Built from any schedule (``from_betas``, ``from_alpha_bar``, ``cosine``); VP-type SDEs own one as ``sde.chain``.
    Arrays are float64 numpy and 0-based: ``betas[i]`` is the papers' β_{i+1}, step i ends at time i T/(N-1).
    """

    betas: np.ndarray

    @classmethod
    def from_betas(cls, betas) -> "DDPMChain":
        """The chain of β_1..β_N (a 1-D array with 0 ≤ β_i < 1)."""
        betas = np.array(betas, np.float64)
        if betas.ndim != 1 or betas.size == 0 or not np.all((betas >= 0) & (betas < 1)):
            raise ValueError(f"a DDPM chain needs a non-empty 1-D β schedule with 0 <= β_i < 1, got shape "
                             f"{betas.shape} with values in [{np.min(betas, initial=np.inf):g}, "
                             f"{np.max(betas, initial=-np.inf):g}]")
        betas.setflags(write=False)
        return cls(betas)

    @classmethod
    def from_alpha_bar(cls, alpha_bar: Callable, N: int, max_beta: float = 0.999, T: float = 1.0) -> "DDPMChain":
        """β_i = min(1 - ᾱ(u_i) / ᾱ(u_{i-1}), max_beta), u_i = i T/N, i = 1..N, for a decreasing ᾱ(u) (numpy,
        float64) on [0, T] (Nichol & Dhariwal 2021, Eq. 17; the clip keeps the last steps, where ᾱ → 0, finite)."""
        abar = np.asarray(alpha_bar(np.arange(N + 1, dtype=np.float64) * (T / N)), np.float64)
        return cls.from_betas(np.minimum(1.0 - abar[1:] / abar[:-1], max_beta))

    @classmethod
    def cosine(cls, N: int, s: float = 0.008, max_beta: float = 0.999, T: float = 1.0) -> "DDPMChain":
        """The cosine schedule ᾱ(u) = f(u)/f(0), f(u) = cos²(π/2 · (u + s)/(1 + s)) (Nichol & Dhariwal 2021), on
        u ∈ [0, T] (T = 1: their chain; T < 1 stops before ᾱ reaches 0)."""
        f = lambda u: np.cos(0.5 * np.pi * (u + s) / (1 + s)) ** 2
        return cls.from_alpha_bar(lambda u: f(u) / f(0.0), N, max_beta, T)

    @property
    def N(self) -> int:
        return self.betas.shape[0]

    @functools.cached_property
    def alphas(self) -> np.ndarray:
        """α_i = 1 - β_i."""
        return 1.0 - self.betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_i = Π_{j≤i} α_j, so q(x_i | x_0) = N(√ᾱ_i x_0, (1 - ᾱ_i) I)."""
        return np.cumprod(self.alphas)

    @functools.cached_property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @functools.cached_property
    def posterior_variance(self) -> np.ndarray:
        """β̃_i = (1 - ᾱ_{i-1}) / (1 - ᾱ_i) β_i, the variance of q(x_{i-1} | x_i, x_0)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @functools.cached_property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of x_0 in μ̃_i(x_i, x_0): √ᾱ_{i-1} β_i / (1 - ᾱ_i)."""
        return np.sqrt(self.alphas_cumprod_prev) * self.betas / (1.0 - self.alphas_cumprod)

    @functools.cached_property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of x_i in μ̃_i(x_i, x_0): √α_i (1 - ᾱ_{i-1}) / (1 - ᾱ_i)."""
        return np.sqrt(self.alphas) * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def posterior(self, x_t: Array, x_0: Array, i: Array) -> Tuple[Array, Array]:
        """Mean μ̃_i and variance β̃_i (shape (batch,)) of q(x_{i-1} | x_i, x_0) at integer steps i (0-based)."""
        c1 = batch_broadcast(jnp.asarray(self.posterior_mean_coef1)[i], x_t)
        c2 = batch_broadcast(jnp.asarray(self.posterior_mean_coef2)[i], x_t)
        return c1 * x_0 + c2 * x_t, jnp.asarray(self.posterior_variance)[i]

    def alpha_sigma(self, i: Array) -> Tuple[Array, Array]:
        """(√ᾱ_i, √(1 - ᾱ_i)) of q(x_i | x_0) at 0-based steps i."""
        abar = jnp.asarray(self.alphas_cumprod, jnp.float32)[i]
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    def discretize(self, x: Array, i: Array) -> Tuple[Array, Array]:
        """x_i = √(1-β_i) x_{i-1} + √β_i z, i.e. f_i = (√(1-β_i) - 1) x, G_i = √β_i."""
        beta = jnp.asarray(self.betas, x.dtype)[i]
        return (batch_broadcast(jnp.sqrt(1.0 - beta), x) - 1.0) * x, jnp.sqrt(beta)

    def ancestral_step(self, x: Array, i: Array, score: Array, variance: str | None = None) -> Tuple[Array, Array]:
        """x_{i-1} = (x_i + β_i s) / √(1-β_i) + σ_i z (SDE paper Eq. 47): mean and std (batch,), with
        σ_i² = β_i ("beta", default) or the posterior variance β̃_i ("beta_tilde"); DDPM Sec. 3.2."""
        beta = jnp.asarray(self.betas, x.dtype)[i]
        var = _ancestral_variance(variance, "beta", beta, jnp.asarray(self.posterior_variance, x.dtype)[i])
        b = batch_broadcast(beta, x)
        return (x + b * score) / jnp.sqrt(1.0 - b), jnp.sqrt(var)


@dataclasses.dataclass(frozen=True)
class SDE(abc.ABC):
    """Base class of affine-drift SDEs dx = f(t) x dt + g(t) dw with a Gaussian perturbation kernel.

    Subclasses implement ``sde``, ``alpha_sigma``, ``prior_sampling`` and ``prior_logp``; everything else
    (marginals, reverse SDE / probability-flow ODE, Euler–Maruyama discretization, score conversions) follows.
    ``N`` is the number of discretization steps of the chain the SDE is the limit of, ``eps`` the smallest time
    used for sampling and likelihoods (the SDE paper's ``sampling_eps``).
    """

    N: int = 1000
    T: float = 1.0
    eps: float = 1e-3

    @classmethod
    def from_config(cls, cfg) -> "SDE":
        """Build from a config section, taking the fields of this dataclass that the section has."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: cfg[k] for k in cfg.keys() if k in names})

    # ---- the forward SDE ------------------------------------------------------------------------------
    @abc.abstractmethod
    def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape (batch,))."""

    @abc.abstractmethod
    def alpha_sigma(self, t: Array) -> Tuple[Array, Array]:
        """Mean coefficient α(t) and standard deviation σ(t) of p_0t(x(t)|x(0)) = N(α x(0), σ² I)."""

    def marginal_prob(self, x: Array, t: Array) -> Tuple[Array, Array]:
        """Mean α(t) x and std σ(t) (shape (batch,)) of the perturbation kernel p_0t(x(t) | x(0) = x)."""
        alpha, sigma = self.alpha_sigma(t)
        return batch_broadcast(alpha, x) * x, sigma

    def perturb(self, key: Array, x: Array, t: Array) -> Tuple[Array, Array, Array]:
        """Sample x(t) = α(t) x + σ(t) z, z ~ N(0, I). Returns (x_t, z, σ(t))."""
        z = jax.random.normal(key, x.shape, x.dtype)
        mean, std = self.marginal_prob(x, t)
        return mean + batch_broadcast(std, x) * z, z, std

    @abc.abstractmethod
    def prior_sampling(self, key: Array, shape) -> Array:
        """Sample from the prior p_T (shape includes the batch axis)."""

    @abc.abstractmethod
    def prior_logp(self, z: Array) -> Array:
        """log p_T(z) per example, shape (batch,)."""

    @property
    def chain(self) -> DDPMChain | None:
        """The DDPM chain the SDE is the limit of (VP-type SDEs), or None. Setting it gives the SDE the chain's
        discretization, ancestral sampling, Langevin α_i, the ``ddpm``/``ddpm_vlb`` losses and the DDPM bound."""
        return None

    @property
    def discrete_sigmas(self) -> np.ndarray | None:
        """The SMLD/NCSN noise ladder σ_0 < ... < σ_{N-1} the SDE is the limit of (VE-type SDEs), or None."""
        return None

    def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
        """One step of the discrete chain x_{i+1} = x_i + f_i(x_i) + G_i z_i ending at time t.

        The DDPM chain's step when ``chain`` is set, else Euler–Maruyama with Δt = T/N, f_i = f(x, t) Δt,
        G_i = g(t) √Δt.
        """
        if self.chain is not None:
            return self.chain.discretize(x, self.step_index(t))
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * jnp.sqrt(dt)

    def step_index(self, t: Array) -> Array:
        """Index i = ⌊t (N-1) / T⌋ of the discrete step at time t (the SDE paper's code).

        A tolerance of 1e-4 steps keeps grid times t = i T/(N-1) on step i despite float32 rounding.
        """
        return jnp.clip(jnp.floor(t * (self.N - 1) / self.T + 1e-4).astype(jnp.int32), 0, self.N - 1)

    def timesteps(self, eps: float | None = None) -> Array:
        """The N sampling times linspace(T, eps, N) used by the SDE paper's PC sampler."""
        return jnp.linspace(self.T, self.eps if eps is None else eps, self.N)

    # ---- time reversal ----------------------------------------------------------------------------------
    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (Eq. 6) or probability-flow ODE (Eq. 13) driven by ``score_fn(x, t)``."""
        return ReverseSDE(self, score_fn, probability_flow)

    # ---- network output <-> score -------------------------------------------------------------------------
    def chain_alpha_sigma(self, t: Array) -> Tuple[Array, Array]:
        """α and σ of the discrete chain's marginal q(x_i | x_0) at the step i of t: (√ᾱ_i, √(1 - ᾱ_i)) with a DDPM
        ``chain``; SDEs without a chain of their own use the continuous α(t), σ(t)."""
        if self.chain is not None:
            return self.chain.alpha_sigma(self.step_index(t))
        return self.alpha_sigma(t)

    def score_from_output(self, output: Array, x: Array, t: Array, prediction: str,
                          discrete: bool = False) -> Array:
        """Convert a network output at (x, t) into ∇x log p_t(x).

        eps:   s = -ε̂ / σ(t)                  (x = α x0 + σ ε)
        x0:    s = (α(t) x̂0 - x) / σ(t)²
        score: s = output
        ``discrete``: the network was trained on the discrete chain (DDPM/NCSN step labels), so α, σ are the
        chain's (e.g. √ᾱ_i, √(1-ᾱ_i) for DDPM), as in the 2021 code.
        """
        alpha, sigma = (self.chain_alpha_sigma if discrete else self.alpha_sigma)(t)
        alpha, sigma = batch_broadcast(alpha, x), batch_broadcast(sigma, x)
        if prediction == "eps":
            return -output / sigma
        if prediction == "x0":
            return (alpha * output - x) / sigma**2
        if prediction == "score":
            return output
        raise ValueError(f"unknown prediction target {prediction!r}; expected one of {PREDICTIONS}")

    def output_from_score(self, score: Array, x: Array, t: Array, prediction: str) -> Array:
        """Inverse of ``score_from_output``: the network output that represents ``score``."""
        alpha, sigma = self.alpha_sigma(t)
        alpha, sigma = batch_broadcast(alpha, x), batch_broadcast(sigma, x)
        if prediction == "eps":
            return -sigma * score
        if prediction == "x0":
            return (x + sigma**2 * score) / alpha
        if prediction == "score":
            return score
        raise ValueError(f"unknown prediction target {prediction!r}; expected one of {PREDICTIONS}")

    def model_time(self, t: Array, time_input: str) -> Array:
        """The conditioning label a network receives at time t.

        t:           t itself
        t999:        999 t (score_sde's continuous VP/sub-VP models)
        sigma:       σ(t), the marginal std (NCSN++ continuous VE models)
        index:       t (N-1) / T, the DDPM step as a float
        sigma_index: round((T - t)(N-1)/T), position on the NCSN σ ladder counted from σ_max (NCSN, NCSNv2)
        """
        if time_input == "t":
            return t
        if time_input == "t999":
            return t * 999
        if time_input == "sigma":
            return self.alpha_sigma(t)[1]
        if time_input == "index":
            return t * (self.N - 1) / self.T
        if time_input == "sigma_index":
            return jnp.round((self.T - t) * (self.N - 1) / self.T).astype(jnp.int32)
        raise ValueError(f"unknown time input {time_input!r}; expected one of {TIME_INPUTS}")

    # ---- hooks used by discrete samplers (overridden where the chain has its own rule) --------------------
    def ancestral_step(self, x: Array, t: Array, score: Array, variance: str | None = None) -> Tuple[Array, Array]:
        """Mean and std (shape (batch,)) of the ancestral transition x_{i-1} | x_i of the discrete chain.

        ``variance``: "beta" (the forward step's variance) or "beta_tilde" (the posterior q(x_{i-1}|x_i, x_0)'s);
        None: the chain's usual choice. Defined by the DDPM ``chain`` when there is one."""
        if self.chain is not None:
            return self.chain.ancestral_step(x, self.step_index(t), score, variance)
        raise NotImplementedError(
            f"{type(self).__name__} defines no discrete ancestral chain; use another predictor")

    def langevin_alpha(self, t: Array) -> Array:
        """α_i multiplying the Langevin step size of the SDE paper's corrector (Alg. 4/5): the DDPM ``chain``'s
        α_i = 1 - β_i, 1 without one."""
        if self.chain is not None:
            return jnp.asarray(self.chain.alphas, jnp.float32)[self.step_index(t)]
        return jnp.ones_like(t)


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
    """Reverse-time SDE (or probability-flow ODE) of ``forward`` with the score ``score_fn(x, t)``."""

    forward: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def N(self) -> int:
        return self.forward.N

    @property
    def T(self) -> float:
        return self.forward.T

    def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
        """Drift f - g² s (SDE) or f - ½ g² s (ODE) and diffusion g (SDE) or 0 (ODE)."""
        drift, diffusion = self.forward.sde(x, t)
        return self._reverse(drift, diffusion, x, t)

    def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
        """Reverse of the forward discretization: f_i - G_i² s (SDE) or f_i - ½ G_i² s (ODE), and G_i or 0."""
        f, G = self.forward.discretize(x, t)
        return self._reverse(f, G, x, t)

    def _reverse(self, f, g, x, t):
        coeff = 0.5 if self.probability_flow else 1.0
        drift = f - batch_broadcast(g**2, x) * self.score_fn(x, t) * coeff
        return drift, jnp.zeros_like(g) if self.probability_flow else g


@dataclasses.dataclass(frozen=True)
class _LinearBetaMixin:
    """Shared β(t) = β_min + t (β_max - β_min) of the VP and sub-VP SDEs."""

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t: Array) -> Array:
        """∫_0^t β(s) ds = β_min t + ½ t² (β_max - β_min)."""
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def prior_sampling(self, key, shape):
        return jax.random.normal(key, shape)

    def prior_logp(self, z):
        return standard_normal_logp(z)


@register_sde("vpsde")
@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearBetaMixin, SDE):
    """Variance-preserving SDE dx = -½ β(t) x dt + √β(t) dw, the continuous limit of DDPM.

    α(t) = exp(-½ ∫β), σ(t)² = 1 - α(t)². The discrete chain has β_i = β_min/N + i (β_max - β_min)/(N(N-1)).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta)

    def alpha_sigma(self, t):
        log_alpha = -0.5 * self.integral_beta(t)
        return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2 * log_alpha))

    @functools.cached_property
    def chain(self) -> DDPMChain:
        """DDPM's chain with β_i = linspace(β_min/N, β_max/N); with N=1000 DDPM's linspace(1e-4, 0.02)."""
        if self.beta_max / self.N >= 1.0:
            raise ValueError(f"{type(self).__name__}(N={self.N}, beta_max={self.beta_max}): the discrete chain's "
                             f"β_N = beta_max/N = {self.beta_max / self.N:g} must be < 1; use N > {self.beta_max:g}")
        return DDPMChain.from_betas(np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N))


@register_sde("subvpsde")
@dataclasses.dataclass(frozen=True)
class subVPSDE(_LinearBetaMixin, SDE):
    """Sub-VP SDE dx = -½ β(t) x dt + √(β(t)(1 - exp(-2 ∫β))) dw; σ(t) = 1 - exp(-∫β) ≤ the VP σ(t)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def sde(self, x, t):
        beta = self.beta(t)
        discount = -jnp.expm1(-2.0 * self.integral_beta(t))
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta * discount)

    def alpha_sigma(self, t):
        log_alpha = -0.5 * self.integral_beta(t)
        return jnp.exp(log_alpha), -jnp.expm1(2 * log_alpha)


@register_sde("vesde")
@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE dx = √(d σ²(t)/dt) dw with σ(t) = σ_min (σ_max/σ_min)^t, continuous SMLD/NCSN.

    As in the SDE paper the marginal std is σ(t) itself (x(0) is taken to carry σ_min noise already), and the
    discrete chain is NCSN's geometric ladder σ_i = σ_min (σ_max/σ_min)^{i/(N-1)}.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    eps: float = 1e-5

    def sigma(self, t: Array) -> Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        g = self.sigma(t) * np.sqrt(2 * np.log(self.sigma_max / self.sigma_min))
        return jnp.zeros_like(x), g

    def alpha_sigma(self, t):
        return jnp.ones_like(t), self.sigma(t)

    def prior_sampling(self, key, shape):
        return jax.random.normal(key, shape) * self.sigma_max

    def prior_logp(self, z):
        return standard_normal_logp(z, self.sigma_max)

    @functools.cached_property
    def discrete_sigmas(self) -> np.ndarray:
        """σ_0 < ... < σ_{N-1}: NCSN's geometric noise ladder from σ_min to σ_max."""
        return np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N))

    def chain_alpha_sigma(self, t):
        """(1, σ_i) at the NCSN ladder step i of t."""
        return jnp.ones_like(t), jnp.asarray(self.discrete_sigmas, jnp.float32)[self.step_index(t)]

    def _sigma_and_previous(self, t, dtype):
        i = self.step_index(t)
        sigmas = jnp.asarray(self.discrete_sigmas, dtype)
        return sigmas[i], jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])

    def discretize(self, x, t):
        """SMLD: x_i = x_{i-1} + √(σ_i² - σ_{i-1}²) z, i.e. f_i = 0, G_i = √(σ_i² - σ_{i-1}²)."""
        sigma, prev = self._sigma_and_previous(t, x.dtype)
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - prev**2)

    def ancestral_step(self, x, t, score, variance=None):
        """SMLD ancestral sampling (SDE paper Eq. 47): mean x + (σ_i² - σ_{i-1}²) s, std
        √(σ_{i-1}² (σ_i² - σ_{i-1}²) / σ_i²) (the posterior's, "beta_tilde", default) or √(σ_i² - σ_{i-1}²) ("beta")."""
        sigma, prev = self._sigma_and_previous(t, x.dtype)
        var_step = sigma**2 - prev**2
        var = _ancestral_variance(variance, "beta_tilde", var_step, prev**2 * var_step / sigma**2)
        return x + batch_broadcast(var_step, x) * score, jnp.sqrt(var)


def _ancestral_variance(variance, default, beta, beta_tilde):
    """Pick the ancestral step's variance by name ("beta" or "beta_tilde"; None: ``default``)."""
    choices = {"beta": beta, "beta_tilde": beta_tilde}
    name = default if variance is None else variance
    if name not in choices:
        raise ValueError(f"unknown ancestral variance {variance!r}; expected one of {sorted(choices)}")
    return choices[name]


def get_sde(cfg) -> SDE:
    """Build the SDE named ``cfg.name`` from a config section (``config.sde``)."""
    name = cfg.name
    if name not in SDES:
        raise ValueError(f"unknown SDE {name!r} in config.sde.name; registered SDEs: {sorted(SDES)}")
    return SDES[name].from_config(cfg)
