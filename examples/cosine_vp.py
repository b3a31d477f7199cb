"""Adding an SDE is one subclass: the cosine-schedule VP SDE (Nichol & Dhariwal, 2021) in continuous time.

    ᾱ(t) = f(t)/f(0),  f(t) = cos²(π/2 · (t + s)/(1 + s))      (so α(t) = √ᾱ(t), σ(t)² = 1 − ᾱ(t))
    β(t) = −d log ᾱ/dt = π/(1 + s) · tan(π/2 · (t + s)/(1 + s))
    dx = −½ β(t) x dt + √β(t) dw

Only the forward SDE, the marginal coefficients and the prior are written here; marginals, the reverse SDE and
probability-flow ODE, score conversions, every sampler, loss and the likelihood come from the base class. Its
discrete chain is DDPM's with the cosine β schedule (``chain``: a ``sde_lib.DDPMChain``, not a copy of the VP
SDE's), which gives it the DDPM discretization, ancestral sampling and the ``ddpm``/``ddpm_vlb`` losses. Select it
with ``config.sde.name = "cosine_vpsde"`` after importing this module (the config file
`examples/cosine_vp_config.py` does both).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import sde_lib


@sde_lib.register_sde("cosine_vpsde")
@dataclasses.dataclass(frozen=True)
class CosineVPSDE(sde_lib.SDE):
    """VP SDE with the cosine noise schedule; T < 1 because β(t) diverges at t = 1."""

    s: float = 0.008
    T: float = 0.995

    def _u(self, t):
        return 0.5 * np.pi * (t + self.s) / (1 + self.s)

    def beta(self, t):
        return np.pi / (1 + self.s) * jnp.tan(self._u(t))

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * sde_lib.batch_broadcast(beta, x) * x, jnp.sqrt(beta)

    def alpha_sigma(self, t):
        alpha_bar = (jnp.cos(self._u(t)) / np.cos(self._u(0.0))) ** 2
        return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)

    def prior_sampling(self, key, shape):
        return jax.random.normal(key, shape)

    def prior_logp(self, z):
        return sde_lib.standard_normal_logp(z)

    @functools.cached_property
    def chain(self) -> sde_lib.DDPMChain:
        """The cosine DDPM chain of N steps on [0, T] (Nichol & Dhariwal's when T = 1)."""
        return sde_lib.DDPMChain.cosine(self.N, self.s, T=self.T)
