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
  last one(s) are **padded** and marked with ``mask == False`` (padding rows hold some valid image with an
  arbitrary label: weight every per-example quantity by ``mask``). All processes
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
import importlib.util
import math
import os
import queue
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

import safe_pickle

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
        """Bits/dim added to -log2 p(x)/D of model space to get bits/dim of 8-bit data, log2(256 / width of the
        model-space range): 7 centred, 8 in [0, 1]. Exact for uniformly dequantized data (bins of 1/256)."""
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

SOURCES: Dict[str, Callable] = {}
SHAPES: Dict[str, Callable] = {}   # source -> shape(config.data) -> shape of one example; default ``image_shape``


def register_source(name: str, shape: Optional[Callable] = None):
    """Function decorator adding a source ``(config, split) -> (images, labels)`` to ``SOURCES``; ``shape``
    (``config.data -> tuple``) declares the shape of one example when it is not ``image_shape``'s (H, W, C)."""

    def wrap(fn):
        SOURCES[name] = fn
        if shape is not None:
            SHAPES[name] = shape
        return fn

    return wrap


def image_shape(data) -> tuple:
    """(H, W, C) = (``data.image_size``, ``data.image_size``, ``data.num_channels``) of an image source."""
    return (data.image_size, data.image_size, data.num_channels)


def toy_shape(data) -> tuple:
    """(D,) of the toy source's vectors: ``data.dim`` (default 2)."""
    return (data.get("dim", 2),)


SHAPES["toy"] = toy_shape


def data_shape(data) -> tuple:
    """Shape of one example of ``config.data``: what its source declared in ``SHAPES``, else (H, W, C)."""
    return tuple(SHAPES.get(data.source, image_shape)(data))


def holds_images(data) -> bool:
    """Whether ``config.data``'s examples are images (H, W, C) rather than vectors."""
    return len(data_shape(data)) == 3


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


@register_source("digits")
def load_digits(config, split: str) -> Arrays:
    """scikit-learn's 8x8 digits (embedded in the package): 1797 images; a fixed permutation (numpy seed 0)
    puts the first 297 in "test" and the other 1500 in "train"."""
    images, labels, idx = _digits_split(split)
    return fit_images(images[idx], config.data.image_size, config.data.num_channels, "digits"), labels[idx]


def sklearn_digits_file() -> Optional[str]:
    """Path of scikit-learn's embedded ``datasets/data/digits.csv.gz``, found without importing scikit-learn
    (whose import alone takes about a second of the time to the first step); None when not there."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def read_sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as (N, 8, 8) pixel values 0..16 and their labels, as ``sklearn.datasets.load_digits`` gives
    them: each row of the CSV is 64 pixels then the label. Falls back to scikit-learn itself when its file moved."""
    path = sklearn_digits_file()
    if path is None:
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"{path}: expected rows of 64 pixels and a label, got shape {table.shape}")
    return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)


