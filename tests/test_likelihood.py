"""Probability-flow ODE likelihoods against closed-form Gaussian-mixture densities; bits/dim conventions."""
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiment
import likelihood
import run_lib
import sde_lib
from analytic import GaussianMixture
from conftest import REPO

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}


def mixture(dim: int, seed: int = 0) -> GaussianMixture:
    rng = np.random.default_rng(seed)
    return GaussianMixture(np.array([0.3, 0.7]), rng.normal(size=(2, dim)), np.array([0.3, 0.6]))


def ode_model_logp(gm, sde, x, z, eps):
    """log-density of the ODE's model: log p_eps(x) with p_T(z) replaced by the prior (exact flow, exact score)."""
    b = x.shape[0]
    return (gm.log_prob_t(sde, x, jnp.full((b,), eps)) - gm.log_prob_t(sde, z, jnp.full((b,), sde.T))
            + sde.prior_logp(z))


EXACT_CASES = [(name, dim) for name in ("vp", "ve") for dim in (1, 2, 8)] + [("subvp", 8)] + [
    pytest.param("subvp", dim, marks=pytest.mark.slow) for dim in (1, 2)]


@pytest.mark.parametrize("name,dim", EXACT_CASES)
def test_exact_trace_matches_mixture_density(name, dim):
    sde, gm = SDES[name], mixture(dim, seed=dim)
    x = gm.sample(jax.random.key(dim), 8)
    logp, z, nfe = likelihood.log_likelihood(jax.random.key(0), sde, gm.score_fn(sde), x)
    err = np.abs(np.asarray(logp - ode_model_logp(gm, sde, x, z, sde.eps))) / dim
    assert err.max() < 0.01, (name, dim, err.max())
    assert np.all(np.asarray(nfe) > 0)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_latent_matches_closed_form_flow_of_a_gaussian(name):
    """For N(μ, s² I) data the flow keeps (x - m(t)) / √v(t) fixed: z = m(T) + √(v(T)/v(ε)) (x - m(ε))."""
    sde, mu, s = SDES[name], np.array([1.0, -0.5, 2.0]), 0.7
    gm = GaussianMixture(np.array([1.0]), mu[None], np.array([s]))
    x = gm.sample(jax.random.key(1), 6)
    _, z, _ = likelihood.log_likelihood(jax.random.key(0), sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6)

    def m_v(t):
        a, sig = sde.alpha_sigma(jnp.array([t]))
        return a[0] * mu, (a[0] * s) ** 2 + sig[0] ** 2

    (m0, v0), (m1, v1) = m_v(sde.eps), m_v(sde.T)
    expected = m1 + jnp.sqrt(v1 / v0) * (x - m0)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4 * float(jnp.sqrt(v1)))


