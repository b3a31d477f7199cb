"""Adding a dataset is one function in ``datasets.SOURCES``: ``source(config, split) -> (images, labels)`` with
uint8 images (N, H, W, C) and int32 labels (N,). Batching, sharding over processes, shuffling, flips, scaling to
[-1, 1] and the inverse transform for saved PNGs come from ``datasets.get_dataset``. An image source needs no
shape (``datasets.image_shape``); its quality figure is one function in ``evaluation.quality.QUALITY_FIGURES``.

The source here is the classic "bars" problem: 8×8 binary images in which every row (label 0) or every column
(label 1) is independently on with probability ½, so a sample is valid exactly when it is constant along rows or
along columns. Train a small U-Net on it:

    python main.py --config=examples/bars_dataset.py --workdir=/tmp/bars
"""
import numpy as np

import datasets
from configs.base import get_base_config
from evaluation import quality

BARS_SIZES = {"train": 4096, "test": 512}


def make_bars(n: int, size: int, rng: np.random.Generator):
    """n bars images uint8 (n, size, size, 1) in {0, 255} and their orientation labels (n,)."""
    labels = rng.integers(0, 2, n).astype(np.int32)
    lines = rng.random((n, size)) < 0.5
    horizontal = np.repeat(lines[:, :, None], size, axis=2)  # row r is on when lines[r]
    images = np.where(labels[:, None, None] == 0, horizontal, horizontal.transpose(0, 2, 1))
    return (255 * images).astype(np.uint8)[..., None], labels


@datasets.register_source("bars")
def load_bars(config, split: str):
    """Fixed train/test sets (different seeds), generated at ``config.data.image_size`` with 1 channel."""
    split = "train" if split == "train" else "test"
    rng = np.random.default_rng([7, 0 if split == "train" else 1])
    images, labels = make_bars(BARS_SIZES[split], config.data.image_size, rng)
    return datasets.convert_channels(images, config.data.num_channels, "bars"), labels


def is_bars(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> bool (N,): binarised at 128, every row or every column is constant."""
    b = images[..., 0] >= 128
    rows = np.all(b == b[:, :, :1], axis=(1, 2))
    cols = np.all(b == b[:, :1, :], axis=(1, 2))
    return rows | cols


@quality.register_quality_figure("bars")
def bars_quality(config, samples: np.ndarray) -> dict:
    """The quality figure of ``--mode=sample`` / ``--mode=eval``: the fraction of uint8 samples that are valid bars
    images (every real image is)."""
    return {"fraction_valid": float(is_bars(samples).mean()), "num_samples": int(len(samples))}


def get_config():
    """bars 8×8 under the VP SDE with a small U-Net."""
    config = get_base_config()
    config.data.source = "bars"
    config.data.dataset = "bars"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.num_classes = 2
    config.training.batch_size = 128
    config.training.n_iters = 2000
    config.training.snapshot_freq = 1000
    config.training.log_freq = 100
    config.training.reduce_mean = True
    config.optim.lr = 2e-3
    config.optim.warmup = 100
    config.model.nf = 16
    config.model.ch_mult = (1, 2)
    config.model.ema_rate = 0.995
    config.sde.N = 200
    config.sampling.corrector = "none"
    return config
