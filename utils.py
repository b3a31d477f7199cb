"""Workdir I/O: config files, checkpoints with conventions, metric logs and image grids. All writes are atomic."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Callable, Optional

import jax
import numpy as np
from flax import serialization

from configs.checks import UserError
from configs.base import get_base_config

log = logging.getLogger(__name__)


# ---- atomic files -----------------------------------------------------------------------------------------------
def _atomic(path: pathlib.Path, write: Callable, suffix: str = ""):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: name the file (the previous version of it is intact)
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
    _atomic(path, write)


def atomic_savez(path, **arrays):
    _atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def _json_default(o):
    if isinstance(o, (np.generic, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_config_file(path) -> "ml_collections.ConfigDict":
    """``get_config()`` of a config file (what ``--config=path`` gives main.py, before flag overrides)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_config(workdir: pathlib.Path, config):
    """Save the resolved config next to the checkpoints (``config.json``)."""
    atomic_write_json(pathlib.Path(workdir) / "config.json", config.to_dict())


WORKDIR_MODES = ("sample", "eval", "likelihood", "fid_stats")  # modes whose base config is the workdir's


def saved_config(workdir) -> Optional["ml_collections.ConfigDict"]:
    """The config a run saved in ``<workdir>/config.json`` laid over ``configs.base`` (so the base's field types
    and placeholders hold, lists become the base's tuples); None when there is no such file."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the saved config {path}: {e}") from None
    config = get_base_config()
    _merge_into(config, saved)
    return config


def _merge_into(config, saved: dict):
    import ml_collections

    for k, v in saved.items():
        if isinstance(v, dict) and isinstance(config.get(k, None), ml_collections.ConfigDict):
            _merge_into(config[k], v)
            continue
        current = config.get(k, None)
        if isinstance(v, dict):
            v = ml_collections.ConfigDict(v)
        elif isinstance(v, list) and (isinstance(current, tuple) or current is None):
            v = tuple(v)
        with config.ignore_type():
            config[k] = v


def set_path(config, path: str, value):
    """``config.a.b = value`` for ``path`` "a.b", adding missing fields."""
    *parents, leaf = path.split(".")
    for name in parents:
        config = config[name]
    with config.ignore_type():
        config[leaf] = value


def workdir_config(workdir, cli_config, overrides: dict, quiet: bool = False):
    """The config of a mode run on an existing workdir: the saved ``config.json`` as the base, the command-line
    ``overrides`` (flat ``{"sampling.method": "ode"}``) applied on top; ``cli_config`` (from ``--config``) only
    when the workdir has no saved config. Prints which fields of ``--config`` the saved config replaced."""
    config = saved_config(workdir)
    if config is None:
        if cli_config is None:
            raise FileNotFoundError(f"{pathlib.Path(workdir) / 'config.json'} does not exist; pass --config")
        return cli_config
    for path, value in (overrides or {}).items():
        set_path(config, path, value)
    if not quiet:
        differ = [] if cli_config is None else _differing(cli_config.to_dict(), config.to_dict())
        differ.sort(key=lambda k: (k.split(".")[0] not in ("model", "data", "sde"), k))  # the ones that matter
        note = (f"; --config differs in {', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''} and is ignored "
                f"except for its command-line overrides") if differ else ""
        print(f"using the config saved in {pathlib.Path(workdir) / 'config.json'} with {len(overrides or {})} "
              f"command-line override(s){note}", flush=True)
    return config


def _differing(a: dict, b: dict, prefix: str = "") -> list:
    out = []
    for k in sorted(set(a) & set(b)):
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            out += _differing(a[k], b[k], f"{prefix}{k}.")
        elif json.dumps(a[k], default=_json_default) != json.dumps(b[k], default=_json_default):
            out.append(prefix + k)
    return out


def check_workdir_writable(workdir: str):
    """Fail early, writing nothing, when ``workdir`` cannot be created or written."""
    path = pathlib.Path(workdir).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"workdir {workdir!r} is not writable (checked {existing})")


# ---- checkpoints ------------------------------------------------------------------------------------------------
def conventions(config) -> dict:
    """What a checkpoint must agree on with the config that restores it: architecture, its conventions, the SDE
    and the data geometry (not learning rate, EMA rate or loop lengths, which may change on resume)."""
    model = {k: v for k, v in config.model.to_dict().items() if k not in ("ema_rate", "dropout")}
    data = {k: config.data[k] for k in ("image_size", "num_channels", "centered", "source") if k in config.data}
    return json.loads(json.dumps({"model": model, "sde": config.sde.to_dict(), "data": data},
                                 default=_json_default))


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {a!r} vs config {b!r}"]


def hyperparameters(config) -> dict:
    """What may change on resume and is reported when it does: the optimiser settings and the EMA rate."""
    return json.loads(json.dumps({"optim": config.optim.to_dict(), "ema_rate": config.model.ema_rate},
                                 default=_json_default))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def hyperparameter_changes(stored: dict, config) -> list:
    """Lines like ``config.optim.lr: 0.0002 in the checkpoint -> 0.001 now`` for every changed setting."""
    now = _flat(hyperparameters(config))
    old = _flat(stored or {})
    names = {"ema_rate": "model.ema_rate"}
    return [f"config.{names.get(k, k)}: {old[k]!r} in the checkpoint -> {now[k]!r} now"
            for k in sorted(now) if k in old and old[k] != now[k]]


def lazy_import(name: str):
    """Module ``name``, executed on its first attribute access (``importlib.util.LazyLoader``): for heavy imports
    that a run may never use, e.g. diffrax (ODE solvers only) and orbax (0.2 s; the first checkpoint)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ocp = lazy_import("orbax.checkpoint")