def _digits_split(split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 (N, 8, 8, 1), their labels, and the sorted indices of ``split``."""
    pixels, target = read_sklearn_digits()
    images = digits_to_uint8(pixels)[..., None]
    labels = target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(labels))
    idx = perm[:DIGITS_TEST_SIZE] if _local_split(split) == "test" else perm[DIGITS_TEST_SIZE:]
    return images, labels, np.sort(idx)



# Equal channel sums (1.5): every colour has the same gray component, so the gray image carries no colour
# information and colorization must choose among the palette (red, green, blue, yellow, cyan, magenta).
COLOR_PALETTE = np.array([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.25, 0.25, 1.0],
                          [0.625, 0.625, 0.25], [0.25, 0.625, 0.625], [0.625, 0.25, 0.625]], np.float32)


def tint(images_uint8: np.ndarray, color_index: np.ndarray) -> np.ndarray:
    """Gray uint8 images (N, H, W, 1) -> RGB uint8 (N, H, W, 3): x_c = round(x · palette[k]_c)."""
    colors = COLOR_PALETTE[np.asarray(color_index)][:, None, None, :]
    return np.round(images_uint8.astype(np.float32) * colors).astype(np.uint8)


@register_source("colored_digits")
def load_colored_digits(config, split: str) -> Arrays:
    """The digits of ``load_digits`` tinted with one ``COLOR_PALETTE`` colour each (fixed per image: numpy seed 1),
    an RGB dataset generated offline for colorization; the labels stay the digit classes."""
    images, labels, idx = _digits_split(split)
    color_of = np.random.default_rng(1).integers(0, len(COLOR_PALETTE), len(labels))
    rgb = tint(images[idx], color_of[idx])
    return fit_images(rgb, config.data.image_size, config.data.num_channels, "colored_digits"), labels[idx]


REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def resolve_data_dir(config) -> str:
    """``config.data.data_dir`` as an existing directory; relative paths are tried from the working directory,
    then from the repository root."""
    raw = config.data.data_dir
    if not raw:
        raise ValueError(f"config.data.data_dir is empty but config.data.source={config.data.source!r} reads files "
                         f"from a directory")
    path = os.path.expanduser(raw)
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path), os.path.join(REPO_ROOT, path)]
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"config.data.data_dir={raw!r} is not a directory (looked at {candidates})")


# IDX (MNIST / Fashion-MNIST) -----------------------------------------------------------------------------------

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_header(data: bytes, path: str = "<bytes>") -> Tuple[Tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of IDX bytes: magic 0x0000 TT NN (type code, rank), NN big-endian uint32 dims."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4].hex()!r})")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{path}: IDX header of rank {data[3]} is truncated")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
    return shape, np.dtype(IDX_DTYPES[data[2]]), header


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """IDX bytes -> array: magic 0x0000 TT NN (type code, rank), NN big-endian uint32 dims, then the values."""
    shape, dtype, header = idx_header(data, path)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header gives shape {shape} ({expected} bytes of data) but the file holds "
                         f"{len(data) - header} bytes; the file is truncated or has the wrong size")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file, gzip-compressed (.gz) or raw. The header's claimed size is checked against the file
    (x ``safe_pickle.MAX_COMPRESSION_RATIO`` when compressed) before the data is read: no gzip bomb."""
    compressed = path.endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 else b""
            shape, dtype, _ = idx_header(head, path)
            expected = math.prod(shape) * dtype.itemsize
            disk = os.path.getsize(path)
            limit = safe_pickle.MAX_COMPRESSION_RATIO * disk + safe_pickle.SLACK_BYTES if compressed \
                else disk - len(head)
            if expected > limit:
                raise ValueError(f"{path}: IDX header claims shape {shape} ({expected} bytes), more than the "
                                 f"{disk}-byte file holds; the file is truncated or its header is corrupt")
            data = head + f.read(expected + 1)
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    return parse_idx(data, path)


def find_idx_file(directory: str, prefix: str, kind: str) -> str:
    """``{prefix}-{kind}-idx?-ubyte`` (or ``.idx?-ubyte``), raw or .gz, in ``directory``."""
    patterns = [f"{prefix}-{kind}-idx?-ubyte", f"{prefix}-{kind}.idx?-ubyte"]
    matches = sorted(m for p in patterns for ext in ("", ".gz") for m in glob.glob(os.path.join(directory, p + ext)))
    if not matches:
        raise FileNotFoundError(f"no IDX file {patterns[0]}[.gz] in {directory} (config.data.data_dir)")
    return matches[0]


@register_source("idx")
def load_idx(config, split: str) -> Arrays:
    """MNIST-format files ``train-*`` / ``t10k-*`` (images (N, H, W) uint8, labels (N,)) from data_dir."""
    directory = resolve_data_dir(config)
    prefix = "train" if _local_split(split) == "train" else "t10k"
    images_path = find_idx_file(directory, prefix, "images")
    labels_path = find_idx_file(directory, prefix, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"{labels_path}: labels of shape {labels.shape} do not match {len(images)} images "
                         f"in {images_path}")
    what = f"IDX images {images_path}"
    return fit_images(images, config.data.image_size, config.data.num_channels, what), labels.astype(np.int32)


# CIFAR-10 python pickles ---------------------------------------------------------------------------------------

CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_MAX_BATCH_BYTES = 64 << 20  # a real batch is ~30 MiB (10000 x 3072 bytes + labels)
CIFAR_MAX_OPCODES = 1 << 20       # a real batch has ~5 per image (label, file name)


def read_cifar_batch(path: str) -> Arrays:
    """One CIFAR-10 python pickle: {b"data": (N, 3072) uint8 rows R..G..B.., b"labels": N ints} -> NHWC, labels.

    Read with ``safe_pickle``: only dicts, lists, bytes, str, numbers and numeric numpy arrays are rebuilt (no
    other global is imported or called) and files over ``CIFAR_MAX_BATCH_BYTES`` are refused unread.
    """
    try:
        batch = safe_pickle.load_file(path, CIFAR_MAX_BATCH_BYTES, encoding="bytes", max_ops=CIFAR_MAX_OPCODES)
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], np.int32)
    except safe_pickle.UnsafeFileError as exc:
        raise ValueError(f"CIFAR-10 pickle {exc}") from exc
    except (OSError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"corrupt CIFAR-10 pickle {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise ValueError(f"{path}: CIFAR-10 rows must be uint8 of length 3072 (3x32x32), got {data.dtype} "
                         f"{data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {labels.shape} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


@register_source("cifar10_pickle")
def load_cifar10_pickle(config, split: str) -> Arrays:
    """``data_batch_1..5`` (train) / ``test_batch`` (test) from data_dir or its ``cifar-10-batches-py/``."""
    directory = resolve_data_dir(config)
    nested = os.path.join(directory, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(directory, "test_batch")) and os.path.isdir(nested):
        directory = nested
    names = CIFAR_FILES[_local_split(split)]
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 pickles {missing} are missing from {directory} (config.data.data_dir)")
    parts = [read_cifar_batch(os.path.join(directory, n)) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return fit_images(images, config.data.image_size, config.data.num_channels, f"CIFAR-10 in {directory}"), labels


# Image folders -------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 1 << 24  # 4096 x 4096: checked from the header before decoding
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation", "eval")}


def _image_files(directory: str) -> list:
    """Sorted image paths under ``directory`` (recursively)."""
    return sorted(os.path.join(root, f) for root, _, files in os.walk(directory) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS))


def list_image_folder(directory: str) -> Tuple[list, np.ndarray, list]:
    """(paths, int32 labels, class names). Sub-folders are classes (sorted names -> 0, 1, ...); a folder with
    images but no sub-folders is one class 0."""
    classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    top = [f for f in sorted(os.listdir(directory)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if classes and top:
        raise ValueError(f"image folder {directory} mixes images ({top[0]}, ...) with class sub-folders "
                         f"({classes[0]}, ...); put every image in a class folder or use a flat folder")
    groups = [_image_files(os.path.join(directory, c)) for c in classes] if classes else [_image_files(directory)]
    paths = [p for g in groups for p in g]
    labels = np.concatenate([np.full(len(g), i, np.int32) for i, g in enumerate(groups)]) if paths else \
        np.zeros(0, np.int32)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found in {directory}")
    return paths, labels, classes


def read_image(path: str, size: int, channels: int) -> np.ndarray:
    """Decode a PNG/JPEG, convert to L/RGB, resize the short side to ``size`` and centre crop: uint8 (s, s, C)."""
    from PIL import Image

    try:
        with Image.open(path) as pil:
            width, height = pil.size
            if width * height <= MAX_IMAGE_PIXELS:  # the header is read, nothing decoded yet
                pil = pil.convert("L" if channels == 1 else "RGB")
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"corrupt or unreadable image {path}: {type(exc).__name__}: {exc}") from exc
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image {path} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} this reader "
                         f"decodes (a decompression bomb, or resize it first)")
    image = np.asarray(pil, np.uint8).reshape(pil.size[1], pil.size[0], channels)
    if min(image.shape[:2]) == 0:
        raise ValueError(f"image {path} has an empty size {pil.size}")
    return resize_center_crop(image, size)