@pytest.mark.parametrize("divergence", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(divergence):
    sde, gm = SDES["vp"], mixture(8, seed=3)
    n = 256
    x = jnp.repeat(gm.sample(jax.random.key(5), 1), n, axis=0)  # one point, n independent probes
    sf = gm.score_fn(sde)
    exact, _, _ = likelihood.log_likelihood(jax.random.key(0), sde, sf, x[:1])
    est, _, _ = likelihood.log_likelihood(jax.random.key(7), sde, sf, x, divergence=divergence)
    est = np.asarray(est, np.float64)
    se = est.std(ddof=1) / math.sqrt(n)
    assert est.std() > 1e-3  # the probes do differ between examples
    assert abs(est.mean() - float(exact[0])) < 4 * se + 1e-3, (est.mean(), float(exact[0]), se)


def test_probes_are_held_fixed_over_the_solve():
    """Isotropic Gaussian data: J = a(t) I, so with one fixed probe v the estimate is ‖v‖²/D times the exact
    ∫div. Probes redrawn at each drift evaluation would average ‖v‖² towards D instead."""
    sde, dim = SDES["vp"], 4
    gm = GaussianMixture(np.array([1.0]), np.zeros((1, dim)), np.array([0.5]))
    x, key = gm.sample(jax.random.key(2), 8), jax.random.key(11)
    sf = gm.score_fn(sde)
    exact, z, _ = likelihood.log_likelihood(key, sde, sf, x)
    est, _, _ = likelihood.log_likelihood(key, sde, sf, x, divergence="gaussian")
    probes = likelihood._draw_probes(key, "gaussian", 1, x)
    div_exact = exact - sde.prior_logp(z)
    expected = sde.prior_logp(z) + div_exact * jnp.sum(probes**2, axis=(1, 2)) / dim
    np.testing.assert_allclose(est, expected, rtol=1e-4, atol=1e-3)
    rad, _, _ = likelihood.log_likelihood(key, sde, sf, x, divergence="rademacher")
    np.testing.assert_allclose(rad, exact, atol=1e-3)  # vᵀ (a I) v = a D exactly for ±1 probes


@pytest.mark.parametrize("solver", ["tsit5", "heun"])
def test_nfe_counts_drift_evaluations(solver):
    sde, gm = SDES["vp"], mixture(2)
    calls = []
    base = gm.score_fn(sde)

    def counted(x, t):
        jax.debug.callback(lambda _: calls.append(1), t)
        return base(x, t)

    _, _, nfe = likelihood.log_likelihood(jax.random.key(0), sde, counted, gm.sample(jax.random.key(1), 1),
                                          solver=solver, rtol=1e-4, atol=1e-4)
    jax.effects_barrier()
    assert int(nfe[0]) == len(calls)


def test_sharded_equals_unsharded():
    script = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh
        import likelihood, sde_lib
        from analytic import GaussianMixture
        gm = GaussianMixture(np.array([0.5, 0.5]), np.array([[-2., 0.], [2., 1.]]), np.array([0.1, 0.5]))
        sde = sde_lib.VPSDE()
        mesh = Mesh(np.array(jax.devices()), ("data",))
        x = gm.sample(jax.random.key(0), 8)
        a = likelihood.log_likelihood(jax.random.key(1), sde, gm.score_fn(sde), x, divergence="rademacher")
        b = jax.block_until_ready(likelihood.log_likelihood(
            jax.random.key(1), sde, gm.score_fn(sde), x, divergence="rademacher", mesh=mesh))
        assert len(b[0].sharding.device_set) == 4, b[0].sharding
        for u, v in zip(a, b):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6)
        try:
            likelihood.log_likelihood(jax.random.key(1), sde, gm.score_fn(sde), x[:6], mesh=mesh)
        except ValueError as e:
            assert "not divisible" in str(e), e
        else:
            raise AssertionError("an unshardable batch was accepted")
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
               "--xla_cpu_collective_call_terminate_timeout_seconds=8", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ---- errors ------------------------------------------------------------------------------------------------------

def test_clear_errors():
    sde, gm = SDES["vp"], mixture(2)
    sf, key, x = gm.score_fn(sde), jax.random.key(0), jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="unknown divergence estimator 'hutch'"):
        likelihood.log_likelihood(key, sde, sf, x, divergence="hutch")
    with pytest.raises(ValueError, match="unknown ODE solver"):
        likelihood.log_likelihood(key, sde, sf, x, solver="rk4")
    with pytest.raises(ValueError, match=r"batch axis.*shape \(2,\)"):
        likelihood.log_likelihood(key, sde, sf, jnp.zeros((2,)))
    with pytest.raises(ValueError, match="use 'gaussian' or 'rademacher'"):
        likelihood.log_likelihood(key, sde, sf, jnp.zeros((1, 32, 32, 3)))
    space = likelihood.DataSpace(bits=8, centered=False)
    with pytest.raises(ValueError, match=r"outside the declared range \[0, 1\]"):
        space.integers(np.full((1, 3), -0.5))
    with pytest.raises(ValueError, match="not 8-bit"):
        space.integers(np.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="batch axis"):
        space.integers(np.zeros(3))
    logp_fn = lambda k, x: (jnp.zeros(x.shape[0]), jnp.zeros(x.shape[0]))
    with pytest.raises(ValueError, match="unknown dequantization 'gaussian'"):
        likelihood.data_log_likelihood(key, logp_fn, np.zeros((1, 3)), space, dequantization="gaussian")
    with pytest.raises(ValueError, match="continuous data"):
        likelihood.data_log_likelihood(key, logp_fn, np.zeros((1, 3)), likelihood.DataSpace(bits=None))


def test_running_out_of_solver_steps_names_max_steps():
    """A solve that hits max_steps fails loudly (no silent NaN), naming the setting; the others still solve."""
    sde, gm = SDES["vp"], mixture(2)
    x = gm.sample(jax.random.key(3), 4)
    with pytest.raises(RuntimeError, match=r"did not reach T for 4 of 4 examples within max_steps=3"):
        likelihood.log_likelihood(jax.random.key(0), sde, gm.score_fn(sde), x, max_steps=3)
    logp, _, nfe = likelihood.log_likelihood(jax.random.key(0), sde, gm.score_fn(sde), x, max_steps=4096)
    assert np.all(np.isfinite(np.asarray(logp))) and np.all(np.asarray(nfe) > 0)