class CheckpointManager:
    """orbax ``CheckpointManager`` storing the train state with the config's conventions and hyperparameters.

    Writes are asynchronous (``save`` returns once the state is copied to host memory); the last
    ``config.training.keep_checkpoints`` are kept. The state is stored as host numpy arrays, so a checkpoint
    restores onto any number of devices or processes. Restoring refuses a checkpoint from an incompatible config,
    and falls back to the previous checkpoint (with a warning) when the latest one is corrupt or partial.
    """

    def __init__(self, directory: pathlib.Path, config, max_to_keep: Optional[int] = None):
        self.directory = pathlib.Path(directory).absolute()
        self.config = config
        self.restored_meta: Optional[dict] = None
        self.unreadable: set = set()
        self._pending: Optional[int] = None
        self.max_to_keep = max_to_keep or config.training.get("keep_checkpoints", 3)
        self._manager = None

    @property
    def manager(self):
        """orbax's ``CheckpointManager`` of ``directory``, made on first use: a run that starts without a
        checkpoint directory needs none before its first save (importing orbax takes 0.2 s of the start-up)."""
        if self._manager is None:
            _quiet_orbax_write_errors()
            self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep, enable_async_checkpointing=True, create=False))  # the first save does
        return self._manager

    def save(self, step: int, state):
        """Start writing ``state`` as checkpoint ``step`` (a no-op when that step exists). Every save is checked:
        a non-finite state is refused (``FloatingPointError``), and a save orbax declines or fails to write
        (e.g. disk full) raises ``CheckpointNotSaved`` in one line; ``wait`` checks the written directory."""
        self.wait()  # orbax waits for the previous save anyway; this also verifies it
        if step in self.manager.all_steps() and step not in self.unreadable:
            return
        host = serialization.to_state_dict(jax.device_get(state))
        bad = non_finite_parts(host)
        if bad:
            raise FloatingPointError(f"not saving checkpoint {step}: non-finite values in {', '.join(bad)}; "
                                     f"the last good checkpoint is {self.last_good()}")
        self._move_aside_unreadable(step)
        meta = {"step": step, "conventions": conventions(self.config),
                "hyperparameters": hyperparameters(self.config), "config": self.config.to_dict()}
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._saving(step):
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(host),
                meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=_json_default)))))
        if not saved:
            higher = [self.directory / str(s) for s in self.manager.all_steps() if s >= step]
            raise CheckpointNotSaved(f"checkpoint {self.directory / str(step)} was not saved: orbax saves only "
                                     f"steps above the latest, and {', '.join(map(str, higher))} exists; move it "
                                     "out of the way and resume")
        self._pending = step

    def last_good(self) -> str:
        """'step N in <dir>' of the latest complete, readable checkpoint (or 'none ...')."""
        good = [s for s in self.steps() if s not in self.unreadable and _is_complete(self.directory / str(s))]
        return f"step {good[-1]} in {self.directory}" if good else f"none (no checkpoint in {self.directory})"

    def _move_aside_unreadable(self, step: int):
        """Unreadable checkpoints (restore fell back from them) numbered ``step`` or above would make orbax decline
        this save: rename them to ``<n>.unreadable`` (kept for inspection, ignored as checkpoints)."""
        moved = False
        for s in sorted(self.unreadable):
            if s >= step and (self.directory / str(s)).exists():
                target = self.directory / f"{s}.unreadable"
                while target.exists():
                    target = target.with_name(target.name + "_")
                os.replace(self.directory / str(s), target)
                print(f"moved the unreadable checkpoint {self.directory / str(s)} to {target}", flush=True)
                self.unreadable.discard(s)
                moved = True
        if moved:
            self.manager.reload()

    @contextlib.contextmanager
    def _saving(self, step: int):
        """Turn a failed write (an ``OSError`` such as a full disk, possibly wrapped by orbax) into one line."""
        try:
            yield
        except Exception as e:
            reason = _write_error(e)
            if reason is None:
                raise
            self._discard_partial(step)
            raise CheckpointNotSaved(f"could not write checkpoint {self.directory / str(step)}: {reason} "
                                     f"({_free_space(self.directory)}); the last good checkpoint is "
                                     f"{self.last_good()}") from e

    def _discard_partial(self, step: int):
        """Remove what a failed save of ``step`` left (orbax's temporary directory), freeing the space."""
        self._pending = None
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self):
        """Wait for the pending save and check that its step directory is complete."""
        if self._manager is None:  # nothing saved or restored through orbax yet
            return
        step = self._pending
        with self._saving(step if step is not None else -1):
            self.manager.wait_until_finished()
        self._pending = None
        # the primary process finalises the directory; others may not see it complete yet
        if step is not None and jax.process_index() == 0 and not _is_complete(self.directory / str(step)):
            self._discard_partial(step)
            aside = ""
            if (self.directory / str(step)).exists():  # out of orbax's way, kept for inspection
                os.replace(self.directory / str(step), self.directory / f"{step}.incomplete")
                self.manager.reload()
                aside = f", moved to {self.directory / f'{step}.incomplete'}"
            raise CheckpointNotSaved(f"checkpoint {self.directory / str(step)} is missing or incomplete after "
                                     f"saving ({_free_space(self.directory)}{aside}); the last good checkpoint "
                                     f"is {self.last_good()}")

    def close(self):
        if self._manager is not None:
            self._manager.close()

    def steps(self):
        """The checkpoint steps in ``directory`` (none, without asking orbax, when it does not exist)."""
        if self._manager is None and not self.directory.is_dir():
            return []
        return sorted(self.manager.all_steps())

    def _restore_step(self, step: int, template):
        target = jax.device_get(serialization.to_state_dict(template))
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        mismatch = _diff(meta["conventions"], conventions(self.config))
        if mismatch:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory / str(step)} was written by an incompatible config: "
                + "; ".join(mismatch[:5]))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        _check_shapes(restored["state"], target, self.directory / str(step))
        bad = non_finite_parts(restored["state"])
        if bad:
            raise FloatingPointError(f"checkpoint {self.directory / str(step)} holds non-finite values in "
                                     + ", ".join(bad))
        self.restored_meta = meta
        return serialization.from_state_dict(template, restored["state"])

    def restore(self, template, step: Optional[int] = None):
        """Restore ``step`` (default: the latest readable checkpoint) into the structure of ``template``."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
            return self._restore_step(step, template)
        for s in reversed(steps):
            try:
                return self._restore_step(s, template)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # corrupt or partial write: fall back to the previous one
                self.unreadable.add(s)
                warnings.warn(f"checkpoint {self.directory / str(s)} is unreadable ({type(e).__name__}: "
                              f"{str(e)[:300]}); falling back to the previous checkpoint")
        raise FileNotFoundError(f"no readable checkpoint in {self.directory} (tried steps {steps}); move the "
                                "unreadable ones away to start afresh")

    def restore_or(self, init: Callable):
        """The latest readable checkpoint, or ``init()`` when there is none; reports changed hyperparameters."""
        template = init()
        if not self.steps():
            return template
        state = self.restore(template)
        print(f"resumed from step {int(state.step)} in {self.directory}")
        for line in hyperparameter_changes(self.restored_meta.get("hyperparameters"), self.config):
            print(f"resuming with a changed setting, using the new value: {line}")
        return state


def _check_shapes(restored, target, where):
    """Shapes must match the template exactly (orbax may pad or truncate silently on some versions)."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target)):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"checkpoint {where}: {jax.tree_util.keystr(path)} has shape {np.shape(a)}, "
                             f"the model expects {np.shape(b)}")


