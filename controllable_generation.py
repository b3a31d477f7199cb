"""Controllable generation with score models (SDE paper §5 and App. I; Ho & Salimans 2022).

* Imputation (inpainting, colorization): PC sampling where, after every predictor and corrector step, the known
  part is replaced by forward-diffused data α(t) y + σ(t) z (``samplers.build_pc``'s ``project`` hook), or the
  probability-flow ODE of the unknown part with the known part on the path α(t) y + σ(t) z (fixed z).
  Colorization imputes in a decoupled channel space u = x M, M orthogonal with first column (1,1,1)/√3 (the gray
  axis), so the known gray image is the first coordinate of u.
* Class-conditional sampling: s(x, t) + w ∇x log p_t(y | x) with a noise-conditional classifier.
* Classifier-free guidance: (1 + w) s(x, t, y) - w s(x, t, ∅), ∅ the null label ``num_classes``.

The training objectives of the classifier and of the class-conditional model are ``losses``' ``classifier`` and
``dsm_cfg``. The ``--mode=sample`` runner for ``config.sampling.task`` != "unconditional" is
``run_lib.controllable``.
"""
from __future__ import annotations

import pathlib
from typing import Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

import samplers
from sde_lib import SDE, batch_broadcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


# ---- decoupled coordinates ------------------------------------------------------------------------------------
class Decoupling(NamedTuple):
    """An orthogonal change of coordinates u = forward(x), x = inverse(u) in which the known part is a mask."""

    forward: Callable[[Array], Array]
    inverse: Callable[[Array], Array]


IDENTITY = Decoupling(lambda x: x, lambda u: u)

# columns: the gray axis (1,1,1)/√3 and two orthonormal chroma axes (-2,1,1)/√6, (0,1,-1)/√2
COLOR_MATRIX = np.stack([np.ones(3) / np.sqrt(3), np.array([-2.0, 1, 1]) / np.sqrt(6),
                         np.array([0.0, 1, -1]) / np.sqrt(2)], axis=1)


def color_decoupling() -> Decoupling:
    """u = x M per pixel (channels last); M orthogonal, so x = u Mᵀ and u_0 = √3 · mean(r, g, b)."""
    m = jnp.asarray(COLOR_MATRIX, jnp.float32)
    return Decoupling(lambda x: x @ m, lambda u: u @ m.T)


