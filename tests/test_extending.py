"""A new SDE defined in one file (examples/cosine_vp.py) trains, samples and matches its own math."""
import jax
import jax.numpy as jnp
import numpy as np

import datasets
import experiment
import run_lib
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
