"""Samplers against exact answers: Gaussian-mixture targets with exact perturbed scores (analytic.py).

Acceptance bounds (n = 4096 samples, sliced W1 against an independent target sample of the same size; the sampling
floor of two independent target samples is 0.02-0.07 at n=4096 on the 2-D mixture):
  * PC / ODE / DDIM / DPM-Solver++ / Heun: SW < 0.15, every mixture weight within 0.035 (4.5 sd) of the truth;
  * annealed Langevin (approximate at any finite step): SW < 0.3, weights within 0.05;
  * the same checks fail when the score is the wrong one (a mixture with shifted means and swapped weights).
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samplers
import sde_lib
from analytic import GaussianMixture, sliced_wasserstein
from configs.base import get_base_config

N_SAMPLES = 4096
# zero-mean mixture: VE's N(0, σ_max²) prior then matches p_T up to O(var_data / σ_max²)
MIX2 = GaussianMixture(weights=[0.2, 0.3, 0.5], means=[[-3.5, 0.9], [1.5, 2.9], [0.5, -2.1]], stds=[0.5, 0.6, 0.4])
WRONG2 = GaussianMixture(weights=[0.5, 0.3, 0.2], means=[[-4.5, 0.9], [2., 3.5], [0.5, -3.]], stds=[0.5, 0.6, 0.4])

SDES = {"vp": lambda N=1000: sde_lib.VPSDE(N=N), "subvp": lambda N=1000: sde_lib.subVPSDE(N=N),
        "ve": lambda N=1000: sde_lib.VESDE(N=N, sigma_max=20.0)}

# (method, options, SW bound, weight tolerance) at the NFE the options imply; by default each method runs
# under one SDE (rotating over VP / sub-VP / VE), the full SDE x method x dimension grid is marked slow.
FAST_METHODS = {
    "pc_em_langevin": ("pc", dict(num_steps=200, predictor="euler_maruyama", corrector="langevin"), 0.15, 0.035),
    "pc_reverse_diffusion": ("pc", dict(predictor="reverse_diffusion", corrector="none"), 0.15, 0.035),
    "ode_tsit5": ("ode", dict(rtol=1e-4, atol=1e-4), 0.15, 0.035),
    "ddim": ("ddim", dict(num_steps=50), 0.15, 0.035),
    "dpm_solver++2m": ("dpm_solver++", dict(num_steps=20), 0.15, 0.035),
    "dpm_solver++3m": ("dpm_solver++", dict(num_steps=15, order=3), 0.15, 0.035),
    "heun": ("heun", dict(), 0.15, 0.035),
    "pc_ancestral_beta_tilde": ("pc", dict(predictor="ancestral_sampling", corrector="none",
                                           ancestral_variance="beta_tilde"), 0.15, 0.035),
    "annealed_langevin": ("annealed_langevin", dict(), 0.3, 0.05),
}
FAST_SDE = {"pc_em_langevin": "subvp", "pc_reverse_diffusion": "ve", "ode_tsit5": "vp", "ddim": "ve",
            "dpm_solver++2m": "subvp", "dpm_solver++3m": "vp", "heun": "ve", "annealed_langevin": "vp",
            "pc_ancestral_beta_tilde": "vp"}
SLOW_METHODS = {
    "pc_default": ("pc", dict(), 0.15, 0.035),
    "pc_ancestral": ("pc", dict(predictor="ancestral_sampling", corrector="langevin"), 0.15, 0.035),
    "pc_ancestral_beta": ("pc", dict(predictor="ancestral_sampling", corrector="none", ancestral_variance="beta"),
                          0.15, 0.035),
    "pc_em_ald": ("pc", dict(corrector="ald", n_steps=2), 0.15, 0.035),
    "ode_dopri5": ("ode", dict(solver="dopri5"), 0.15, 0.035),
    "ode_heun": ("ode", dict(solver="heun", num_steps=100), 0.15, 0.035),
    "ode_euler": ("ode", dict(solver="euler", num_steps=500), 0.15, 0.035),
    "ddim_eta1": ("ddim", dict(eta=1.0, num_steps=200), 0.15, 0.035),
    "ddim_default": ("ddim", dict(), 0.15, 0.035),
    "dpm_solver++_default": ("dpm_solver++", dict(), 0.15, 0.035),
    "annealed_langevin_ncsnv2": ("annealed_langevin", dict(step_rule="ncsnv2"), 0.3, 0.05),
}


def component_weights(gm: GaussianMixture, x) -> np.ndarray:
    """Fraction of samples whose most likely component (under the clean mixture) is k."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    logp = np.stack([-0.5 * np.sum(((x - m) / s) ** 2 + 2 * np.log(s), -1) + np.log(w)
                     for w, m, s in zip(gm.weights, gm.means, gm.stds)], -1)
    return np.bincount(np.argmax(logp, -1), minlength=len(gm.weights)) / len(x)


