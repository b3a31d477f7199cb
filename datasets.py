"""Input pipeline: host-local batches of images (or 2-D points) in model space.

``get_dataset(config, split, infinite=...)`` returns an iterator of dicts

    {"x": float32 (b, H, W, C) in model space  (or (b, 2) for toy data),
     "label": int32 (b,),
     "mask": bool (b,)           -- finite mode only: True for real examples, False for padding}

where ``b = batch_size // process_count`` (``config.training.batch_size`` for the "train" split,
``config.eval.batch_size`` for every other split).

Modes:
- ``infinite=True`` (training): an epoch-free stream. Each process reshuffles its shard every epoch and batches
  run across epoch boundaries, so no example is ever dropped and there is no epoch bookkeeping. Random
  horizontal flips (``config.data.random_flip``) are applied in this mode only.
- ``infinite=False`` (evaluation): one complete pass in a fixed order. Every batch has exactly ``b`` rows; the
  last one(s) are **padded** (repeating example 0 of the shard) and marked with ``mask == False``. All processes
  yield the same number of batches, ``ceil(ceil(N / P) / b)``, so collective steps stay in lock-step.

Sharding: process ``i`` of ``P`` owns examples ``i, i + P, i + 2P, ...`` of the split (disjoint, and their union
is the split). Defaults come from ``jax.process_index()`` / ``jax.process_count()``.

Randomness is host-side numpy, derived from the seed like ``fold_in``: the generator of batch ``k`` on process
``i`` is ``np.random.default_rng([seed, i, k, stream])``, so a stream is a pure function of
(seed, process, step). ``seed`` defaults to ``config.seed``.

Transforms (``get_data_transform``): uint8 ``u`` -> ``u / 255`` in [0, 1], or with uniform dequantization
``(u + U[0, 1)) / 256``; then ``2 x - 1`` when ``config.data.centered``. ``inverse`` maps model space back to
the uint8 a saved PNG holds (round-and-clip; floor of the dequantization bin when dequantizing).

Sources (``config.data.source``) are plain functions in ``SOURCES``; local ones load the whole split into memory
as uint8 numpy arrays (N, H, W, C) with int32 labels, resized (antialiased) and centre-cropped to
``config.data.image_size`` and converted to ``config.data.num_channels`` when they differ from the stored files.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import math
import os
import pickle
import queue
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

Batch = Dict[str, np.ndarray]
Arrays = Tuple[np.ndarray, np.ndarray]

EVAL_SPLIT_ALIASES = ("eval", "test", "validation")


# --------------------------------------------------------------------------------------------------------------
# Model-space transforms
# --------------------------------------------------------------------------------------------------------------

def _namespace(x):
    """numpy for numpy/python inputs, jax.numpy for jax arrays (so transforms also work under jit)."""
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return np
    import jax.numpy as jnp
    return jnp


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """uint8 images <-> float32 model space.

    forward:  x = u / 255                      (no dequantization)
              x = (u + U[0,1)) / 256           (uniform dequantization; midpoint (u + ½)/256 when no rng)
              x <- 2 x - 1                     (centered)
    inverse:  u = clip(round(255 x'), 0, 255)  or  clip(floor(256 x'), 0, 255) with dequantization,
              where x' = (x + 1) / 2 when centered. ``inverse(forward(u)) == u`` exactly.
    """

    centered: bool = True
    uniform_dequantization: bool = False

    def forward(self, images, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """uint8 (..., H, W, C) -> float32 model space of the same shape."""
        u = np.asarray(images).astype(np.float32)
        if self.uniform_dequantization:
            noise = rng.random(u.shape, dtype=np.float32) if rng is not None else np.float32(0.5)
            x = (u + noise) / np.float32(256.0)
        else:
            x = u / np.float32(255.0)
        return (2.0 * x - 1.0).astype(np.float32) if self.centered else x.astype(np.float32)

    def inverse(self, x):
        """Model space -> uint8 images (numpy in, numpy out; jax in, jax out)."""
        xp = _namespace(x)
        x = xp.asarray(x, dtype=xp.float32)
        if self.centered:
            x = (x + 1.0) / 2.0
        u = xp.floor(x * 256.0) if self.uniform_dequantization else xp.round(x * 255.0)
        return xp.clip(u, 0, 255).astype(xp.uint8)

    @property
    def bpd_offset(self) -> float:
        """Bits/dim added to -log2 p(x)/D of model space to get bits/dim of 8-bit data: log2(256 / width)."""
        return 8.0 - math.log2(2.0 if self.centered else 1.0)


@dataclasses.dataclass(frozen=True)
class IdentityTransform:
    """Toy 2-D data already lives in model space: forward and inverse are float32 identities."""

    def forward(self, x, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def inverse(self, x):
        xp = _namespace(x)
        return xp.asarray(x, dtype=xp.float32)

    @property
    def bpd_offset(self) -> float:
        return 0.0


def get_data_transform(config):
    """The forward/inverse pair of ``config.data`` (``IdentityTransform`` for the toy source)."""
    if config.data.source == "toy":
        return IdentityTransform()
    return ImageTransform(centered=bool(config.data.centered),
                          uniform_dequantization=bool(config.data.uniform_dequantization))


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip each image of (b, H, W, C) left-right with probability ½."""
    flip = rng.random(images.shape[0]) < 0.5
    out = images.copy()
    out[flip] = images[flip, :, ::-1]
    return out


