"""Samples made elsewhere, for ``--mode=eval_samples``: a ``samples.npz`` or a folder of PNGs, checked from their
headers (dtype, shape, count) before anything is read; nothing is unpickled."""
from __future__ import annotations

import pathlib
import zipfile
from typing import Tuple

import numpy as np
from PIL import Image

import safe_pickle

MAX_SAMPLE_IMAGES = 200_000   # more images than any FID protocol uses; bounds the memory a samples file can claim
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_header(path: pathlib.Path, key: str) -> Tuple[tuple, np.dtype]:
    """Shape and dtype of array ``key`` of an npz, read from its header without loading the data."""
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
