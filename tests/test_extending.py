"""A new SDE defined in one file (examples/cosine_vp.py) trains, samples and matches its own math."""
import jax
import jax.numpy as jnp
import numpy as np

import datasets
import experiment
import losses
import run_lib
import samplers
import sde_lib
from analytic import sliced_wasserstein
from examples import cosine_vp, cosine_vp_config


def test_cosine_beta_is_minus_dlog_alpha_bar():
    sde = cosine_vp.CosineVPSDE()
    t = jnp.linspace(0.01, 0.95, 7)
    dlog = jax.vmap(jax.grad(lambda u: 2 * jnp.log(sde.alpha_sigma(u)[0])))(t)
    np.testing.assert_allclose(sde.beta(t), -dlog, rtol=1e-4)
    alpha, sigma = sde.alpha_sigma(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)


def test_cosine_vp_chain_is_the_cosine_schedule_given_to_ddpm_chain():
    """The example's discrete chain is ``DDPMChain.cosine`` on [0, T]: ᾱ_i is the SDE's own α(t)² at
    t = (i + 1) T/N, and the chain alone gives it DDPM ancestral sampling and the ddpm losses."""
    sde = cosine_vp.CosineVPSDE(N=200)
    t = (np.arange(sde.N) + 1) * sde.T / sde.N
    alpha = np.asarray(sde.alpha_sigma(jnp.asarray(t, jnp.float32))[0], np.float64)
    np.testing.assert_allclose(sde.chain.alphas_cumprod, alpha**2, rtol=2e-4, atol=1e-7)
    config = cosine_vp_config.get_config()
    config.training.loss = "ddpm"
    losses.check_loss_config(config, sde)  # the ddpm loss needs a chain: no error
    # ancestral sampling of N(mu, s²) data with its exact score recovers mean and std
    mu, s = 0.7, 0.3
    score_fn = lambda x, t: -(x - sde.alpha_sigma(t)[0][:, None] * mu) / (
        (sde.alpha_sigma(t)[0] ** 2 * s**2 + sde.alpha_sigma(t)[1] ** 2)[:, None])
    x, _ = samplers.sample(jax.random.key(3), sde, score_fn, (4000, 1), "pc", predictor="ancestral_sampling",
                           corrector="none", num_steps=sde.N)
    assert abs(float(x.mean()) - mu) < 0.03 and abs(float(x.std()) - s) < 0.03, (float(x.mean()), float(x.std()))


def test_cosine_vp_trains_and_samples_from_its_config(tmp_path):
    config = cosine_vp_config.get_config()
    config.training.n_iters = 600
    config.training.snapshot_freq = 600
    config.training.snapshot_sampling = False
    assert isinstance(sde_lib.get_sde(config.sde), cosine_vp.CosineVPSDE)
    exp = experiment.Experiment.from_config(config)
    state = run_lib.train(exp, str(tmp_path))
    samples = np.asarray(exp.sample(jax.random.key(1), state.ema_params, 1000)[0])
    real = datasets.draw_examples(config, "test", 1000, seed=config.seed + 7)
    distance = float(sliced_wasserstein(jax.random.key(0), samples, real))
    print(f"cosine VP two moons: sliced W1 {distance:.3f}")
    assert np.isfinite(samples).all() and distance < 0.15
