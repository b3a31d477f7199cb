"""The valid range of every config field, in one place next to the schema (``configs/base.py``).

``validate(config, mode)`` refuses nonsense before anything runs or is written, with one line naming the field
and its valid range ("config sde.sigma_min=50 must be < sde.sigma_max=1"). ``RULES`` holds single-field ranges,
``MODE_RULES`` those that hold for one ``--mode`` only, ``PAIR_RULES`` relations between two fields, and
``METHOD_OPTIONS`` which ``config.sampling`` options each sampler method reads (the names of its builder's
parameters in ``samplers.SAMPLERS``; ``tests/test_config_checks.py`` keeps the two equal), ``LIKELIHOOD_OPTIONS``
the same for ``config.eval.likelihood``: an option of another method set on the command line is an error.
``help_table()`` reads each field's help from the comments of ``configs/base.py``; ``describe`` prints it all
(``--mode=describe``). ``load_config_file`` and ``check_override_keys`` turn a broken config file or an unknown
``--config.a.b`` key into one line. ``UserError`` is the base of every error a user can fix (``main.py`` prints
it as one line). This module imports nothing heavy (no JAX): ``main.py`` runs it before importing the modes.

A ``None`` value (a placeholder) always passes: it means "the default".
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import pathlib
import re
import sys
from typing import Callable, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

BASE_FILE = pathlib.Path(__file__).with_name("base.py")


class UserError(Exception):
    """An error the user can fix from the command line or the config; ``main.py`` prints its message as one
    line ("error: ...") without a traceback and exits with status 2. Subclass it for every user-facing error."""


class ConfigError(UserError):
    """A config that cannot be loaded or that breaks a rule of this module."""


# ---- single-field ranges ----------------------------------------------------------------------------------------
class Rule(NamedTuple):
    """``ok(value) -> bool`` for a non-None value, and the valid range in words ("> 0", "in [0, 1)")."""

    ok: Callable
    text: str


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def gt(lo) -> Rule:
    return Rule(lambda v: _number(v) and v > lo, f"> {lo}")


def ge(lo) -> Rule:
    return Rule(lambda v: _number(v) and v >= lo, f">= {lo}")


def int_ge(lo) -> Rule:
    return Rule(lambda v: _integer(v) and v >= lo, f"an integer >= {lo}")


def in_range(lo, hi, closed_hi: bool = False) -> Rule:
    """lo <= v < hi, or lo <= v <= hi when ``closed_hi``."""
    below = (lambda v: v <= hi) if closed_hi else (lambda v: v < hi)
    return Rule(lambda v: _number(v) and v >= lo and below(v), f"in [{lo}, {hi}{']' if closed_hi else ')'}")


def one_of(*choices) -> Rule:
    return Rule(lambda v: v in choices, f"one of {list(choices)}")


def each_int_ge(lo) -> Rule:
    return Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_integer(u) and u >= lo for u in v),
                f"a non-empty tuple of integers >= {lo}")


FINITE = Rule(_number, "a finite number")

RULES: Dict[str, Rule] = {
    "seed": int_ge(0),
    # training
    "training.batch_size": int_ge(1),
    "training.n_iters": int_ge(0),
    "training.log_freq": int_ge(1),
    "training.eval_freq": int_ge(1),       # above n_iters: no periodic evaluation
    "training.eval_batches": int_ge(0),    # 0: the whole test split
    "training.snapshot_freq": int_ge(1),
    "training.keep_checkpoints": int_ge(1),
    "training.sample_freq": int_ge(1),
    "training.data_shards": int_ge(1),
    "training.eps": gt(0),                 # < the SDE's T too: checked where the SDE is built
    "training.single_sigma": gt(0),
    "training.n_projections": int_ge(1),
    "training.label_dropout": in_range(0, 1, closed_hi=True),
    # sampling
    "sampling.snr": gt(0),
    "sampling.n_steps": int_ge(0),
    "sampling.eps": gt(0),
    "sampling.num_samples": int_ge(1),
    "sampling.batch_size": int_ge(1),
    "sampling.num_steps": int_ge(1),
    "sampling.rtol": gt(0),
    "sampling.atol": gt(0),
    "sampling.eta": in_range(0, 1, closed_hi=True),
    "sampling.order": one_of(1, 2, 3),
    "sampling.ald_step_size": gt(0),
    "sampling.step_size": gt(0),
    "sampling.num_particles": int_ge(1),
    "sampling.label": int_ge(0),
    "sampling.guidance_scale": FINITE,
    # eval and likelihood
    "eval.batch_size": int_ge(1),
    "eval.num_samples": int_ge(1),
    "eval.checkpoint": int_ge(0),
    "eval.fid_num_images": int_ge(1),
    "eval.likelihood.num_examples": int_ge(1),
    "eval.likelihood.num_probes": int_ge(1),
    "eval.likelihood.rtol": gt(0),
    "eval.likelihood.atol": gt(0),
    "eval.likelihood.max_steps": int_ge(1),
    "eval.likelihood.eps": gt(0),
    "eval.likelihood.bits": int_ge(1),
    "eval.likelihood.num_draws": int_ge(1),
    "eval.likelihood.ddpm_num_steps": int_ge(1),
    # data
    "data.image_size": int_ge(1),
    "data.num_channels": int_ge(1),
    "data.num_classes": int_ge(1),
    "data.prefetch": int_ge(0),
    "data.toy_eval_size": int_ge(1),
    "data.shuffle_buffer": int_ge(1),
    "data.dim": int_ge(1),
    # model
    "model.ema_rate": in_range(0, 1),
    "model.dropout": in_range(0, 1),
    "model.nf": int_ge(1),
    "model.ch_mult": each_int_ge(1),
    "model.num_res_blocks": int_ge(0),
    "model.hidden": int_ge(1),
    "model.num_layers": int_ge(1),
    "model.embed_dim": int_ge(1),
    "model.cond_channels": int_ge(1),
    "model.num_scales": int_ge(2),
    "model.sigma_min": gt(0),
    "model.sigma_max": gt(0),
    "model.fourier_scale": gt(0),
    "model.init_scale": ge(0),
    # sde
    "sde.N": int_ge(2),
    "sde.beta_min": ge(0),
    "sde.beta_max": gt(0),
    "sde.sigma_min": gt(0),
    "sde.sigma_max": gt(0),
    # optim
    "optim.lr": gt(0),
    "optim.beta1": in_range(0, 1),
    "optim.eps": gt(0),
    "optim.weight_decay": ge(0),
    "optim.warmup": int_ge(0),
    "optim.grad_clip": Rule(lambda v: _number(v) or v == math.inf, "a number (<= 0: no clipping)"),
}

MODE_RULES: Dict[str, Dict[str, Rule]] = {
    "train": {"training.n_iters": int_ge(1)},
}


class PairRule(NamedTuple):
    """``a op b`` must hold whenever both fields are set (not None)."""

    a: str
    op: str
    b: str


_OPS = {"<": lambda x, y: x < y, "<=": lambda x, y: x <= y}

PAIR_RULES: Tuple[PairRule, ...] = (
    PairRule("sde.sigma_min", "<", "sde.sigma_max"),
    PairRule("sde.beta_min", "<=", "sde.beta_max"),
    PairRule("model.sigma_min", "<", "model.sigma_max"),
    PairRule("sampling.label", "<", "data.num_classes"),
)

# ---- which sampler reads which option ---------------------------------------------------------------------------
# config.sampling options of each method: the parameters of its builder in samplers.SAMPLERS that are
# config.sampling keys ("smc": controllable_generation.SMC_OPTIONS, inpainting/colorization only).
METHOD_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "pc": ("predictor", "corrector", "snr", "n_steps", "num_steps", "denoise", "eps", "ald_step_size",
           "ancestral_variance", "grid"),
    "ode": ("solver", "rtol", "atol", "num_steps", "denoise", "eps"),
    "ddim": ("num_steps", "eta", "grid", "denoise", "eps"),
    "dpm_solver++": ("num_steps", "order", "grid", "denoise", "eps"),
    "heun": ("num_steps", "grid", "denoise", "eps"),
    "langevin": ("num_steps", "step_size", "denoise"),
    "annealed_langevin": ("num_steps", "n_steps", "snr", "ald_step_size", "step_rule", "grid", "denoise", "eps"),
    "smc": ("num_particles", "num_steps", "eps", "denoise"),
}


def method_options() -> Dict[str, Tuple[str, ...]]:
    """``METHOD_OPTIONS``, plus methods registered at run time (``samplers.register_sampler("name", builder)`` in a
    config file) when ``samplers`` is already imported; never imports it."""
    samplers = sys.modules.get("samplers")
    table = dict(METHOD_OPTIONS)
    if samplers is not None:
        import inspect

        keys = set(_sampling_keys())
        for name, builder in samplers.SAMPLERS.items():
            table.setdefault(name, tuple(p for p in inspect.signature(builder).parameters if p in keys))
    return table


def _sampling_keys() -> Tuple[str, ...]:
    return tuple(k.split(".", 1)[1] for k in help_table() if k.startswith("sampling."))


# config.eval.likelihood options of each likelihood.METHODS method (run_lib.likelihood_settings reads them)
LIKELIHOOD_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "ode": ("divergence", "num_probes", "rtol", "atol", "solver", "max_steps", "eps", "dequantization",
            "num_draws"),
    "ddpm_bound": ("ddpm_variance", "ddpm_num_steps"),
}


# method "pc": config.sampling options its predictor / corrector (samplers.PREDICTORS / CORRECTORS) read
PC_PARTS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "predictor": {"euler_maruyama": (), "reverse_diffusion": (), "ancestral_sampling": ("ancestral_variance",),
                  "none": ()},
    "corrector": {"langevin": ("snr", "n_steps"), "ald": ("snr", "n_steps", "ald_step_size"), "none": ()},
}


def _check_pc_parts(config, explicit: Iterable[str]) -> list:
    """Options set on the command line that the chosen (known) predictor or corrector of method "pc" ignores."""
    if get(config, "sampling.method") != "pc":
        return []
    errors = []
    for part, table in PC_PARTS.items():
        chosen, used = get(config, f"sampling.{part}"), {o for opts in table.values() for o in opts}
        for path in explicit:
            head, _, key = path.rpartition(".")
            if head == "sampling" and key in used and chosen in table and key not in table[chosen]:
                users = ", ".join(name for name, opts in table.items() if key in opts)
                errors.append(f"config {path} applies to {part}(s) {users}, not {chosen}")
    return errors


def _option_tables() -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """Section -> {its ``method``: the options of the section that method reads}."""
    return {"sampling": method_options(), "eval.likelihood": LIKELIHOOD_OPTIONS}


def _check_method_options(config, explicit: Iterable[str]) -> list:
    """An unknown ``sampling.method`` / ``eval.likelihood.method``, and options set on the command line that the
    chosen method of their section does not read."""
    errors = []
    for section, table in _option_tables().items():
        method = get(config, f"{section}.method")
        if method is None:
            continue
        if method not in table:
            errors.append(f"config {section}.method={method!r} must be {_one_of_text(sorted(table))}")
            continue
        used = {o for opts in table.values() for o in opts}
        for path in explicit:
            head, _, key = path.rpartition(".")
            if head == section and key in used and key not in table[method]:
                users = ", ".join(m for m, opts in table.items() if key in opts)
                errors.append(f"config {path} applies to method(s) {users}, not {method}")
    return errors


# ---- validate ---------------------------------------------------------------------------------------------------
def get(config, path: str, default=None):
    """``config.a.b`` for path "a.b", or ``default`` when a section or field is missing."""
    node = config
    for part in path.split("."):
        try:
            if part not in node:
                return default
            node = node[part]
        except TypeError:
            return default
    return node


def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _one_of_text(choices: Sequence) -> str:
    return "one of " + ", ".join(map(str, choices))


def rule_errors(config, mode: Optional[str] = None) -> list:
    """Messages for the fields (set, not None) outside their range."""
    rules = {**RULES, **MODE_RULES.get(mode, {})}
    errors = []
    for path, rule in rules.items():
        value = get(config, path)
        if value is not None and not rule.ok(value):
            extra = f" for --mode={mode}" if path in MODE_RULES.get(mode, {}) else ""
            errors.append(f"config {path}={_fmt(value)} must be {rule.text}{extra}")
    for a, op, b in PAIR_RULES:
        va, vb = get(config, a), get(config, b)
        if _number(va) and _number(vb) and not _OPS[op](va, vb):
            errors.append(f"config {a}={_fmt(va)} must be {op} {b}={_fmt(vb)}")
    return errors


def validate(config, mode: Optional[str] = None, explicit: Iterable[str] = ()) -> None:
    """Raise ``ConfigError`` (one line, every broken rule) when ``config`` breaks a rule of this module.
    ``mode``: the ``--mode`` (adds ``MODE_RULES[mode]``); ``explicit``: the field paths set on the command line
    ("sampling.eta"), refused when the chosen sampler method does not read them."""
    explicit = list(explicit)
    errors = rule_errors(config, mode) + _check_method_options(config, explicit) + _check_pc_parts(config, explicit)
    if errors:
        raise ConfigError("; ".join(errors))


# ---- help of every field (the comments of configs/base.py) -------------------------------------------------------
_SECTION_OF_VAR = {"evaluate": "eval", "lik": "eval.likelihood"}
_FIELD = re.compile(r"^\s*(\w+)\.(\w+)\s*=(?!=).*?(?:#\s*(.*))?$")
_CONTINUATION = re.compile(r"^(\s{20,})#\s*(.*)$")
_help_cache: Dict[str, str] = {}


def help_table() -> Dict[str, str]:
    """{"training.batch_size": "global batch, split over all devices and processes", ...}: every field of
    ``configs/base.py`` with its end-of-line comment (continued on indented comment-only lines); "" if none."""
    if _help_cache:
        return _help_cache
    last = None
    for line in BASE_FILE.read_text().splitlines():
        m, cont = _FIELD.match(line), _CONTINUATION.match(line)
        if cont and last:
            _help_cache[last] = f"{_help_cache[last]} {cont.group(2).strip()}".strip()
        elif m and m.group(1) != "config" or m and m.group(2) == "seed":
            var, key, text = m.groups()
            last = f"{_SECTION_OF_VAR.get(var, var)}.{key}" if var != "config" else key
            _help_cache[last] = (text or "").strip()
        else:
            last = None
    return _help_cache


# ---- loading a config file with one-line errors -------------------------------------------------------------------
MODULE_NAME = "config_config"   # the name ml_collections' --config flag gives the config module


def load_config_file(spec: str):
    """``get_config([arg])`` of ``spec`` = "path/to/config.py[:arg]" (what ``--config=`` names), with one-line
    ``ConfigError``s for a missing file, a syntax error (file and line), a missing ``get_config`` and an error
    raised by ``get_config`` (e.g. an unknown ``configs/toy.py:<dataset>``)."""
    path, colon, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist" if path else "--config names no file")
    try:
        source = file.read_text()
        code = compile(source, str(file), "exec")
    except SyntaxError as e:
        raise ConfigError(f"config file {file} line {e.lineno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {file} cannot be read: {e}") from e
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(MODULE_NAME, file))
    sys.modules[MODULE_NAME] = module   # as an import does: dataclasses and pickling look the module up
    try:
        exec(code, module.__dict__)  # the config file is the user's own code (like any script they run)
    except Exception as e:
        del sys.modules[MODULE_NAME]
        raise ConfigError(f"config file {file}{_where(e, file)}: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {file} defines no get_config()")
    try:
        config = module.get_config(*([arg] if colon else []))
    except UserError:
        raise
    except Exception as e:
        what = f"{file}:{arg}" if colon else str(file)
        raise ConfigError(f"--config={what}: {_plain(e)}") from e
    if config is None:
        raise ConfigError(f"config file {file}: get_config() returned None (a missing return?)")
    return config


def _where(e: BaseException, file: pathlib.Path) -> str:
    """" line N" of the innermost frame of ``e``'s traceback inside ``file``."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if pathlib.Path(tb.tb_frame.f_code.co_filename) == file:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" line {line}" if line else ""