# ---- masks ----------------------------------------------------------------------------------------------------
def _named_mask(name: str, h: int, w: int) -> Optional[np.ndarray]:
    """Built-in (H, W) masks, 1 = known: ``left``/``right``/``top``/``bottom`` halves known, ``center`` (middle
    square unknown), ``checkerboard`` (4×4-pixel checks, or 1-pixel below 8 pixels)."""
    ii, jj = np.mgrid[:h, :w]
    cell = max(1, min(h, w) // 8)
    masks = {"left": jj < w // 2, "right": jj >= w // 2, "top": ii < h // 2, "bottom": ii >= h // 2,
             "center": ~((abs(ii - (h - 1) / 2) < h / 4) & (abs(jj - (w - 1) / 2) < w / 4)),
             "checkerboard": ((ii // cell + jj // cell) % 2) == 0}
    return None if name not in masks else masks[name].astype(np.float32)


NAMED_MASKS = ("left", "right", "top", "bottom", "center", "checkerboard")


def _read_mask_image(name: str, shape) -> np.ndarray:
    """The grey levels of an image file, refused from its header (before decoding) when larger than the data."""
    from PIL import Image

    try:
        with Image.open(name) as pil:
            width, height = pil.size
            if len(shape) != 3 or (height, width) != tuple(shape[:2]):
                raise ValueError(f"mask image {name} is {width}x{height} pixels but the data is {shape}; "
                                 f"expected (H, W) = {tuple(shape[:2])}")
            return np.asarray(pil.convert("L"), np.float32)
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"mask image {name}: corrupt or unreadable ({type(exc).__name__}: {exc})") from None


def load_mask(mask: Union[str, pathlib.Path, np.ndarray, Array], shape) -> np.ndarray:
    """A {0, 1} float mask (1 = known) broadcast to one example's ``shape`` (H, W, C) or (D,).

    ``mask``: an array broadcastable to ``shape`` ((H, W), (H, W, 1) or (H, W, C); (D,) for vectors), a PNG/image
    file path (pixels > 127 are known), or one of ``NAMED_MASKS``."""
    shape = tuple(shape)
    if isinstance(mask, (str, pathlib.Path)):
        name = str(mask)
        named = _named_mask(name, shape[0], shape[1]) if len(shape) == 3 and name in NAMED_MASKS else None
        if named is not None:
            m = named
        elif pathlib.Path(name).is_file():
            m = (_read_mask_image(name, shape) > 127).astype(np.float32)
        else:
            raise ValueError(f"mask {name!r} (config.sampling.mask) is neither an image file nor one of "
                             f"{list(NAMED_MASKS)}")
    else:
        m = np.asarray(mask, np.float32)
    if m.ndim == 2 and len(shape) == 3:
        m = m[..., None]
    try:
        out = np.broadcast_to(m, shape)
    except ValueError:
        raise ValueError(f"mask of shape {m.shape} does not match the data shape {shape} (expected (H, W), "
                         f"(H, W, 1) or (H, W, C) images, or (D,) vectors)") from None
    if not np.all((out == 0) | (out == 1)):
        raise ValueError("mask values must be 0 (unknown) or 1 (known)")
    return out.astype(np.float32)


# ---- imputation: replacement of the known part -------------------------------------------------------------------
def _tb(t, x: Array) -> Array:
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))


def impute_fn(sde: SDE, known: Array, mask: Array, decoupling: Decoupling = IDENTITY,
              noise: Optional[Array] = None) -> Callable:
    """``project(key, x, t)``: in u = forward(x), set u ← m ⊙ (α(t) u_y + σ(t) z) + (1 - m) ⊙ u, with u_y the
    known data in decoupled coordinates (batch, ...) and m the mask; z ~ N(0, I) drawn from ``key`` at every call,
    or the fixed ``noise`` (one path α(t) u_y + σ(t) z per sample, for deterministic solvers)."""

    def project(key, x, t):
        tb = _tb(t, x)
        alpha, sigma = sde.alpha_sigma(tb)
        u = decoupling.forward(x)
        z = jax.random.normal(key, u.shape) if noise is None else noise
        u_known = batch_broadcast(alpha, u) * known + batch_broadcast(sigma, u) * z
        return decoupling.inverse(mask * u_known + (1 - mask) * u)

    return project


def imputation_methods() -> Tuple[str, ...]:
    """``pc``, ``ode``, ``smc`` and every registered sampler that takes the ``project`` hook."""
    return ("pc", "ode", "smc") + tuple(m for m in samplers.methods_with("project") if m != "pc")


def impute(key: Array, sde: SDE, score_fn: ScoreFn, known: Array, mask, decoupling: Decoupling = IDENTITY,
           method: str = "pc", **options) -> Tuple[Array, object]:
    """Samples of x given the known part ``mask ⊙ forward(x) = mask ⊙ known`` (known in decoupled coordinates,
    (batch, ...)). ``method``: ``pc`` (any predictor/corrector; ``options`` as ``samplers.build_pc``), ``ode``
    (``options`` as ``solve_imputation_flow``), ``smc`` (``smc_impute``), or any other sampler that takes the
    ``project`` hook (``samplers.methods_with``: ``ddim``, ``dpm_solver++``, ``heun``, every ``grid_method``;
    ``options`` as its builder's; the known part follows one noisy path α(t) u_y + σ(t) z per sample, as in the
    ODE). The known part of the result is exactly the data.
    Returns (x, nfe)."""
    known = jnp.asarray(known, jnp.float32)
    if known.ndim < 2:
        raise ValueError(f"known data must have a batch axis, got shape {tuple(known.shape)}")
    mask = jnp.asarray(load_mask(mask, known.shape[1:]), jnp.float32)
    if method == "pc":
        fn, nfe = samplers.build_sampler(sde, score_fn, known.shape, "pc",
                                         project=impute_fn(sde, known, mask, decoupling), **options)
        x, nfe = fn(key)
    elif method in samplers.methods_with("project"):
        k_path, key = jax.random.split(key)
        project = impute_fn(sde, known, mask, decoupling, noise=jax.random.normal(k_path, known.shape))
        fn, nfe = samplers.build_sampler(sde, score_fn, known.shape, method, project=project, **options)
        x, nfe = fn(key)
    elif method == "ode":
        x, nfe = solve_imputation_flow(key, sde, score_fn, known, mask, decoupling, **options)
    elif method == "smc":
        x, nfe = smc_impute(key, sde, score_fn, known, mask, decoupling, **options)
        known = jnp.repeat(known, options.get("num_particles", 16), axis=0)
    else:
        raise ValueError(f"imputation method {method!r} is not supported; expected one of {imputation_methods()}")
    u = decoupling.forward(x)
    return decoupling.inverse(mask * known + (1 - mask) * u), nfe


def solve_imputation_flow(key: Array, sde: SDE, score_fn: ScoreFn, known: Array, mask: Array,
                          decoupling: Decoupling = IDENTITY, solver: str = "tsit5", rtol: float = 1e-5,
                          atol: float = 1e-5, num_steps: int = 100, denoise: bool = True,
                          eps: Optional[float] = None, max_steps: int = 16384) -> Tuple[Array, Array]:
    """Probability-flow ODE of the unknown coordinates du/dt = [f - ½ g² s](x(u), t) from T to eps, with the
    known coordinates on the path α(t) u_y + σ(t) z (one z per sample), then Tweedie's denoiser. (x, nfe)."""
    eps = samplers.check_eps(sde, eps)
    k_prior, k_path = jax.random.split(key)
    z = jax.random.normal(k_path, known.shape)
    path = lambda t: batch_broadcast(sde.alpha_sigma(_tb(t, known))[0], known) * known + \
        batch_broadcast(sde.alpha_sigma(_tb(t, known))[1], known) * z
    rsde = sde.reverse(score_fn, probability_flow=True)

    def field(t, u, args):
        x = decoupling.inverse(mask * path(t) + (1 - mask) * u)
        return (1 - mask) * decoupling.forward(rsde.sde(x, _tb(t, x))[0])

    def run(k):
        u0 = decoupling.forward(sde.prior_sampling(k, known.shape))
        u, nfe, _ = samplers.solve_ode(field, u0, sde.T, eps, solver, rtol, atol, num_steps, max_steps)
        x = decoupling.inverse(mask * path(eps) + (1 - mask) * u)
        if denoise:
            x, nfe = samplers.tweedie(sde, score_fn, x, eps), nfe + 1
        return x, nfe

    return jax.jit(run)(k_prior)


# ---- imputation by sequential Monte Carlo (SMCDiff) ----------------------------------------------------------------
def forward_path(key: Array, sde: SDE, known: Array, ts: Array) -> Array:
    """One forward-chain trajectory of the known data per example on the grid ``ts`` (T..eps), shape
    (len(ts), batch, ...): u(eps) = α(eps) u_y + σ(eps) z, then u(t_i) = (α_i/α_{i+1}) u(t_{i+1}) +
    √(σ_i² - (α_i/α_{i+1})² σ_{i+1}²) z going up in t (the SDE's exact transition between marginals)."""
    alpha, sigma = sde.alpha_sigma(ts)
    u_eps = alpha[-1] * known + sigma[-1] * jax.random.normal(jax.random.fold_in(key, len(ts)), known.shape)

    def up(u, i):  # from t_{i+1} to t_i
        ratio = alpha[i] / alpha[i + 1]
        std = jnp.sqrt(jnp.maximum(sigma[i] ** 2 - (ratio * sigma[i + 1]) ** 2, 0.0))
        u = ratio * u + std * jax.random.normal(jax.random.fold_in(key, i), u.shape)
        return u, u

    _, path = jax.lax.scan(up, u_eps, jnp.arange(len(ts) - 2, -1, -1))
    return jnp.concatenate([path[::-1], u_eps[None]])


def _resample(key: Array, logw: Array, threshold: float) -> Tuple[Array, Array]:
    """Per group (rows of logw (G, P)): systematic resampling when the effective sample size
    (Σw)²/Σw² < threshold · P. Returns flat particle indices (G·P,) and the new log-weights."""
    g, p = logw.shape
    w = jax.nn.softmax(logw, axis=-1)
    ess = 1.0 / jnp.sum(w**2, axis=-1)
    positions = (jax.random.uniform(key, (g, 1)) + jnp.arange(p)[None]) / p
    draw = jax.vmap(jnp.searchsorted)(jnp.cumsum(w, axis=-1), positions)
    draw = jnp.minimum(draw, p - 1)
    keep = ess < threshold * p
    idx = jnp.where(keep[:, None], draw, jnp.arange(p)[None])
    return (idx + p * jnp.arange(g)[:, None]).reshape(-1), jnp.where(keep[:, None], 0.0, logw)


def smc_impute(key: Array, sde: SDE, score_fn: ScoreFn, known: Array, mask: Array,
               decoupling: Decoupling = IDENTITY, num_particles: int = 16, num_steps: Optional[int] = None,
               eps: Optional[float] = None, denoise: bool = True, ess_threshold: float = 0.5) -> Tuple[Array, int]:
    """SMCDiff (Trippe et al. 2023): ``num_particles`` Euler–Maruyama particles per example, the known part on a
    forward-chain trajectory of the data (``forward_path``), weighted by the reverse transition density of the
    known part, N(u_k(t'); u_k + [f - g² s]_k Δt, g² |Δt|), and resampled when the ESS drops below
    ``ess_threshold``. Unlike replacement it is exact as particles → ∞ and steps → ∞ (for an exact score).
    Returns (batch · num_particles samples, group-major, resampled to equal weights; nfe)."""
    eps = samplers.check_eps(sde, eps)
    num_steps = sde.N if num_steps is None else int(num_steps)
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    ts = samplers.time_grid(sde, num_steps, eps, "uniform")
    g, p = known.shape[0], num_particles
    rsde = sde.reverse(score_fn)

    def step(carry, xs):
        (u, logw, k), (i, target) = carry, xs
        k_z, k_r = jax.random.split(jax.random.fold_in(k, i))
        x, dt = decoupling.inverse(u), ts[i + 1] - ts[i]
        drift, diff = rsde.sde(x, _tb(ts[i], x))
        mean, std = u + decoupling.forward(drift) * dt, batch_broadcast(diff * jnp.sqrt(-dt), u)
        target = jnp.repeat(target, p, axis=0)
        log_inc = jnp.sum((mask * (-0.5 * ((target - mean) / std) ** 2)).reshape(g * p, -1), axis=-1)
        u = mask * target + (1 - mask) * (mean + std * jax.random.normal(k_z, u.shape))
        idx, logw = _resample(k_r, logw + log_inc.reshape(g, p), ess_threshold)
        return (u[idx], logw, k), None

    def run(key):
        k_path, k_prior, k_loop, k_final = jax.random.split(key, 4)
        path = forward_path(k_path, sde, known, ts)
        u = decoupling.forward(sde.prior_sampling(k_prior, (g * p,) + known.shape[1:]))
        u = mask * jnp.repeat(path[0], p, axis=0) + (1 - mask) * u
        (u, logw, _), _ = jax.lax.scan(step, (u, jnp.zeros((g, p)), k_loop), (jnp.arange(num_steps - 1), path[1:]))
        idx, _ = _resample(k_final, logw, threshold=2.0)  # always: equal weights at the end
        x = decoupling.inverse(u[idx])
        return samplers.tweedie(sde, score_fn, x, eps) if denoise else x

    x = jax.jit(run)(key)
    return x, num_steps - 1 + int(denoise)


def inpaint(key: Array, sde: SDE, score_fn: ScoreFn, data: Array, mask, method: str = "pc",
            **options) -> Tuple[Array, object]:
    """Inpainting: samples of x with x = data where ``mask`` (array, image path or name; see ``load_mask``) is 1."""
    data = jnp.asarray(data, jnp.float32)
    return impute(key, sde, score_fn, data, load_mask(mask, data.shape[1:]), IDENTITY, method, **options)


def gray_component(images: Array) -> Array:
    """The gray coordinate u_0 = √3 · mean over channels of (batch, H, W, C) images (C = 1: the gray image
    itself, read as r = g = b)."""
    return jnp.sqrt(3.0) * jnp.mean(jnp.asarray(images, jnp.float32), axis=-1, keepdims=True)


def colorize(key: Array, sde: SDE, score_fn: ScoreFn, gray: Array, method: str = "pc",
             **options) -> Tuple[Array, object]:
    """Colorization: RGB samples (batch, H, W, 3) whose channel mean equals ``gray`` ((batch, H, W, 1) gray
    images, or RGB images whose gray version is used), by imputation in ``color_decoupling`` coordinates."""
    gray = jnp.asarray(gray, jnp.float32)
    if gray.ndim != 4 or gray.shape[-1] not in (1, 3):
        raise ValueError(f"colorize needs gray (B, H, W, 1) or RGB (B, H, W, 3) images, got shape {gray.shape}")
    u0 = gray_component(gray)
    known = jnp.concatenate([u0, jnp.zeros_like(u0), jnp.zeros_like(u0)], axis=-1)
    mask = jnp.broadcast_to(jnp.array([1.0, 0.0, 0.0]), known.shape[1:])
    return impute(key, sde, score_fn, known, mask, color_decoupling(), method, **options)


# ---- guidance -----------------------------------------------------------------------------------------------------
def check_labels(y, num_classes: int, batch: int) -> Array:
    """Class indices (batch,) from an int or an array; every label must lie in [0, num_classes)."""
    y = np.broadcast_to(np.asarray(y), (batch,)) if np.ndim(y) == 0 else np.asarray(y)
    if y.shape != (batch,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be an int or {batch} ints, got {y!r}")
    if np.any(y < 0) or np.any(y >= num_classes):
        raise ValueError(f"label(s) {sorted(set(y[(y < 0) | (y >= num_classes)].tolist()))} out of range "
                         f"[0, {num_classes}) (config.sampling.label / config.data.num_classes)")
    return jnp.asarray(y, jnp.int32)


def classifier_guided_score_fn(score_fn: ScoreFn, logits_fn: Callable, y: Array, scale: float = 1.0) -> ScoreFn:
    """s(x, t) + w ∇x log p_t(y | x), with ``logits_fn(x, t) -> (batch, K)`` the noise-conditional classifier's
    logits; w = 1 samples p_t(x | y) exactly when both the score and the classifier are exact."""

    def log_py(x, t):
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits_fn(x, t), axis=-1), y[:, None], axis=1))

    return lambda x, t: score_fn(x, t) + scale * jax.grad(log_py)(x, t)


