"""Samplers on exact Gaussian-mixture scores: error vs NFE for every method, and wall time of the design choices.

    python benchmarks/samplers.py [--parts nfe,pc_loop,ode,ode_tol,langevin] [--sde vpsde] [--n 8192]
                                  [--out docs/figures]

Parts:
  nfe       sliced W1 to the 2-D mixture vs NFE for every method (printed, and ``samplers_error_vs_nfe.png``);
            the floor of the metric (two independent target samples of size n) is printed and drawn.
  pc_loop   1000-step PC sampler (Euler–Maruyama + Langevin): one jitted ``lax.scan`` vs a host Python loop
            calling a jitted PC step per iteration (as 2021 implementations do); same score, same batch; at a
            (64, 2) batch (dispatch-bound) and at ``--batch`` x ``--dim`` (more compute per step). The gain is the
            per-step dispatch overhead, so it shrinks as the score gets more expensive (a real network).
  ode       probability-flow ODE: diffrax (Tsit5 and Dopri5, jitted) vs ``scipy.integrate.solve_ivp(RK45)``
            on the host with a jitted vector field (score_sde's likelihood/ODE code), at equal rtol/atol; the
            accuracy of each is the max abs error against a tight-tolerance reference solve; diffrax also runs
            at tol/2, tol/5, tol/10, and the speed-up is also reported at equal (or better) accuracy.
  ode_tol   NFE and accuracy at equal rtol = atol (1e-3, 1e-5) of scipy RK45 and of the diffrax settings: "tsit5"
            (the default), "dopri5" (diffrax's I controller) and "rk45" (Dopri5 with scipy's rule and a PI term),
            on a VP and a VE problem; accuracy = max abs error against a tight reference solve.
  langevin  ``langevin_vs_annealed.png``: plain Langevin with the data score vs annealed Langevin on
            0.2 N((-5,-5), I) + 0.8 N((5,5), I) (Song & Ermon 2019, Fig. 3).
Timings exclude compilation (each jitted function is run once first) and block on results.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """The flags (``--sde`` is checked against ``sde_lib.SDES`` once that is imported)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="nfe,pc_loop,ode,ode_tol,langevin")
    p.add_argument("--sde", default="vpsde", help="key of sde_lib.SDES")
    p.add_argument("--n", type=int, default=8192, help="samples for the error-vs-NFE sweep")
    p.add_argument("--batch", type=int, default=256, help="batch of the timing parts")
    p.add_argument("--dim", type=int, default=16, help="dimension of the timing parts' mixture")
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of the ODE timing")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    return p


if __name__ == "__main__":
    build_parser().parse_args()   # --help and bad arguments answer before JAX is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))

import samplers  # noqa: E402
import sde_lib  # noqa: E402
from analytic import GaussianMixture, sliced_wasserstein  # noqa: E402

MIX = GaussianMixture(weights=[0.2, 0.3, 0.5], means=[[-3.5, 0.9], [1.5, 2.9], [0.5, -2.1]], stds=[0.5, 0.6, 0.4])
FAR = GaussianMixture(weights=[0.2, 0.8], means=[[-5., -5.], [5., 5.]], stds=[1.0, 1.0])

# label -> (method, fixed options, swept option, values)
SWEEPS = {
    "pc: EM, no corrector": ("pc", dict(corrector="none"), "num_steps", [10, 25, 50, 100, 250, 1000]),
    "pc: EM + Langevin": ("pc", dict(), "num_steps", [10, 25, 50, 100, 250, 1000]),
    "pc: ancestral (chain N=num_steps)": ("pc", dict(predictor="ancestral_sampling", corrector="none"),
                                          "num_steps", [25, 50, 100, 250, 1000]),   # the VP chain needs β_i < 1
    "ode: Tsit5 (rtol=atol)": ("ode", dict(), "rtol", [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]),
    "ode: Heun fixed": ("ode", dict(solver="heun"), "num_steps", [5, 10, 25, 50, 100]),
    "ode: Euler fixed": ("ode", dict(solver="euler"), "num_steps", [10, 25, 50, 100, 250]),
    "ddim (eta=0)": ("ddim", dict(), "num_steps", [5, 10, 20, 50, 100]),
    "ddim (eta=1)": ("ddim", dict(eta=1.0), "num_steps", [5, 10, 20, 50, 100, 250]),
    "dpm_solver++ 2M": ("dpm_solver++", dict(), "num_steps", [5, 8, 10, 15, 20, 50]),
    "dpm_solver++ 3M": ("dpm_solver++", dict(order=3), "num_steps", [5, 8, 10, 15, 20, 50]),
    "heun (EDM)": ("heun", dict(), "num_steps", [3, 5, 8, 12, 18, 30]),
    "annealed Langevin (10/level)": ("annealed_langevin", dict(), "num_steps", [5, 10, 30, 100]),
}