def _plain(e: BaseException) -> str:
    """An exception as one line: ValueError/KeyError text alone, other types named."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(text.split())
    return text if isinstance(e, (ValueError, KeyError)) else f"{type(e).__name__}: {text}"


# ---- command-line overrides ---------------------------------------------------------------------------------------
# Common names from other code bases for a field of this one: the first suggestion for an unknown key.
SYNONYMS = {"steps": "num_steps", "num_inference_steps": "num_steps", "sampler": "method",
            "learning_rate": "lr", "iters": "n_iters", "num_iters": "n_iters", "max_steps": "n_iters",
            "train_steps": "n_iters", "ema": "ema_rate", "ema_decay": "ema_rate", "clip": "grad_clip",
            "warmup_steps": "warmup", "num_scales": "N", "n": "N"}


def override_paths(argv: Sequence[str], name: str = "config") -> list:
    """Field paths of the ``--config.a.b=v`` / ``--config.a.b v`` / ``--noconfig.a.b`` arguments, in order."""
    pattern = re.compile(rf"^--?(?:no)?{name}\.([^=]+)")
    return [m.group(1) for m in map(pattern.match, argv) if m]


def check_override_keys(config, paths: Iterable[str]) -> None:
    """``ConfigError`` "unknown config key training.foo (did you mean ...?)" for the first path that names no
    field of ``config``."""
    for path in paths:
        node, parts = config, path.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                raise ConfigError(_unknown_key(config, node, parts, i))
            node = node[part]


def _unknown_key(config, node, parts: Sequence[str], i: int) -> str:
    path = ".".join(parts)
    if not hasattr(node, "keys"):
        return f"unknown config key {path}: {'.'.join(parts[:i])} is a value, not a section"
    part, keys = parts[i], [str(k) for k in node.keys()]
    guess = [SYNONYMS[part]] if SYNONYMS.get(part) in keys else []
    guess += [k for k in difflib.get_close_matches(part, keys, n=2, cutoff=0.6) if k not in guess]
    if not guess and i == 1:   # a field of another section: --config.training.lr -> optim.lr
        guess = [f"{s}.{part}" for s in config.keys() if hasattr(config[s], "keys") and part in config[s]]
    hint = f" (did you mean {' or '.join(guess[:2])}?)" if guess else f" ({'.'.join(parts[:i]) or 'config'} has: " \
        f"{', '.join(sorted(keys))})"
    return f"unknown config key {path}{hint}"


# ---- describe ---------------------------------------------------------------------------------------------------
def flat_items(config, prefix: str = "") -> Iterable[Tuple[str, object]]:
    """("section.key", value) of every field, depth first."""
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _schema_order(helps: Dict[str, str]) -> Callable:
    """Sort key: sections and fields in the order of configs/base.py, unknown ones after those of their section."""
    index = {path: i for i, path in enumerate(helps)}
    first = {}
    for path, i in index.items():
        first.setdefault(path.rsplit(".", 1)[0] if "." in path else "", i)

    def key(item):
        path = item[0]
        section = path.rsplit(".", 1)[0] if "." in path else ""
        return first.get(section, len(index)), index.get(path, len(index)), path

    return key


def describe(config, mode: Optional[str] = None) -> str:
    """Every field with its value, valid range and help, then the sampler methods and the options each reads."""
    helps, rules = help_table(), {**RULES, **MODE_RULES.get(mode, {})}
    lines, section = [], None
    for path, value in sorted(flat_items(config), key=_schema_order(helps)):
        top = path.rsplit(".", 1)[0] if "." in path else ""
        if top != section:
            section = top
            lines.append(f"\n[{section or 'top level'}]")
        extra = [f"valid: {rules[path].text}"] if path in rules else []
        extra += [f"--mode={m}: {r[path].text}" for m, r in MODE_RULES.items() if path in r and m != mode]
        extra += [f"must be {op} {b}" for a, op, b in PAIR_RULES if a == path]
        text = "; ".join(filter(None, [helps.get(path, "")] + extra))
        lines.append(f"  {path} = {_fmt(value)}" + (f"    # {text}" if text else ""))
    for part, table in PC_PARTS.items():
        lines.append(f"\n[sampling.{part} of method pc: the options each reads]")
        lines += [f"  {name}: {', '.join(opts) or '-'}" for name, opts in table.items()]
    for section, table in _option_tables().items():
        lines.append(f"\n[{section}.method: the options of config.{section} each method reads; setting another "
                     f"method's option is an error]")
        lines += [f"  {method}: {', '.join(opts)}" for method, opts in table.items()]
    return "\n".join(lines).lstrip("\n")