# --------------------------------------------------------------------------------------------------------------
# Image geometry: resolution and channels
# --------------------------------------------------------------------------------------------------------------

def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> (size, size, C): resize the short side to ``size`` (bicubic, antialiased), centre crop."""
    from PIL import Image

    h, w, c = image.shape
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = np.asarray(pil)[top:top + size, left:left + size]
    return out.reshape(size, size, c)


def convert_channels(images: np.ndarray, channels: int, what: str = "images") -> np.ndarray:
    """(..., C) uint8 -> (..., channels): gray->RGB repeats, RGB->gray uses ITU-R 601 luma (as PIL "L")."""
    c = images.shape[-1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {what} with {c} channels to config.data.num_channels={channels} "
                     f"(supported: 1 <-> 3)")


def fit_images(images: np.ndarray, size: int, channels: int, what: str) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, size, size, channels), resizing only when the stored size differs."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    images = convert_channels(images, channels, what)
    if images.shape[1:3] != (size, size):
        images = np.stack([resize_center_crop(im, size) for im in images]) if len(images) else \
            np.zeros((0, size, size, channels), np.uint8)
    return np.ascontiguousarray(images)


# --------------------------------------------------------------------------------------------------------------
# Local sources: (config, split) -> (uint8 images (N, H, W, C), int32 labels (N,))
# --------------------------------------------------------------------------------------------------------------

def _local_split(split: str) -> str:
    """Local sources have "train" and "test"; "eval" and "validation" mean "test"."""
    if split == "train":
        return "train"
    if split in EVAL_SPLIT_ALIASES:
        return "test"
    raise ValueError(f"unknown split {split!r}; valid splits: 'train', {', '.join(map(repr, EVAL_SPLIT_ALIASES))}")


DIGITS_TEST_SIZE = 297  # of 1797; the train split has 1500 images


def digits_to_uint8(v: np.ndarray) -> np.ndarray:
    """Digits pixel values 0..16 -> uint8 0..255 exactly: u = floor((255 v + 8) / 16) = round-half-up(255 v / 16).

    So 0 -> 0, 8 -> 128, 16 -> 255; the 17 levels are distinct and monotone.
    """
    v = np.asarray(v).astype(np.int64)
    if v.min() < 0 or v.max() > 16:
        raise ValueError(f"digits pixel values must lie in 0..16, got {v.min()}..{v.max()}")
    return ((255 * v + 8) // 16).astype(np.uint8)


def load_digits(config, split: str) -> Arrays:
    """scikit-learn's 8x8 digits (embedded in the package): 1797 images; a fixed permutation (numpy seed 0)
    puts the first 297 in "test" and the other 1500 in "train"."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = digits_to_uint8(bunch.images)[..., None]
    labels = bunch.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(labels))
    idx = perm[:DIGITS_TEST_SIZE] if _local_split(split) == "test" else perm[DIGITS_TEST_SIZE:]
    idx = np.sort(idx)
    return fit_images(images[idx], config.data.image_size, config.data.num_channels, "digits"), labels[idx]


SOURCES: Dict[str, Callable] = {}


def register_source(name: str):
    """Function decorator adding a source ``(config, split) -> (images, labels)`` to ``SOURCES``."""

    def wrap(fn):
        SOURCES[name] = fn
        return fn

    return wrap


register_source("digits")(load_digits)


