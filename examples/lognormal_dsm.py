"""Adding a loss is one registered factory: denoising score matching with EDM's log-normal noise levels.

Karras et al. (2022, "EDM") draw the noise level of the DSM loss from a log-normal instead of t ~ U[eps, T]:

    ln σ̃ ~ N(P_mean, P_std²),   σ̃ = σ(t)/α(t) = e^{-λ(t)},   t = λ⁻¹(-ln σ̃)  (clipped to [eps, T])
    x_t = α(t) x_0 + σ(t) z,    loss = ‖σ(t) s_θ(x_t, t) + z‖²         (λ(t) = σ², the weight of loss "dsm")

Only the time distribution differs from ``losses.get_dsm_loss``; it works with every SDE (λ⁻¹ is found by
bisection, ``samplers.t_from_log_snr``). Train the two-moons toy with it:

    python main.py --config=examples/lognormal_dsm.py --workdir=/tmp/lognormal
"""
import jax
import jax.numpy as jnp

import losses
import samplers
from configs import toy


@losses.register_loss("dsm_lognormal")
def get_lognormal_dsm_loss(config, sde, model) -> losses.LossFn:
    """DSM ‖σ s_θ + z‖² at t with ln(σ(t)/α(t)) ~ N(p_mean, p_std²) (``config.training.p_mean`` / ``p_std``)."""
    tc = config.training
    p_mean, p_std = tc.get("p_mean", -1.2), tc.get("p_std", 1.2)
    lam_T, lam_eps = samplers.log_snr(sde, jnp.array([sde.T, losses.training_eps(config, sde)]))

    def loss_fn(params, key, batch):
        x = batch["x"]
        k_t, k_z, k_drop = jax.random.split(key, 3)
        log_sigma = p_mean + p_std * jax.random.normal(k_t, (x.shape[0],))
        t = samplers.t_from_log_snr(sde, jnp.clip(-log_sigma, lam_T, lam_eps))
        x_t, z, sigma = sde.perturb(k_z, x, t)
        score = model.score(params, sde, x_t, t, train=True, key=k_drop)
        per_example = losses.dsm_at(score, z, sigma, jnp.ones_like(sigma), tc.reduce_mean)
        return per_example, {"t": t, "sigma": sigma}

    return loss_fn


def get_config():
    """The two-moons toy (configs/toy.py) trained with ``dsm_lognormal``."""
    config = toy.get_config("two_moons")
    config.training.loss = "dsm_lognormal"
    config.training.p_mean = -0.5  # the moons have std ≈ 1 (EDM's -1.2 is for data of std 0.5)
    config.training.p_std = 1.2
    return config
