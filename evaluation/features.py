"""Features of image batches: streaming uint8 batches through a feature extractor (jitted, sharded over a
``data`` mesh axis when a sharding is given), and the FID/KID figures of samples against reference statistics."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from evaluation.metrics import evaluate_features


def _padded(images: np.ndarray, size: int) -> np.ndarray:
    """Pad the batch axis to ``size`` by repeating the first image (padding rows are dropped afterwards)."""
    if len(images) == size:
        return images
    return np.concatenate([images, np.repeat(images[:1], size - len(images), axis=0)])


def extract_features(extractor, batches, batch_size: int, limit: Optional[int] = None,
                     progress: Optional[Callable[[], None]] = None, sharding=None):
    """Stream uint8 image batches through ``extractor`` -> (features (N, D) float32, logits (N, K) or None);
    ``progress()`` (optional) is called after each input batch and may raise to stop.

    ``batches`` yields uint8 arrays (b, H, W, C) with b <= batch_size, or (images, mask) pairs whose
    ``mask`` marks the real rows. Every batch is padded to one fixed size (a multiple of the number of devices of
    ``sharding``, a ``jax.sharding.Sharding`` of the batch axis, or None: no placement), so the jitted extractor
    compiles once; padding rows are dropped. Stops after ``limit`` images when given.
    """
    n_dev = 1 if sharding is None else len(sharding.device_set)
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


def check_samples(samples_uint8, num_samples: int) -> np.ndarray:
    """The first ``num_samples`` of uint8 NHWC samples; an error when fewer are given or they are not uint8 NHWC."""
    samples = np.asarray(samples_uint8)
    if len(samples) < num_samples:
        raise ValueError(f"got {len(samples)} samples but num_samples={num_samples} were requested "
                         f"(config.eval.num_samples)")
    if samples.dtype != np.uint8 or samples.ndim != 4:
        raise ValueError(f"FID needs uint8 NHWC samples, got {samples.dtype} {samples.shape}")
    return samples[:num_samples]


def evaluate_against(samples_uint8, extractor, stats: Dict[str, Any], batch_size: int,
                     sharding=None) -> Dict[str, Any]:
    """``evaluate_features`` of uint8 samples' features by ``extractor`` vs reference ``stats`` (as
    ``reference.load_stats`` returns them), with the reference file, its sha256 and its image count."""
    feats, logits = extract_features(extractor, array_batches(samples_uint8, batch_size), batch_size,
                                     sharding=sharding)
    out = evaluate_features(feats, logits, stats)
    out.update(reference_stats=stats["path"], reference_sha256=stats["sha256"],
               reference_num_images=int(stats["num_images"]))
    return out


def default_extractors(names, num_channels: int, image_size: int) -> Tuple[str, ...]:
    """``names`` (a comma list or a sequence: ``config.eval.fid_extractors``), else Inception, plus the domain
    classifier for small grayscale data (``num_channels`` 1, ``image_size`` <= 32)."""
    if names:
        return tuple(n.strip() for n in names.split(",")) if isinstance(names, str) else tuple(names)
    small_gray = int(num_channels) == 1 and int(image_size) <= 32
    return ("inception", "domain") if small_gray else ("inception",)
