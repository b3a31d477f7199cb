"""Accuracy and wall time of probability-flow ODE likelihoods vs solver tolerance and divergence estimator.

    python benchmarks/likelihood.py [--dim 8] [--n 64] [--sde vpsde] [--rtols 1e-2,1e-3,1e-4,1e-5,1e-6]
                                    [--probes 1] [--solver tsit5] [--out /tmp/likelihood_benchmark.png]

Data: n points of a D-dimensional two-component Gaussian mixture, with its exact perturbed score (analytic.py).
Truth: the log-density of the ODE's model, log p_ε(x) - log p_T(z) + log π(z) (closed form; π the prior).
For each rtol (atol = rtol) and estimator, reports the error in nats/dim — max and mean |error| for the exact
trace; bias ± standard error and RMS for Hutchinson (whose RMS is the estimator's own spread) — the mean NFE
per example, and the best-of-3 wall time of one batched call after compilation (the first call, compile
included, separately). Prints a table
and writes a two-panel PNG (error vs rtol, time vs rtol). A second, timing-only table uses a random MLP score
of dimension ``--net_dim`` (where the exact trace's D JVPs per evaluation show up in the wall time).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ESTIMATORS = ("exact", "gaussian", "rademacher")


def build_parser() -> argparse.ArgumentParser:
    """The flags (``--sde`` and ``--solver`` are checked against their registries once those are imported)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--sde", default="vpsde", help="key of sde_lib.SDES")
    p.add_argument("--rtols", default="1e-2,1e-3,1e-4,1e-5,1e-6")
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    p.add_argument("--probes", type=int, default=1)
    p.add_argument("--solver", default="tsit5", help="key of likelihood.SOLVERS")
    p.add_argument("--out", default="/tmp/likelihood_benchmark.png")
    p.add_argument("--net_dim", type=int, default=64, help="dimension of the timing-only MLP score (0: skip)")
    p.add_argument("--net_hidden", type=int, default=256)
    return p


if __name__ == "__main__":
    build_parser().parse_args()   # --help and bad arguments answer before JAX is imported

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import likelihood  # noqa: E402
import sde_lib  # noqa: E402
from analytic import GaussianMixture  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    """Least wall time of ``repeats`` calls (the machine may be shared)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def truth(gm, sde, x, z):
    b = x.shape[0]
    return (gm.log_prob_t(sde, x, jnp.full((b,), sde.eps)) - gm.log_prob_t(sde, z, jnp.full((b,), sde.T))
            + sde.prior_logp(z))


def measure(sde, gm, x, estimator: str, rtol: float, probes: int, solver: str) -> dict:
    score_fn = gm.score_fn(sde)
    run = lambda: jax.block_until_ready(likelihood.log_likelihood(
        jax.random.key(1), sde, score_fn, x, divergence=estimator, rtol=rtol, atol=rtol, num_probes=probes,
        solver=solver))
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    logp, z, nfe = run()
    wall = best_of(run)
    err = np.asarray(logp - truth(gm, sde, x, z), np.float64) / x.shape[1]
    return {"estimator": estimator, "rtol": rtol, "max_abs_err": float(np.abs(err).max()),
            "mean_abs_err": float(np.abs(err).mean()), "bias": float(err.mean()),
            "bias_se": float(err.std(ddof=1) / np.sqrt(len(err))), "rms_err": float(np.sqrt(np.mean(err**2))),
            "nfe_mean": float(np.mean(nfe)), "wall_s": wall, "compile_s": compile_s}


def mlp_score_fn(dim: int, hidden: int, seed: int = 0):
    """A random two-layer network s(x, t) = W2 tanh(W1 [x, t] + b1) / 4 - x: the cost of a small score model,
    for timing only (it has no closed-form density, so its rows report no error)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w1 = jax.random.normal(k1, (dim + 1, hidden)) / np.sqrt(dim + 1)
    b1 = jax.random.normal(k2, (hidden,))
    w2 = jax.random.normal(k3, (hidden, dim)) / np.sqrt(hidden)
    return lambda x, t: jnp.tanh(jnp.concatenate([x, t[:, None]], -1) @ w1 + b1) @ w2 / 4 - x