def _timeit(fn, repeats=3) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs (fn must block on its result)."""
    return _timeit_interleaved([fn], repeats)[0]


def _timeit_interleaved(fns, repeats=7) -> list:
    """Best wall time of each of ``fns`` over ``repeats`` rounds that run them in turn, so that load from other
    processes on a shared machine hits all of them alike (each fn must block on its result)."""
    best = [np.inf] * len(fns)
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def make_sde(name: str, N: int = 1000) -> sde_lib.SDE:
    return sde_lib.SDES[name](N=N, **({"sigma_max": 20.0} if name == "vesde" else {}))


# ---- error vs NFE ----------------------------------------------------------------------------------------------
def error_vs_nfe(sde_name: str, n: int, out: pathlib.Path) -> dict:
    target = MIX.sample(jax.random.key(1), n)
    proj_key = jax.random.key(2)
    floor = float(sliced_wasserstein(proj_key, MIX.sample(jax.random.key(3), n), target))
    print(f"\n== sliced W1 to the mixture vs NFE ({sde_name}, n={n}; floor of the metric {floor:.4f}) ==")
    results = {}
    for label, (method, fixed, swept, values) in SWEEPS.items():
        rows = []
        for v in values:
            opts = dict(fixed, **{swept: v})
            if swept == "rtol":
                opts["atol"] = v
            chain = opts.get("predictor") == "ancestral_sampling"
            sde = make_sde(sde_name, N=v if chain else 1000)
            if chain and sde_name == "subvpsde":
                continue
            x, nfe = samplers.sample(jax.random.key(0), sde, MIX.score_fn(sde), (n, 2), method, **opts)
            rows.append((nfe, float(sliced_wasserstein(proj_key, x, target))))
        results[label] = rows
        print(f"{label:36s} " + "  ".join(f"{nfe}:{err:.3f}" for nfe, err in rows))
    _plot_error_vs_nfe(results, floor, sde_name, out / "samplers_error_vs_nfe.png")
    return results


def _plot_error_vs_nfe(results, floor, sde_name, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    for j, (label, rows) in enumerate(results.items()):
        if rows:
            ax.plot(*zip(*rows), "os^vD<>"[j % 7] + ("-" if j % 2 == 0 else "--"), color=colors[(2 * j) % 20 + j // 10],
                    label=label, ms=4)
    ax.axhline(floor, color="k", ls="--", lw=1, label="metric floor (two target samples)")
    ax.set(xscale="log", yscale="log", xlabel="NFE (score evaluations)", ylabel="sliced W1 to target",
           title=f"Samplers on a 2-D Gaussian mixture, exact scores ({sde_name})")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---- jitted scan vs host loop ------------------------------------------------------------------------------------
def pc_loop_timing(sde_name: str, batch: int, dim: int) -> float:
    """Wall time of 1000 PC steps: one jitted scan vs a Python loop of jitted steps. Returns the ratio."""
    sde, shape = make_sde(sde_name), (batch, dim)
    gm = GaussianMixture(weights=[0.2, 0.3, 0.5], means=np.eye(3, dim) * 4.0, stds=[0.5, 0.6, 0.4])
    score = gm.score_fn(sde)
    scan_fn, nfe = samplers.build_sampler(sde, score, shape, "pc", mesh=None)
    key = jax.random.key(0)
    jax.block_until_ready(scan_fn(key))

    pred = samplers.euler_maruyama(sde, score)
    corr = samplers.langevin(sde, score, snr=0.16, n_steps=1)
    step = jax.jit(samplers.pc_step_fn(sde, score, pred, corr))
    final = jax.jit(lambda k, x, t: samplers.tweedie(sde, score, corr.step(k, x, t), t))
    ts = np.linspace(sde.T, sde.eps, sde.N).astype(np.float32)

    def host_loop():
        k_prior, k_loop = jax.random.split(key)
        x = sde.prior_sampling(k_prior, shape)
        for i in range(sde.N - 1):
            x = step(jax.random.fold_in(k_loop, i), x, ts[i], ts[i + 1])
        return jax.block_until_ready(final(jax.random.fold_in(k_loop, sde.N - 1), x, ts[-1]))

    x_host = host_loop()
    t_scan, t_host = _timeit_interleaved([lambda: jax.block_until_ready(scan_fn(key)), host_loop], 9)
    same = float(jnp.max(jnp.abs(x_host - scan_fn(key)[0])))
    print(f"\n== PC sampler, {sde.N} steps, NFE {nfe}, batch {shape} ({jax.devices()[0].platform}) ==")
    print(f"jitted lax.scan: {t_scan * 1e3:8.1f} ms   host loop of jitted steps: {t_host * 1e3:8.1f} ms   "
          f"speed-up {t_host / t_scan:.1f}x   (max |difference| of the samples {same:.2e})")
    return t_host / t_scan


# ---- diffrax vs scipy RK45 ----------------------------------------------------------------------------------------
def ode_timing(sde_name: str, batch: int, dim: int, tol: float) -> dict:
    """Probability-flow ODE from T to eps: diffrax (jitted) vs scipy RK45 on the host at rtol = atol = tol."""
    import scipy.integrate

    sde, shape = make_sde(sde_name), (batch, dim)
    gm = GaussianMixture(weights=[0.2, 0.3, 0.5], means=np.eye(3, dim) * 4.0, stds=[0.5, 0.6, 0.4])
    score = gm.score_fn(sde)
    x_T = sde.prior_sampling(jax.random.key(0), shape)
    ref, _ = jax.jit(lambda x: samplers.solve_flow(sde, score, x, sde.T, sde.eps, "dopri5", 1e-9, 1e-9))(x_T)
    rsde = sde.reverse(score, probability_flow=True)
    drift = jax.jit(lambda x, t: rsde.sde(x, jnp.full((shape[0],), t))[0])

    def scipy_solve():
        def f(t, y):   # score_sde's ODE sampler: device call + host copy per evaluation
            return np.asarray(drift(jnp.asarray(y, jnp.float32).reshape(shape), t), np.float64).reshape(-1)

        sol = scipy.integrate.solve_ivp(f, (sde.T, sde.eps), np.asarray(x_T, np.float64).reshape(-1), rtol=tol,
                                        atol=tol, method="RK45")
        return sol.y[:, -1].reshape(shape), sol.nfev

    rows = {}
    x_sp, nfe_sp = scipy_solve()
    rows["scipy RK45 (host)"] = (_timeit(scipy_solve, 7), nfe_sp, float(np.max(np.abs(x_sp - np.asarray(ref)))))
    for solver in ("dopri5", "tsit5", "rk45"):
        for tl in (tol, tol / 2, tol / 5, tol / 10):
            fn = jax.jit(lambda x, s=solver, tl=tl: samplers.solve_flow(sde, score, x, sde.T, sde.eps, s, tl, tl))
            x, nfe = jax.block_until_ready(fn(x_T))
            t = _timeit(lambda: jax.block_until_ready(fn(x_T)), 7)
            rows[f"diffrax {solver} tol {tl:g}"] = (t, int(nfe), float(jnp.max(jnp.abs(x - ref))))
    print(f"\n== probability-flow ODE T -> eps, scipy at rtol = atol = {tol:g}, batch {shape} ==")
    base, _, base_err = rows["scipy RK45 (host)"]
    for name, (t, nfe, err) in rows.items():
        print(f"{name:26s} {t * 1e3:9.2f} ms  NFE {nfe:5d}  max|x - ref| {err:.2e}  speed-up vs scipy "
              f"{base / t:.1f}x")
    for solver in ("dopri5", "tsit5", "rk45"):   # the loosest diffrax tolerance at least as accurate as scipy
        ok = [(k, v) for k, v in rows.items() if k.startswith(f"diffrax {solver}") and v[2] <= base_err]
        if ok:
            print(f"at equal accuracy: {ok[0][0]} is {base / ok[0][1][0]:.1f}x faster than scipy RK45")
    return rows


# ---- NFE at equal tolerance: scipy RK45 vs the diffrax settings ------------------------------------------------------
ODE_SETTINGS = ("tsit5", "dopri5", "rk45")


def scipy_rk45(sde, score, x_T, tol: float):
    """score_sde's ODE solve: scipy RK45 on the flattened batch in float64, the drift jitted in float32.
    Returns (x(eps), nfev)."""
    import scipy.integrate

    shape = x_T.shape
    rsde = sde.reverse(score, probability_flow=True)
    drift = jax.jit(lambda x, t: rsde.sde(x, jnp.full((shape[0],), t))[0])

    def f(t, y):
        return np.asarray(drift(jnp.asarray(y, jnp.float32).reshape(shape), t), np.float64).reshape(-1)

    sol = scipy.integrate.solve_ivp(f, (sde.T, sde.eps), np.asarray(x_T, np.float64).reshape(-1), rtol=tol,
                                    atol=tol, method="RK45")
    return sol.y[:, -1].reshape(shape), int(sol.nfev)


def ode_problem(sde_name: str, batch: int, dim: int, seed: int = 0):
    """(sde, exact score, prior sample, reference x(eps) by Dopri5 at rtol = atol = 1e-8) of a 3-component
    mixture in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    sde = make_sde(sde_name)
    gm = GaussianMixture(weights=[0.2, 0.3, 0.5], means=rng.normal(size=(3, dim)) * 2.0, stds=[0.3, 0.5, 0.2])
    score = gm.score_fn(sde)
    x_T = sde.prior_sampling(jax.random.key(seed), (batch, dim))
    ref, _ = jax.jit(lambda x: samplers.solve_flow(sde, score, x, sde.T, sde.eps, "dopri5", 1e-8, 1e-8))(x_T)
    return sde, score, x_T, np.asarray(ref)


