"""scikit-learn's 8×8 digits: the held-out split as uint8, a small MLP classifier, and the quality figures of
digit and colored-digit samples next to real held-out digits."""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Dict, Optional, Tuple

import ml_collections
import numpy as np

import datasets
import safe_pickle
import utils
from evaluation.metrics import classifier_quality, feature_statistics, palette_fit


def digits_uint8(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """sklearn digits as stored by ``datasets`` (source "digits"): (N, 8, 8, 1) uint8 and labels (N,) int32.

    Split "train" (1500 images) or "test" (297 held out), the fixed split of ``datasets.load_digits``.
    """
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
        utils.atomic_savez(path, **params)
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
