"""Convert score_sde_pytorch checkpoints into this codebase's Flax parameters (``main.py --mode=convert``).

A score_sde_pytorch checkpoint is ``torch.save({"optimizer", "model", "ema", "step"})``: ``model`` is the
(DataParallel, ``module.``-prefixed) state dict, ``ema`` is ``{decay, num_updates, shadow_params}`` where
``shadow_params`` is an unnamed list of the *trainable* parameters in parameter order (buffers such as ``sigmas``
and ``requires_grad=False`` parameters such as NCSN++'s Fourier ``W`` are absent; they come from ``model``).

The converters are registered next to the models (``models.torch_mapping.register_converter``); the mapping is
strict: a tensor nobody read, a Flax parameter nobody produced, or a shape that differs from ``jax.eval_shape`` of
the model's init is one error listing the names.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

import experiment
import models
import torch_io
import utils
from models.torch_mapping import (MAX_LISTED, ConversionError, Params, StateDict, get_converter, listed,
                                  non_trainable_names)

BUFFERS = ("sigmas",)  # state-dict entries that are buffers, not parameters, in score_sde_pytorch models
MAX_STEP = 2**31 - 1  # the train state's step is int32


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str = "module.") -> Dict[str, np.ndarray]:
    """Drop DataParallel's ``module.`` prefix when every name carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


# ---- EMA --------------------------------------------------------------------------------------------------------


def ema_state_dict(model_sd: Mapping[str, np.ndarray], shadow: Sequence[np.ndarray], non_trainable: Iterable[str],
                   source: str) -> Dict[str, np.ndarray]:
    """The state dict with EMA values: ``shadow[i]`` replaces the i-th trainable entry (state-dict order, skipping
    ``non_trainable``, which keep their ``model`` values)."""
    skip = set(non_trainable)
    absent = sorted(skip - set(model_sd))
    trainable = [k for k in model_sd if k not in skip]
    if len(trainable) != len(shadow):
        raise ConversionError(
            f"{source}: ema.shadow_params has {len(shadow)} tensors but the model state dict has {len(trainable)} "
            f"trainable entries (after excluding non-trainable {sorted(skip)}; not present: {absent}); the "
            f"converter's non_trainable list does not match this checkpoint")
    bad = [f"{k}: model {model_sd[k].shape} vs shadow[{i}] {np.shape(s)}"
           for i, (k, s) in enumerate(zip(trainable, shadow)) if tuple(model_sd[k].shape) != tuple(np.shape(s))]
    if bad:
        raise ConversionError(f"{source}: ema.shadow_params do not line up with the model's parameters: "
                              f"{listed(bad, 4)}")
    out = dict(model_sd)
    out.update(zip(trainable, (np.asarray(s) for s in shadow)))
    return out


# ---- strict mapping ----------------------------------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Flat ``{"Conv_0/kernel": shape}`` of the configured model's parameters, via ``jax.eval_shape``."""
    model = models.create_model(config)
    shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
    tree = jax.eval_shape(lambda k: model.init(k, jnp.zeros(shape, jnp.float32)), jax.random.key(0))
    return {k: tuple(v.shape) for k, v in _flatten(tree).items()}


def check_mapping(params: Params, expected: Mapping[str, Tuple[int, ...]], sd: StateDict, what: str) -> None:
    """Raise one ``ConversionError`` listing shape mismatches, params not produced, extra params, unread tensors."""
    flat = _flatten(params)
    named = lambda path: f"{sd.origin[id(flat[path])]} -> {path}" if id(flat[path]) in sd.origin else path
    problems = []
    torch_shape = lambda p: (f" (torch {tuple(np.shape(sd._tensors[sd.origin[id(flat[p])]]))})"
                             if id(flat[p]) in sd.origin and np.ndim(flat[p]) > 1 else "")
    mismatched = [f"{named(p)}: checkpoint {tuple(np.shape(flat[p]))}{torch_shape(p)} vs model {expected[p]}"
                  for p in flat if p in expected and tuple(np.shape(flat[p])) != expected[p]]
    if mismatched:
        problems.append(f"shape mismatches (first {min(len(mismatched), MAX_LISTED)} of {len(mismatched)}): "
                        f"{listed(mismatched)}")
    missing = [p for p in expected if p not in flat]
    if missing:
        problems.append(f"model parameters with no checkpoint tensor: {listed(missing)}")
    extra = [named(p) for p in flat if p not in expected]
    if extra:
        problems.append(f"converted tensors the model does not have: {listed(extra)}")
    unread = sd.unused()
    if unread:
        problems.append(f"checkpoint tensors left unmapped: {listed(unread)}")
    if problems:
        raise ConversionError(f"{sd.source} does not match the configured model ({what}):\n  "
                              + "\n  ".join(problems))