def ode_tolerances(sde_names=("vpsde", "vesde"), batch: int = 32, dim: int = 64, tols=(1e-3, 1e-5)) -> dict:
    """NFE and max error of scipy RK45 and each of ``ODE_SETTINGS`` at rtol = atol = tol."""
    rows = {}
    print(f"\n== probability-flow ODE T -> eps at equal rtol = atol: NFE (ratio to scipy RK45) and max|x - ref|, "
          f"batch ({batch}, {dim}) ==")
    for name in sde_names:
        sde, score, x_T, ref = ode_problem(name, batch, dim)
        for tol in tols:
            x, nfe = scipy_rk45(sde, score, x_T, tol)
            row = {"scipy RK45": (nfe, float(np.max(np.abs(x - ref))))}
            for solver in ODE_SETTINGS:
                fn = jax.jit(lambda x, s=solver: samplers.solve_flow(sde, score, x, sde.T, sde.eps, s, tol, tol))
                y, n = fn(x_T)
                row[solver] = (int(n), float(np.max(np.abs(np.asarray(y) - ref))))
            rows[(name, tol)] = row
            base = row["scipy RK45"][0]
            print(f"{name:6s} tol {tol:g}: " + " | ".join(f"{k} {n} ({n / base:.2f}x) {e:.1e}"
                                                         for k, (n, e) in row.items()), flush=True)
    return rows