def _split_folder(directory: str, split: str) -> str:
    """``directory/<split folder>`` when the folder is organised by split, else ``directory`` itself."""
    present = [n for names in SPLIT_FOLDERS.values() for n in names if os.path.isdir(os.path.join(directory, n))]
    if not present:
        return directory
    matching = [n for n in SPLIT_FOLDERS[split] if n in present]
    if not matching:
        raise FileNotFoundError(f"image folder {directory} has split folders {present} but none for split "
                                f"{split!r} (expected one of {list(SPLIT_FOLDERS[split])})")
    return os.path.join(directory, matching[0])


@register_source("image_folder")
def load_image_folder(config, split: str) -> Arrays:
    """PNG/JPEG files under data_dir. If data_dir has a split folder (train/ or test|val|validation|eval/) it
    is used, otherwise the whole folder serves every split. Class sub-folders give labels."""
    directory = _split_folder(resolve_data_dir(config), _local_split(split))
    paths, labels, _ = list_image_folder(directory)
    size, channels = config.data.image_size, config.data.num_channels
    if channels not in (1, 3):
        raise ValueError(f"config.data.num_channels={channels}: image folders give 1 (L) or 3 (RGB) channels")
    return np.stack([read_image(p, size, channels) for p in paths]), labels


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


def _epoch_free_indices(n: int, b: int, seed: int, process_index: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless batches of ``b`` indices into range(n): concatenated per-epoch permutations, no drops. Batch
    ``k`` holds positions ``[k b, (k + 1) b)`` of the concatenation, so starting at ``start_step`` skips exactly."""
    if n == 0:
        raise ValueError("cannot draw training batches from an empty shard")
    epoch, offset = divmod(start_step * b, n)
    buffer = batch_rng(seed, process_index, epoch, STREAM_SHUFFLE).permutation(n)[offset:]
    epoch += 1
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
                  process_index: int, process_count: int, preprocess: Preprocess,
                  start_step: int = 0) -> Iterator[Batch]:
    """Host-local batches from whole in-memory arrays (see the module docstring for the two modes)."""
    shard = np.arange(process_index, len(x), process_count)
    if infinite:
        indices = _epoch_free_indices(len(shard), batch_size, seed, process_index, start_step)
        for step, idx in enumerate(indices, start=start_step):
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


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(iterator: Iterator, q: queue.Queue, stop: threading.Event, end) -> None:
    """Thread body; holds no reference to the Prefetcher, so dropping the Prefetcher stops the thread."""
    try:
        for item in iterator:
            if not _put(q, stop, item):
                return
        _put(q, stop, end)
    except BaseException as exc:  # handed to the consumer
        _put(q, stop, exc)


class Prefetcher:
    """Runs an iterator in a daemon thread, ``size`` items ahead; order and values are unchanged.

    Exceptions of the producer are re-raised by ``next``; ``close()`` (or dropping the object) stops the thread.
    """

    _END = object()

    def __init__(self, iterator: Iterator, size: int = 2, num_batches: Optional[int] = None):
        self.num_batches = num_batches   # how many items the iterator yields, when known
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=_produce, args=(iterator, self._queue, self._stop, self._END),
                                        daemon=True)
        self._thread.start()

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

    def close(self) -> None:
        self._stop.set()
        self._done = True

    def __del__(self):
        self._stop.set()


# --------------------------------------------------------------------------------------------------------------
# TensorFlow Datasets
# --------------------------------------------------------------------------------------------------------------

TFDS_EVAL_SPLITS = {"celeb_a": "validation", "lsun": "validation"}  # others: "test"
CELEBA_CROP = 140  # centre crop of the 218x178 aligned faces before resizing (as in the score_sde paper code)


def import_tensorflow():
    """Import TensorFlow with every GPU hidden from it, so it reserves no accelerator memory JAX needs."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised: only fine if TF sees no GPU
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError("TensorFlow initialised its GPUs before datasets.py could hide them; import "
                               "datasets (or call datasets.import_tensorflow()) before building any tf pipeline")
    return tf


def tfds_split(name: str, split: str) -> str:
    """"eval" -> the dataset's evaluation split ("validation" for celeb_a and lsun/*, else "test")."""
    if split != "eval":
        return split
    return TFDS_EVAL_SPLITS.get(name.split("/")[0], "test")


def tfds_builder(config):
    """The prepared builder of ``config.data.dataset`` under ``config.data.data_dir`` (tfds default if empty);
    datasets that need manual downloads read them from ``config.data.manual_dir``."""
    import tensorflow_datasets as tfds

    name = config.data.dataset
    data_dir = os.path.expanduser(config.data.data_dir) or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as exc:  # DatasetNotFoundError and friends
        raise ValueError(f"unknown tfds dataset {name!r} in config.data.dataset ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    manual_dir = os.path.expanduser(config.data.get("manual_dir", "")) or None
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as exc:
        raise RuntimeError(f"tfds dataset {name!r} is not prepared in data_dir={data_dir or tfds.core.constants.DATA_DIR!r} "
                           f"and preparing it failed (offline? manual_dir={manual_dir!r}): {exc}") from exc
    return builder


def tf_resize_image(tf, image, name: str, size: int):
    """uint8 (H, W, C) -> uint8 (size, size, C): CelebA centre crop 140, then short side -> size (bicubic,
    antialiased) and centre crop."""
    if name.startswith("celeb_a"):
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        image = tf.image.crop_to_bounding_box(image, (h - CELEBA_CROP) // 2, (w - CELEBA_CROP) // 2,
                                              CELEBA_CROP, CELEBA_CROP)
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    scale = size / tf.minimum(h, w)
    new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
    resized = tf.image.resize(image, [new_h, new_w], method="bicubic", antialias=True)
    resized = tf.image.resize_with_crop_or_pad(resized, size, size)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def tfds_examples(config, split: str, *, shuffle: bool, seed: int, process_index: int, process_count: int):
    """tf.data of (uint8 image (size, size, C_stored), int32 label) for this process's part of ``split``.

    Training (``shuffle``): ``tfds.even_splits`` gives each process a disjoint contiguous part, read with
    shuffled files, so no host decodes another's images. Evaluation: ``ds.shard(P, i)`` of the split in its
    stored order (examples i, i + P, ..., as for local sources). Returns (dataset, examples in the whole split).
    """
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    name, size = config.data.dataset, config.data.image_size
    builder = tfds_builder(config)
    read_config = tfds.ReadConfig(shuffle_seed=seed + 7919 * process_index)
    split = tfds_split(name, split)
    if shuffle and process_count > 1:
        split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config)
    total = int(ds.cardinality().numpy())
    if total < 0:  # unknown cardinality: count once
        total = int(ds.reduce(0, lambda n, _: n + 1).numpy())
    if not shuffle:
        ds = ds.shard(process_count, process_index)

    def convert(example):
        label = tf.cast(example["label"], tf.int32) if "label" in example else tf.constant(0, tf.int32)
        return tf_resize_image(tf, example["image"], name, size), label

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), total