def convert_state_dict(state: Mapping[str, np.ndarray], config, source: str = "checkpoint",
                       expected: Optional[Mapping[str, Tuple[int, ...]]] = None) -> Params:
    """Flax params of ``config.model`` from one torch state dict (``module.`` prefix optional), strictly checked."""
    convert_fn = get_converter(config.model.name)
    check_finite(check_state_dict(state, source), source)
    sd = StateDict(strip_prefix(state), source)
    params = convert_fn(sd, config.model, config.data)
    what = f"config.model.name={config.model.name!r}, image_size={config.data.image_size}"
    check_mapping(params, expected if expected is not None else expected_shapes(config), sd, what)
    return params


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def _describe(obj) -> str:
    if isinstance(obj, torch_io.PickledObject):
        return f"an object of class {obj.module}.{obj.name}"
    if isinstance(obj, Mapping):
        bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)), None)
        return "an empty dict" if not obj else f"a dict whose entry {str(bad)[:60]!r} is " \
            f"{'a ' + type(obj[bad]).__name__ if isinstance(bad, str) else 'not named by a string'}"
    return f"a {type(obj).__name__}"


def check_state_dict(obj, where: str) -> Mapping[str, np.ndarray]:
    """``obj`` when it is a non-empty ``{name: array}`` mapping, else a ``ConversionError`` saying what it is."""
    if not (_is_state_dict(obj) and all(isinstance(k, str) for k in obj)):
        raise ConversionError(f"{where} is {_describe(obj)}, not a state dict {{name: tensor}}")
    return obj