# ---- bits/dim ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("centered", [True, False])
def test_uniform_noise_data_under_a_uniform_model_is_8_bits(centered):
    """8-bit uniform noise has entropy 8 bits/dim; a uniform density on [lo, hi]^D must score exactly that."""
    space = likelihood.DataSpace(bits=8, centered=centered)
    lo, hi = space.bounds
    k = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 3))
    x = np.asarray(space.lattice(k))

    def uniform_logp(key, xm):
        assert float(jnp.min(xm)) >= lo and float(jnp.max(xm)) < hi
        return jnp.full((xm.shape[0],), -48 * math.log(hi - lo)), jnp.zeros(xm.shape[0])

    out = likelihood.data_log_likelihood(jax.random.key(0), uniform_logp, x, space, num_draws=3)
    np.testing.assert_allclose(out["bpd"], 8.0, atol=1e-5)


@pytest.mark.parametrize("centered", [True, False])
def test_log_det_matches_the_pipeline_offset(centered):
    """Independent check against datasets.ImageTransform: -log|det T'| / (D ln 2) is its bits/dim offset."""
    import datasets

    space = likelihood.DataSpace(bits=8, centered=centered)
    v = jnp.ones((2, 3, 3, 1))
    offset = -float(space.log_det(v)[0]) / (9 * math.log(2))
    assert offset == pytest.approx(datasets.ImageTransform(centered=centered).bpd_offset, abs=1e-5)
    k = np.arange(256).reshape(1, 256)
    np.testing.assert_array_equal(space.integers(datasets.ImageTransform(centered=centered).forward(k)), k)


def test_dequantized_gaussian_matches_closed_form():
    """Model N(μ, s²) in model space: E_u log p(T(k+u)) = Σ -½log 2πs² - ((T(k+½) - μ)² + c²/12) / 2s², c = 2/256."""
    space, mu, s = likelihood.DataSpace(bits=8, centered=True), 0.1, 0.5
    k = np.random.default_rng(1).integers(0, 256, size=(4, 8, 8, 3))
    dim, c = 192, 2.0 / 256

    def gauss_logp(key, xm):
        return jnp.sum((-0.5 * jnp.log(2 * jnp.pi * s**2) - (xm - mu) ** 2 / (2 * s**2)).reshape(
            xm.shape[0], -1), -1), jnp.zeros(xm.shape[0])

    out = likelihood.data_log_likelihood(jax.random.key(3), gauss_logp, np.asarray(space.lattice(k)), space,
                                         num_draws=16)
    centre = -1.0 + c * (k + 0.5)
    expected = (np.sum(-0.5 * np.log(2 * np.pi * s**2) - ((centre - mu) ** 2 + c**2 / 12) / (2 * s**2),
                       axis=(1, 2, 3)) + dim * np.log(c))
    np.testing.assert_allclose(out["bpd"], -expected / (dim * np.log(2)), atol=1e-3)
    assert out["bpd"].shape == (4,)


def test_continuous_gaussian_bits_per_dim_through_the_ode():
    """Continuous data: bits/dim = -log p_model(x) / (D ln 2) with no offset, the ODE model of an exact score."""
    sde, gm = SDES["ve"], mixture(2, seed=4)
    x = gm.sample(jax.random.key(0), 8)
    sf = gm.score_fn(sde)

    def model_logp(key, xm):
        logp, z, nfe = likelihood.log_likelihood(key, sde, sf, xm)
        return logp, nfe

    out = likelihood.data_log_likelihood(jax.random.key(1), model_logp, x, likelihood.DataSpace(bits=None),
                                         dequantization="none")
    logp, z, _ = likelihood.log_likelihood(jax.random.key(1), sde, sf, x)
    expected = -ode_model_logp(gm, sde, x, z, sde.eps) / (2 * math.log(2))
    np.testing.assert_allclose(out["bpd"], expected, atol=0.01 / math.log(2))