def check_matches(gm, x, sw_bound, w_tol, key=jax.random.key(123)):
    """Assert samples x match the mixture gm; returns (sw, weights) for messages."""
    assert bool(jnp.all(jnp.isfinite(x))), "non-finite samples"
    sw = float(sliced_wasserstein(jax.random.fold_in(key, 1), x, gm.sample(jax.random.fold_in(key, 2), len(x))))
    w = component_weights(gm, x)
    assert sw < sw_bound and np.all(np.abs(w - gm.weights) < w_tol), (sw, w)
    return sw, w


def _run(sde_name, method, options, score_gm=MIX2, n=N_SAMPLES, dim_shape=(2,)):
    needs_chain = options.get("predictor") in ("reverse_diffusion", "ancestral_sampling")
    sde = SDES[sde_name](N=200) if needs_chain else SDES[sde_name]()
    if method == "pc" and needs_chain:
        options = dict(options, num_steps=200)
    return samplers.sample(jax.random.key(0), sde, score_gm.score_fn(sde), (n,) + dim_shape, method, **options)


@pytest.mark.parametrize("name", sorted(FAST_METHODS))
def test_method_matches_mixture(name):
    method, options, sw_bound, w_tol = FAST_METHODS[name]
    x, nfe = _run(FAST_SDE[name], method, options)
    assert x.shape == (N_SAMPLES, 2)
    check_matches(MIX2, x, sw_bound, w_tol)


@pytest.mark.parametrize("name", ["pc_em_langevin", "dpm_solver++2m"])
def test_wrong_score_fails(name):
    method, options, sw_bound, w_tol = FAST_METHODS[name]
    x, _ = _run("vp", method, options, score_gm=WRONG2)
    with pytest.raises(AssertionError):
        check_matches(MIX2, x, sw_bound, w_tol)


# In 1-D the sliced W1 is the plain W1 (no averaging over directions): its floor (two target samples) is
# 0.11 median / 0.17 max over 20 seeds, against 0.06 / 0.09 in 2-D and 0.03 / 0.04 in 16-D.
SW_SCALE = {1: 1.7, 2: 1.0, 16: 1.0}
GRID_CASES = ([(name, 2) for name in sorted(FAST_METHODS) + sorted(SLOW_METHODS)]
              + [(name, dim) for dim in (1, 16) for name in ("pc_em_langevin", "pc_reverse_diffusion", "ode_tsit5",
                                                              "ddim", "dpm_solver++2m", "heun", "annealed_langevin")])


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("name,dim", GRID_CASES)
def test_method_grid(sde_name, name, dim):
    """Every method under every SDE on the 2-D mixture, main methods also on 1-D and 16-D mixtures; the wrong
    score must fail the same check."""
    method, options, sw_bound, w_tol = {**FAST_METHODS, **SLOW_METHODS}[name]
    if options.get("predictor") == "ancestral_sampling" and sde_name == "subvp":
        pytest.skip("sub-VP has no discrete ancestral chain")
    means = {1: np.array([[-4.0], [0.5], [4.0]]), 2: MIX2.means,
             16: np.random.default_rng(16).normal(size=(3, 16)) * 1.5}[dim]
    means = means - np.array([0.2, 0.3, 0.5]) @ means          # zero mean (see MIX2)
    gm = GaussianMixture(weights=[0.2, 0.3, 0.5], means=means, stds=[0.5, 0.6, 0.4])
    wrong = GaussianMixture(weights=[0.5, 0.3, 0.2], means=means * 1.3, stds=[0.5, 0.6, 0.4])
    sw_bound *= SW_SCALE[dim]
    x, _ = _run(sde_name, method, options, score_gm=gm, dim_shape=(dim,))
    check_matches(gm, x, sw_bound, w_tol)
    x_wrong, _ = _run(sde_name, method, options, score_gm=wrong, dim_shape=(dim,))
    with pytest.raises(AssertionError):
        check_matches(gm, x_wrong, sw_bound, w_tol)