def check_finite(state: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse tensors holding NaN or inf, naming them (the first ``MAX_LISTED``)."""
    bad = [f"{k} ({int(np.size(v) - np.isfinite(v).sum())} of {np.size(v)} values)" for k, v in state.items()
           if (v.dtype.kind in "fc" or v.dtype.name == "bfloat16") and not np.isfinite(v).all()]
    if bad:
        raise ConversionError(f"{where}: non-finite (NaN/inf) values in {listed(bad)}; refusing to convert them")


def check_step(value, where: str) -> int:
    """The training step as an int in [0, ``MAX_STEP``] (an int, or an integer-valued 0-d array)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iuf" and np.isfinite(value):
        ok, value = float(value) == int(value), int(value)
    if not ok or not 0 <= int(value) <= MAX_STEP:
        raise ConversionError(f"{where}: step {str(value)[:40]} is not an integer in [0, {MAX_STEP}]")
    return int(value)


def normalise_checkpoint(ckpt: Any, source: str) -> dict:
    """``{"model", "ema", "step"}`` from the checkpoint layouts we read:

    * score_sde_pytorch: ``{"optimizer", "model", "ema": {"shadow_params": [...]}, "step"}``;
    * ermongroup/ncsn(v2): ``[model, optimizer, epoch, step(, ema)]`` with a *named* EMA state dict;
    * a bare state dict (no EMA: the raw weights serve as EMA; step 0).

    The model must be a state dict, the EMA absent, a state dict or ``{"shadow_params": [arrays]}``, and the step
    an integer in [0, 2**31 - 1]; anything else is a one-line ``ConversionError``.
    """
    if isinstance(ckpt, (list, tuple)) and ckpt and _is_state_dict(ckpt[0]):
        ema = ckpt[4] if len(ckpt) > 4 and _is_state_dict(ckpt[4]) else None
        out = {"model": ckpt[0], "ema": ema, "step": ckpt[3] if len(ckpt) > 3 else 0,
               "optimizer": ckpt[1] if len(ckpt) > 1 else None}
    elif _is_state_dict(ckpt) and "model" not in ckpt:
        out = {"model": ckpt, "ema": None, "step": 0, "optimizer": None}
    elif not isinstance(ckpt, Mapping) or "model" not in ckpt:
        what = sorted(map(str, ckpt))[:MAX_LISTED] if isinstance(ckpt, Mapping) else _describe(ckpt)
        raise ConversionError(f"{source}: not a score_sde_pytorch checkpoint {{'optimizer', 'model', 'ema', "
                              f"'step'}}, an ermongroup [model, optimizer, epoch, step, ema] list or a state dict "
                              f"(got {what})")
    else:
        out = {"model": ckpt["model"], "ema": ckpt.get("ema"), "step": ckpt.get("step", 0),
               "optimizer": ckpt.get("optimizer")}
    check_state_dict(out["model"], f"{source}['model']")
    ema = out["ema"]
    if isinstance(ema, Mapping) and "shadow_params" in ema:
        shadow = ema["shadow_params"]
        if not isinstance(shadow, (list, tuple)) or not all(isinstance(v, np.ndarray) for v in shadow):
            raise ConversionError(f"{source}['ema']['shadow_params'] is {_describe(shadow)}, not a list of tensors")
    elif ema is not None:
        check_state_dict(ema, f"{source}['ema']")
    out["step"] = check_step(out["step"], source)
    return out


def ema_values(model_sd: Dict[str, np.ndarray], ema: Any, config, source: str) -> Dict[str, np.ndarray]:
    """The state dict with EMA values, from score_sde's ordered ``shadow_params`` list or a named EMA dict."""
    if isinstance(ema, Mapping) and "shadow_params" in ema:
        names = non_trainable_names(config.model.name, config.model)
        return ema_state_dict(model_sd, ema["shadow_params"], names, source)
    named = strip_prefix(ema)
    unknown = [k for k in named if k not in model_sd]
    if unknown:
        raise ConversionError(f"{source}: EMA tensors with no counterpart in the model: {listed(unknown)}")
    return {**model_sd, **named}


def convert_loaded(ckpt: Any, config, source: str = "checkpoint") -> Tuple[Params, Params, int]:
    """``(params, ema_params, step)`` from an unpickled checkpoint (see ``normalise_checkpoint``)."""
    ckpt = normalise_checkpoint(ckpt, source)
    expected = expected_shapes(config)
    model_sd = strip_prefix(ckpt["model"])
    params = convert_state_dict(model_sd, config, f"{source}['model']", expected)
    if ckpt["ema"] is None:
        return params, jax.tree.map(np.copy, params), ckpt["step"]
    ema_sd = ema_values(model_sd, ckpt["ema"], config, f"{source}['ema']")
    return params, convert_state_dict(ema_sd, config, f"{source}['ema']", expected), ckpt["step"]


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """torch.optim.Adam's first/second moments as Flax param trees, and its step count."""

    mu: Params
    nu: Params
    count: int


def adam_moments(ckpt: Any, config, source: str = "checkpoint") -> Optional[AdamMoments]:
    """The checkpoint's Adam state mapped like the weights (None when it has none). torch keys the state by the
    index of the parameter in ``model.parameters()`` order, i.e. state-dict order without the buffers
    (``sigmas``); parameters that never had a gradient (NCSN++'s Fourier W) get zero moments."""
    ckpt = normalise_checkpoint(ckpt, source)
    opt = ckpt.get("optimizer")
    if not isinstance(opt, Mapping) or not opt.get("state"):
        return None
    _check_adam_layout(opt, f"{source}['optimizer']")
    model_sd = strip_prefix(ckpt["model"])
    indices = [i for group in opt["param_groups"] for i in group["params"]]
    names = [k for k in model_sd if k not in BUFFERS]
    if len(names) != len(indices):
        raise ConversionError(f"{source}: the optimizer holds {len(indices)} parameters but the state dict has "
                              f"{len(names)} non-buffer entries")
    by_name = {name: opt["state"].get(i) for name, i in zip(names, indices)}
    counts = {check_step(s.get("step"), f"{source}['optimizer'] Adam") for s in by_name.values() if s}
    if len(counts) != 1 or any(s and "exp_avg" not in s for s in by_name.values()):
        raise ConversionError(f"{source}: optimizer state is not torch.optim.Adam's (steps {sorted(counts)})")
    expected = expected_shapes(config)
    trees = []
    for moment in ("exp_avg", "exp_avg_sq"):
        sd = {k: (by_name[k][moment] if by_name[k] else np.zeros_like(v)) if k in by_name else v
              for k, v in model_sd.items()}
        trees.append(convert_state_dict(sd, config, f"{source}['optimizer'].{moment}", expected))
    return AdamMoments(trees[0], trees[1], counts.pop())


def _check_adam_layout(opt: Mapping, where: str) -> None:
    """torch.optim's ``{"state": {index: {name: tensor}}, "param_groups": [{"params": [index, ...]}]}``."""
    groups, state = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple))
            and all(isinstance(i, int) for i in g["params"]) for g in groups):
        raise ConversionError(f"{where}['param_groups'] is not torch.optim's [{{'params': [int, ...]}}, ...]")
    if not isinstance(state, Mapping) or not all(isinstance(v, Mapping) for v in state.values()):
        raise ConversionError(f"{where}['state'] is not torch.optim's {{index: {{name: tensor}}}}")