class IncompatibleCheckpointError(ValueError):
    pass


class CheckpointNotSaved(UserError, RuntimeError):
    """A checkpoint save that was declined or failed (the previous checkpoints are intact); one line in main.py."""


def non_finite_parts(tree) -> list:
    """Paths of the leaves holding NaN or inf, as top-level key plus the first offending leaf, e.g.
    ``['params (params/Dense_0/kernel)', 'opt_state (...)']``; empty when all is finite."""
    bad = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            bad.setdefault(names[0] if names else "value", "/".join(names))
    return [f"{top} ({first})" for top, first in bad.items()]


class _OrbaxWriteErrors(logging.Filter):
    """Drops orbax's log records of a failed background write (three tracebacks per save on a full disk):
    ``CheckpointManager`` reports that failure in one line. ``SCORE_DEBUG=1`` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("orbax" in record.pathname and exc is not None and _write_error(exc) is not None
                    and not _debug())


def _quiet_orbax_write_errors():
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxWriteErrors) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxWriteErrors())
    if not getattr(sys.unraisablehook, "drops_closed_loops", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _drop_closed_loop_callbacks(previous: Callable) -> Callable:
    """An ``sys.unraisablehook`` that drops "Event loop is closed" (tensorstore calling back into the asyncio loop
    of an orbax thread that ended after a failed write: dozens of tracebacks, no information) and passes the rest
    on. ``SCORE_DEBUG=1`` keeps them."""

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and not _debug():
            return
        previous(unraisable)

    hook.drops_closed_loops = True
    return hook


def _debug() -> bool:
    """``SCORE_DEBUG=1``: keep the tracebacks and noise that one-line errors replace."""
    return os.environ.get("SCORE_DEBUG", "") not in ("", "0")


def _is_complete(step_dir: pathlib.Path) -> bool:
    """A finalised orbax step: the directory with its metadata and both items (state, meta)."""
    return all((step_dir / name).exists() for name in ("_CHECKPOINT_METADATA", "state", "meta"))


def _write_error(e: BaseException) -> Optional[str]:
    """Why a write failed, when ``e`` (or what caused it) is an ``OSError`` or tensorstore's RESOURCE_EXHAUSTED
    (a full disk); None for other exceptions."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e.strerror or str(e)
        if "RESOURCE_EXHAUSTED" in str(e) or "No space left" in str(e):
            return "no space left on the device"
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _free_space(path: pathlib.Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


# ---- one trainer per workdir ------------------------------------------------------------------------------------
class WorkdirLocked(UserError, RuntimeError):
    """Another process is training in this workdir; one line in main.py."""


class WorkdirLock:
    """One trainer per workdir: an exclusive ``flock`` on ``<workdir>/train.lock``, which holds the trainer's pid.

    The kernel drops the lock when its process ends, however it ends (kill -9 included), so a stale file never
    blocks. Entering locks an existing lock file without writing anything; ``acquire(create=True)`` (called once the
    checks have passed) creates the workdir and the file if needed and writes this process's pid. Only training
    locks: sampling and evaluation read a workdir that is training. Inert when ``enabled`` is False.
    """

    NAME = "train.lock"

    def __init__(self, workdir, enabled: bool = True):
        self.path = pathlib.Path(workdir).absolute() / self.NAME
        self.enabled = enabled
        self._fd: Optional[int] = None

    def acquire(self, create: bool = True) -> "WorkdirLock":
        if not self.enabled or (not create and not self.path.exists()):
            return self
        if self._fd is None:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise WorkdirLocked(f"workdir {self.path.parent} is in use by another training process "
                                    f"(pid {_lock_holder(self.path)}, lock {self.path}); wait for it to end or "
                                    "stop it, or train in another --workdir") from None
            self._fd = fd
        if create:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire(create=False)

    def __exit__(self, *exc):
        self.release()
        return False


def _lock_holder(path: pathlib.Path) -> str:
    """The pid holding ``path``'s flock: from /proc/locks (Linux) by inode, else the pid written in the file."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if (len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode)
                        and parts[4] != "0"):  # 0: a pid outside our pid namespace
                    return parts[4]
    except (OSError, IndexError):
        pass
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


# ---- signals ----------------------------------------------------------------------------------------------------
_ACTIVE_STOPS: list = []   # the StopSignal contexts entered, innermost last


class Stopped(SystemExit):
    """A long job stopped by SIGTERM/SIGINT between two batches: exits with 128 + signal number and, once it leaves
    the outermost ``StopSignal``, prints ``message`` as one line (no traceback). Callers may extend ``message``
    (e.g. with the partial output they kept) before re-raising."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + int(signum))
        self.signum, self.message, self.reported = int(signum), message, False


def stop_requested() -> Optional[int]:
    """The signal number that asked the innermost active ``StopSignal`` to stop, else None."""
    return _ACTIVE_STOPS[-1].signum if _ACTIVE_STOPS else None


class StopSignal:
    """Context manager turning SIGTERM/SIGINT into a flag that loops poll: training saves a checkpoint and exits,
    ``Progress.update`` raises ``Stopped`` after the current batch.

    A second signal while the flag is set: with ``hard_exit`` (command-line entry points: main.py, the reproduce
    scripts; None inherits it from an enclosing StopSignal) the process exits at once (one line, exit code
    128 + signal, no traceback, no hang on background threads); otherwise a second SIGINT raises
    ``KeyboardInterrupt`` (Python sessions). Outside the main thread (where handlers cannot be installed) it is
    inert. On leaving the outermost one, a ``Stopped`` exception's message is printed once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, action: str = "stopping after this batch", hard_exit: Optional[bool] = None):
        self.signum: Optional[int] = None
        self.action, self.hard_exit = action, hard_exit
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            if self.hard_exit:
                print(f"received {signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
        self.signum = signum
        again = "exit at once" if self.hard_exit else "interrupt"
        print(f"received {signal.Signals(signum).name}: {self.action} (send it again to {again})", flush=True)

    def __enter__(self):
        if self.hard_exit is None:
            self.hard_exit = bool(_ACTIVE_STOPS and _ACTIVE_STOPS[-1].hard_exit)
        if threading.current_thread() is threading.main_thread():
            # a signal ignored by whoever started us (``nohup``, ``cmd &`` in a script) stays ignored
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                              if signal.getsignal(s) is not signal.SIG_IGN}
        _ACTIVE_STOPS.append(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self in _ACTIVE_STOPS:
            _ACTIVE_STOPS.remove(self)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if isinstance(exc, Stopped) and not exc.reported and not _ACTIVE_STOPS:
            exc.reported = True
            print(exc.message, file=sys.stderr, flush=True)
        return False


class DeferStops:
    """Inside, ``stop_requested()`` is None: work that every process must finish together (a signal may reach only
    some processes) is not cut short by ``Progress``; the enclosing loop handles the stop afterwards."""

    signum, hard_exit = None, False

    def __enter__(self):
        _ACTIVE_STOPS.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE_STOPS.remove(self)
        return False


class Progress:
    """A per-batch progress line with ETA (``sampling batch 3/10, 12.1 s/batch, ETA 1m25s``) for long jobs, printed
    at most every ``min_interval`` seconds (always for the first and last batch) by process 0. The first batch
    includes compiling; the rate excludes it once a second batch is done. ``total`` None: no ETA. ``update()``
    raises ``Stopped`` when a ``StopSignal`` has been triggered, so a job stops within one batch."""

    def __init__(self, what: str, total: Optional[int], unit: str = "batch", detail: str = "",
                 min_interval: float = 2.0, enabled: Optional[bool] = None, compiles: bool = True):
        self.what, self.unit, self.min_interval = what, unit, min_interval
        self.total = None if total is None else max(int(total), 1)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.done, self.t0, self.t_first, self.t_printed = 0, time.time(), None, 0.0
        plural = "" if self.total == 1 else ("es" if unit.endswith("h") else "s")
        count = "" if self.total is None else f"{self.total} {unit}{plural}"
        head = ", ".join(p for p in (count, detail) if p)
        self.compiles = compiles   # False: the caller says when (and whether) it compiles
        note = f"; compiling on the first {unit}..." if compiles else ""
        self._print(f"{what}{': ' + head if head else ''}{note}")

    def _print(self, line: str):
        if self.enabled:
            print(line, flush=True)

    def seconds_per_unit(self) -> float:
        """Seconds of one batch after the first (the first, which includes compiling, while it is the only one)."""
        now = time.time()
        if self.done > 1:
            return (now - self.t_first) / (self.done - 1)
        return (now - self.t0) / max(self.done, 1)

    def update(self, n: int = 1):
        """Count ``n`` finished batches; print the line; raise ``Stopped`` if a stop was requested."""
        self.done += n
        now = time.time()
        if self.t_first is None:
            self.t_first = now
        of = "" if self.total is None else f"/{self.total}"
        if self.done == n or self.done == self.total or now - self.t_printed >= self.min_interval:
            rate = self.seconds_per_unit()
            first = " (incl. compiling)" if self.compiles and self.done == n and self.done != self.total else ""
            left = None if self.total is None else self.total - self.done
            eta = f", ETA {'at most ' if first else ''}{_duration(rate * left)}" if left else ""
            self._print(f"{self.what} {self.unit} {self.done}{of}, {rate:.1f} s/{self.unit}{first}{eta}")
            self.t_printed = now
        signum = stop_requested()
        if signum is not None and self.done != self.total:
            raise Stopped(signum, f"stopped by {signal.Signals(signum).name}: {self.what} ended after {self.unit} "
                                  f"{self.done}{of}")


# ---- logging ----------------------------------------------------------------------------------------------------
def device_memory() -> dict:
    """``{"peak_memory_gb": ...}``: the most memory any local accelerator has held (empty on CPU, which has no
    such statistics)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return {"peak_memory_gb": max(peaks) / 2**30} if peaks else {}


class MetricLogger:
    """Every ``log_freq`` steps: metrics as JSON lines (``metrics.jsonl``), TensorBoard scalars
    (``tensorboard/``: loss, lr, grad_norm, steps_per_s, samples_per_s, ...) and a console line with ETA.
    Time spent on periodic work (sample grids, evaluation; ``exclude``) is kept out of the step rate, and the ETA
    adds ``pending(step, measured, seconds_per_step)``: the seconds of such work still to come, given the last
    measured time of each kind (``timed``). Inert when ``enabled`` is False (processes other than 0)."""

    def __init__(self, workdir: pathlib.Path, n_iters: int, start_step: int, log_freq: int = 50,
                 enabled: bool = True, tensorboard: bool = True, pending: Optional[Callable] = None):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.n_iters, self.log_freq, self.enabled = n_iters, max(int(log_freq), 1), enabled
        self.t0, self.step0, self.excluded = time.time(), start_step, 0.0
        self.pending, self.measured, self.t_init = pending, {}, time.time()
        self.writer = None
        if enabled:
            drop_records_after(self.path, start_step)
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the events of steps a resumed run computes again
            self.writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), flush_secs=30,
                                        purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict, batch_size: int, force: bool = False):
        if not self.enabled or (step % self.log_freq and step != self.n_iters and not force):
            return
        elapsed = max(time.time() - self.t0 - self.excluded, 1e-9)
        rate = (step - self.step0) / elapsed
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "steps_per_s": rate,
                  "samples_per_s": rate * batch_size, "time": time.time(), **device_memory()}
        self._write(record, "train")
        print(f"step {step}/{self.n_iters}  loss {record['loss']:.4f}  grad_norm {record.get('grad_norm', 0):.3f}"
              f"  lr {record.get('lr', float('nan')):.2e}  {rate:.1f} it/s  {rate * batch_size:.0f} samples/s"
              f"  ETA {self.eta(step, rate)}", flush=True)

    def eta(self, step: int, rate: float) -> str:
        """Remaining steps at ``rate`` plus the pending periodic work, e.g. ``4m10s (incl. 1m05s sampling/eval)``."""
        if not rate > 0:
            return "?"
        steps_s = (self.n_iters - step) / rate
        extra = self.pending(step, self.measured, 1.0 / rate) if self.pending is not None else 0.0
        return _duration(steps_s + extra) + (f" (incl. {_duration(extra)} sampling/eval)" if extra >= 1 else "")

    def _write(self, record: dict, section: str):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{section}/{k}", v, record["step"])

    def log_eval(self, step: int, metrics: dict, seconds: float):
        """Periodic evaluation: a ``metrics.jsonl`` line (``"kind": "eval"``), ``eval/<name>`` scalars, a console
        line; ``seconds`` is remembered for the ETA."""
        self.timed("eval", seconds)
        if not self.enabled:
            return
        self._write({"step": step, **{k: float(v) for k, v in metrics.items()}, "eval_seconds": seconds,
                     "kind": "eval", "time": time.time()}, "eval")
        figures = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "eval_examples")
        print(f"eval at step {step}: {figures}  ({metrics.get('eval_examples', '?')} held-out examples, "
              f"{seconds:.1f}s)", flush=True)

    def exclude(self, seconds: float):
        """Keep ``seconds`` (periodic work) out of the step rate."""
        self.excluded += seconds

    def timed(self, kind: str, seconds: float):
        self.measured[kind] = seconds

    def mark(self, step: int):
        """Measure rates from now and ``step`` on (call after the first step, so compiling is not counted); the
        first call records the first step's time (``measured["first_step"]``, mostly compiling)."""
        self.measured.setdefault("first_step", time.time() - self.t_init)
        self.t0, self.step0, self.excluded = time.time(), step, 0.0

    def image(self, tag: str, grid_png: pathlib.Path, step: int):
        """Add a PNG (e.g. a sample grid) to TensorBoard."""
        if self.writer is None or not pathlib.Path(grid_png).exists():
            return
        from PIL import Image

        img = np.asarray(Image.open(grid_png).convert("RGB"))
        self.writer.add_image(tag, img, step, dataformats="HWC")

    def close(self):
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except OSError as e:  # e.g. a full disk: do not hide the error that ends the run
                log.warning("could not flush TensorBoard events: %s", e)


