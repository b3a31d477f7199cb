"""GPU smoke run of the accelerator recipes (the published CIFAR-10 configs), run the way users run them.

    python -m benchmarks.reproduce.accelerator_smoke --out=/tmp/smoke [--recipes=ve_deep,vp] [--steps=60]

For each recipe: ``main.py --mode=train`` for ``--steps`` steps at the recipe's batch, architecture, optimiser and
SDE (data: the offline 32×32 RGB colored digits, or the recipe's own CIFAR-10 with ``--data=config``); then the
recipe's own sampler (PC with its predictor/corrector) for ``--sample_steps`` noise levels, timed after
compilation; and for the NLL recipe ``main.py --mode=likelihood`` on ``--lik_examples`` test images. Reports
steps/s, peak device memory, the time of one noise level, and what the full recipe would take at these rates
(its n_iters training steps; 50k samples at N = 1000). These are smoke figures, not the published FID/NLL: those
need the full 1.3 M training steps.

Compiling five 60–110 M parameter models one after the other takes longer than running them, so with
``--passes=2`` (the default) a first pass runs every recipe at once to fill a persistent compilation cache and the
second pass reruns each alone, cache hot: the second pass is the one reported.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[2]

# name -> (config file, published figure, whether the likelihood is part of the recipe)
RECIPES = {
    "ve_deep": ("configs/ve/cifar10_ncsnpp_deep_continuous.py", "FID 2.20", False),
    "ve": ("configs/ve/cifar10_ncsnpp_continuous.py", "FID 2.38", False),
    "vp": ("configs/vp/cifar10_ddpmpp_continuous.py", "FID 2.55", False),
    "subvp": ("configs/subvp/cifar10_ddpmpp_continuous.py", "FID 2.61", False),
    "subvp_deep": ("configs/subvp/cifar10_ddpmpp_deep_continuous.py", "NLL 2.99 bits/dim", True),
}
FULL_SAMPLES, FULL_N = 50_000, 1000
# --tiny: the same recipes shrunk for a CPU test of this script (numbers meaningless)
TINY = {"model.nf": 16, "model.ch_mult": (1, 2), "model.num_res_blocks": 1, "training.batch_size": 8}


# ---- configuration -----------------------------------------------------------------------------------------------
def overrides(args, recipe: str) -> Dict[str, object]:
    """Config fields changed from the recipe: training length, sampling, data source (and --tiny sizes)."""
    batch = args.sample_batch
    out = {"training.n_iters": args.steps, "training.snapshot_freq": args.steps,
           "training.snapshot_sampling": False, "training.log_freq": max(args.steps // 6, 1),
           "sampling.num_steps": args.sample_steps, "sampling.num_samples": batch, "sampling.batch_size": batch,
           "eval.batch_size": min(batch, args.lik_examples), "eval.likelihood.num_examples": args.lik_examples}
    if args.data == "colored_digits":
        out.update({"data.source": "colored_digits", "data.dataset": "colored_digits"})
    if args.tiny:
        out.update(TINY)
    return out


def flag_value(v) -> str:
    return repr(v) if isinstance(v, tuple) else str(v)


def main_py(recipe: str, workdir: pathlib.Path, mode: str, fields: dict) -> List[str]:
    """The ``python main.py ...`` command line of one mode."""
    return [sys.executable, str(ROOT / "main.py"), f"--config={ROOT / RECIPES[recipe][0]}",
            f"--workdir={workdir}", f"--mode={mode}", *(f"--config.{k}={flag_value(v)}" for k, v in fields.items())]


def load_config(recipe: str, fields: dict):
    """The recipe's config with ``fields`` set (what main.py builds from the same command line)."""
    import utils

    config = utils.load_config_file(ROOT / RECIPES[recipe][0])
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# ---- one recipe (child process) ----------------------------------------------------------------------------------
def run_logged(cmd: List[str], log: pathlib.Path) -> float:
    """Run ``cmd`` with its output in ``log``; raise with the log's tail when it fails. Returns the wall time."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[1:4])} ... exited with {rc}; end of {log}:\n{tail}")
    return time.time() - t0


def train_figures(workdir: pathlib.Path, steps: int, batch: int, wall: float) -> dict:
    """Loss, steps/s (after the first, compiling step) and peak memory from ``metrics.jsonl``."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"steps": steps, "batch": batch, "first_loss": records[0]["loss"], "last_loss": last["loss"],
            "steps_per_s": last["steps_per_s"], "peak_memory_gb": last.get("peak_memory_gb"),
            "train_wall_s": round(wall, 1)}


