"""Entry point: ``python main.py --config=configs/default.py --workdir=/tmp/run [--mode=train]``.

Any config field can be overridden on the command line, e.g. ``--config.training.n_iters=200``;
``--mode=describe`` lists every field with its help and valid range, and the sampler methods with their options.
Flags and the config are parsed and checked (``configs/checks.py``) before JAX or any mode is imported, so a
bad command line fails in a fraction of a second and writes nothing. Errors are one line ("error: ..."), exit
status 2; ``SCORE_DEBUG=1`` shows the traceback instead.

On a workdir that holds a ``config.json``, ``--config`` may be omitted (training resumes, other modes run with the
saved config), and the modes sample|eval|likelihood|fid_stats always start from the saved config: only the
command-line ``--config.x=y`` overrides apply on top of it.
"""
import importlib
import logging
import os
import sys
import threading

from absl import app, flags
from ml_collections import config_flags

from configs import checks

# mode -> its runner ``fn(experiment, workdir)`` as "module:function" (imported after the checks: JAX is slow to
# import). ``main`` builds the ``experiment.Experiment`` once and passes it.
MODES = {
    "train": "run_lib:train",
    "eval": "run_lib:evaluate",
    "sample": "run_lib:sample",
    "likelihood": "run_lib:likelihood",
    "fid_stats": "run_lib:fid_stats",
    "eval_samples": "run_lib:eval_samples",
    "convert": "convert:run",
    "describe": None,
}
NEEDS_TRAINED_WORKDIR = ("sample", "eval", "likelihood")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/...[:arg]); override any field "
                                "with --config.<section>.<key>=value (list them with --mode=describe)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, samples and metrics")
flags.DEFINE_string("mode", "train", f"one of {sorted(MODES)}")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 (jax.distributed); "
                    "default $JAX_COORDINATOR_ADDRESS")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes; default $JAX_NUM_PROCESSES")
flags.DEFINE_integer("process_id", None, "multi-host: index of this process; default $JAX_PROCESS_ID")
flags.DEFINE_string("compilation_cache", None, "directory of the persistent compilation cache, or 'off'; default "
                    "$SCORE_SDE_JAX_CACHE, else ~/.cache/score_sde_jax/jax_cache (under $XDG_CACHE_HOME if set)")


class _ConfigFileParser(flags.ArgumentParser):
    """``--config=file[:arg]``: loaded once by ``checks.load_config_file`` (one-line errors), and the keys of the
    ``--config.a.b=`` overrides checked against it ("unknown config key ... (did you mean ...?)"); then locked."""

    overrides: tuple = ()

    def parse(self, argument):
        config = checks.load_config_file(argument)
        checks.check_override_keys(config, self.overrides)
        config.lock()
        return config

    def flag_type(self):
        return "config object"


FLAGS["config"].parser = _ConfigFileParser()


def config_overrides() -> list:
    """Field paths set on the command line (``--config.sampling.eta=0.5`` -> "sampling.eta")."""
    return list(FLAGS["config"].parser.overrides)


def parse_flags(argv):
    """absl's flag parsing with every error as a ``UserError`` (one line, no usage dump)."""
    FLAGS["config"].parser.overrides = tuple(checks.override_paths(FLAGS.read_flags_from_files(argv[1:],
                                                                                                force_gnu=False)))
    try:
        return FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        if str(e.flagname).startswith("config.") and FLAGS["config"].value is None:
            raise checks.UserError(f"--{e.flagname} overrides a field of the config: give --config=<file> "
                                   f"first") from e
        raise checks.UserError(str(e)) from e
    except flags.Error as e:
        raise checks.UserError(str(e)) from e


def resolve_mode(mode: str):
    """The runner ``fn(experiment, workdir)`` of ``mode``; imports its module (and JAX)."""
    if mode not in MODES:
        raise checks.UserError(f"unknown --mode={mode!r}; valid modes: {sorted(MODES)}")
    module, fn = MODES[mode].split(":")
    return getattr(importlib.import_module(module), fn)


def check_command_line(mode: str, config, workdir) -> None:
    """Everything about the command line that can be refused before importing a mode: the mode, the required
    flags, the config's rules, and a workdir that the mode needs to exist."""
    if mode not in MODES:
        raise checks.UserError(f"unknown --mode={mode!r}; valid modes: {sorted(MODES)}")
    if config is None:
        raise checks.UserError("--config is required, e.g. --config=configs/default.py (or a --workdir with a "
                               "config.json)")
    if not workdir:
        raise checks.UserError("--workdir is required (where checkpoints, samples and metrics go)")
    checks.validate(config, mode, config_overrides())
    if mode in NEEDS_TRAINED_WORKDIR and not os.path.isdir(workdir):
        raise checks.UserError(f"workdir {workdir} does not exist; --mode={mode} reads a trained workdir "
                               f"(make one with --mode=train or --mode=convert)")
    if mode in NEEDS_TRAINED_WORKDIR and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise checks.UserError(f"workdir {workdir} has no checkpoints/; --mode={mode} reads a trained workdir "
                               f"(make one with --mode=train or --mode=convert)")