def test_bits_per_dim_needs_the_change_of_units():
    """The footgun: a model-space density of 8-bit data read as bits/dim comes out negative. bits_per_dim
    refuses to run without log_det; bits_per_dim_of_data dequantizes and adds log|det T'| = D log(2/256)."""
    sde, gm, space = SDES["vp"], GaussianMixture([1.0], [[0.0] * 4], [0.1]), likelihood.DataSpace(8, True)
    k = np.clip(np.round(127.5 + 12.75 * np.random.default_rng(0).standard_normal((6, 4))), 0, 255)
    x = np.asarray(space.lattice(k))
    logp, _, _ = likelihood.log_likelihood(jax.random.key(0), sde, gm.score_fn(sde), x)
    with pytest.raises(ValueError, match="needs log_det=.*bits_per_dim_of_data"):
        likelihood.bits_per_dim(logp, 4)
    naive = np.asarray(likelihood.bits_per_dim(logp, 4, log_det=0.0))
    assert np.all(naive < 0), naive   # what the bare call used to return silently
    out = likelihood.bits_per_dim_of_data(jax.random.key(0), sde, gm.score_fn(sde), x, dequantization="none")
    np.testing.assert_allclose(np.asarray(out["bpd"]), naive + 7.0, atol=1e-4)   # -log2(2/256) = 7 bits/dim
    assert np.all(np.asarray(out["bpd"]) > 0)
    dequantized = likelihood.bits_per_dim_of_data(jax.random.key(1), sde, gm.score_fn(sde), x, num_draws=2)
    assert np.all(np.abs(np.asarray(dequantized["bpd"]) - np.asarray(out["bpd"])) < 0.5)


# ---- the DDPM bound ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_bound_of_a_point_mass_is_closed_form(variance):
    """Data = one fixed 8-bit image x0 per example and the exact ε̂ of a point mass (ε̂ = ε): μ_θ = μ̃, so every
    L_{i-1} is the KL of the variances alone, L_0 = -Σ log(Φ(δ/σ_0) - Φ(-δ/σ_0)) (edges to ±∞) and L_T is the
    Gaussian KL. Reference in float64 numpy/scipy from the DDPM schedule written out here."""
    from scipy.stats import norm

    sde, space = SDES["vp"], likelihood.DataSpace(8, True)
    k = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 1))
    k[0, 0, :2, 0] = (0, 255)
    x0 = space.lattice(k)
    abar = jnp.asarray(sde.chain.alphas_cumprod, jnp.float32)

    def eps_fn(x, i):
        a = abar[i][:, None, None, None]
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    out = likelihood.ddpm_bound(jax.random.key(0), sde, np.asarray(x0), eps_fn=eps_fn, variance=variance)
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    post = betas * (1 - np.append(1.0, ab[:-1])) / (1 - ab)
    var = betas if variance == "beta" else np.concatenate([post[1:2], post[1:]])
    xx, dim = np.asarray(x0, np.float64).reshape(3, -1), 16
    l_t = 0.5 * np.sum(ab[-1] * xx**2 + (1 - ab[-1]) - 1 - np.log(1 - ab[-1]), -1)
    l_mid = dim * np.sum(0.5 * (np.log(var[1:] / post[1:]) + post[1:] / var[1:] - 1))
    s, d = np.sqrt(var[0]), 1 / 255
    upper, lower = np.where(xx > 0.999, np.inf, d / s), np.where(xx < -0.999, -np.inf, -d / s)
    l_0 = -np.sum(np.log(norm.cdf(upper) - norm.cdf(lower)), -1)
    np.testing.assert_allclose(out["bpd"], (l_t + l_mid + l_0) / (dim * np.log(2)), atol=1e-3)


def test_ddpm_bound_errors():
    sde, x = SDES["vp"], np.zeros((1, 4))
    eps_fn = lambda x, i: jnp.zeros_like(x)
    with pytest.raises(ValueError, match="DDPM Markov chain"):
        likelihood.ddpm_bound(jax.random.key(0), SDES["ve"], x, eps_fn=eps_fn)
    with pytest.raises(ValueError, match="centred model space"):
        likelihood.ddpm_bound(jax.random.key(0), sde, x, eps_fn=eps_fn, space=likelihood.DataSpace(8, False))
    with pytest.raises(ValueError, match="not 8-bit"):
        likelihood.ddpm_bound(jax.random.key(0), sde, np.full((1, 4), 0.001), eps_fn=eps_fn)


# ---- --mode=likelihood ---------------------------------------------------------------------------------------------

def _checkpointed(config, workdir):
    import pathlib

    import utils

    exp = experiment.Experiment.from_config(config)
    ckpt = utils.CheckpointManager(pathlib.Path(workdir) / "checkpoints", config)
    ckpt.save(1, experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape))
    ckpt.wait()
    return exp


