"""Adding a sampler is one builder in ``samplers.SAMPLERS``: the explicit midpoint rule (RK2) for the
probability-flow ODE dx/dt = f(x, t) - ½ g(t)² s(x, t) on any time grid T = t_0 > ... > t_{n-1} = eps:

    x_mid = x + ½ h f̃(x, t_i),   x ← x + h f̃(x_mid, t_i + ½ h),   h = t_{i+1} - t_i < 0

followed by Tweedie's denoiser at eps. NFE = 2 (n - 1) + denoise. The builder sees only the SDE and
``score_fn(x, t)``; its keyword arguments are its options, read from ``config.sampling`` by name. Sample the
two-moons toy with it:

    python main.py --config=examples/midpoint_sampler.py --workdir=/tmp/midpoint
"""
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import samplers
from configs import toy


def build_midpoint(sde, score_fn, shape, num_steps: int = 50, grid: str = "log_snr", denoise: bool = True,
                   eps: Optional[float] = None, mesh="auto"):
    """Jitted ``key -> (x, nfe)`` and the NFE; ``num_steps`` grid times (``samplers.time_grid``) from T to eps."""
    ts = samplers.time_grid(sde, num_steps, samplers.check_eps(sde, eps), grid)
    flow = sde.reverse(score_fn, probability_flow=True)
    drift = lambda x, t: flow.sde(x, jnp.full((x.shape[0],), t))[0]
    nfe = 2 * (num_steps - 1) + int(denoise)

    def run(key):
        def step(x, i):
            h = ts[i + 1] - ts[i]
            x_mid = x + 0.5 * h * drift(x, ts[i])
            return x + h * drift(x_mid, ts[i] + 0.5 * h), None

        x, _ = jax.lax.scan(step, sde.prior_sampling(key, shape), jnp.arange(num_steps - 1))
        x = samplers.tweedie(sde, score_fn, x, ts[-1]) if denoise else x
        return x, jnp.asarray(nfe)

    sharding = samplers.batch_sharding(shape, mesh)  # None on one device
    if sharding is None:
        return jax.jit(run), nfe
    return jax.jit(run, out_shardings=(sharding, NamedSharding(sharding.mesh, PartitionSpec()))), nfe


samplers.SAMPLERS["midpoint"] = build_midpoint


def get_config():
    """The two-moons toy (configs/toy.py) sampled with 20 midpoint steps (39 NFE)."""
    config = toy.get_config("two_moons")
    config.sampling.method = "midpoint"
    config.sampling.num_steps = 20
    config.sampling.grid = "log_snr"
    return config
