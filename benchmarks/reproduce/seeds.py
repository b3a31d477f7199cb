"""Seed spread of Table 1's central comparison: PC_N against P_2N (equal NFE), several independent sample sets.

    python -m benchmarks.reproduce.seeds --workdir=/tmp/repro --setting=cpu [--seeds=5] [--sdes=VE,VP] [--publish]

One Table 1 cell is the FID of one set of ``setting.num_samples`` samples, whose noise at 128 images is several FID
points. This command draws ``--seeds`` independent sets for the chosen rows (default: Euler–Maruyama predictor,
predictor-only with 2N steps against predictor + one Langevin step with N) on Table 1's models, reports mean ± std
per cell and the difference PC − P with its standard error. Seed 0 uses Table 1's key, so it reproduces that
table's cell exactly. Cells are cached and resumable like the tables'.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from typing import Dict, List, Optional

import numpy as np

from benchmarks.reproduce import common, table1


def pair_rows(setting, predictor: str) -> List[dict]:
    """The P_2N and PC_N rows of Table 1's grid for ``predictor`` (a label of ``table1.PREDICTORS``)."""
    rows = {r["label"]: r for r in table1.sampler_grid(setting.N, setting.low_nfe_steps)}
    return [rows[f"P{2 * setting.N} {predictor}"], rows[f"PC{setting.N} {predictor}"]]


def cached(store: common.CellStore, key: str) -> dict:
    """A cell another process computes (an SDE left out by --sdes): its result when written, else pending."""
    path = store.path(key)
    return json.loads(path.read_text()) if path.exists() else {"pending": True}


def summarize(values: List[float]) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "values": v.tolist()}


def difference(p: dict, pc: dict) -> dict:
    """PC − P: the mean difference, its standard error as for independent sets, and (same number of sets) the
    paired standard error of the per-seed differences. Seed s starts both samplers from the same prior draw, so
    their figures move together and the paired error is the one that applies."""
    k_p, k_pc = len(p["values"]), len(pc["values"])
    se = None if p["std"] is None or pc["std"] is None else float(np.sqrt(p["std"] ** 2 / k_p +
                                                                          pc["std"] ** 2 / k_pc))
    paired = None
    if k_p == k_pc > 1:
        d = np.asarray(pc["values"]) - np.asarray(p["values"])
        paired = float(d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": pc["mean"] - p["mean"], "stderr": se, "paired_stderr": paired}


def run(workdir: str, setting_name: str = "cpu", seeds: int = 5, sdes: Optional[List[str]] = None,
        predictor: str = "Euler-Maruyama", publish: bool = False, report_only: bool = False) -> dict:
    setting = common.get_setting(setting_name)
    workdir = pathlib.Path(workdir)
    sdes = sdes or list(table1.SDES)
    rows = pair_rows(setting, predictor)
    out_dir = workdir / f"table1_seeds_{setting.name}"
    store = common.CellStore(out_dir, "seeds", len(sdes) * len(rows) * seeds, report_only)
    models = common.ModelCache(workdir, setting)
    cells: Dict[str, Dict[str, dict]] = {}
    for sde in table1.SDES:
        for row in rows:
            keys = [f"{table1.SDES[sde]}__{row['label'].replace(' ', '_')}__seed{s}" for s in range(seeds)]
            results = [store.run(k, table1._cell(models, workdir, table1.SDES[sde], row, setting.num_samples, s))
                       if sde in sdes else cached(store, k) for s, k in enumerate(keys)]
            fids = [r["fid"] for r in results if "fid" in r]
            cells.setdefault(sde, {})[row["label"]] = summarize(fids) if fids else {"pending": True}
    real = common.real_reference(setting, workdir, report_only)
    results = {"setting": setting.__dict__, "rows": [r["label"] for r in rows], "cells": cells,
               "seeds": seeds, "fid_real_heldout": real}
    stem = f"table1_seeds_{setting.name}"
    common.write_outputs(out_dir, stem, markdown(cells, rows, setting, seeds, real), results,
                         lambda p: plot(cells, rows, p), publish)
    return results


def _cell_text(c: dict) -> str:
    if "mean" not in c:
        return "pending"
    return f"{c['mean']:.2f} ± {c['std'] or 0:.2f}"


def markdown(cells: dict, rows: List[dict], setting, seeds: int, real: Optional[dict]) -> str:
    p, pc = (r["label"] for r in rows)
    header = ["SDE", f"{p} FID", f"{pc} FID", "PC − P ± paired stderr"]
    body = []
    for sde, c in cells.items():
        done = "mean" in c[p] and "mean" in c[pc]
        diff = difference(c[p], c[pc]) if done else None
        body.append([sde, _cell_text(c[p]), _cell_text(c[pc]),
                     "pending" if diff is None else f"{diff['mean']:+.2f} ± {diff['paired_stderr'] or 0:.2f}"])
    note = (f"\nDomain-classifier FID, mean ± std over {seeds} independent sets of {setting.num_samples} samples "
            f"(seed 0 is Table 1's cell); equal NFE ({rows[0]['expected_nfe']}). Seed s gives both samplers the "
            f"same prior draw, so the difference uses the paired standard error of the per-seed differences"
            f"{common.real_note(real)}.\n")
    return f"## PC against predictor-only at equal NFE (setting {setting.name})\n\n" + \
        common.markdown_table(header, body) + note


def plot(cells: dict, rows: List[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, row in enumerate(rows):
        xs = [j + 0.15 * (2 * i - 1) for j in range(len(cells))]
        stats = [cells[s][row["label"]] for s in cells]
        ax.errorbar(xs, [c.get("mean", np.nan) for c in stats], [c.get("std") or 0 for c in stats], fmt="o",
                    capsize=3, label=row["label"])
    ax.set_xticks(range(len(cells)), list(cells))
    ax.set_ylabel("domain FID (mean ± std)")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--setting", default="cpu", choices=sorted(common.SETTINGS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sdes", default=",".join(table1.SDES), help=f"comma list of {list(table1.SDES)}")
    p.add_argument("--predictor", default="Euler-Maruyama", choices=list(table1.PREDICTORS))
    p.add_argument("--publish", action="store_true")
    p.add_argument("--report_only", action="store_true")
    a = p.parse_args(argv)
    unknown = [s for s in a.sdes.split(",") if s not in table1.SDES]
    if unknown:
        p.error(f"unknown SDEs {unknown}; choose from {list(table1.SDES)}")
    import utils

    with utils.StopSignal("stopping after the current batch or cell (finished cells are kept)", hard_exit=True):
        return run(a.workdir, a.setting, a.seeds, a.sdes.split(","), a.predictor, a.publish, a.report_only)


if __name__ == "__main__":
    main()