# ---- NFE counts ------------------------------------------------------------------------------------------
NFE_CASES = [
    ("pc", dict(num_steps=30, n_steps=2), 30 * 3),
    ("pc", dict(num_steps=30, predictor="none", corrector="ald", n_steps=3), 91),
    ("ode", dict(solver="heun", num_steps=20, denoise=False), 40),
    ("ode", dict(rtol=1e-3, atol=1e-3), None),
    ("ddim", dict(num_steps=25, eta=0.5), 25),
    ("dpm_solver++", dict(num_steps=12, order=3), 12),
    ("heun", dict(num_steps=10), 19),
    ("langevin", dict(num_steps=17), 17),
]
SLOW_NFE_CASES = [
    ("pc", dict(num_steps=30, corrector="none", denoise=False), 29),
    ("ode", dict(solver="euler", num_steps=40), 41),
    ("ode", dict(solver="dopri5", rtol=1e-3, atol=1e-3), None),
    ("annealed_langevin", dict(num_steps=7, n_steps=4), 29),
]


@pytest.mark.parametrize("method,options,expected",
                         NFE_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_NFE_CASES])
def test_nfe_is_exact(method, options, expected):
    """Reported NFE equals the number of score calls counted on the host."""
    sde = sde_lib.VESDE(sigma_max=20.0)
    count = [0]
    base = MIX2.score_fn(sde)

    def counting_score(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return base(x, t)

    x, nfe = samplers.sample(jax.random.key(1), sde, counting_score, (64, 2), method, **options)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert nfe == count[0]
    if expected is not None:
        assert nfe == expected


# ---- ODE: exact Gaussian flow, encode/decode ---------------------------------------------------------------
GAUSS = GaussianMixture(weights=[1.0], means=[[1.5, -0.5]], stds=[[0.3, 0.7]])


def gaussian_flow(sde, x, t0, t1):
    """Exact probability-flow map of N(μ, s²) from t0 to t1: standardised coordinates are preserved."""
    (a0, s0), (a1, s1) = (sde.alpha_sigma(jnp.array([t], jnp.float32)) for t in (t0, t1))
    mu, s = jnp.asarray(GAUSS.means[0]), jnp.asarray(GAUSS.stds[0])
    std0, std1 = jnp.sqrt(a0**2 * s**2 + s0**2), jnp.sqrt(a1**2 * s**2 + s1**2)
    return a1 * mu + std1 / std0 * (x - a0 * mu)


@pytest.mark.parametrize("sde_name", ["vp", pytest.param("subvp", marks=pytest.mark.slow), "ve"])
def test_ode_encode_matches_exact_gaussian_flow_and_decodes(sde_name):
    sde = SDES[sde_name]()
    score = GAUSS.score_fn(sde)
    x = GAUSS.sample(jax.random.key(3), 256)
    z, nfe = samplers.ode_encode(sde, score, x, rtol=1e-6, atol=1e-6)
    assert nfe > 0
    exact = gaussian_flow(sde, x, sde.eps, sde.T)
    np.testing.assert_allclose(z, exact, rtol=1e-3, atol=1e-3 * float(sde.alpha_sigma(jnp.ones(1))[1][0]))
    x_rec, _ = samplers.ode_decode(sde, score, z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x_rec, x, atol=2e-3)


def test_ode_encode_decode_mixture_reconstructs():
    sde = sde_lib.VPSDE()
    score = MIX2.score_fn(sde)
    x = MIX2.sample(jax.random.key(4), 256)
    z, _ = samplers.ode_encode(sde, score, x, rtol=1e-6, atol=1e-6)
    assert abs(float(jnp.std(z)) - 1.0) < 0.15          # latents look like the N(0, I) prior
    x_rec, _ = samplers.ode_decode(sde, score, z, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(x_rec - x))) < 1e-2


@pytest.mark.parametrize("sde_name,method,options,tol", [
    ("vp", "ddim", dict(num_steps=100), 8e-2), ("ve", "dpm_solver++", dict(num_steps=20), 4e-2),
    ("vp", "dpm_solver++", dict(num_steps=20, order=3), 4e-2), ("ve", "heun", dict(num_steps=40), 2e-2),
    ("vp", "ode", dict(solver="heun", num_steps=100), 1e-2)])
