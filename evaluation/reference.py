"""Reference statistics files: mean/covariance (and features, for KID) of a dataset split, their names, sha256."""
from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Dict, Optional

import numpy as np

import safe_pickle
import utils
from evaluation.metrics import feature_statistics


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
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
    utils.atomic_savez(path, **arrays)
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


def stats_path(directory, *, dataset: str, split: str, image_size: int, extractor: str,
               num_images: Optional[int] = None) -> pathlib.Path:
    """``<directory>/<dataset>_<split>[<n>]_<image_size>px_<extractor>.npz``, with n = ``num_images`` when the
    statistics cover only the first n images of the split."""
    return pathlib.Path(directory) / f"{dataset}_{split}{num_images or ''}_{image_size}px_{extractor}.npz"
