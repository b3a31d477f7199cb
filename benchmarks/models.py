"""Forward+backward cost of the paper's CIFAR-10 score networks: time, peak memory, FLOPs, utilisation.

    python benchmarks/models.py                       # all CIFAR-10 configs, batch 4, float32
    python benchmarks/models.py --batch 128 --dtype bfloat16 --configs vp.cifar10_ddpmpp_continuous

One training-like step is ``jax.grad`` of mean(output²) with dropout on. FLOPs come from XLA's cost analysis of
the compiled step (``jax.jit(...).lower(...).compile().cost_analysis()``); peak memory is the device's
``peak_bytes_in_use`` where the backend reports it (GPU), otherwise XLA's buffer assignment of the compiled step
(arguments + outputs + temporaries − aliased). Utilisation = achieved FLOP/s ÷ the device's peak (``--peak-tflops``,
or a table entry for known GPUs).
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

CIFAR10_CONFIGS = ("vp.cifar10_ddpm", "vp.cifar10_ddpmpp_continuous", "vp.cifar10_ddpmpp_deep_continuous",
                   "ve.cifar10_ncsnpp_continuous", "ve.cifar10_ncsnpp_deep_continuous")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CIFAR10_CONFIGS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the utilisation column")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()   # --help and bad arguments answer before JAX is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import create_model  # noqa: E402
# dense peak TFLOP/s by device kind substring and compute dtype (vendor data sheets, SXM parts)
PEAK_TFLOPS = {("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
               ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
               ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5}


def _cost(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _static_peak(compiled) -> float:
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return float(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes)


def build(name: str, dtype: str):
    """The module of a paper config with compute dtype ``dtype``, and the config."""
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.dtype = dtype
    model = create_model(config)
    return model.module, config


def benchmark(name: str, batch: int, dtype: str, repeats: int) -> dict:
    module, config = build(name, dtype)
    size, channels = config.data.image_size, config.data.num_channels
    x = jax.random.uniform(jax.random.key(0), (batch, size, size, channels))
    labels = jnp.linspace(0.1, 10.0, batch) if config.model.time_input == "sigma" else jnp.linspace(1., 999., batch)
    params = jax.jit(lambda k: module.init({"params": k}, x, labels)["params"])(jax.random.key(1))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

    def loss(p, key):
        out = module.apply({"params": p}, x, labels, train=True, rngs={"dropout": key})
        return jnp.mean(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss))
    forward = jax.jit(lambda p: module.apply({"params": p}, x, labels))
    t0 = time.perf_counter()
    compiled = step.lower(params, jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t0
    fwd_flops = _cost(forward.lower(params).compile())
    jax.block_until_ready(compiled(params, jax.random.key(2)))  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, jax.random.key(3 + i)))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak = float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else _static_peak(compiled)
    return dict(name=name, params=n_params, compile_s=compile_s, step_s=statistics.median(times),
                flops=_cost(compiled), fwd_flops=fwd_flops, peak_bytes=peak,
                peak_source="device" if "peak_bytes_in_use" in stats else "xla-buffers")


def peak_tflops(dtype: str, override: float | None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for (k, d), v in PEAK_TFLOPS.items() if k in kind and d == dtype), None)


def main(argv=None):
    args = build_parser().parse_args(argv)
    peak = peak_tflops(args.dtype, args.peak_tflops)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, {args.dtype}, "
          f"peak {peak or 'unknown'} TFLOP/s")
    header = (f"{'config':38s} {'params':>8s} {'fwd GFLOP/img':>13s} {'step GFLOP':>11s} {'compile s':>9s} "
              f"{'step ms':>9s} {'TFLOP/s':>8s} {'util':>6s} {'peak MiB':>9s}")
    print(header)
    for name in args.configs:
        r = benchmark(name, args.batch, args.dtype, args.repeats)
        achieved = r["flops"] / r["step_s"] / 1e12
        util = f"{100 * achieved / peak:5.1f}%" if peak else "   n/a"
        print(f"{name:38s} {r['params'] / 1e6:7.2f}M {r['fwd_flops'] / args.batch / 1e9:13.2f} "
              f"{r['flops'] / 1e9:11.1f} {r['compile_s']:9.1f} {1e3 * r['step_s']:9.1f} {achieved:8.3f} {util} "
              f"{r['peak_bytes'] / 2 ** 20:9.0f} ({r['peak_source']})", flush=True)


if __name__ == "__main__":
    main()