def sample_figures(recipe: str, fields: dict, workdir: pathlib.Path, out: pathlib.Path) -> dict:
    """The recipe's sampler on the trained checkpoint: first call (compile or cache) and a second, timed call."""
    import jax

    import experiment
    import samplers
    import sde_lib
    import utils

    config = load_config(recipe, fields)
    exp = experiment.Experiment.from_config(config)
    ev = experiment.restore_eval_state(exp, str(workdir))
    n, steps = int(config.sampling.num_samples), int(fields["sampling.num_steps"])
    # the recipe's SDE with N = steps noise levels (its discrete predictors follow the chain of sde.N steps)
    short = load_config(recipe, {**fields, "sde.N": steps, "sampling.num_steps": None})
    sde = sde_lib.get_sde(short.sde)
    fn, _ = samplers.build_sampler(sde, exp.model.score_fn(ev.params, sde), (n,) + exp.data_shape,
                                   short.sampling.method, mesh=exp.mesh, **samplers.options_from_config(short.sampling))
    t0 = time.time()
    jax.block_until_ready(fn(jax.random.key(0)))  # compiles (or loads from the cache)
    t1 = time.time()
    x, nfe = jax.block_until_ready(fn(jax.random.key(1)))
    t2 = time.time()
    images = experiment.to_output(exp, jax.device_get(x))
    utils.save_image_grid(images, out / f"samples_{recipe}.png")
    return {"sampler": f"pc {config.sampling.predictor}+{config.sampling.corrector}", "sample_batch": n,
            "sample_steps": steps, "nfe": int(nfe), "first_call_s": round(t1 - t0, 2),
            "sample_s": round(t2 - t1, 3), "s_per_noise_level": (t2 - t1) / steps,
            "sample_peak_memory_gb": utils.device_memory().get("peak_memory_gb"),
            "finite": bool(jax.numpy.isfinite(x).all())}


def likelihood_figures(recipe: str, fields: dict, workdir: pathlib.Path) -> dict:
    wall = run_logged(main_py(recipe, workdir, "likelihood", fields), workdir / "likelihood.log")
    result = json.loads(next((workdir / "likelihood").glob("*.json")).read_text())
    return {"bpd": result["bpd"], "lik_examples": result["num_examples"], "lik_nfe_mean": result["nfe_mean"],
            "lik_wall_s": round(wall, 1), "lik_solver_s": result["wall_time_s"]}


