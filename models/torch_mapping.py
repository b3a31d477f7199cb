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

This module also holds the converter registry: each model family registers a converter
``fn(state_dict: StateDict, model_cfg, data_cfg) -> params`` in ``TORCH_CONVERTERS``
(``@register_converter(name, non_trainable=...)``) next to its class, and ``convert.py`` (the ``--mode=convert``
runner) looks it up with ``get_converter``. Converters read tensors by their torch name (without ``module.``)
through ``StateDict``, which records what was read. Layout helpers: ``conv_kernel`` (OIHW -> HWIO),
``dense_kernel`` ((out, in) -> (in, out)).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax
import numpy as np

import models

Path = Tuple[str, ...]
Params = Dict[str, Any]
ConverterFn = Callable[["StateDict", Any, Any], Params]

TORCH_CONVERTERS: Dict[str, ConverterFn] = {}
# model name -> names of non-trainable state-dict entries (absent from the EMA list), or fn(model_cfg) -> names.
NON_TRAINABLE: Dict[str, Union[Sequence[str], Callable[[Any], Sequence[str]]]] = {}
DEFAULT_NON_TRAINABLE = ("sigmas",)
MAX_LISTED = 8
# buffers of the torch models that are not parameters here (NCSN++/DDPM keep a float64 copy of the σ ladder)
IGNORED_BUFFERS = ("sigmas",)


# ---- the converter registry --------------------------------------------------------------------------------------


class ConversionError(ValueError):
    """A checkpoint that does not map exactly onto the configured model."""


def register_converter(name: str, non_trainable=DEFAULT_NON_TRAINABLE):
    """Decorator registering ``fn(state_dict, model_cfg, data_cfg) -> params`` for ``config.model.name``.

    ``non_trainable``: state-dict names absent from the EMA ``shadow_params`` list (buffers and
    ``requires_grad=False`` parameters), or a function ``model_cfg -> names``.
    """

    def wrap(fn: ConverterFn) -> ConverterFn:
        if name in TORCH_CONVERTERS and TORCH_CONVERTERS[name] is not fn:
            raise ValueError(f"a torch converter for model {name!r} is already registered")
        TORCH_CONVERTERS[name] = fn
        NON_TRAINABLE[name] = non_trainable
        return fn

    return wrap


def get_converter(name: str) -> ConverterFn:
    """The converter registered for ``config.model.name`` = ``name``."""
    models._import_all()  # model modules register their converters next to their classes
    if name not in TORCH_CONVERTERS:
        raise ConversionError(f"no score_sde_pytorch converter for config.model.name={name!r}; models with one: "
                              f"{sorted(TORCH_CONVERTERS)}")
    return TORCH_CONVERTERS[name]


def non_trainable_names(model_name: str, model_cfg) -> Tuple[str, ...]:
    """State-dict names of ``model_name`` absent from score_sde_pytorch's EMA list (see ``register_converter``)."""
    names = NON_TRAINABLE.get(model_name, DEFAULT_NON_TRAINABLE)
    return tuple(names(model_cfg) if callable(names) else names)


def listed(names: Sequence[str], n: int = MAX_LISTED) -> str:
    """The first ``n`` names, comma-separated, with a count of the rest (for one-line errors)."""
    names = list(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---- layout helpers ---------------------------------------------------------------------------------------------


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
    if w.ndim != 4:
        raise ConversionError(f"expected a 4-D conv weight (out, in, kh, kw), got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    if w.ndim != 2:
        raise ConversionError(f"expected a 2-D linear weight (out, in), got shape {w.shape}")
    return np.ascontiguousarray(w.T)


# ---- the tracked state dict -------------------------------------------------------------------------------------


class StateDict(Mapping):
    """A torch state dict (names without ``module.``) that records which tensors a converter read.

    ``sd["a.weight"]`` returns the array; ``sd.conv("a")`` / ``sd.dense("a")`` return Flax ``{"kernel", "bias"}``
    dicts; ``sd.skip(name)`` marks a tensor as deliberately unused. Every array handed out remembers its torch
    name, so that shape errors can name the tensor.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "checkpoint"):
        self._tensors = dict(tensors)
        self.source = source
        self.used: set = set()
        self.origin: Dict[int, str] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._tensors:
            stem = key.rsplit(".", 1)[0]
            near = [k for k in self._tensors if k.startswith(stem)] or self.unused()
            raise ConversionError(f"{self.source}: tensor {key!r} needed by the configured model is not in the "
                                  f"checkpoint (wrong config?); unread checkpoint tensors: {listed(near)}")
        self.used.add(key)
        return self._tensors[key]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def take(self, key: str, fn: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
        """``fn(sd[key])`` (default identity) as float32, remembered as coming from ``key``."""
        arr = self[key]
        arr = np.asarray(fn(arr) if fn is not None else arr)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        self.origin[id(arr)] = key
        return arr

    def conv(self, prefix: str, bias: bool = True) -> Params:
        """Flax Conv params from torch ``<prefix>.weight`` (OIHW) and ``<prefix>.bias``."""
        out = {"kernel": self.take(f"{prefix}.weight", conv_kernel)}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias")
        return out

    def dense(self, prefix: str, bias: bool = True) -> Params:
        """Flax Dense params from torch Linear ``<prefix>.weight`` (out, in) and ``<prefix>.bias``."""
        out = {"kernel": self.take(f"{prefix}.weight", dense_kernel)}
        if bias:
            out["bias"] = self.take(f"{prefix}.bias")
        return out

    def skip(self, *keys: str) -> None:
        for key in keys:
            self[key]

    def unused(self) -> List[str]:
        return [k for k in self._tensors if k not in self.used]


# ---- the all_modules renaming ------------------------------------------------------------------------------------


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
    tensors, missing Flax parameters and shape mismatches (first ones first) as ``ConversionError``.
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