def tfds_batches(config, split: str, *, batch_size: int, infinite: bool, seed: int, process_index: int,
                 process_count: int) -> Iterator[Batch]:
    """Batches from tfds (see the module docstring); images pass through the same numpy transforms.

    The builder and tf.data pipeline are made here, eagerly (so errors surface in ``get_dataset``); the returned
    generator only iterates.
    """
    tf = import_tensorflow()
    ds, total = tfds_examples(config, split, shuffle=infinite, seed=seed, process_index=process_index,
                              process_count=process_count)
    preprocess = image_preprocess(config, flip=infinite and bool(config.data.random_flip))
    channels = config.data.num_channels
    if infinite:
        ds = ds.repeat().shuffle(int(config.data.shuffle_buffer), seed=seed + 7919 * process_index)
        ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        return _tf_train_batches(ds, preprocess, channels, config.data.dataset, seed, process_index)
    return _padded_tf_batches(ds.batch(batch_size), preprocess, batch_size=batch_size,
                                  n_batches=num_eval_batches(total, batch_size, process_count),
                                  size=config.data.image_size, channels=channels, name=config.data.dataset,
                                  seed=seed, process_index=process_index)


def _tf_train_batches(ds, preprocess, channels, name, seed, process_index) -> Iterator[Batch]:
    """Infinite mode for tf.data: numpy transforms with the per-step generator."""
    for step, (images, labels) in enumerate(ds.as_numpy_iterator()):
        images = convert_channels(images, channels, f"tfds {name}")
        yield {"x": preprocess(images, batch_rng(seed, process_index, step, STREAM_AUGMENT)),
               "label": labels.astype(np.int32)}


