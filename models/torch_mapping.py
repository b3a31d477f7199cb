"""Strict renaming of score_sde_pytorch state dicts onto the Flax parameters of this package's models.

score_sde_pytorch keeps its layers in one flat ``all_modules`` list; each model here provides the Flax names of
those list entries in the same order (``torch_module_names()``), and the leaf names inside a layer are shared
(``GroupNorm_0``, ``Conv_0``, ``NIN_0``...). Only leaf names and layouts change:

=================  =====  ===========================================
torch leaf          ndim   flax leaf (layout change)
=================  =====  ===========================================
``weight``          4      ``kernel`` (O, I, kh, kw) -> (kh, kw, I, O)
``weight``          2      ``kernel`` (out, in) -> (in, out)
``weight``          1      ``scale`` (GroupNorm)
``bias`` / ``b``    1      ``bias``
``W``               2      ``kernel`` (NIN, already (in, out))
``W``               1      ``W`` (Gaussian Fourier features)
=================  =====  ===========================================
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import flax
import jax
import numpy as np

from convert import ConversionError

Path = Tuple[str, ...]
# buffers of the torch models that are not parameters here (NCSN++/DDPM keep a float64 copy of the σ ladder)
IGNORED_BUFFERS = ("sigmas",)


def _leaf(name: str, array: np.ndarray) -> Tuple[str, np.ndarray]:
    """Flax leaf name and array for a torch leaf (see the module table)."""
    if name == "weight" and array.ndim == 4:
        return "kernel", np.transpose(array, (2, 3, 1, 0))
    if name == "weight" and array.ndim == 2:
        return "kernel", array.T
    if name == "weight" and array.ndim == 1:
        return "scale", array
    if name in ("bias", "b"):
        return "bias", array
    if name == "W":
        return ("kernel" if array.ndim == 2 else "W"), array
    raise KeyError(name)


def flax_path(key: str, module_names: Sequence[str], shape: Tuple[int, ...]) -> Path:
    """Flax parameter path of a torch key ``all_modules.<i>.<...>.<leaf>`` (``KeyError`` if it has none)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "all_modules" or not parts[1].isdigit() or int(parts[1]) >= len(module_names):
        raise KeyError(key)
    leaf, _ = _leaf(parts[-1], np.empty((0,) * len(shape)))
    return (module_names[int(parts[1])], *parts[2:-1], leaf)


def _strip(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Drop the DataParallel ``module.`` prefix and the ignored buffers."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key not in IGNORED_BUFFERS:
            out[key] = value
    return out


def _listing(title: str, items: List[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def map_state_dict(state_dict: Mapping[str, np.ndarray], module_names: Sequence[str],
                   expected: Mapping[Path, Tuple[int, ...]], model: str) -> dict:
    """Nested Flax params from a torch state dict; every tensor and every expected parameter must match.

    ``expected`` maps each Flax parameter path to its shape. Raises ``ValueError`` listing unmapped torch
    tensors, missing Flax parameters and shape mismatches (first ones first) as ``convert.ConversionError``.
    """
    flat, unmapped, mismatched, seen = {}, [], [], set()
    for key, value in _strip(state_dict).items():
        value = np.asarray(value)
        try:
            path = flax_path(key, module_names, value.shape)
        except KeyError:
            unmapped.append(key)
            continue
        array = _leaf(key.rsplit(".", 1)[-1], value)[1]
        if path not in expected:
            unmapped.append(f"{key} (-> {'/'.join(path)})")
        elif tuple(array.shape) != tuple(expected[path]):
            seen.add(path)
            mismatched.append(f"{key} {tuple(value.shape)} -> {'/'.join(path)} expects {tuple(expected[path])}")
        else:
            flat[path] = np.asarray(array, dtype=np.float32)
    missing = ["/".join(p) for p in expected if p not in flat and p not in seen]
    problems = [_listing(t, items) for t, items in (("shape mismatches", mismatched),
                ("torch tensors with no parameter", unmapped), ("parameters missing from the checkpoint", missing))
                if items]
    if problems:
        raise ConversionError(f"checkpoint does not match the {model!r} model of this config: " + "; ".join(problems))
    return flax.traverse_util.unflatten_dict(flat)


def expected_shapes(module, image_size: int, num_channels: int) -> Dict[Path, Tuple[int, ...]]:
    """Parameter path -> shape of ``module`` for (1, image_size, image_size, num_channels) inputs, no allocation."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, num_channels), np.float32)
    labels = jax.ShapeDtypeStruct((1,), np.float32)
    shapes = jax.eval_shape(lambda a, b: module.init({"params": jax.random.key(0)}, a, b), x, labels)["params"]
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes).items()}


def check_key_list(keys: Iterable[Tuple[str, Sequence[int]]], module, image_size: int, num_channels: int,
                   model: str) -> dict:
    """Map a list of (torch key, shape) without data (zero-stride arrays) — checks names and shapes only."""
    fake = {k: np.broadcast_to(np.zeros((), np.float32), tuple(s)) for k, s in keys}
    return map_state_dict(fake, module.torch_module_names(), expected_shapes(module, image_size, num_channels), model)