def test_deterministic_solvers_follow_exact_gaussian_flow(sde_name, method, options, tol):
    """Deterministic samplers (denoise=False) land where the exact flow maps the same prior draws (max abs
    error; measured convergence orders: DDIM 1, DPM-Solver++ 2M 2, Heun 2)."""
    sde = SDES[sde_name]()
    key = jax.random.key(5)
    x, _ = samplers.sample(key, sde, GAUSS.score_fn(sde), (256, 2), method, denoise=False, **options)
    z = sde.prior_sampling(jax.random.split(key)[0], (256, 2))
    exact = gaussian_flow(sde, z, sde.T, sde.eps)
    err = float(jnp.max(jnp.abs(x - exact)))
    assert err < tol, err


def test_dpm_solver_order_increases_accuracy():
    sde = sde_lib.VPSDE()
    key = jax.random.key(6)
    z = sde.prior_sampling(jax.random.split(key)[0], (256, 2))
    exact = gaussian_flow(sde, z, sde.T, sde.eps)
    errs = {}
    for order in (1, 2, 3):
        x, _ = samplers.sample(key, sde, GAUSS.score_fn(sde), (256, 2), "dpm_solver++", num_steps=24,
                               order=order, denoise=False)
        errs[order] = float(jnp.max(jnp.abs(x - exact)))
    assert errs[3] < errs[2] < errs[1], errs


# ---- Langevin vs annealed Langevin -------------------------------------------------------------------------
FAR = GaussianMixture(weights=[0.2, 0.8], means=[[-5., -5.], [5., 5.]], stds=[1.0, 1.0])


def test_plain_langevin_gets_weights_wrong_annealing_fixes_it():
    """Song & Ermon (2019) Sec. 3.2: Langevin with the data score mixes modes by basin, not by weight."""
    sde = sde_lib.VESDE(sigma_max=20.0)
    key = jax.random.key(7)
    x_plain, nfe = samplers.sample(key, sde, FAR.score_fn(sde), (1024, 2), "langevin", step_size=0.1,
                                   num_steps=1000)
    w_plain = component_weights(FAR, x_plain)
    assert nfe == 1000 and abs(w_plain[0] - 0.2) > 0.2, w_plain
    x_ald, _ = samplers.sample(key, sde, FAR.score_fn(sde), (1024, 2), "annealed_langevin")
    check_matches(FAR, x_ald, 0.3, 0.05)


# ---- errors, config, sharding --------------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    (dict(predictor="leapfrog"), "unknown predictor 'leapfrog'.*euler_maruyama"),
    (dict(corrector="hmc"), "unknown corrector 'hmc'.*langevin"),
    (dict(snr=0.0), "'snr' must be > 0"),
    (dict(snr=-1.0, corrector="ald"), "'snr' must be > 0"),
    (dict(eps=0.0), r"eps=0.0 must lie in \(0, T=1.0\)"),
    (dict(eps=1.5), r"eps=1.5 must lie in \(0, T=1.0\)"),
    (dict(num_steps=50, predictor="ancestral_sampling"), "discrete chain of sde.N=1000"),
    (dict(temperature=2.0), r"unknown option\(s\) \['temperature'\]"),
])
def test_invalid_options_raise_clear_errors(options, match):
    sde = sde_lib.VPSDE()
    with pytest.raises(ValueError, match=match):
        samplers.sample(jax.random.key(0), sde, MIX2.score_fn(sde), (8, 2), "pc", **options)


def test_invalid_method_and_solver():
    sde = sde_lib.VPSDE()
    with pytest.raises(ValueError, match="unknown sampling method 'magic'.*'pc'"):
        samplers.sample(jax.random.key(0), sde, MIX2.score_fn(sde), (8, 2), "magic")
    with pytest.raises(ValueError, match="unknown ODE solver 'rk4'"):
        samplers.sample(jax.random.key(0), sde, MIX2.score_fn(sde), (8, 2), "ode", solver="rk4")
    with pytest.raises(ValueError, match="unknown time grid 'cosine'"):
        samplers.sample(jax.random.key(0), sde, MIX2.score_fn(sde), (8, 2), "ddim", grid="cosine")


def test_sample_from_config():
    config = get_base_config()
    config.sampling.corrector = "none"
    config.sampling.num_steps = 100
    sde = sde_lib.VPSDE()
    x, nfe = samplers.sample_from_config(jax.random.key(0), sde, MIX2.score_fn(sde), (N_SAMPLES, 2),
                                         config.sampling)
    assert nfe == 100
    check_matches(MIX2, x, 0.15, 0.035)