def smoke_one(args, recipe: str, workdir: pathlib.Path, out: pathlib.Path) -> dict:
    """Train, sample and (NLL recipe) evaluate bits/dim for one recipe; the figures as a dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    fields = overrides(args, recipe)
    result = {"recipe": recipe, "config": RECIPES[recipe][0], "published": RECIPES[recipe][1]}
    wall = run_logged(main_py(recipe, workdir, "train", fields), workdir / "train.log")
    result.update(train_figures(workdir, args.steps, load_config(recipe, fields).training.batch_size, wall))
    result.update(sample_figures(recipe, fields, workdir, out))
    if RECIPES[recipe][2]:
        result.update(likelihood_figures(recipe, fields, workdir))
    result.update(projection(load_config(recipe, {}).training.n_iters, result))
    return result


def projection(n_iters: int, r: dict) -> dict:
    """Hours the full recipe (``n_iters`` steps) would take at the measured rates; 50k samples at N = 1000."""
    batches = -(-FULL_SAMPLES // r["sample_batch"])
    return {"full_train_h": n_iters / r["steps_per_s"] / 3600,
            "full_sampling_h": r["s_per_noise_level"] * FULL_N * batches / 3600}


# ---- the two passes (parent process) -----------------------------------------------------------------------------
def child_env(cache: pathlib.Path) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def child_cmd(args, recipe: str, workdir: pathlib.Path) -> List[str]:
    cmd = [sys.executable, "-m", "benchmarks.reproduce.accelerator_smoke", f"--one={recipe}",
           f"--workdir={workdir}", f"--out={args.out}", f"--steps={args.steps}", f"--data={args.data}",
           f"--sample_steps={args.sample_steps}", f"--sample_batch={args.sample_batch}",
           f"--lik_examples={args.lik_examples}"]
    return cmd + (["--tiny"] if args.tiny else [])


def run_pass(args, recipes: List[str], name: str, parallel: bool, deadline: float) -> Dict[str, dict]:
    """Run the recipes' children (all at once or one by one) until done or ``deadline``; their results."""
    out = pathlib.Path(args.out)
    env = child_env(out / "jax_cache")
    results, waves = {}, [recipes] if parallel else [[r] for r in recipes]
    for wave in waves:
        procs = {}
        for r in wave:
            log = open(out / f"{name}_{r}.log", "w")
            procs[r] = subprocess.Popen(child_cmd(args, r, out / name / r), stdout=log, stderr=subprocess.STDOUT,
                                        cwd=ROOT, env=env)
        failed = wait_all(procs, deadline)
        for r in wave:
            path = out / name / r / "smoke.json"
            results[r] = json.loads(path.read_text()) if path.exists() else {
                "recipe": r, "error": failed.get(r, "no result"), "log": str(out / f"{name}_{r}.log")}
        print(f"[{name}] {', '.join(wave)}: " + ", ".join(
            f"{r} {'ok' if 'error' not in results[r] else 'FAILED'}" for r in wave), flush=True)
        if failed:
            break
    return results


def wait_all(procs: dict, deadline: float) -> Dict[str, str]:
    """Wait for every process; on the first failure or at ``deadline`` stop the rest. {recipe: why} of failures."""
    failed = {}
    while procs:
        for r, p in list(procs.items()):
            if p.poll() is not None:
                del procs[r]
                if p.returncode:
                    failed[r] = f"exit {p.returncode}"
        if failed or time.time() > deadline:
            for r, p in procs.items():
                p.kill()
                failed[r] = "stopped: " + ("another recipe failed" if failed else "deadline")
            break
        time.sleep(1)
    return failed