def main(argv):
    if len(argv) > 1:
        raise checks.UserError(f"unexpected argument(s) {' '.join(argv[1:])} (flags are --name=value)")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)   # "Unable to initialize backend 'tpu'"
    if FLAGS.mode == "describe":
        print(describe(FLAGS.config))
        return
    check_command_line(FLAGS.mode, FLAGS.config, FLAGS.workdir)
    run = resolve_mode(FLAGS.mode)
    import utils

    utils.check_workdir_writable(FLAGS.workdir)
    utils.enable_compilation_cache(FLAGS.compilation_cache)
    config = FLAGS.config
    if FLAGS.mode in utils.WORKDIR_MODES:   # the saved config.json is the base, command-line overrides on top
        overrides = {path: checks.get(config, path) for path in config_overrides()}
        config = utils.workdir_config(FLAGS.workdir, config, overrides)
        checks.validate(config, FLAGS.mode, config_overrides())
    init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    with utils.StopSignal(hard_exit=True):
        run(build_experiment(config), FLAGS.workdir)


def build_experiment(config):
    """The ``experiment.Experiment`` of ``config``, built once for the mode (after ``jax.distributed``)."""
    import experiment

    return experiment.Experiment.from_config(config)


def describe(config) -> str:
    """``--mode=describe``: the fields of ``config`` (default: ``configs/base.py``) with help and ranges."""
    if config is None:
        from configs.base import get_base_config

        config = get_base_config()
    else:
        checks.validate(config, None, config_overrides())
    return checks.describe(config)


def init_distributed(address=None, num_processes=None, process_id=None):
    """``jax.distributed.initialize`` from the flags, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; nothing when neither names a coordinator or a process count (single process)."""
    address = address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if not address and not num_processes:
        return
    import jax

    jax.distributed.initialize(address, num_processes, process_id)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
          f"{jax.device_count()} in all", flush=True)


# ---- errors and noise -------------------------------------------------------------------------------------------
# Errors of the modes' own checks that are one clear line (unknown registry names, shapes, missing checkpoints).
ONE_LINE_ERRORS = (checks.UserError, OSError, flags.Error, KeyError, ValueError, TypeError, AttributeError,
                   FloatingPointError)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a KeyError's key without quotes, newlines folded)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, OSError) and not isinstance(e, checks.UserError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(text.split()) or type(e).__name__


def _is_event_loop_noise(message) -> bool:
    return "Event loop is closed" in str(message)


def quiet_known_noise() -> None:
    """Drop orbax's "RuntimeError: Event loop is closed" reports (from tasks of its closed event loops, after a
    failed restore or at exit) and nothing else: in finalisers, background threads and the asyncio log."""
    default_hook, default_thread_hook = sys.unraisablehook, threading.excepthook

    def hook(unraisable):
        if not _is_event_loop_noise(unraisable.exc_value):
            default_hook(unraisable)

    def thread_hook(args):
        if not _is_event_loop_noise(args.exc_value):
            default_thread_hook(args)

    sys.unraisablehook, threading.excepthook = hook, thread_hook

    class _Filter(logging.Filter):
        def filter(self, record):
            return not (_is_event_loop_noise(record.getMessage()) or
                        (record.exc_info and _is_event_loop_noise(record.exc_info[1])))

    logging.getLogger("asyncio").addFilter(_Filter())
def workdir_config_argv(argv: list) -> list:
    """``argv`` with ``--config=configs/workdir.py:<workdir>`` added when ``--config`` is missing and the workdir
    holds a config.json, so the saved config is loaded and ``--config.x=y`` overrides apply to it."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    pairs = zip(argv, argv[1:] + [None])
    workdir = next((a.split("=", 1)[1] if a.startswith("--workdir=") else b for a, b in pairs
                    if a.startswith("--workdir=") or a == "--workdir"), None)
    if workdir is None or not os.path.isfile(os.path.join(workdir, "config.json")):
        return argv
    loader = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "workdir.py")
    return argv[:1] + [f"--config={loader}:{workdir}"] + argv[1:]


def _run():
    """Parse flags and run the mode; a user error is one line on stderr and exit status 2."""
    quiet_known_noise()
    try:
        app.run(main, argv=workdir_config_argv(sys.argv), flags_parser=parse_flags)
    except BrokenPipeError:   # output piped into a reader that stopped (| head)
        sys.stderr.close()
        sys.exit(1)
    except ONE_LINE_ERRORS as e:
        if os.environ.get("SCORE_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _run()