def drop_records_after(path: pathlib.Path, step: int):
    """Remove the records of steps after ``step`` (and a line cut by a kill) from a JSON-lines log, atomically:
    a run resumed from checkpoint ``step`` logs those steps again, once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
    if len(keep) != len(lines):
        _atomic(path, lambda tmp: pathlib.Path(tmp).write_text("".join(f"{line}\n" for line in keep)))


def _record_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ---- pictures ---------------------------------------------------------------------------------------------------
def save_image_grid(images: np.ndarray, path, ncol: Optional[int] = None, scale: int = 4):
    """Tile uint8 images (N, H, W, C) into one PNG, each image upscaled ``scale``× (nearest)."""
    from PIL import Image

    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    _atomic(path, lambda tmp: pil.save(tmp, format="PNG"), suffix=".png")


def save_images(images: np.ndarray, directory, scale: int = 1):
    """One PNG per uint8 image (N, H, W, C): ``<directory>/000000.png``, ..."""
    from PIL import Image

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(np.asarray(images)):
        img = np.repeat(np.repeat(img, scale, 0), scale, 1)
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        _atomic(directory / f"{i:06d}.png", lambda tmp: pil.save(tmp, format="PNG"), suffix=".png")


def save_scatter(x: np.ndarray, path, reference: Optional[np.ndarray] = None, title: str = ""):
    """Scatter plot of 2-D points (first two coordinates), optionally over reference (real) data, with a legend
    and ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, c="tab:gray", label="real data (held out)")
    ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    if reference is not None:
        ax.legend(loc="upper right", fontsize=7, markerscale=4)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), suffix=".png")
    plt.close(fig)


