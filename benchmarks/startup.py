"""Time to the first training step, cold and warm: process start -> first step done, in phases.

    python benchmarks/startup.py                              # both configs, this checkout, 3 repeats
    python benchmarks/startup.py --repo /path/to/other/checkout --label before   # the same on another checkout
    python benchmarks/startup.py --configs small --repeats 5 --json out.json

Each run is a fresh process that does what ``run_lib.train`` does before its first step, timing each phase:

- import: interpreter start -> ``experiment`` (older checkouts: ``run_lib``) imported (jax, flax, optax, orbax,
  the project);
- init: the experiment, the initial train state (``experiment.init_train_state``) placed on the mesh;
- compile: the sharded train step compiled for the first batch, after the init as in ``run_lib.train``
  (``--background``: in a thread started before the init, ``experiment.compile_step_in_background``; then only the
  wait that does not overlap the init shows here);
- first step: that step run once (blocking).

``small`` is ``configs/default.py`` (8x8 digits, small U-Net, batch 128, real data through ``train_batches``);
``ddpmpp_small`` is the DDPM++ cont. architecture at nf=32, ch_mult (1, 2), one block per level (749,891
parameters), batch 8, on a synthetic batch (``benchmarks/train_throughput.py``'s ``cifar10_reduced``).
Cold: an empty compilation-cache directory; warm: the same directory again, right after. When the checkout has
``utils.enable_compilation_cache`` (what ``main.py`` calls), the worker enables it on that directory; an older
checkout runs without one, so its cold and warm runs differ only by the operating system's file cache.
The baseline is a torch-free, project-free process: ``import jax`` and one jitted op (``BASELINE``); the ratio
column divides each time to the first step by it, which also makes runs on a loaded machine comparable.
Times are medians over ``--repeats`` (cold, warm) pairs; CPU seconds (user + system) are reported beside the wall
seconds, as other processes on a shared machine stretch wall time but not CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BASELINE = "import jax, jax.numpy as jnp; jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()"
CONFIGS = {"small": ("small", None), "ddpmpp_small": ("cifar10_reduced", 8)}
PHASES = ("import", "init", "compile", "first_step")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args) -> dict:
    """Run in a fresh process: the phases of training up to the first step; absolute times and CPU seconds."""
    marks = {"start": args.t0}
    cpu = {}
    sys.path.insert(0, args.repo)
    import jax
    import numpy as np

    try:
        import experiment as lib   # the composition module (issue 20); older checkouts: run_lib
    except ImportError:
        import run_lib as lib
    import utils

    marks["import"], cpu["import"] = time.time(), _cpu()
    if hasattr(utils, "enable_compilation_cache"):
        utils.enable_compilation_cache(args.cache_dir)
    sys.path.insert(1, str(REPO))
    from benchmarks.train_throughput import get_config

    name, batch = CONFIGS[args.config]
    config = get_config(name, batch, "float32")
    exp = lib.Experiment.from_config(config)
    mesh = lib.make_mesh()
    step = lib.jit_sharded_step(lib.make_train_step(exp.loss_fn(), exp.optimizer, config.model.ema_rate,
                                                    config.seed), mesh)
    background = hasattr(lib, "compile_step_in_background") and args.background
    if background:  # the step compiles in a thread while the state is built (run_lib.train does not)
        compiling = (lib.compile_step_in_background(step, exp) if lib.__name__ == "experiment" else
                     lib.compile_step_in_background(step, config, exp, mesh))
    state = lib.replicate(lib.init_train_state(config, exp.model, exp.optimizer, exp.data_shape), mesh)
    jax.block_until_ready(state)
    marks["init"], cpu["init"] = time.time(), _cpu()
    if args.config == "small":
        batch = next(lib.train_batches(config, mesh))
    else:
        b = config.training.batch_size
        batch = lib.shard_batch({"x": np.zeros((b,) + exp.data_shape, np.float32),
                                 "label": np.zeros(b, np.int32)}, mesh)
    options = lib.step_compiler_options() if hasattr(lib, "step_compiler_options") else None
    compiled = compiling.future.result() if background else step.lower(state, batch).compile(options)
    marks["compile"], cpu["compile"] = time.time(), _cpu()
    state, metrics = compiled(state, batch)
    jax.device_get(metrics)
    marks["first_step"], cpu["first_step"] = time.time(), _cpu()
    return {"marks": marks, "cpu": cpu}


def run_worker(repo: str, config: str, cache_dir: str, background: bool = False) -> dict:
    """One fresh process; wall seconds and CPU seconds per phase, and the total."""
    t0 = time.time()
    cmd = [sys.executable, __file__, "--worker", f"--repo={repo}", f"--config={config}", f"--cache_dir={cache_dir}",
           f"--t0={t0!r}"] + (["--background"] if background else [])
    env = dict(os.environ, SCORE_SDE_JAX_CACHE=cache_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker failed ({config}, {repo}): {proc.stderr.strip()[-800:]}")
    rec = json.loads(lines[-1])
    marks, cpu = rec["marks"], rec["cpu"]
    times = ["start"] + list(PHASES)
    wall = {p: marks[p] - marks[q] for q, p in zip(times, times[1:])}
    cpu_phase = {p: cpu[p] - (cpu[q] if q in cpu else 0.0) for q, p in zip(times, times[1:])}
    return {"wall": wall, "cpu": cpu_phase, "total": marks["first_step"] - marks["start"],
            "total_cpu": cpu["first_step"]}


def baseline() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", BASELINE], check=True, capture_output=True)
    return time.time() - t0


def _median_record(records: list) -> dict:
    med = lambda xs: statistics.median(xs)
    return {"wall": {p: med([r["wall"][p] for r in records]) for p in PHASES},
            "cpu": {p: med([r["cpu"][p] for r in records]) for p in PHASES},
            "total": med([r["total"] for r in records]), "total_cpu": med([r["total_cpu"] for r in records]),
            "totals": [round(r["total"], 2) for r in records]}


def measure(repo: str, config: str, repeats: int, background: bool = False) -> dict:
    """``repeats`` (cold, warm) pairs, each on a new empty cache directory; the baseline between them."""
    cold, warm, base = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="startup_cache_") as cache:
            base.append(baseline())
            cold.append(run_worker(repo, config, cache, background))
            warm.append(run_worker(repo, config, cache, background))
    return {"cold": _median_record(cold), "warm": _median_record(warm), "baseline": statistics.median(base)}


def print_table(label: str, results: dict):
    print(f"\n{'checkout':10s} {'config':13s} {'cache':5s} " + " ".join(f"{p:>11s}" for p in PHASES)
          + f" {'total s':>8s} {'CPU s':>6s} {'baseline':>8s} {'ratio':>6s}")
    for config, r in results.items():
        for kind in ("cold", "warm"):
            m = r[kind]
            print(f"{label:10s} {config:13s} {kind:5s} " + " ".join(f"{m['wall'][p]:11.1f}" for p in PHASES)
                  + f" {m['total']:8.1f} {m['total_cpu']:6.1f} {r['baseline']:8.2f} {m['total'] / r['baseline']:6.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,ddpmpp_small", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--repo", default=str(REPO), help="checkout to measure (default: this one)")
    p.add_argument("--label", default="this", help="name of the checkout in the table")
    p.add_argument("--repeats", type=int, default=3, help="(cold, warm) pairs; medians are reported")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--background", action="store_true",
                   help="compile the train step in a thread beside the init (run_lib.train does not)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    results = {}
    for config in args.configs.split(","):
        if config not in CONFIGS:
            raise SystemExit(f"unknown --configs entry {config!r}; valid: {sorted(CONFIGS)}")
        results[config] = measure(str(pathlib.Path(args.repo).resolve()), config, args.repeats, args.background)
        print(json.dumps({"label": args.label, "config": config, **results[config]}), flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs; wall seconds "
          f"per phase, medians of {args.repeats}; ratio = total / baseline ({BASELINE!r})")
    print_table(args.label, results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"label": args.label, "results": results}, indent=1))


if __name__ == "__main__":
    main()
