"""The "rk45" ODE setting: scipy RK45's NFE at equal rtol = atol and similar accuracy (score_sde's ODE sampler and
likelihood used scipy's solve_ivp RK45), on a Gaussian mixture whose score is exact; its NFE count is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import samplers
import sde_lib
from analytic import GaussianMixture

TOL = 1e-5


def problem(sde, dim=16, batch=32, seed=0):
    rng = np.random.default_rng(seed)
    gm = GaussianMixture(weights=[0.2, 0.3, 0.5], means=rng.normal(size=(3, dim)) * 2.0, stds=[0.3, 0.5, 0.2])
    score = gm.score_fn(sde)
    x_T = sde.prior_sampling(jax.random.key(seed), (batch, dim))
    ref, _ = jax.jit(lambda x: samplers.solve_flow(sde, score, x, sde.T, sde.eps, "dopri5", 1e-8, 1e-8))(x_T)
    return score, x_T, np.asarray(ref)


def scipy_rk45(sde, score, x_T, tol):
    shape = x_T.shape
    rsde = sde.reverse(score, probability_flow=True)
    drift = jax.jit(lambda x, t: rsde.sde(x, jnp.full((shape[0],), t))[0])
    f = lambda t, y: np.asarray(drift(jnp.asarray(y, jnp.float32).reshape(shape), t), np.float64).reshape(-1)
    sol = scipy.integrate.solve_ivp(f, (sde.T, sde.eps), np.asarray(x_T, np.float64).reshape(-1), rtol=tol, atol=tol,
                                    method="RK45")
    return sol.y[:, -1].reshape(shape), sol.nfev


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.VESDE(sigma_max=20.0)], ids=["vp", "ve"])
def test_rk45_setting_matches_scipy_nfe_at_equal_tolerance(sde):
    score, x_T, ref = problem(sde)
    x_sp, nfe_sp = scipy_rk45(sde, score, x_T, TOL)
    x, nfe = jax.jit(lambda x: samplers.solve_flow(sde, score, x, sde.T, sde.eps, "rk45", TOL, TOL))(x_T)
    err_sp, err = float(np.max(np.abs(x_sp - ref))), float(np.max(np.abs(np.asarray(x) - ref)))
    print(f"scipy RK45 NFE {nfe_sp} error {err_sp:.2e}; rk45 NFE {int(nfe)} error {err:.2e}")
    assert abs(int(nfe) - nfe_sp) <= 0.15 * nfe_sp
    assert err <= 3 * err_sp + 1e-5


def test_rk45_nfe_counts_every_evaluation():
    """The reported NFE equals the drift evaluations a counting callback sees (first-step rule included)."""
    sde = sde_lib.VPSDE()
    score, x_T, _ = problem(sde, dim=4, batch=8)
    calls = []

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return score(x, t)

    fn = jax.jit(lambda x: samplers.solve_flow(sde, counted, x, sde.T, sde.eps, "rk45", 1e-4, 1e-4))
    _, nfe = fn(x_T)
    jax.effects_barrier()
    assert int(nfe) == len(calls)


def test_rk45_is_a_sampling_and_config_choice():
    sde = sde_lib.VPSDE()
    score, _, _ = problem(sde, dim=2, batch=4)
    x, nfe = samplers.sample(jax.random.key(0), sde, score, (4, 2), "ode", solver="rk45", rtol=1e-3, atol=1e-3)
    assert x.shape == (4, 2) and np.all(np.isfinite(np.asarray(x))) and nfe > 3
    with pytest.raises(ValueError, match="rk45"):
        samplers.sample(jax.random.key(0), sde, score, (4, 2), "ode", solver="rk46")
