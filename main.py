"""Entry point: ``python main.py --config=configs/default.py --workdir=/tmp/run [--mode=train]``.

Any config field can be overridden on the command line, e.g. ``--config.training.n_iters=200``.
"""
import importlib
import logging
import os
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
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 (jax.distributed); "
                    "default $JAX_COORDINATOR_ADDRESS")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes; default $JAX_NUM_PROCESSES")
flags.DEFINE_integer("process_id", None, "multi-host: index of this process; default $JAX_PROCESS_ID")
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
    init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    run(FLAGS.config, FLAGS.workdir)


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