def _padded_tf_batches(ds, preprocess, *, n_batches, batch_size, size, channels, name, seed, process_index):
    """Finite mode for tf.data: pad short (or missing) batches to ``batch_size`` rows with mask False."""
    iterator = ds.as_numpy_iterator()
    blank = np.zeros((1, size, size, channels), np.uint8)
    for step in range(n_batches):
        images, labels = next(iterator, (blank[:0], np.zeros(0, np.int32)))
        images = convert_channels(images, channels, f"tfds {name}")
        n, pad = len(images), batch_size - len(images)
        images = np.concatenate([images, np.repeat(images[:1] if n else blank, pad, axis=0)])
        labels = np.concatenate([labels.astype(np.int32), np.zeros(pad, np.int32)])
        yield {"x": preprocess(images, batch_rng(seed, process_index, step, STREAM_AUGMENT)),
               "label": labels, "mask": np.arange(batch_size) < n}


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


def _toy_batches(config, split, *, b, infinite, seed, process_index, process_count,
                 start_step: int = 0) -> Iterator[Batch]:
    """Infinite: fresh samples every step. Finite: a fixed set of config.data.toy_eval_size points per split."""
    sampler = get_toy_sampler(config.data.dataset)
    split_id = 0 if split == "train" else 1  # train and evaluation streams never share draws
    if infinite:
        def stream():
            step = start_step
            while True:
                rng = batch_rng(seed, process_index, step, STREAM_TOY + 16 * split_id)
                yield dict(zip(("x", "label"), sampler(b, rng)))
                step += 1
        return stream()
    x, labels = sampler(int(config.data.toy_eval_size), batch_rng(seed, split_id, 0, STREAM_EVAL_SET))
    return array_batches(x, labels, batch_size=b, infinite=False, seed=seed, process_index=process_index,
                         process_count=process_count, preprocess=lambda v, rng: v)