# --------------------------------------------------------------------------------------------------------------
# Toy 2-D distributions
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Isotropic 2-D mixture sum_k w_k N(mu_k, s_k^2 I); exact densities/scores make it a test target."""

    weights: np.ndarray  # (K,)
    means: np.ndarray    # (K, 2)
    stds: np.ndarray     # (K,)

    def sample(self, n: int, rng: np.random.Generator) -> Arrays:
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        x = self.means[k] + self.stds[k, None] * rng.standard_normal((n, 2))
        return x.astype(np.float32), k.astype(np.int32)


def _eight_gaussians() -> GaussianMixture:
    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture(np.full(8, 1 / 8), means, np.full(8, 0.2))


TOY_MIXTURES: Dict[str, GaussianMixture] = {
    "8gaussians": _eight_gaussians(),  # means 2 (cos 2πk/8, sin 2πk/8), std 0.2
    "gaussian_mixture": GaussianMixture(np.array([0.5, 0.3, 0.2]),
                                        np.array([[-1.5, -1.0], [1.5, -0.5], [0.0, 1.5]]),
                                        np.array([0.3, 0.5, 0.4])),
}


def swiss_roll(n: int, rng: np.random.Generator) -> Arrays:
    """t ~ U[1.5π, 4.5π], x = (t cos t, t sin t) / 5 + N(0, 0.1² I); label 0."""
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 5.0 + 0.1 * rng.standard_normal((n, 2))
    return x.astype(np.float32), np.zeros(n, np.int32)


def two_moons(n: int, rng: np.random.Generator) -> Arrays:
    """Upper arc (cos θ, sin θ) and lower arc (1 - cos θ, ½ - sin θ), θ ~ U[0, π], + N(0, 0.1²), centred at
    (½, ¼) and scaled by 2; label = moon index."""
    moon = rng.integers(0, 2, n)
    theta = np.pi * rng.random(n)
    upper = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    lower = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], axis=1)
    x = np.where(moon[:, None] == 0, upper, lower) + 0.1 * rng.standard_normal((n, 2))
    x = 2.0 * (x - np.array([0.5, 0.25]))
    return x.astype(np.float32), moon.astype(np.int32)


def checkerboard(n: int, rng: np.random.Generator) -> Arrays:
    """Uniform on the 8 "black" unit cells (i + j even) of a 4x4 board on [-2, 2]², scaled by 2; label 0."""
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
    c = cells[rng.integers(0, len(cells), n)]
    x = 2.0 * (c - 2 + rng.random((n, 2)))
    return x.astype(np.float32), np.zeros(n, np.int32)


TOY_SAMPLERS: Dict[str, Callable[[int, np.random.Generator], Arrays]] = {
    "swiss_roll": swiss_roll,
    "two_moons": two_moons,
    "checkerboard": checkerboard,
    **{name: mixture.sample for name, mixture in TOY_MIXTURES.items()},
}


def get_toy_sampler(name: str) -> Callable[[int, np.random.Generator], Arrays]:
    if name not in TOY_SAMPLERS:
        raise ValueError(f"unknown toy dataset {name!r} in config.data.dataset; valid: {sorted(TOY_SAMPLERS)}")
    return TOY_SAMPLERS[name]


# --------------------------------------------------------------------------------------------------------------
# Batching, sharding, prefetching
# --------------------------------------------------------------------------------------------------------------

def batch_rng(seed: int, process_index: int, step: int, stream: int) -> np.random.Generator:
    """The generator of batch ``step`` on a process: a pure function of (seed, process, step, stream)."""
    return np.random.default_rng([seed, process_index, step, stream])


STREAM_SHUFFLE, STREAM_AUGMENT, STREAM_TOY, STREAM_EVAL_SET = 0, 1, 2, 3


def _epoch_free_indices(n: int, b: int, seed: int, process_index: int) -> Iterator[np.ndarray]:
    """Endless batches of ``b`` indices into range(n): concatenated per-epoch permutations, no drops."""
    if n == 0:
        raise ValueError("cannot draw training batches from an empty shard")
    buffer, epoch = np.zeros(0, np.int64), 0
    while True:
        while len(buffer) < b:
            buffer = np.concatenate([buffer, batch_rng(seed, process_index, epoch, STREAM_SHUFFLE).permutation(n)])
            epoch += 1
        yield buffer[:b]
        buffer = buffer[b:]


def num_eval_batches(n: int, b: int, process_count: int) -> int:
    """Batches every process yields in finite mode: ceil(ceil(N / P) / b)."""
    return math.ceil(math.ceil(n / process_count) / b)


def _padded_indices(shard_len: int, b: int, n_batches: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(indices, mask) pairs covering range(shard_len) once in order; padding repeats index 0, mask False."""
    for k in range(n_batches):
        idx = np.arange(k * b, min((k + 1) * b, shard_len))
        mask = np.zeros(b, bool)
        mask[:len(idx)] = True
        yield np.concatenate([idx, np.zeros(b - len(idx), np.int64)]), mask