def test_time_grids_are_monotone_and_karras():
    for sde in (sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE()):
        for kind in samplers.GRIDS:
            ts = np.asarray(samplers.time_grid(sde, 18, sde.eps, kind))
            assert ts[0] == sde.T and np.isclose(ts[-1], sde.eps) and np.all(np.diff(ts) < 0), (sde, kind, ts)
        ts = samplers.time_grid(sde, 18, sde.eps, "karras")
        a, s = sde.alpha_sigma(ts)
        root = np.asarray(s / a, np.float64) ** (1 / 7)
        np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=2e-3)   # ρ=7: σ̃^{1/ρ} linear


SHARDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, pytest
    from jax.sharding import Mesh
    import samplers, sde_lib
    from analytic import GaussianMixture
    assert jax.device_count() == 4
    def euler_flow_step(sde, score_fn, ts):   # a user's grid step (as in test_a_registered_grid_step_...)
        flow = sde.reverse(score_fn, probability_flow=True)
        step = lambda key, x, state, i, t, t_next: (x + (t_next - t) * flow.sde(x, jnp.full((16,), t))[0], state)
        return samplers.GridStep(step, 1)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    gm = GaussianMixture(weights=[0.5, 0.5], means=[[-2., 0.], [2., 0.]], stds=[0.5, 0.5])
    sde = sde_lib.VPSDE(N=50)
    samplers.register_sampler("user_euler", samplers.grid_method(euler_flow_step, 8))
    for method, opts in [("pc", {}), ("ode", dict(rtol=1e-4, atol=1e-4)), ("dpm_solver++", {}),
                         ("user_euler", dict(project=lambda key, x, t: x.at[:, 0].set(t)))]:
        x, nfe = samplers.sample(jax.random.key(0), sde, gm.score_fn(sde), (16, 2), method, mesh=mesh, **opts)
        x = jax.block_until_ready(x)
        assert len(x.sharding.device_set) == 4, (method, x.sharding)
        x1, nfe1 = samplers.sample(jax.random.key(0), sde, gm.score_fn(sde), (16, 2), method, mesh=None, **opts)
        x1 = jax.block_until_ready(x1)
        assert len(x1.sharding.device_set) == 1
        np.testing.assert_allclose(np.asarray(x), np.asarray(x1), atol=1e-4, err_msg=method)
        assert nfe == nfe1
    with pytest.raises(ValueError, match="batch size 6 .* not divisible by the 4 devices"):
        samplers.sample(jax.random.key(0), sde, gm.score_fn(sde), (6, 2), mesh=mesh)
    x, _ = samplers.sample(jax.random.key(0), sde, gm.score_fn(sde), (16, 2), "ddim")   # no mesh: one device
    assert len(jax.block_until_ready(x).sharding.device_set) == 1
    print("OK")
""")


def test_sharding_over_forced_host_devices():
    """With 4 CPU devices the batch is sharded, samples equal the single-device ones, bad batches error."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                                     "--xla_cpu_collective_call_terminate_timeout_seconds=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(
                   os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ---- the Python API: x_init, time grids as arrays, trajectories -------------------------------------------------
API_OPTIONS = {"pc": dict(num_steps=8), "ode": dict(solver="euler", num_steps=8), "ddim": dict(num_steps=8),
               "dpm_solver++": dict(num_steps=8), "heun": dict(num_steps=5), "langevin": dict(num_steps=8),
               "annealed_langevin": dict(num_steps=5, n_steps=2)}


@pytest.mark.parametrize("method", sorted(API_OPTIONS))
def test_every_sampler_takes_x_init_and_records_its_trajectory(method):
    """x_init = the prior sample the sampler would draw from the same key gives identical output; another x_init
    changes it and starts the trajectory; the trajectory ({"t", "x"}) starts at the start point and, without
    denoising, ends at the output; a wrong x_init shape is one clear error."""
    built_in = {m for m, build in samplers.SAMPLERS.items() if build.__module__ == "samplers"}
    assert set(API_OPTIONS) == built_in, "add the new sampler to API_OPTIONS"
    sde, shape, key = sde_lib.VPSDE(N=50), (6, 2), jax.random.key(3)
    fn, _ = samplers.build_sampler(sde, MIX2.score_fn(sde), shape, method, trajectory=True, denoise=False,
                                   **API_OPTIONS[method])
    x_ref, _, traj = fn(key)
    prior = sde.prior_sampling(jax.random.split(key)[0], shape)
    assert traj["x"].shape == (len(traj["t"]),) + shape and len(traj["t"]) >= 5
    np.testing.assert_array_equal(np.asarray(traj["x"][0]), np.asarray(prior))
    if method not in ("pc", "annealed_langevin"):   # PC ends with a corrector step at the last time
        np.testing.assert_allclose(np.asarray(traj["x"][-1]), np.asarray(x_ref), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fn(key, x_init=prior)[0]), np.asarray(x_ref))
    other, _, traj = fn(key, x_init=prior + 1.0)
    np.testing.assert_array_equal(np.asarray(traj["x"][0]), np.asarray(prior + 1.0))
    assert not np.array_equal(np.asarray(other), np.asarray(x_ref))  # stochastic samplers forget most of it
    with pytest.raises(ValueError, match=r"x_init has shape \(3, 2\) but the sample shape is \(6, 2\)"):
        fn(key, x_init=prior[:3])


