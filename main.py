"""Entry point: ``python main.py --config=configs/default.py --workdir=/tmp/run [--mode=train]``.

Any config field can be overridden on the command line, e.g. ``--config.training.n_iters=200``.
"""
import importlib
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

MODES = {
    "train": "run_lib:train",
    "eval": "run_lib:evaluate",
    "sample": "run_lib:sample",
    "likelihood": "likelihood:run",
    "fid_stats": "evaluation:run_fid_stats",
    "convert": "convert:run",
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/...)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, samples and metrics")
flags.DEFINE_string("mode", "train", f"one of {sorted(MODES)}")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 (jax.distributed)")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: index of this process")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_mode(mode: str):
    if mode not in MODES:
        raise app.UsageError(f"unknown --mode={mode!r}; valid modes: {sorted(MODES)}")
    module, fn = MODES[mode].split(":")
    return getattr(importlib.import_module(module), fn)


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    run = resolve_mode(FLAGS.mode)
    import utils

    utils.check_workdir_writable(FLAGS.workdir)
    if FLAGS.coordinator_address or FLAGS.num_processes:
        import jax

        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    run(FLAGS.config, FLAGS.workdir)


def _run():
    """Parse flags, turning config-flag errors (unknown key, bad value) into one clear line."""
    try:
        app.run(main)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, PermissionError,
            FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _run()
