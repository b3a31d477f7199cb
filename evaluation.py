"""Sample-quality evaluation: FID, Inception Score, KID, and a domain classifier for small grayscale data.

    FID  (Heusel et al. 2017)   d² = |μ₁ - μ₂|² + tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)
    IS   (Salimans et al. 2016) exp E_x KL(p(y|x) ‖ p(y)), averaged over 10 splits
    KID  (Bińkowski et al. 2018) unbiased MMD² with k(x, y) = (xᵀy / d + 1)³, averaged over subsets

Images enter every metric as uint8 exactly as they would be saved (``quantize_uint8``), NHWC.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Dict, Optional, Tuple

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------------------------------


def quantize_uint8(x01) -> np.ndarray:
    """Images in [0, 1] -> uint8 as saved (torchvision ``save_image``/PIL): ⌊clip(255 x + ½, 0, 255)⌋. Any shape."""
    x = np.asarray(x01, dtype=np.float64)
    return np.floor(np.clip(x * 255.0 + 0.5, 0.0, 255.0)).astype(np.uint8)


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


def kernel_inception_distance(feats1, feats2, key_seed: int = 0, num_subsets: int = 100,
                              subset_size: int = 1000) -> Tuple[float, float]:
    """KID: unbiased polynomial MMD² averaged over random subsets (without replacement); returns (mean, std)."""
    x, y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(key_seed)
    vals = [_mmd2_unbiased_poly(x[rng.choice(x.shape[0], m, replace=False)],
                                y[rng.choice(y.shape[0], m, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# --------------------------------------------------------------------------------------------------------------
# Digits (sklearn 8x8): data, a small classifier, and quality numbers
# --------------------------------------------------------------------------------------------------------------

DIGITS_NUM_TEST = 360  # the last 360 of sklearn's 1797 digits are held out; the first 1437 train the classifier


def digits_uint8(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """sklearn digits as (N, 8, 8, 1) uint8, values round(v * 255 / 16), and labels (N,) int; split train|test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    cut = len(images) - DIGITS_NUM_TEST
    if split == "train":
        return images[:cut], labels[:cut]
    if split == "test":
        return images[cut:], labels[cut:]
    raise ValueError(f"digits split {split!r} is unknown; valid: 'train', 'test'")


DIGITS_CLASSIFIER_FILE = "digits_mlp_v1.npz"


def train_digits_classifier(seed: int = 0) -> Dict[str, np.ndarray]:
    """Train an MLP 64-128-64-10 (ReLU) on the digits training split, pixels u/255; ~3 s on CPU.

    Returns numpy weights {"W0", "b0", "W1", "b1", "W2", "b2", "test_accuracy"}.
    """
    from sklearn.neural_network import MLPClassifier

    x, y = digits_uint8("train")
    xt, yt = digits_uint8("test")
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-2, max_iter=1000, random_state=seed)
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
        with np.load(path) as f:
            return dict(f)
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


def classifier_quality(logits, feats, ref_mu, ref_sigma) -> Dict[str, Any]:
    """Entropy, confidence, class histogram, IS and domain FID of one set of classifier outputs."""
    logp = _log_softmax(np.asarray(logits, np.float64))
    p = np.exp(logp)
    n = len(p)
    is_mean, is_std = inception_score(logits, splits=min(10, n))
    return {
        "num_samples": int(n),
        "mean_entropy": float(-(p * logp).sum(axis=1).mean()),
        "mean_confidence": float(p.max(axis=1).mean()),
        "class_histogram": np.bincount(p.argmax(axis=1), minlength=p.shape[1]).tolist(),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_1split": inception_score(logits, splits=1)[0],
        "domain_fid": frechet_distance(*feature_statistics(feats), ref_mu, ref_sigma),
    }


def digits_quality(samples_uint8, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Quality of uint8 digit samples (N, 8, 8[, 1]) next to the same count of held-out real digits.

    Both sets get: mean predictive entropy, mean max-probability, class histogram, IS (min(10, N) splits and
    1 split) and the domain FID to the training split, in the classifier's penultimate (64-d) feature space.
    The held-out set has min(N, 360) images (its count is recorded).
    """
    samples = np.asarray(samples_uint8)
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
                         "reference": "digits train split (1437 images)"}
    return out
