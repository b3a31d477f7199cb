"""Adding a sampler is one step function: the explicit midpoint rule (RK2) for the probability-flow ODE
dx/dt = f(x, t) - ½ g(t)² s(x, t) on any time grid T = t_0 > ... > t_{n-1} = eps:

    x_mid = x + ½ h f̃(x, t_i),   x ← x + h f̃(x_mid, t_i + ½ h),   h = t_{i+1} - t_i < 0

followed by Tweedie's denoiser at eps. NFE = 2 (n - 1) + denoise. ``samplers.grid_method`` runs the step in the
shared jitted loop: NFE count, named or array time grids, ``x_init``, trajectories, sharding over a mesh and the
inpainting ``project`` hook come with it. The step sees only the SDE and ``score_fn(x, t)``. Sample the two-moons
toy with it:

    python main.py --config=examples/midpoint_sampler.py --workdir=/tmp/midpoint
"""
import jax.numpy as jnp

import samplers
from configs import toy


def midpoint_step(sde, score_fn, ts) -> samplers.GridStep:
    """The midpoint step of the probability-flow ODE from t to t_next: 2 score evaluations."""
    flow = sde.reverse(score_fn, probability_flow=True)
    drift = lambda x, t: flow.sde(x, jnp.full((x.shape[0],), t))[0]

    def step(key, x, state, i, t, t_next):
        h = t_next - t
        x_mid = x + 0.5 * h * drift(x, t)
        return x + h * drift(x_mid, t + 0.5 * h), state

    return samplers.GridStep(step, nfe=2)


build_midpoint = samplers.register_sampler("midpoint", samplers.grid_method(midpoint_step, 50, grid="log_snr"))


def get_config():
    """The two-moons toy (configs/toy.py) sampled with 20 midpoint steps (39 NFE)."""
    config = toy.get_config("two_moons")
    config.sampling.method = "midpoint"
    config.sampling.num_steps = 20
    config.sampling.grid = "log_snr"
    return config