@pytest.mark.parametrize("method", ["pc", "ddim"])
def test_x_init_given_at_build_time(method):
    sde, shape, key = sde_lib.VPSDE(N=50), (6, 2), jax.random.key(3)
    prior = sde.prior_sampling(jax.random.split(key)[0], shape)
    x_ref = samplers.sample(key, sde, MIX2.score_fn(sde), shape, method, **API_OPTIONS[method])[0]
    x = samplers.sample(key, sde, MIX2.score_fn(sde), shape, method, x_init=prior, **API_OPTIONS[method])[0]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x_ref))


@pytest.mark.parametrize("method", ["pc", "ddim", "dpm_solver++", "heun", "annealed_langevin"])
def test_time_grid_as_an_array_equals_the_named_grid(method):
    sde, shape, key = sde_lib.VPSDE(N=50), (6, 2), jax.random.key(0)
    kind = {"pc": "uniform", "ddim": "uniform", "heun": "karras"}.get(method, "log_snr")
    opts = {k: v for k, v in API_OPTIONS[method].items() if k != "num_steps"}
    n = API_OPTIONS[method]["num_steps"]
    eps = None if method != "annealed_langevin" else 0.05
    named = samplers.sample(key, sde, MIX2.score_fn(sde), shape, method, grid=kind, num_steps=n,
                            eps=eps, **opts)
    ts = np.asarray(samplers.time_grid(sde, n, eps or sde.eps, kind))
    arr = samplers.sample(key, sde, MIX2.score_fn(sde), shape, method, grid=ts, **opts)
    np.testing.assert_allclose(np.asarray(arr[0]), np.asarray(named[0]), atol=1e-5)
    assert arr[1] == named[1]
    _, fewer = samplers.build_sampler(sde, MIX2.score_fn(sde), shape, method, grid=ts[::2], **opts)
    assert fewer < named[1]


def test_time_grid_array_errors():
    sde = sde_lib.VPSDE()
    for bad, msg in (([0.5, 0.7], "strictly decreasing"), ([1.0], "1-D with >= 2 times"),
                     ([2.0, 0.5], r"must lie in \(0, T=1"), ([1.0, 0.0], r"must lie in \(0, T=1")):
        with pytest.raises(ValueError, match=msg):
            samplers.build_sampler(sde, MIX2.score_fn(sde), (4, 2), "ddim", grid=np.array(bad))


# ---- the public grid-step protocol: a user's sampler gets the loop, NFE, options, project and sharding ---------
def euler_flow_step(sde, score_fn, ts, scale: float = 1.0) -> samplers.GridStep:
    """A user's step: Euler on the probability-flow ODE with the drift times ``scale``; the state counts steps."""
    flow = sde.reverse(score_fn, probability_flow=True)

    def step(key, x, state, i, t, t_next):
        return x + scale * (t_next - t) * flow.sde(x, jnp.full((x.shape[0],), t))[0], state + 1

    return samplers.GridStep(step, 1, init=lambda x: jnp.zeros((), jnp.int32))


@pytest.fixture
def user_sampler(monkeypatch):
    monkeypatch.setattr(samplers, "SAMPLERS", dict(samplers.SAMPLERS))
    return samplers.register_sampler("user_euler", samplers.grid_method(euler_flow_step, 8, grid="uniform"))