def get_dataset(config, split: str, *, infinite: bool, seed: Optional[int] = None,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                start_step: int = 0) -> Iterator[Batch]:
    """Iterator of host-local batches ``{"x", "label"[, "mask"]}`` of ``split`` (see the module docstring).

    ``start_step`` (infinite mode): begin at batch ``start_step`` of the stream, exactly as if the earlier ones had
    been drawn (toy and in-memory sources; tfds, whose shuffle buffer has no such index, reseeds with it instead).
    """
    source = config.data.source
    _check_source(source)
    process_index, process_count = _process_defaults(process_index, process_count)
    seed = int(config.seed if seed is None else seed)
    b = host_batch_size(config, split, process_count)
    kwargs = dict(infinite=infinite, seed=seed, process_index=process_index, process_count=process_count)
    start = int(start_step) if infinite else 0
    if source == "toy":
        iterator = _toy_batches(config, split, b=b, start_step=start, **kwargs)
    elif source == "tfds":
        iterator = tfds_batches(config, split, batch_size=b, **dict(kwargs, seed=seed + start))
    else:
        images, labels = SOURCES[source](config, split)
        iterator = array_batches(images, labels, batch_size=b, preprocess=image_preprocess(
            config, flip=infinite and bool(config.data.random_flip)), start_step=start, **kwargs)
        if not infinite:   # known length: progress lines can give an ETA
            return Prefetcher(iterator, size=int(config.data.get("prefetch", 2)),
                              num_batches=num_eval_batches(len(images), b, process_count))
    return Prefetcher(iterator, size=int(config.data.get("prefetch", 2)))


# --------------------------------------------------------------------------------------------------------------
# Whole splits as stored (uint8), and random draws of examples
# --------------------------------------------------------------------------------------------------------------

def uint8_batches(config, split: str) -> Iterator[Arrays]:
    """Every image of a split exactly once, in order, as stored: yields (uint8 (b, H, W, C), labels (b,)).

    Model-space batches of ``get_dataset(..., infinite=False)`` are mapped back with the data transform's inverse
    (exact for stored uint8) and padding rows are dropped; every process reads the whole split.
    """
    if not holds_images(config.data):
        raise ValueError(f"image statistics need an image dataset; config.data.source={config.data.source!r} "
                         f"holds vectors of shape {data_shape(config.data)}")
    inverse = get_data_transform(config).inverse
    for batch in get_dataset(config, split, infinite=False, process_index=0, process_count=1):
        mask = np.asarray(batch.get("mask", np.ones(len(batch["x"]), bool)), bool)
        yield np.asarray(inverse(np.asarray(batch["x"])))[mask], np.asarray(batch["label"])[mask]


def count_uint8_batches(config, split: str) -> Optional[int]:
    """Batches ``uint8_batches`` yields, when the source holds its split in memory (``SOURCES``), else None."""
    if config.data.source not in SOURCES:
        return None
    data = get_dataset(config, split, infinite=False, process_index=0, process_count=1)
    data.close()
    return getattr(data, "num_batches", None)


def uint8_split(config, split: str) -> Arrays:
    """The whole split in memory (small datasets): uint8 (N, H, W, C) and labels (N,)."""
    images, labels = zip(*uint8_batches(config, split))
    return np.concatenate(images), np.concatenate(labels)


def draw_examples(config, split: str, n: int, seed: int) -> np.ndarray:
    """``n`` examples of ``split`` in model space, from the shuffled stream of ``seed``."""
    out, got = [], 0
    stream = get_dataset(config, split, infinite=True, seed=seed)
    for batch in stream:
        out.append(np.asarray(batch["x"]))
        got += len(out[-1])
        if got >= n:
            break
    stream.close()
    return np.concatenate(out)[:n]
