"""FIR up/down-sampling of NHWC images (StyleGAN2's ``upfirdn2d``, as used by NCSN++/DDPM++).

``upfirdn2d(x, k, up, down, pad)``: insert ``up - 1`` zeros after every pixel, pad each spatial side by
``pad = (p0, p1)`` (negative values crop), convolve every channel with the 2-D kernel ``k``, keep every ``down``-th
pixel. The resampling filters are ``setup_kernel(k)``: the outer product of a 1-D kernel, normalised to sum 1.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def setup_kernel(k: Sequence[float]) -> np.ndarray:
    """2-D FIR kernel from a 1-D one (outer product) or a 2-D one, normalised to sum to 1."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    return k / np.sum(k)


def upfirdn2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1, pad: Tuple[int, int] = (0, 0)) -> Array:
    """Upsample by zero insertion, pad, FIR-filter (true convolution with k) and downsample; x (B, H, W, C).

    Output side: (H·up + p0 + p1 − kh) // down + 1.
    """
    p0, p1 = pad
    zero = jnp.zeros((), x.dtype)
    cfg = [(0, 0, 0), (p0, p1 + up - 1, up - 1), (p0, p1 + up - 1, up - 1), (0, 0, 0)]
    x = lax.pad(x, zero, cfg)
    channels = x.shape[-1]
    kernel = np.asarray(k, np.float32)[::-1, ::-1]  # convolution = correlation with the flipped kernel
    kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), x.dtype)
    return lax.conv_general_dilated(x, kernel, window_strides=(down, down), padding="VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def upsample_2d(x: Array, k: Sequence[float] = (1, 1), factor: int = 2, gain: float = 1.0) -> Array:
    """FIR upsampling (B, H, W, C) -> (B, factor·H, factor·W, C) with kernel k·gain·factor²."""
    kernel = setup_kernel(k) * (gain * factor ** 2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Sequence[float] = (1, 1), factor: int = 2, gain: float = 1.0) -> Array:
    """FIR downsampling (B, H, W, C) -> (B, H/factor, W/factor, C) with kernel k·gain."""
    kernel = setup_kernel(k) * gain
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Array, w: Array, k: Sequence[float] = (1, 1), factor: int = 2, gain: float = 1.0) -> Array:
    """Fused FIR upsampling and convolution with w (kh, kw, C_in, C_out), padded once at the start.

    A stride-``factor`` transposed convolution (the adjoint of a strided VALID convolution with w) followed by
    the FIR filter; output (B, factor·H, factor·W, C_out).
    """
    kh, kw = w.shape[:2]
    if kh != kw:
        raise ValueError(f"upsample_conv_2d needs a square conv kernel, got {w.shape[:2]}")
    kernel = setup_kernel(k) * (gain * factor ** 2)
    p = (kernel.shape[0] - factor) - (kw - 1)
    # transposed conv = dilate the input by `factor`, pad by kw-1 on each side, correlate with w
    x = lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(1, 1),
                                 padding=((kh - 1, kh - 1), (kw - 1, kw - 1)), lhs_dilation=(factor, factor),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Array, w: Array, k: Sequence[float] = (1, 1), factor: int = 2,
                       gain: float = 1.0) -> Array:
    """Fused FIR downsampling and stride-``factor`` convolution with w (kh, kw, C_in, C_out)."""
    kh, kw = w.shape[:2]
    if kh != kw:
        raise ValueError(f"conv_downsample_2d needs a square conv kernel, got {w.shape[:2]}")
    kernel = setup_kernel(k) * gain
    p = (kernel.shape[0] - factor) + (kw - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(factor, factor), padding="VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling (B, H, W, C) -> (B, factor·H, factor·W, C)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
    """Average pooling over factor×factor blocks (B, H, W, C) -> (B, H/factor, W/factor, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