def cfg_score_fn(cond_score_fn: Callable, y: Array, null_label: int, guidance_scale: float) -> ScoreFn:
    """Classifier-free guidance (Ho & Salimans 2022): (1 + w) s(x, t, y) - w s(x, t, ∅), one batched call of
    ``cond_score_fn(x, t, y)`` on [x; x] with labels [y; ∅]. w = 0: conditional; w = -1: unconditional."""
    w = guidance_scale

    def score(x, t):
        both = cond_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                             jnp.concatenate([y, jnp.full_like(y, null_label)]))
        s_cond, s_uncond = both[: x.shape[0]], both[x.shape[0]:]
        return (1.0 + w) * s_cond - w * s_uncond

    return score


def is_class_conditional(model) -> bool:
    """Whether a ``ScoreModel``'s network takes class labels ``y`` (classifier-free guidance needs it)."""
    return hasattr(model.module, "num_classes") and "y" in _call_params(model.module)


def _call_params(module) -> tuple:
    import inspect

    return tuple(inspect.signature(type(module).__call__).parameters)


def model_cfg_score_fn(model, params, sde: SDE, y: Array, guidance_scale: float) -> ScoreFn:
    """The guided score of a class-conditional ``ScoreModel`` (``models.classifier.ClassConditional``)."""
    if not is_class_conditional(model):
        raise ValueError(f"classifier-free guidance needs a class-conditional score model (config.model.name="
                         f"'class_conditional' trained with loss 'dsm_cfg'); {type(model.module).__name__} "
                         f"takes no class label")
    num_classes = int(model.module.num_classes)
    check_labels(np.asarray(y), num_classes, y.shape[0])
    cond = lambda x, t, labels: model.score(params, sde, x, t, y=labels)
    return cfg_score_fn(cond, y, num_classes, guidance_scale)