# ---- Langevin vs annealed Langevin figure --------------------------------------------------------------------------
def langevin_figure(out: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sde, n, key = make_sde("vesde"), 1280, jax.random.key(7)
    x_true = FAR.sample(jax.random.key(8), n)
    x_plain, nfe_plain = samplers.sample(key, sde, FAR.score_fn(sde), (n, 2), "langevin", step_size=0.1,
                                         num_steps=1000)
    x_ald, nfe_ald = samplers.sample(key, sde, FAR.score_fn(sde), (n, 2), "annealed_langevin")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    for ax, x, title in [(axes[0], x_true, "target: 0.2 / 0.8"),
                         (axes[1], x_plain, f"Langevin, data score ({nfe_plain} NFE)"),
                         (axes[2], x_ald, f"annealed Langevin ({nfe_ald} NFE)")]:
        x = np.asarray(x)
        frac = np.mean(x[:, 0] + x[:, 1] < 0)
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{title}\nlower-left mode: {frac:.2f}")
        ax.set(xlim=(-10, 10), ylim=(-10, 10), aspect="equal")
    fig.suptitle("Plain Langevin dynamics gets mixture weights wrong; annealing over noise levels fixes it")
    fig.tight_layout()
    path = out / "langevin_vs_annealed.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\n== Langevin vs annealed Langevin: lower-left weight plain {np.mean(np.asarray(x_plain).sum(1) < 0):.3f},"
          f" annealed {np.mean(np.asarray(x_ald).sum(1) < 0):.3f} (truth 0.2); wrote {path} ==")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.sde not in sde_lib.SDES:
        p.error(f"argument --sde: invalid choice {args.sde!r} (choose from {sorted(sde_lib.SDES)})")
    parts, out = args.parts.split(","), pathlib.Path(args.out)
    print(f"devices: {jax.devices()}")
    if "nfe" in parts:
        error_vs_nfe(args.sde, args.n, out)
    if "pc_loop" in parts:
        pc_loop_timing(args.sde, 64, 2)
        pc_loop_timing(args.sde, args.batch, args.dim)
    if "ode" in parts:
        ode_timing(args.sde, args.batch, args.dim, args.tol)
    if "ode_tol" in parts:
        ode_tolerances()
    if "langevin" in parts:
        langevin_figure(out)


if __name__ == "__main__":
    main()
