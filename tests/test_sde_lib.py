"""sde_lib against closed forms and independent computations."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

import sde_lib
from analytic import GaussianMixture

jax.config.update("jax_enable_x64", False)
ALL_SDES = [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE(sigma_max=5.0)]
IDS = ["vp", "subvp", "ve"]


def simulate_forward(sde, key, x0, t_end, n_steps=2000):
    """Euler–Maruyama simulation of the forward SDE from 0 to t_end (independent of marginal_prob)."""
    dt = t_end / n_steps

    def step(x, i):
        t = jnp.full((x.shape[0],), i * dt)
        drift, g = sde.sde(x, t)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
        return x + drift * dt + g[:, None] * jnp.sqrt(dt) * z, None

    x, _ = jax.lax.scan(step, x0, jnp.arange(n_steps))
    return x


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_marginal_prob_matches_simulated_forward_sde(sde):
    n, t_end = 20000, 0.6
    x0 = jnp.concatenate([jnp.full((n // 2, 1), 1.5), jnp.full((n // 2, 1), -0.5)])
    key = jax.random.key(0)
    if isinstance(sde, sde_lib.VESDE):  # the VE marginal std σ(t) assumes x(0) already carries σ_min noise
        x0 = x0 + sde.sigma_min * jax.random.normal(jax.random.key(1), x0.shape)
    xt = simulate_forward(sde, key, x0, t_end)
    mean, std = sde.marginal_prob(x0, jnp.full((n,), t_end))
    resid = (xt - mean) / std[:, None]
    assert abs(float(resid.mean())) < 0.03
    assert abs(float(resid.std()) - 1.0) < 0.02
    # the two halves have different means: the mean coefficient must be right, not just the spread
    half_mean = float(xt[: n // 2].mean())
    assert abs(half_mean - float(mean[0, 0])) < 4 * float(std[0]) / np.sqrt(n / 2)


def test_vp_alphas_cumprod_matches_integral_of_beta():
    sde = sde_lib.VPSDE()
    i = np.arange(sde.N)
    t = (i + 1) / sde.N  # ᾱ_i covers i+1 steps of length 1/N
    alpha_t, _ = sde.alpha_sigma(jnp.asarray(t))
    np.testing.assert_allclose(np.sqrt(sde.chain.alphas_cumprod), alpha_t, rtol=0, atol=2e-3)
    # DDPM's own schedule: β from 1e-4 to 0.02
    np.testing.assert_allclose(sde.chain.betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    np.testing.assert_allclose(sde.chain.betas[1] - sde.chain.betas[0],
                               (sde.beta_max - sde.beta_min) / (sde.N * (sde.N - 1)), rtol=1e-9)


def test_vp_discretize_is_the_ddpm_chain():
    """Running x_{i} = x_{i-1} + f_i + G_i z from x_0 reproduces q(x_i | x_0) = N(√ᾱ_i x_0, 1-ᾱ_i)."""
    sde = sde_lib.VPSDE(N=100)
    n, x0 = 20000, 2.0
    x = jnp.full((n, 1), x0)
    for i in range(40):
        t = jnp.full((n,), i * sde.T / (sde.N - 1))
        f, G = sde.discretize(x, t)
        x = x + f + G[:, None] * jax.random.normal(jax.random.fold_in(jax.random.key(2), i), x.shape)
    abar = sde.chain.alphas_cumprod[39]
    assert abs(float(x.mean()) - np.sqrt(abar) * x0) < 0.03
    assert abs(float(x.var()) - (1 - abar)) < 0.03


def test_ve_discretize_accumulates_the_sigma_ladder():
    sde = sde_lib.VESDE(N=50)
    ts = jnp.arange(sde.N) * sde.T / (sde.N - 1)
    _, G = sde.discretize(jnp.zeros((sde.N, 1)), ts)
    np.testing.assert_allclose(np.cumsum(np.asarray(G, np.float64) ** 2), sde.discrete_sigmas**2, rtol=1e-4)


def test_ddpm_chain_of_the_linear_schedule_is_the_vp_chain():
    """DDPM's published schedule linspace(1e-4, 0.02, 1000), given to ``DDPMChain``, is VPSDE's chain, and VPSDE's
    discrete steps are this chain's: f_i = (√(1-β_i) - 1) x, G_i = √β_i, ancestral mean (x + β_i s)/√(1-β_i)."""
    betas = np.linspace(1e-4, 0.02, 1000)
    chain, vp = sde_lib.DDPMChain.from_betas(betas), sde_lib.VPSDE(N=1000)
    assert chain.N == vp.N == 1000
    for name in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(vp.chain, name), getattr(chain, name), rtol=1e-12, atol=0, err_msg=name)
    np.testing.assert_allclose(chain.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    i = np.array([0, 1, 250, 998, 999])
    t, x = jnp.asarray(i / 999.0, jnp.float32), jnp.linspace(-1.0, 2.0, 10).reshape(5, 2)
    score = -x
    f, G = vp.discretize(x, t)
    np.testing.assert_allclose(f, (np.sqrt(1 - betas[i])[:, None] - 1) * np.asarray(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(G, np.sqrt(betas[i]), rtol=1e-6)
    mean, std = vp.ancestral_step(x, t, score, "beta_tilde")
    np.testing.assert_allclose(mean, (np.asarray(x) + betas[i, None] * np.asarray(score))
                               / np.sqrt(1 - betas[i, None]), rtol=1e-6)
    np.testing.assert_allclose(std**2, chain.posterior_variance[i], rtol=1e-5)
    np.testing.assert_allclose(vp.langevin_alpha(t), 1 - betas[i], rtol=1e-6)
    np.testing.assert_allclose(vp.chain_alpha_sigma(t)[0], np.sqrt(np.cumprod(1 - betas)[i]), rtol=1e-6)


def test_cosine_chain_matches_the_closed_form_alpha_bar():
    """Nichol & Dhariwal (2021): ᾱ_i = f(i/N)/f(0), f(u) = cos²(π/2 (u + s)/(1 + s)), s = 0.008, β clipped at 0.999
    (only the last step, where f(1) = 0, is clipped)."""
    N, s = 1000, 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    chain = sde_lib.DDPMChain.cosine(N)
    abar = f(np.arange(1, N + 1) / N) / f(0.0)
    np.testing.assert_allclose(chain.alphas_cumprod[:-1], abar[:-1], rtol=1e-9, atol=1e-15)
    assert chain.betas[-1] == 0.999 and np.all(chain.betas[:-1] < 0.999) and np.all(np.diff(chain.betas) > 0)
    np.testing.assert_allclose(chain.alphas_cumprod[-1], 0.001 * abar[-2], rtol=1e-9)
    np.testing.assert_allclose(chain.betas[0], 1 - f(1 / N) / f(0.0), rtol=1e-12)
    # a chain is a value of its schedule: the same β give the same chain, any β schedule gives one
    np.testing.assert_array_equal(sde_lib.DDPMChain.from_betas(chain.betas).posterior_variance,
                                  chain.posterior_variance)


@pytest.mark.parametrize("betas", [np.array([0.1, 1.0]), np.array([[0.1, 0.2]]), np.array([]),
                                   np.array([-0.1, 0.2])])
def test_ddpm_chain_refuses_a_schedule_outside_0_1(betas):
    with pytest.raises(ValueError, match="1-D β schedule with 0 <= β_i < 1"):
        sde_lib.DDPMChain.from_betas(betas)


def test_only_vp_type_sdes_have_a_ddpm_chain():
    assert isinstance(sde_lib.VPSDE().chain, sde_lib.DDPMChain)
    assert sde_lib.subVPSDE().chain is None and sde_lib.VESDE().chain is None
    assert sde_lib.VESDE(N=5).discrete_sigmas.shape == (5,) and sde_lib.VPSDE().discrete_sigmas is None


def test_posterior_matches_bayes_rule_on_a_grid():
    sde = sde_lib.VPSDE()
    x0, xt = 0.7, -0.4
    grid = np.linspace(-6, 6, 200001)
    for i in [1, 10, 500, 999]:
        abar_prev, alpha = sde.chain.alphas_cumprod[i - 1], sde.chain.alphas[i]
        log_post = (stats.norm.logpdf(xt, np.sqrt(alpha) * grid, np.sqrt(1 - alpha))
                    + stats.norm.logpdf(grid, np.sqrt(abar_prev) * x0, np.sqrt(1 - abar_prev)))
        w = np.exp(log_post - log_post.max())
        w /= w.sum()
        mean = (w * grid).sum()
        var = (w * (grid - mean) ** 2).sum()
        mu, v = sde.chain.posterior(jnp.full((1, 1), xt), jnp.full((1, 1), x0), jnp.array([i]))
        np.testing.assert_allclose(float(mu[0, 0]), mean, atol=1e-5)
        np.testing.assert_allclose(float(v[0]), var, rtol=1e-3)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_prior_logp_matches_scipy_and_prior_sampling(sde):
    z = sde.prior_sampling(jax.random.key(3), (4000, 3))
    scale = getattr(sde, "sigma_max", 1.0)
    assert abs(float(z.std()) / scale - 1.0) < 0.03
    expected = stats.norm.logpdf(np.asarray(z[:5], np.float64), scale=scale).sum(-1)
    np.testing.assert_allclose(sde.prior_logp(z[:5]), expected, rtol=1e-5)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_reverse_drift(sde):
    gmm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], [0.3, 0.5])
    x = gmm.sample(jax.random.key(4), 6)
    t = jnp.linspace(0.1, 0.9, 6)
    score = gmm.score_t(sde, x, t)
    f, g = sde.sde(x, t)
    for pf, coeff in [(False, 1.0), (True, 0.5)]:
        drift, diffusion = sde.reverse(gmm.score_fn(sde), probability_flow=pf).sde(x, t)
        np.testing.assert_allclose(drift, f - coeff * g[:, None] ** 2 * score, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(diffusion, 0.0 if pf else g)
    rf, rG = sde.reverse(gmm.score_fn(sde)).discretize(x, t)
    df, dG = sde.discretize(x, t)
    np.testing.assert_allclose(rf, df - dG[:, None] ** 2 * score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_score_conversions_agree(sde):
    """For x = α x0 + σ ε the three targets ε, x0 and the conditional score are one function of each other."""
    key = jax.random.key(5)
    x0 = jax.random.normal(key, (5, 4, 4, 1))
    t = jnp.linspace(0.05, 0.95, 5)
    xt, eps, std = sde.perturb(jax.random.fold_in(key, 1), x0, t)
    true_score = -eps / std[:, None, None, None]
    for prediction, output in [("eps", eps), ("x0", x0), ("score", true_score)]:
        np.testing.assert_allclose(sde.score_from_output(output, xt, t, prediction), true_score,
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(sde.output_from_score(true_score, xt, t, prediction), output,
                                   rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="prediction"):
        sde.score_from_output(eps, xt, t, "velocity")


def test_model_time_labels():
    vp, ve = sde_lib.VPSDE(), sde_lib.VESDE()
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(vp.model_time(t, "t999"), [0, 499.5, 999])
    np.testing.assert_allclose(vp.model_time(t, "index"), [0, 499.5, 999])
    np.testing.assert_allclose(ve.model_time(t, "sigma"), [0.01, np.sqrt(0.01 * 50), 50], rtol=1e-5)
    np.testing.assert_array_equal(ve.model_time(t, "sigma_index"), [999, 500, 0])
    with pytest.raises(ValueError, match="time input"):
        vp.model_time(t, "seconds")


def test_ancestral_steps_are_the_chains_posteriors():
    """The SMLD ancestral rule with the exact score of N(x0, σ_i²) equals the Gaussian posterior of the SMLD chain
    q(x_{i-1} | x_i, x0) computed by Bayes' rule."""
    ve = sde_lib.VESDE(N=10)
    x0, xi = 0.3, 2.0
    i = 6
    t = jnp.array([i / (ve.N - 1)])
    s_i, s_prev = ve.discrete_sigmas[i], ve.discrete_sigmas[i - 1]
    score = jnp.array([[-(xi - x0) / s_i**2]])  # score of N(x0, σ_i²) at xi
    mean, std = ve.ancestral_step(jnp.array([[xi]]), t, score)
    # Bayes: x_{i-1} | x_i, x0 with x_{i-1} ~ N(x0, σ_{i-1}²), x_i | x_{i-1} ~ N(x_{i-1}, σ_i² - σ_{i-1}²)
    post_var = 1 / (1 / s_prev**2 + 1 / (s_i**2 - s_prev**2))
    post_mean = post_var * (x0 / s_prev**2 + xi / (s_i**2 - s_prev**2))
    np.testing.assert_allclose(float(mean[0, 0]), post_mean, rtol=1e-5)
    np.testing.assert_allclose(float(std[0]) ** 2, post_var, rtol=1e-4)


def test_get_sde_from_config_and_errors():
    cfg = ml_collections.ConfigDict({"name": "vesde", "N": 10, "sigma_max": 20.0, "beta_min": 0.1})
    sde = sde_lib.get_sde(cfg)
    assert isinstance(sde, sde_lib.VESDE) and sde.N == 10 and sde.sigma_max == 20.0
    with pytest.raises(ValueError, match="unknown SDE 'cld'.*vesde"):
        sde_lib.get_sde(ml_collections.ConfigDict({"name": "cld"}))


def test_new_sde_is_one_subclass():
    """A cosine-schedule VP SDE (Nichol & Dhariwal) only implements sde/alpha_sigma/prior: marginals, reverse
    SDE and score conversions come from the base class."""

    @dataclasses.dataclass(frozen=True)
    class CosineVP(sde_lib.SDE):
        s: float = 0.008

        def alpha_sigma(self, t):
            f = lambda u: jnp.cos((u + self.s) / (1 + self.s) * jnp.pi / 2)
            a = f(t) / f(0.0)
            return a, jnp.sqrt(1 - a**2)

        def sde(self, x, t):
            a = lambda u: self.alpha_sigma(u)[0]
            dlog_a = jax.vmap(jax.grad(lambda u: jnp.log(a(u))))(t)
            beta = -2 * dlog_a
            return -0.5 * beta[:, None] * x, jnp.sqrt(beta)

        def prior_sampling(self, key, shape):
            return jax.random.normal(key, shape)

        def prior_logp(self, z):
            return sde_lib.standard_normal_logp(z)

    sde = CosineVP(T=0.99)
    n, t_end = 20000, 0.7
    x0 = jnp.full((n, 1), 1.0)
    xt = simulate_forward(sde, jax.random.key(6), x0, t_end, n_steps=1000)
    mean, std = sde.marginal_prob(x0, jnp.full((n,), t_end))
    assert abs(float(xt.mean()) - float(mean[0, 0])) < 0.02
    assert abs(float(xt.std()) - float(std[0])) < 0.02


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_mixture_score_is_the_gradient_of_its_log_density(sde):
    """analytic.GaussianMixture.score_t, which the sampler/likelihood tests rely on, is ∇x log_prob_t."""
    gmm = GaussianMixture([0.2, 0.5, 0.3], [[-2.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, -1.0, 2.0]], [0.3, 0.5, 1.0])
    x = gmm.sample(jax.random.key(7), 8)
    t = jnp.linspace(0.05, 0.95, 8)
    grad = jax.vmap(jax.grad(lambda xi, ti: gmm.log_prob_t(sde, xi[None], ti[None])[0]))(x, t)
    np.testing.assert_allclose(gmm.score_t(sde, x, t), grad, rtol=1e-4, atol=1e-5)


def test_registering_the_same_class_twice_is_allowed_a_different_one_is_not():
    sde_lib.register_sde("vpsde")(sde_lib.VPSDE)  # re-executing the defining module is fine
    assert sde_lib.SDES["vpsde"] is sde_lib.VPSDE

    class Impostor(sde_lib.VPSDE):
        pass

    with pytest.raises(ValueError, match="'vpsde' is already registered to sde_lib.VPSDE"):
        sde_lib.register_sde("vpsde")(Impostor)
    assert sde_lib.SDES["vpsde"] is sde_lib.VPSDE


def test_discrete_models_use_the_chains_marginal():
    """A DDPM ε-network's score divides by √(1-ᾱ_i) of its step (2021 code), not the continuous σ(t_i)."""
    vp, ve = sde_lib.VPSDE(), sde_lib.VESDE()
    t = jnp.array([0.01, 0.5, 0.9])
    i = np.floor(np.asarray(t) * (vp.N - 1) + 1e-4).astype(int)
    x = jnp.ones((3, 2))
    eps_hat = jnp.full((3, 2), 0.5)
    expected = -0.5 / np.sqrt(1 - vp.chain.alphas_cumprod[i])
    np.testing.assert_allclose(vp.score_from_output(eps_hat, x, t, "eps", discrete=True),
                               np.broadcast_to(expected[:, None], (3, 2)), rtol=1e-4)
    continuous = vp.score_from_output(eps_hat, x, t, "eps")
    assert abs(float(continuous[0, 0]) / expected[0] - 1) > 0.01
    np.testing.assert_allclose(ve.chain_alpha_sigma(t)[1], ve.discrete_sigmas[i], rtol=1e-5)


def test_vp_chain_too_short_is_a_clear_error():
    """With N ≤ β_max the DDPM β_N = β_max/N ≥ 1 (√(1-β) undefined): named error instead of NaN samples."""
    for cls in (sde_lib.VPSDE,):
        with pytest.raises(ValueError, match=r"N=10.*must be < 1; use N > 20"):
            _ = cls(N=10).chain
    assert sde_lib.VPSDE(N=21).chain.betas[-1] < 1