def time_network(sde, dim: int, n: int, hidden: int, estimator: str, rtol: float, probes: int, solver: str):
    score_fn, x = mlp_score_fn(dim, hidden), jax.random.normal(jax.random.key(3), (n, dim))
    run = lambda: jax.block_until_ready(likelihood.log_likelihood(
        jax.random.key(1), sde, score_fn, x, divergence=estimator, rtol=rtol, atol=rtol, num_probes=probes,
        solver=solver))
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    _, _, nfe = run()
    wall = best_of(run)
    return {"estimator": estimator, "rtol": rtol, "nfe_mean": float(np.mean(nfe)), "wall_s": wall,
            "compile_s": compile_s, "network": f"mlp D={dim} hidden={hidden}"}


def plot(rows, path: pathlib.Path, title: str, net_rows=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for est in ESTIMATORS:
        r = [row for row in rows if row["estimator"] == est]
        if not r:
            continue
        rt = [row["rtol"] for row in r]
        key = "mean_abs_err" if est == "exact" else "rms_err"
        ax1.loglog(rt, [max(row[key], 1e-12) for row in r], "o-", label=f"{est} ({key})")
        if est != "exact":
            ax1.loglog(rt, [abs(row["bias"]) + 2 * row["bias_se"] for row in r], "x--",
                       label=f"{est} |bias| + 2 se (bound on the bias)")
        ax2.loglog(rt, [row["wall_s"] for row in r], "o-", label=f"{est} (mixture)")
        rn = [row for row in net_rows if row["estimator"] == est]
        if rn:
            ax2.loglog([row["rtol"] for row in rn], [row["wall_s"] for row in rn], "s:",
                       label=f"{est} ({rn[0]['network']})")
    ax1.set_xlabel("rtol = atol")
    ax1.set_ylabel("error vs closed form (nats/dim)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("rtol = atol")
    ax2.set_ylabel("wall time per batch (s)")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    p = build_parser()
    a = p.parse_args()
    for flag, value, registry in (("--sde", a.sde, sde_lib.SDES), ("--solver", a.solver, likelihood.SOLVERS)):
        if value not in registry:
            p.error(f"argument {flag}: invalid choice {value!r} (choose from {sorted(registry)})")

    sde = sde_lib.SDES[a.sde]()
    rng = np.random.default_rng(0)
    gm = GaussianMixture(np.array([0.3, 0.7]), rng.normal(size=(2, a.dim)), np.array([0.3, 0.6]))
    x = gm.sample(jax.random.key(0), a.n)
    rows = []
    header = (f"{'estimator':>10} {'rtol':>7} {'max|err|':>9} {'mean|err|':>9} {'bias':>10} {'± se':>8} "
              f"{'rms':>8} {'NFE':>7} {'wall s':>7} {'compile s':>9}")
    print(f"{a.sde}, D={a.dim}, n={a.n}, solver={a.solver}, probes={a.probes}, backend={jax.default_backend()}; "
          f"errors in nats/dim vs the closed-form density of the ODE model")
    print(header)
    for est in a.estimators.split(","):
        for rtol in (float(r) for r in a.rtols.split(",")):
            row = measure(sde, gm, x, est, rtol, a.probes, a.solver)
            rows.append(row)
            print(f"{est:>10} {rtol:7.0e} {row['max_abs_err']:9.2e} {row['mean_abs_err']:9.2e} "
                  f"{row['bias']:10.2e} {row['bias_se']:8.1e} {row['rms_err']:8.1e} {row['nfe_mean']:7.1f} "
                  f"{row['wall_s']:7.3f} {row['compile_s']:9.2f}", flush=True)
    net_rows = []
    if a.net_dim:
        print(f"timing only: random MLP score, D={a.net_dim}, hidden={a.net_hidden}, n={a.n}")
        print(f"{'estimator':>10} {'rtol':>7} {'NFE':>7} {'wall s':>7} {'compile s':>9}")
        for est in a.estimators.split(","):
            for rtol in (float(r) for r in a.rtols.split(",")):
                row = time_network(sde, a.net_dim, a.n, a.net_hidden, est, rtol, a.probes, a.solver)
                net_rows.append(row)
                print(f"{est:>10} {rtol:7.0e} {row['nfe_mean']:7.1f} {row['wall_s']:7.3f} {row['compile_s']:9.2f}",
                      flush=True)
    out = pathlib.Path(a.out)
    plot(rows, out, f"probability-flow ODE likelihood: {a.sde}, D={a.dim}, n={a.n}, {a.solver}, "
                    f"{jax.default_backend()}", net_rows)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "rows": rows, "network_rows": net_rows},
                                                   indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