def with_adam_moments(opt_state: Any, moments: AdamMoments, step: int) -> Any:
    """``opt_state`` (an optax chain's state) with its Adam moments/count and schedule count replaced."""
    import optax

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            as_tree = lambda t: jax.tree.map(jnp.asarray, t)
            return node._replace(count=jnp.asarray(moments.count, node.count.dtype), mu=as_tree(moments.mu),
                                 nu=as_tree(moments.nu))
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jnp.asarray(step, node.count.dtype))
        if isinstance(node, tuple):
            children = [visit(c) for c in node]
            return type(node)(*children) if hasattr(node, "_fields") else tuple(children)
        return node

    return visit(opt_state)


def convert_checkpoint(pth_path: Union[str, pathlib.Path], config) -> Tuple[Params, Params, int]:
    """Read a score_sde_pytorch ``.pth`` (numpy only) and return ``(params, ema_params, step)`` for ``config``.

    Raises ``torch_io.TorchLoadError`` for unreadable files and ``ConversionError`` (naming the tensors) when
    the checkpoint does not map exactly onto ``config.model``.
    """
    return convert_loaded(torch_io.load(pth_path), config, str(pth_path))


# ---- main.py --mode=convert ----------------------------------------------------------------------------------------


def checkpoint_path(config) -> pathlib.Path:
    """The source file named by ``config.convert.checkpoint``."""
    section = config.get("convert")
    path = section.get("checkpoint") if section is not None else None
    if not path:
        raise ValueError("--mode=convert needs the source file: pass --config.convert.checkpoint=/path/to/"
                         "checkpoint_N.pth (config section 'convert', field 'checkpoint')")
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config.convert.checkpoint={str(path)!r}: no such file")
    return path


def check_no_checkpoints(workdir) -> None:
    """Refuse (before anything is written) a workdir whose ``checkpoints/`` holds anything: a converted step
    could collide with, or be declined because of, checkpoints already there."""
    directory = pathlib.Path(workdir) / "checkpoints"
    entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if entries:
        steps = [int(n) for n in entries if n.isdigit()]
        held = f"already has a checkpoint for step{'s' if len(steps) > 1 else ''} {listed(map(str, steps))}" \
            if steps else f"is not empty ({listed(entries)})"
        raise ConversionError(f"{directory} {held}; --mode=convert writes into a workdir without checkpoints "
                              f"(use a new --workdir)")


def save_converted(exp, workdir, params: Params, ema_params: Params, step: int, source: str,
                   moments: Optional[AdamMoments] = None) -> pathlib.Path:
    """Write a train state of ``exp`` (an ``experiment.Experiment``) at ``step`` in ``workdir/checkpoints``, with
    the config, so that sample/eval/likelihood run on it and training resumes from it (with the converted Adam
    moments when given, else a fresh optimizer state). Returns the checkpoint directory, checked to exist after the
    save; the config and ``converted_from.json`` are written only then."""
    config, workdir = exp.config, pathlib.Path(workdir)
    utils.check_workdir_writable(str(workdir))
    check_no_checkpoints(workdir)
    step = check_step(step, source)
    params, ema_params = (jax.tree.map(jnp.asarray, p) for p in (params, ema_params))
    opt_state = exp.optimizer.init(params)
    if moments is not None:
        opt_state = with_adam_moments(opt_state, moments, step)
    state = experiment.TrainState(step=jnp.asarray(step, jnp.int32), params=params, ema_params=ema_params,
                                  opt_state=opt_state)
    ckpt = utils.CheckpointManager(workdir / "checkpoints", config)
    try:
        ckpt.save(step, state)
        ckpt.wait()
        saved = ckpt.directory / str(step)
        if step not in ckpt.steps() or not saved.is_dir():
            raise ConversionError(f"saving the converted checkpoint failed: {saved} does not exist after the save")
    finally:
        ckpt.close()
    utils.write_config(workdir, config)
    utils.atomic_write_json(workdir / "converted_from.json", {"source": source, "step": step,
                                                              "model": config.model.name,
                                                              "adam_moments": moments is not None})
    return saved


def run(exp, workdir: str) -> None:
    """``main.py --mode=convert --config=<matching config> --config.convert.checkpoint=<file.pth> --workdir=W``:
    the runner ``fn(experiment, workdir)`` of the mode."""
    config = exp.config
    source = checkpoint_path(config)
    check_no_checkpoints(workdir)
    ckpt = torch_io.load(source)
    params, ema_params, step = convert_loaded(ckpt, config, str(source))
    moments = adam_moments(ckpt, config, str(source))
    n = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    out = save_converted(exp, workdir, params, ema_params, step, str(source), moments)
    print(f"converted {source} ({config.model.name}, {n / 1e6:.2f}M parameters, step {step}) -> {out}")
