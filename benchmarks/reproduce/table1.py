"""Sampler × SDE grid (the SDE paper's Table 1 structure) on models trained by this command.

    python -m benchmarks.reproduce.table1 --workdir=/tmp/repro --setting=tiny [--publish]

For VE, VP and sub-VP models (continuous DSM, same network) every sampler draws ``setting.num_samples`` samples:
P_N / P_2N (predictor only: ancestral, reverse diffusion, Euler–Maruyama), C_2N (Langevin corrector only), PC_N
(predictor + one Langevin step), the probability-flow ODE (Tsit5 at two tolerances), and DDIM, DPM-Solver++(2M)
and Heun at low NFE. Each cell: domain-classifier FID, NFE (score evaluations per sample batch) and wall time.
With N = 1000 the rows are the paper's P1000, P2000, C2000, PC1000.
"""
from __future__ import annotations

import pathlib
from typing import Dict, List, Optional

from benchmarks.reproduce import common

SDES = {"VE": "ve_dsm", "VP": "vp_dsm", "sub-VP": "subvp_dsm"}
PREDICTORS = {"ancestral": "ancestral_sampling", "reverse diffusion": "reverse_diffusion",
              "Euler-Maruyama": "euler_maruyama"}


def sampler_grid(N: int, low: int) -> List[dict]:
    """Rows: label, method, options, SDE steps override (chain predictors at 2N) and the expected NFE
    (None: adaptive). NFE = (steps-1)·P + steps·C + 1 (final denoising) for PC; s for DDIM/DPM-Solver++ with s
    nodes, 2s-1 for Heun."""
    rows = []
    for kind, (steps, corr) in {"P": (N, "none"), "P2": (2 * N, "none"), "PC": (N, "langevin")}.items():
        for pname, pred in PREDICTORS.items():
            label = {"P": f"P{N}", "P2": f"P{2 * N}", "PC": f"PC{N}"}[kind]
            rows.append({"label": f"{label} {pname}", "method": "pc",
                         "options": {"predictor": pred, "corrector": corr, "num_steps": steps},
                         "N": steps if steps != N else None, "expected_nfe": 2 * N if kind != "P" else N})
    rows.append({"label": f"C{2 * N} Langevin", "method": "pc", "N": None, "expected_nfe": 2 * N + 1,
                 "options": {"predictor": "none", "corrector": "langevin", "num_steps": 2 * N}})
    for tol in (1e-3, 1e-5):
        rows.append({"label": f"ODE Tsit5 tol {tol:g}", "method": "ode", "N": None, "expected_nfe": None,
                     "options": {"solver": "tsit5", "rtol": tol, "atol": tol}})
    rows.append({"label": f"DDIM {low}", "method": "ddim", "N": None, "expected_nfe": low,
                 "options": {"num_steps": low}})
    rows.append({"label": f"DPM-Solver++(2M) {low}", "method": "dpm_solver++", "N": None, "expected_nfe": low,
                 "options": {"num_steps": low, "order": 2}})
    rows.append({"label": f"Heun {low}", "method": "heun", "N": None, "expected_nfe": 2 * low - 1,
                 "options": {"num_steps": low}})
    return rows


def _cell(models: common.ModelCache, workdir: pathlib.Path, model: str, row: dict, n: int, batch_index: int = 0):
    """The cell's computation: ``n`` samples of ``row``'s sampler (sample set ``batch_index``) and their quality."""
    def compute() -> dict:
        cfg, ev = models.get(model)
        opts = dict(row["options"])
        if row["N"] is not None:  # chain predictors follow the SDE's own N-step chain
            opts.pop("num_steps")
        out = common.draw(cfg, ev, row["method"], opts, n, seed=cfg.seed + 11, N=row["N"], batch_index=batch_index)
        q = common.quality(cfg, workdir, out["images"])
        return {**q, **out, "sampler": row["label"], "model": model, "num_samples": n}

    return compute


def run(workdir: str, setting_name: str = "tiny", publish: bool = False,
        report_only: bool = False) -> dict:
    """Compute the missing cells and write ``table1_<setting>.{md,json,png}``; returns the results dict."""
    setting = common.get_setting(setting_name)
    workdir = pathlib.Path(workdir)
    out_dir = workdir / f"table1_{setting.name}"
    rows = sampler_grid(setting.N, setting.low_nfe_steps)
    store = common.CellStore(out_dir, "table1", len(rows) * len(SDES), report_only)
    models = common.ModelCache(workdir, setting)
    cells: Dict[str, Dict[str, dict]] = {}
    for sde_label, model in SDES.items():
        for row in rows:
            key = f"{model}__{row['label'].replace(' ', '_')}"
            cells.setdefault(row["label"], {})[sde_label] = store.run(
                key, _cell(models, workdir, model, row, setting.num_samples))
    train = {m: common.ensure_or_read_model(workdir, setting, m, report_only) for m in SDES.values()}
    real = common.real_reference(setting, workdir, report_only)
    results = {"setting": setting.__dict__, "rows": rows, "cells": cells, "models": train,
               "computed_cells": store.computed, "pending_cells": store.pending, "fid_real_heldout": real}
    common.write_outputs(out_dir, f"table1_{setting.name}", markdown(cells, rows, setting, real), results,
                         lambda p: plot(cells, p, setting), publish)
    return results


def markdown(cells: dict, rows: List[dict], setting, real_fid: Optional[dict] = None) -> str:
    header = ["sampler"] + [f"{s} FID / NFE / s" for s in SDES]
    body = []
    for row in rows:
        entries = []
        for s in SDES:
            c = cells[row["label"]][s]
            entries.append(common.cell_text(c, lambda c: f"{c['fid']:.2f} / {c['nfe']} / {c['sample_s']:.1f}"))
        body.append([row["label"]] + entries)
    real = next((c for r in cells.values() for c in r.values() if "fid_real_heldout" in c), None)
    note = (f"\nDomain-classifier FID of {setting.num_samples} samples (lower is better)"
            + (f"; held-out real digits score {real['fid_real_heldout']:.2f}" if real else "")
            + common.real_note(real_fid)
            + f". N = {setting.N}; time = sampling seconds excluding compilation.\n")
    return f"## Table 1 (setting {setting.name})\n\n" + common.markdown_table(header, body) + note


def plot(cells: dict, path, setting) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_points = False
    for s, marker in zip(SDES, "os^"):
        pts = [(c[s]["nfe"], c[s]["fid"], label) for label, c in cells.items() if "fid" in c[s]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=s)
        any_points = any_points or bool(pts)
    if any_points:   # nothing computed yet (--report_only on a new workdir): a linear empty plot
        ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("domain-classifier FID")
    ax.set_title(f"Sampler × SDE ({setting.name}: {setting.base}, N={setting.N})")
    ax.legend()
    common.save_figure(fig, path)


def main(argv: Optional[list] = None) -> dict:
    return common.cli_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