def test_run_writes_the_figure_with_every_setting(tmp_path, capsys):
    """Toy (continuous) data: the JSON figure equals -log p / (D ln 2) of log_likelihood on the same points."""
    import json

    import datasets
    from configs import toy

    config = toy.get_config("two_moons")
    config.eval.batch_size, config.data.toy_eval_size = 4, 6
    lik = config.eval.likelihood
    lik.divergence, lik.rtol, lik.atol = "exact", 1e-4, 1e-4
    exp = _checkpointed(config, tmp_path)
    result = run_lib.likelihood(exp, str(tmp_path))
    out = capsys.readouterr().out
    assert "likelihood on every test example (tsit5, rtol 0.0001, exact divergence" in out   # said before starting
    assert "examples, step 0, EMA weights)" in out
    written = json.loads(next((tmp_path / "likelihood").glob("*.json")).read_text())
    assert written == pytest.approx(result)
    for key in ("bpd", "estimator", "num_probes", "rtol", "atol", "dequantization", "num_draws", "nfe_mean",
                "num_examples", "checkpoint_step", "ema", "solver", "eps", "data_bits", "split"):
        assert key in written, key
    assert written["num_examples"] == 6 and written["dequantization"] == "none" and written["data_bits"] is None
    x = np.concatenate([b["x"][b["mask"]] for b in datasets.get_dataset(config, "test", infinite=False)])
    state = restore(config, tmp_path)
    logp, _, _ = likelihood.log_likelihood(jax.random.key(0), exp.sde, exp.model.score_fn(state.params, exp.sde),
                                           jnp.asarray(x), rtol=1e-4, atol=1e-4)
    assert written["bpd"] == pytest.approx(float(np.mean(-logp / (2 * np.log(2)))), abs=1e-3)


def test_eval_with_bits_per_dim_builds_and_restores_once(tmp_path, monkeypatch):
    """``--mode=eval`` with ``eval.enable_bpd``: the figure comes from the checkpoint evaluate restored (one
    Experiment, one restore; the likelihood runner used to restore it again with a second Experiment)."""
    import utils
    from configs import toy

    config = toy.get_config("two_moons")
    config.eval.batch_size, config.data.toy_eval_size = 4, 4
    config.eval.enable_bpd, config.eval.enable_loss, config.eval.enable_sampling = True, False, False
    config.eval.likelihood.divergence, config.eval.likelihood.rtol, config.eval.likelihood.atol = "exact", 1e-3, 1e-3
    exp = experiment.Experiment.from_config(config)
    ckpt = utils.CheckpointManager(tmp_path / "checkpoints", config)
    ckpt.save(0, experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape))
    ckpt.wait()
    calls = {"experiment": 0, "restore": 0}
    build, restore = experiment.Experiment.from_config.__func__, utils.CheckpointManager.restore

    def counted_build(cls, cfg):
        calls["experiment"] += 1
        return build(cls, cfg)

    def counted_restore(self, *args, **kwargs):
        calls["restore"] += 1
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(experiment.Experiment, "from_config", classmethod(counted_build))
    monkeypatch.setattr(utils.CheckpointManager, "restore", counted_restore)
    result = run_lib.evaluate(experiment.Experiment.from_config(config), str(tmp_path))[0]["metrics"]["likelihood"]
    assert result["num_examples"] == 4 and result["checkpoint_step"] == 0 and np.isfinite(result["bpd"])
    assert calls == {"experiment": 1, "restore": 1}


def restore(config, workdir):
    return experiment.restore_eval_state(experiment.Experiment.from_config(config), str(workdir))


def test_run_rejects_bad_settings(tmp_path):
    from configs import default

    config = default.get_config()  # settings are checked before any checkpoint is looked for
    config.eval.likelihood.divergence = "hutch"
    with pytest.raises(ValueError, match="config.eval.likelihood.divergence"):
        run_lib.likelihood(experiment.Experiment.from_config(config), str(tmp_path))
    config.eval.likelihood.divergence, config.eval.likelihood.method = "gaussian", "ddpm_bound"
    with pytest.raises(ValueError, match="DDPM Markov chain"):
        run_lib.likelihood_settings(config, SDES["ve"])
    config.data.centered = False
    with pytest.raises(ValueError, match="centred model space"):
        run_lib.likelihood_settings(config, SDES["vp"])
