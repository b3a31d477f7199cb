"""Metric math on features and classifier outputs: FID, KID, the Inception Score formula, uint8 quantisation.

    FID  (Heusel et al. 2017)   d² = |μ₁ - μ₂|² + tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)
    IS   (Salimans et al. 2016) exp E_x KL(p(y|x) ‖ p(y)), averaged over 10 splits; computed here with a domain
         classifier's classes, so results are named ``classifier_score`` (the Inception network gives no logits)
    KID  (Bińkowski et al. 2018) unbiased MMD² with k(x, y) = (xᵀy / d + 1)³, averaged over subsets

Images enter every metric as uint8 exactly as they would be saved (``quantize_uint8``), NHWC.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


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
