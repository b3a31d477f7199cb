"""Training throughput of the sharded train step (``experiment``) versus device count: steps/s, images/s,
scaling efficiency.

    python benchmarks/train_throughput.py                          # small + cifar10_reduced on 1, 2, 4, 8 devices
    python benchmarks/train_throughput.py --configs cifar10 --batch 128 --dtypes float32,bfloat16 --devices 1

Each (config, device count, dtype) runs in a fresh process: on CPU with ``--xla_force_host_platform_device_count``
(forced host devices share the machine's cores, so this measures the sharding overhead, not a speed-up), on GPU/TPU
with the first n real devices. The step is ``experiment.jit_sharded_step(make_train_step(...))`` exactly as in
training, compiled with ``experiment.step_compiler_options()`` (``--xla_defaults``: one program under XLA's
defaults), on a fixed synthetic batch (the input pipeline is measured by ``benchmarks/data.py``), blocking on every
step as the training loop does. Reported: compile time, steps/s and images/s (median of ``--repeats`` timed
windows), scaling efficiency ``images/s(n) / (n images/s(1))``, and where the backend exposes them, peak device
memory and MFU = XLA-counted FLOPs of one step x steps/s / peak FLOP/s of the devices.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense peak TFLOP/s per device by device_kind substring: (float32, bfloat16). float32 is the non-tensor-core rate.
PEAK_TFLOPS = {"H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0), "V100": (15.7, 125.0),
               "L4": (30.3, 121.0), "TPU v4": (275.0, 275.0), "TPU v5": (197.0, 197.0)}


def get_config(name: str, batch: int | None, dtype: str):
    """small: configs/default.py (8x8 digits, small U-Net); cifar10: DDPM++ cont. (VP) of the score SDE paper;
    cifar10_reduced: the same architecture at nf=32, ch_mult (1, 2), one block per level, no attention below 16."""
    if name == "small":
        from configs import default

        config = default.get_config()
    elif name in ("cifar10", "cifar10_reduced"):
        from configs.vp import cifar10_ddpmpp_continuous

        config = cifar10_ddpmpp_continuous.get_config()
        if name == "cifar10_reduced":
            config.model.nf, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2), 1
            config.model.attn_resolutions = (16,)
            config.training.batch_size = 16
    else:
        raise ValueError(f"unknown benchmark config {name!r}; valid: small, cifar10, cifar10_reduced")
    if batch:
        config.training.batch_size = batch
    if dtype != "float32":
        if "dtype" not in config.model:
            raise ValueError(f"config {name!r} (model {config.model.name}) has no config.model.dtype")
        config.model.dtype = dtype
    return config


def worker(args) -> dict:
    """Time the sharded train step in this process; returns one result record."""
    import jax
    import numpy as np

    import experiment

    config = get_config(args.config, args.batch, args.dtype)
    exp = experiment.Experiment.from_config(config)
    mesh = exp.mesh
    experiment.check_batch_size(config.training.batch_size)
    state = experiment.replicate(experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape),
                                 mesh)
    rng = np.random.default_rng(0)
    b = config.training.batch_size
    batch = experiment.shard_batch({"x": rng.uniform(-1, 1, (b,) + exp.data_shape).astype(np.float32),
                                    "label": np.zeros(b, np.int32)}, mesh)
    step = experiment.jit_sharded_step(experiment.make_train_step(exp.loss_fn(), exp.optimizer, 0.999, 0), mesh,
                                       split=False if args.xla_defaults else None)
    t0 = time.perf_counter()
    options = None if args.xla_defaults else experiment.step_compiler_options()  # what training compiles with
    compiled = step.lower(state, batch).compile(options)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        rates.append(args.steps / (time.perf_counter() - t0))
    steps_per_s = float(np.median(rates))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {"config": args.config, "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "dtype": args.dtype, "batch": b, "params": n_params, "compile_s": round(compile_s, 2),
            "steps_per_s": steps_per_s, "images_per_s": steps_per_s * b, **device_figures(compiled, steps_per_s,
                                                                                          args.dtype)}


def device_figures(compiled, steps_per_s: float, dtype: str) -> dict:
    """Peak memory (bytes, device 0) and MFU where the backend reports them."""
    import jax

    out = {}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2 ** 30
    cost = compiled.cost_analysis()  # of the partitioned program: one device's share
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    if flops > 0:
        out["gflops_per_step"] = flops * jax.device_count() / 1e9
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
        if peak is not None:
            out["mfu"] = flops * steps_per_s / (peak[dtype == "bfloat16"] * 1e12)
    return out


def backend() -> tuple:
    """(platform, device count) of this machine, asked in a throw-away process."""
    code = "import jax; print(jax.default_backend(), jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def run_one(args, config: str, devices: int, dtype: str, platform: str) -> dict:
    env = dict(os.environ)
    if platform == "cpu":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    elif platform == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
    cmd = [sys.executable, __file__, "--worker", f"--config={config}", f"--dtype={dtype}",
           f"--steps={args.steps}", f"--repeats={args.repeats}"] + ([f"--batch={args.batch}"] if args.batch else []) \
        + (["--xla_defaults"] if args.xla_defaults else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"config": config, "devices": devices, "dtype": dtype, "error": proc.stderr.strip()[-500:]}
    return json.loads(lines[-1])


def print_table(results: list):
    base = {}
    print(f"{'config':16s} {'dtype':9s} {'dev':>3s} {'batch':>5s} {'compile s':>9s} {'steps/s':>8s} "
          f"{'images/s':>9s} {'speed-up':>8s} {'scaling':>7s} {'peak GiB':>8s} {'MFU':>6s}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:16s} {r['dtype']:9s} {r['devices']:3d}  failed: {r['error']}")
            continue
        key = (r["config"], r["dtype"], r["batch"])
        base.setdefault(key, r["images_per_s"] if r["devices"] == 1 else None)
        speedup = r["images_per_s"] / base[key] if base[key] else float("nan")
        eff = speedup / r["devices"]
        print(f"{r['config']:16s} {r['dtype']:9s} {r['devices']:3d} {r['batch']:5d} {r['compile_s']:9.1f} "
              f"{r['steps_per_s']:8.2f} {r['images_per_s']:9.1f} {speedup:8.2f} {eff:7.2f} "
              f"{_fmt(r.get('peak_memory_gib'), '8.2f')} {_fmt(r.get('mfu'), '6.1%')}")


def _fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0])
    return format(value, spec) if value is not None else "-".rjust(width)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,cifar10_reduced")
    p.add_argument("--devices", default="1,2,4,8", help="device counts (CPU: forced host devices)")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--xla_defaults", action="store_true",
                   help="compile the step as one program with XLA's default options (not experiment.SplitStep on "
                        "CPU with experiment.step_compiler_options())")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    platform, available = backend()
    counts = [int(n) for n in args.devices.split(",")]
    if platform != "cpu":
        counts = [n for n in counts if n <= available]
    results = []
    for config in args.configs.split(","):
        for dtype in args.dtypes.split(","):
            for n in counts:
                results.append(run_one(args, config, n, dtype, platform))
                print(json.dumps(results[-1]), flush=True)
    print(f"\nplatform {platform}; synthetic batches; images/s = steps/s x global batch; "
          f"speed-up = images/s(n) / images/s(1); "
          f"scaling = speed-up / n")
    print_table(results)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
