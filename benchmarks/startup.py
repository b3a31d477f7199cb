"""Time to the first training step, cold and warm: process start -> first step done, in phases.

    python benchmarks/startup.py                              # both configs and main.py, this checkout, 3 repeats
    python benchmarks/startup.py --repo /path/to/other/checkout --label before   # the same on another checkout
    python benchmarks/startup.py --configs small --repeats 5 --json out.json
    python benchmarks/startup.py --pythonpath /tmp/ml_dtypes_0.7 ...   # shadow installed packages (e.g. the
                                                                       # versions an older checkout resolved to)

Each run is a fresh process that does what ``run_lib.train`` does before its first step, timing each phase:

- import: interpreter start -> ``run_lib`` (what ``main.py`` imports for training) and ``experiment`` imported;
- init: the experiment, the initial train state placed on the mesh (and the first batch read);
- compile: the rest of the train step's compilation for that batch;
- first step: that step run once (blocking).

The worker follows the checkout's own order: where ``experiment.initial_state_in_background`` exists (issue 21), as
``run_lib.train`` does on a fresh run, the initial state compiles in one thread while the train step is traced
and then compiled in another (``experiment.compile_step_in_background``), so the init phase overlaps most of the
compilation and "compile" is what remains of it; older checkouts build the state, then compile the step.

``small`` is ``configs/default.py`` (8x8 digits, small U-Net, batch 128, real data through ``train_batches``);
``ddpmpp_small`` is the DDPM++ cont. architecture at nf=32, ch_mult (1, 2), one block per level (749,891
parameters), batch 8, on a synthetic batch (``benchmarks/train_throughput.py``'s ``cifar10_reduced``).
``main.py`` (with ``--main``, the default; configs/default.py only) runs ``python main.py --config=configs/default.py
--config.training.n_iters=1`` itself and times launch -> its "step 1/1" line, which it prints right after the
first step: everything a user waits for, flag parsing, checks and checkpoint set-up included; its phases are read
from the "first step after" line where the checkout prints one.
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
import re
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

    import run_lib  # noqa: F401  (what main.py imports for --mode=train)
    try:
        import experiment as lib   # the composition module (issue 20); older checkouts: run_lib
    except ImportError:
        lib = run_lib
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
    batch = first_batch(lib, args.config, config, exp, mesh)
    if hasattr(lib, "initial_state_in_background"):   # run_lib.train's order on a fresh run since issue 21
        initial = lib.initial_state_in_background(exp)
        compiling = lib.compile_step_in_background(step, exp)
        state = lib.replicate(initial.result(), mesh)
    else:
        compiling = None
        state = lib.replicate(lib.init_train_state(config, exp.model, exp.optimizer, exp.data_shape), mesh)
    jax.block_until_ready(state)
    marks["init"], cpu["init"] = time.time(), _cpu()
    options = lib.step_compiler_options() if hasattr(lib, "step_compiler_options") else None
    compiled = compiling.future.result() if compiling else step.lower(state, batch).compile(options)
    marks["compile"], cpu["compile"] = time.time(), _cpu()
    state, metrics = compiled(state, batch)
    jax.device_get(metrics)
    marks["first_step"], cpu["first_step"] = time.time(), _cpu()
    return {"marks": marks, "cpu": cpu}


def first_batch(lib, name: str, config, exp, mesh) -> dict:
    """The first global batch: real digits for ``small``, a synthetic one for ``ddpmpp_small``."""
    if name == "small":
        stream = lib.train_batches(config, mesh)
        batch = next(stream)
        stream.close()
        return batch
    import numpy as np

    b = config.training.batch_size
    return lib.shard_batch({"x": np.zeros((b,) + exp.data_shape, np.float32), "label": np.zeros(b, np.int32)}, mesh)


def environment(cache_dir: str, pythonpath: str = "") -> dict:
    env = dict(os.environ, SCORE_SDE_JAX_CACHE=cache_dir)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH", "")]))
    return env


def run_worker(repo: str, config: str, cache_dir: str, pythonpath: str = "") -> dict:
    """One fresh process; wall seconds and CPU seconds per phase, and the total."""
    t0 = time.time()
    cmd = [sys.executable, __file__, "--worker", f"--repo={repo}", f"--config={config}", f"--cache_dir={cache_dir}",
           f"--t0={t0!r}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=environment(cache_dir, pythonpath))
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


FIRST_STEP_LINE = re.compile(r"first step after [0-9.]+ s \(import ([0-9.]+) s, init ([0-9.]+) s, "
                             r"compile ([0-9.]+) s[^,]*, step ([0-9.]+) s\)")


def run_main(repo: str, cache_dir: str, pythonpath: str = "") -> dict:
    """``python main.py`` on configs/default.py for one step in a fresh workdir: wall seconds from launch to its
    "step 1/1" line (printed right after the first step), its CPU seconds then, and its own phases if printed."""
    with tempfile.TemporaryDirectory(prefix="startup_workdir_") as workdir:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "main.py", "--config=configs/default.py", f"--workdir={workdir}",
                                 "--config.training.n_iters=1", "--config.training.snapshot_sampling=False"],
                                cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=environment(cache_dir, pythonpath))
        phases, total = None, None
        for line in proc.stdout:
            match = FIRST_STEP_LINE.search(line)
            if match:
                phases = [float(v) for v in match.groups()]
            if line.startswith("step 1/1"):
                total = time.time() - t0
                break
        cpu = _process_cpu(proc.pid)
        proc.kill()
        proc.wait()
    if total is None:
        raise RuntimeError(f"main.py in {repo} ended without a 'step 1/1' line (exit status {proc.returncode})")
    wall = dict(zip(PHASES, phases)) if phases else {p: float("nan") for p in PHASES}
    return {"wall": wall, "cpu": {p: float("nan") for p in PHASES}, "total": total, "total_cpu": cpu}


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc), NaN elsewhere."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


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


def measure(repo: str, config: str, repeats: int, pythonpath: str = "") -> dict:
    """``repeats`` (cold, warm) pairs, each on a new empty cache directory; the baseline between them.
    ``config`` "main.py" runs ``main.py`` itself (``run_main``), the others the worker."""
    run = (lambda cache: run_main(repo, cache, pythonpath)) if config == "main.py" else \
        (lambda cache: run_worker(repo, config, cache, pythonpath))
    cold, warm, base = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="startup_cache_") as cache:
            base.append(baseline())
            cold.append(run(cache))
            warm.append(run(cache))
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
    p.add_argument("--main", action=argparse.BooleanOptionalAction, default=True,
                   help="also time `python main.py` on configs/default.py (--no-main: not)")
    p.add_argument("--repo", default=str(REPO), help="checkout to measure (default: this one)")
    p.add_argument("--label", default="this", help="name of the checkout in the table")
    p.add_argument("--repeats", type=int, default=3, help="(cold, warm) pairs; medians are reported")
    p.add_argument("--pythonpath", default="", help="prepended to PYTHONPATH of the measured processes")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    configs = [c for c in args.configs.split(",") if c] + (["main.py"] if args.main else [])
    results = {}
    for config in configs:
        if config not in CONFIGS and config != "main.py":
            raise SystemExit(f"unknown --configs entry {config!r}; valid: {sorted(CONFIGS)}")
        results[config] = measure(str(pathlib.Path(args.repo).resolve()), config, args.repeats, args.pythonpath)
        print(json.dumps({"label": args.label, "config": config, **results[config]}), flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs; wall seconds "
          f"per phase, medians of {args.repeats}; ratio = total / baseline ({BASELINE!r}); main.py: phases as "
          "it printed them (nan: it prints none), CPU s of the whole process at its 'step 1/1' line")
    print_table(args.label, results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"label": args.label, "results": results}, indent=1))


if __name__ == "__main__":
    main()