def hatch_unknown(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, C) with the pixels where ``mask`` (H, W, C or broadcastable) is 0 drawn as a
    gray checkerboard, so the unknown region of an inpainting input is visible."""
    images = np.array(images, copy=True)
    h, w = images.shape[1:3]
    checker = np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2, 96, 176).astype(np.uint8)
    unknown = np.broadcast_to(np.asarray(mask) <= 0, images.shape[1:])
    fill = np.broadcast_to(checker[..., None], images.shape[1:])
    images[:, unknown] = fill[unknown]
    return images


# ---- compilation cache and start-up time -----------------------------------------------------------------------
CACHE_ENV = "SCORE_SDE_JAX_CACHE"
# programs that compile faster than this are not written to the cache (jax's own variable may override it)
CACHE_MIN_COMPILE_S = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0.2))
_IMPORTED_AT = time.time()
_cache_events = {"hits": 0, "misses": 0}


def compilation_cache_dir(setting: Optional[str] = None) -> Optional[pathlib.Path]:
    """The persistent compilation cache directory: ``setting`` (a directory, or "off"), else
    ``$SCORE_SDE_JAX_CACHE`` (the same), else ``$XDG_CACHE_HOME/score_sde_jax/jax_cache`` (``~/.cache/...``).
    None when off."""
    setting = setting or os.environ.get(CACHE_ENV) or "default"
    if setting.strip().lower() in ("off", "none", "false", "0"):
        return None
    if setting == "default":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return pathlib.Path(base) / "score_sde_jax" / "jax_cache"
    return pathlib.Path(setting).expanduser().absolute()


def enable_compilation_cache(setting: Optional[str] = None) -> Optional[pathlib.Path]:
    """Turn on JAX's persistent compilation cache in ``compilation_cache_dir(setting)`` (a second run of the same
    programs loads them instead of compiling). Entries are keyed by the program, the compiler options, the jax
    version and the device, so a stale entry is never used; several processes may share the directory (a reader
    that meets an entry being written recompiles). Returns the directory, or None when off or not writable (then
    it says so in one line and runs without a cache)."""
    path = compilation_cache_dir(setting)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        print(f"compilation cache {path} is unusable ({e}); running without it (--compilation_cache=off or "
              f"${CACHE_ENV}=off silences this)", flush=True)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    _count_cache_events()
    return path


def _count_cache_events():
    """Count persistent-cache hits and misses from jax's monitoring events (registered once)."""
    if _cache_events.get("registered"):
        return
    names = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}

    def listener(event, **kwargs):
        if event in names:
            _cache_events[names[event]] += 1

    jax.monitoring.register_event_listener(listener)
    _cache_events["registered"] = True


def compilation_cache_hits() -> int:
    """Programs loaded from the persistent compilation cache so far in this process."""
    return _cache_events["hits"]


def process_age() -> float:
    """Seconds since this process started (from /proc where available, else since this module was imported)."""
    try:
        ticks = float(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
        return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED_AT