def test_a_registered_grid_step_is_a_full_sampler(user_sampler):
    """Registered by name: the loop equals a hand-written Euler loop from the prior sample, the NFE equals the
    counted score evaluations, the step's own option and the common ones (array grid, x_init, trajectory) work."""
    import controllable_generation
    sde, shape, key = sde_lib.VPSDE(N=50), (6, 2), jax.random.key(3)
    calls, base = [], MIX2.score_fn(sde)

    def counted(x, t):
        jax.debug.callback(lambda _: calls.append(1), t)
        return base(x, t)

    fn, nfe = samplers.build_sampler(sde, counted, shape, "user_euler", trajectory=True)
    x, nfe_run, traj = fn(key)
    jax.effects_barrier()
    assert nfe == int(nfe_run) == len(calls) == 8 - 1 + 1
    ts = samplers.time_grid(sde, 8, sde.eps, "uniform")
    drift = sde.reverse(base, probability_flow=True).sde
    manual = prior = sde.prior_sampling(jax.random.split(key)[0], shape)
    for i in range(7):
        manual = manual + (ts[i + 1] - ts[i]) * drift(manual, jnp.full((6,), ts[i]))[0]
    np.testing.assert_allclose(np.asarray(traj["x"][-1]), np.asarray(manual), atol=1e-5)
    np.testing.assert_allclose(np.asarray(x), np.asarray(samplers.tweedie(sde, base, manual, ts[-1])), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(traj["t"]), np.asarray(ts))
    still, _ = samplers.sample(key, sde, base, shape, "user_euler", scale=0.0, denoise=False, x_init=prior + 1)
    np.testing.assert_array_equal(np.asarray(still), np.asarray(prior + 1))
    _, fewer = samplers.build_sampler(sde, base, shape, "user_euler", grid=np.asarray(ts[::2]))
    assert fewer == 4 - 1 + 1
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['eta'\] for sampling method 'user_euler'.*'scale'"):
        samplers.build_sampler(sde, base, shape, "user_euler", eta=1.0)
    assert "user_euler" in samplers.methods_with("project") and "user_euler" not in samplers.methods_with("order")
    assert "user_euler" in controllable_generation.imputation_methods()


def test_a_registered_grid_step_gets_the_project_hook(user_sampler):
    """``project`` runs on the start and after every step at the time it ends at (here it writes t into x[:, 0]);
    through controllable_generation.impute the user's sampler inpaints with the known part exact."""
    import controllable_generation
    sde, shape, key = sde_lib.VPSDE(N=50), (6, 2), jax.random.key(4)
    project = lambda key, x, t: x.at[:, 0].set(t)
    fn, _ = samplers.build_sampler(sde, MIX2.score_fn(sde), shape, "user_euler", project=project,
                                   trajectory=True, denoise=False)
    _, _, traj = fn(key)
    np.testing.assert_array_equal(np.asarray(traj["x"][:, :, 0]), np.repeat(np.asarray(traj["t"])[:, None], 6, 1))
    known = MIX2.sample(jax.random.key(5), 6)
    x, nfe = controllable_generation.impute(key, sde, MIX2.score_fn(sde), known, np.array([1.0, 0.0]),
                                            method="user_euler", num_steps=30)
    np.testing.assert_array_equal(np.asarray(x[:, 0]), np.asarray(known[:, 0]))
    free, _ = samplers.sample(key, sde, MIX2.score_fn(sde), shape, "user_euler", num_steps=30)
    assert int(nfe) == 30 and np.all(np.isfinite(np.asarray(x))) and not np.allclose(x[:, 1], free[:, 1])


def test_register_sampler_refuses_a_second_function_under_a_taken_name(monkeypatch):
    monkeypatch.setattr(samplers, "SAMPLERS", dict(samplers.SAMPLERS))
    with pytest.raises(ValueError, match="sampler name 'ddim' is already registered to samplers.ddim_step"):
        samplers.register_sampler("ddim", samplers.grid_method(euler_flow_step))
    assert samplers.register_sampler("ddim", samplers.build_ddim) is samplers.build_ddim   # the same one again

    @samplers.register_sampler("mine")
    def build_mine(sde, score_fn, shape, mesh=None):
        raise NotImplementedError

    assert samplers.SAMPLERS["mine"] is build_mine and "mine" not in samplers.methods_with("project")