def markdown(results: Dict[str, dict], device: str) -> str:
    header = ["recipe", "published", "steps/s (batch)", "peak GB", "loss first→last", "s per noise level",
              "NFE", "bits/dim (smoke)", "full training h", "50k samples h"]
    rows = []
    for r, x in results.items():
        if "error" in x:
            rows.append([r, RECIPES[r][1], f"failed: {x['error']}"] + [""] * 7)
            continue
        note = f" ({x['note']})" if "note" in x else ""
        rows.append([f"`{x['config']}`{note}", x["published"], f"{x['steps_per_s']:.2f} ({x['batch']})",
                     _gb(x.get("peak_memory_gb")), f"{x['first_loss']:.3g}→{x['last_loss']:.3g}",
                     f"{x['s_per_noise_level'] * 1e3:.1f} ms (batch {x['sample_batch']})", str(x["nfe"]),
                     f"{x['bpd']:.3f} ({x['lik_examples']} ex., {x['lik_nfe_mean']:.0f} NFE)" if "bpd" in x else "",
                     f"{x['full_train_h']:.1f}", f"{x['full_sampling_h']:.1f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return f"Accelerator smoke run on {device}.\n\n" + "\n".join(lines) + "\n"


def _gb(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for logs, workdirs, the compilation cache and results")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {list(RECIPES)}")
    p.add_argument("--steps", type=int, default=60, help="training steps per recipe")
    p.add_argument("--sample_steps", type=int, default=100, help="noise levels of the timed sampling run")
    p.add_argument("--sample_batch", type=int, default=128)
    p.add_argument("--lik_examples", type=int, default=128, help="test images of the NLL recipe's bits/dim")
    p.add_argument("--data", default="colored_digits", choices=("colored_digits", "config"),
                   help="colored_digits: offline 32x32 RGB digits; config: the recipe's own data (CIFAR-10)")
    p.add_argument("--passes", type=int, default=2, choices=(1, 2), help="2: a parallel pass fills the cache")
    p.add_argument("--deadline_s", type=float, default=3600.0, help="stop what still runs after this long")
    p.add_argument("--tiny", action="store_true", help="shrunk models, for testing this script on a CPU")
    p.add_argument("--merge", default=None, help="comma list of earlier runs' accelerator_smoke.json: write one "
                   "table (accelerator_smoke_<device>.md/json in --out) from them instead of running")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    return args


def device_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True) if shutil.which("nvidia-smi") else None
    return out.stdout.strip().splitlines()[0] if out and out.returncode == 0 and out.stdout.strip() else "CPU"


def main(argv: Optional[list] = None) -> Dict[str, dict]:
    args = parse_args(argv)
    out = pathlib.Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    if args.merge:
        return merge_runs(args.merge.split(","), out)
    if args.one:  # child: one recipe
        result = smoke_one(args, args.one, pathlib.Path(args.workdir), out)
        (pathlib.Path(args.workdir) / "smoke.json").write_text(json.dumps(result, indent=1))
        return {args.one: result}
    deadline, recipes = time.time() + args.deadline_s, args.recipes.split(",")
    t0 = time.time()
    if args.passes == 2:
        warm = run_pass(args, recipes, "pass1", parallel=True, deadline=deadline)
        print(f"pass 1 (all at once, filling the compilation cache): {time.time() - t0:.0f} s", flush=True)
        if any("error" in r for r in warm.values()):
            return finish(out, warm, device_name())
        results = run_pass(args, recipes, "pass2", parallel=False, deadline=deadline)
        results = {r: fallback(results.get(r), warm[r]) for r in recipes}
    else:
        results = run_pass(args, recipes, "pass1", parallel=False, deadline=deadline)
    print(f"total {time.time() - t0:.0f} s", flush=True)
    return finish(out, results, device_name())


def fallback(timed: Optional[dict], shared: dict) -> dict:
    """A recipe's pass-2 figures, or (when pass 2 did not get to it) its pass-1 figures, marked as such."""
    if timed is not None and "error" not in timed:
        return timed
    return {**shared, "note": "pass 1: all recipes sharing the device"}


def finish(out: pathlib.Path, results: Dict[str, dict], device: str,
           stem: str = "accelerator_smoke") -> Dict[str, dict]:
    text = markdown(results, device)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
    print(text, flush=True)
    return results


def merge_runs(paths: List[str], out: pathlib.Path) -> Dict[str, dict]:
    """One table from several runs' JSON on the same device: a later run's timed (pass-2) figures replace
    earlier ones; figures measured with the device shared are used only where nothing better exists."""
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    devices = {r["device"] for r in runs}
    if len(devices) != 1:
        raise ValueError(f"runs from different devices {sorted(devices)} cannot share one table")
    merged: Dict[str, dict] = {}
    for run in runs:
        for name, x in run["results"].items():
            if "error" in x or (name in merged and "note" not in merged[name] and "note" in x):
                continue
            merged[name] = x
    device = devices.pop()
    slug = "".join(c if c.isalnum() else "_" for c in device.lower().replace("nvidia ", ""))
    return finish(out, {r: merged[r] for r in RECIPES if r in merged}, device, f"accelerator_smoke_{slug}")


if __name__ == "__main__":
    main()