Preprocess = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def array_batches(x: np.ndarray, labels: np.ndarray, *, batch_size: int, infinite: bool, seed: int,
                  process_index: int, process_count: int, preprocess: Preprocess) -> Iterator[Batch]:
    """Host-local batches from whole in-memory arrays (see the module docstring for the two modes)."""
    shard = np.arange(process_index, len(x), process_count)
    if infinite:
        for step, idx in enumerate(_epoch_free_indices(len(shard), batch_size, seed, process_index)):
            rows = shard[idx]
            yield {"x": preprocess(x[rows], batch_rng(seed, process_index, step, STREAM_AUGMENT)),
                   "label": labels[rows].astype(np.int32)}
        return
    if len(shard) == 0 and len(x) > 0:  # more processes than examples: pad with any example, fully masked
        shard = np.zeros(1, np.int64)
        shard_len = 0
    else:
        shard_len = len(shard)
    for step, (idx, mask) in enumerate(_padded_indices(shard_len, batch_size,
                                                       num_eval_batches(len(x), batch_size, process_count))):
        rows = shard[idx]
        yield {"x": preprocess(x[rows], batch_rng(seed, process_index, step, STREAM_AUGMENT)),
               "label": labels[rows].astype(np.int32), "mask": mask}


class Prefetcher:
    """Runs an iterator in a daemon thread, ``size`` items ahead; order and values are unchanged.

    Exceptions of the producer are re-raised by ``next``; ``close()`` stops the thread.
    """

    _END = object()

    def __init__(self, iterator: Iterator, size: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(iterator,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, iterator):
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self):
        self._stop.set()
        self._done = True

    def __del__(self):
        self._stop.set()


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------

def _process_defaults(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


def host_batch_size(config, split: str, process_count: int) -> int:
    """training.batch_size (split "train") or eval.batch_size (other splits), divided over processes."""
    key = "training.batch_size" if split == "train" else "eval.batch_size"
    total = config.training.batch_size if split == "train" else config.eval.batch_size
    if total <= 0 or total % process_count:
        raise ValueError(f"config.{key}={total} must be a positive multiple of the process count {process_count}")
    return total // process_count


def image_preprocess(config, *, flip: bool) -> Preprocess:
    """uint8 batch -> model space: optional random flip, then the forward transform (with dequantization)."""
    transform = get_data_transform(config)

    def preprocess(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if flip:
            images = random_flip(images, rng)
        return transform.forward(images, rng)

    return preprocess


def _check_source(name: str):
    if name not in SOURCES and name not in ("toy", "tfds"):
        raise ValueError(f"unknown data source {name!r} in config.data.source; valid: "
                         f"{sorted([*SOURCES, 'toy', 'tfds'])}")


def _toy_batches(config, split, *, b, infinite, seed, process_index, process_count) -> Iterator[Batch]:
    """Infinite: fresh samples every step. Finite: a fixed set of config.data.toy_eval_size points per split."""
    sampler = get_toy_sampler(config.data.dataset)
    if infinite:
        def stream():
            step = 0
            while True:
                yield dict(zip(("x", "label"), sampler(b, batch_rng(seed, process_index, step, STREAM_TOY))))
                step += 1
        return stream()
    split_id = 0 if split == "train" else 1
    x, labels = sampler(int(config.data.toy_eval_size), batch_rng(seed, split_id, 0, STREAM_EVAL_SET))
    return array_batches(x, labels, batch_size=b, infinite=False, seed=seed, process_index=process_index,
                         process_count=process_count, preprocess=lambda v, rng: v)


def get_dataset(config, split: str, *, infinite: bool, seed: Optional[int] = None,
                process_index: Optional[int] = None, process_count: Optional[int] = None) -> Iterator[Batch]:
    """Iterator of host-local batches ``{"x", "label"[, "mask"]}`` of ``split`` (see the module docstring)."""
    source = config.data.source
    _check_source(source)
    process_index, process_count = _process_defaults(process_index, process_count)
    seed = int(config.seed if seed is None else seed)
    b = host_batch_size(config, split, process_count)
    kwargs = dict(infinite=infinite, seed=seed, process_index=process_index, process_count=process_count)
    if source == "toy":
        iterator = _toy_batches(config, split, b=b, **kwargs)
    elif source == "tfds":
        iterator = tfds_batches(config, split, batch_size=b, **kwargs)
    else:
        images, labels = SOURCES[source](config, split)
        iterator = array_batches(images, labels, batch_size=b, preprocess=image_preprocess(
            config, flip=infinite and bool(config.data.random_flip)), **kwargs)
    return Prefetcher(iterator, size=int(config.data.get("prefetch", 2)))


def tfds_batches(config, split, **kwargs):  # placeholder until the tfds source lands
    raise NotImplementedError("the tfds source is not implemented yet")
