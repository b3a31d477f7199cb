"""Training objectives on the same network: DDPM L_simple, continuous DSM, likelihood-weighted DSM, SMLD.

    python -m benchmarks.reproduce.table_objectives --workdir=/tmp/repro --setting=tiny [--publish]

Each objective trains the same U-Net (same width, depth, steps, batch, optimiser) with ``run_lib.train``; each row
reports sample quality (domain-classifier FID of PC_N samples: reverse-diffusion predictor + one Langevin step,
the same sampler for every row), bits/dim by the probability-flow ODE, and, for the VP models, the DDPM bound.
"""
from __future__ import annotations

import pathlib
from typing import Optional

from benchmarks.reproduce import common

OBJECTIVES = {  # row label -> model name in common.MODELS
    "DDPM L_simple (VP chain)": "vp_ddpm",
    "continuous DSM, sigma^2 weighting (VP)": "vp_dsm",
    "likelihood-weighted DSM + IS (VP)": "vp_dsm_lw",
    "SMLD / NCSN (VE chain)": "ve_smld",
}
COLUMNS = ("quality", "ode_bpd", "ddpm_bound")
VP_CHAIN = ("vp_ddpm", "vp_dsm", "vp_dsm_lw")


def sampler(N: int) -> dict:
    return {"label": f"PC{N} reverse diffusion + Langevin", "method": "pc", "expected_nfe": 2 * N,
            "options": {"predictor": "reverse_diffusion", "corrector": "langevin", "num_steps": N}}


def _compute(models: common.ModelCache, workdir: pathlib.Path, setting, model: str, column: str):
    def compute() -> dict:
        cfg, ev = models.get(model)
        mdir = common.model_dir(workdir, setting, model)
        if column == "quality":
            s = sampler(setting.N)
            out = common.draw(cfg, ev, s["method"], s["options"], setting.num_samples, seed=cfg.seed + 11)
            return {**common.quality(cfg, workdir, out["images"]), **out, "sampler": s["label"]}
        if column == "ddpm_bound" and model not in VP_CHAIN:
            raise ValueError("the DDPM bound needs the VP chain")
        return common.bits_per_dim(cfg, mdir, setting, "ode" if column == "ode_bpd" else "ddpm_bound")

    return compute


def run(workdir: str, setting_name: str = "tiny", publish: bool = False,
        report_only: bool = False) -> dict:
    setting = common.get_setting(setting_name)
    workdir = pathlib.Path(workdir)
    out_dir = workdir / f"table_objectives_{setting.name}"
    store = common.CellStore(out_dir, "objectives", len(OBJECTIVES) * len(COLUMNS), report_only)
    models = common.ModelCache(workdir, setting)
    cells = {label: {} for label in OBJECTIVES}
    for label, model in sorted(OBJECTIVES.items(), key=lambda kv: kv[1] in common.SHARED_WITH_TABLE1):
        for column in COLUMNS:  # models of table1 last: a concurrent table1 run may still be training them
            cells.setdefault(label, {})[column] = store.run(f"{model}__{column}",
                                                            _compute(models, workdir, setting, model, column))
    train = {m: common.ensure_or_read_model(workdir, setting, m, report_only) for m in OBJECTIVES.values()}
    real = common.real_reference(setting, workdir, report_only)
    results = {"setting": setting.__dict__, "cells": cells, "models": train, "computed_cells": store.computed,
               "pending_cells": store.pending, "sampler": sampler(setting.N), "fid_real_heldout": real}
    common.write_outputs(out_dir, f"table_objectives_{setting.name}", markdown(cells, setting, train, real),
                         results,
                         lambda p: plot(cells, p, setting), publish)
    return results


def _bpd(c: dict) -> str:
    return common.cell_text(c, lambda c: f"{c['bpd']:.3f} ± {c['bpd_stderr'] or 0:.3f}")


def markdown(cells: dict, setting, train: dict, real: Optional[dict] = None) -> str:
    header = ["objective", "FID", "NFE", "ODE bits/dim", "DDPM bound bits/dim", "train s"]
    rows = []
    for label, model in OBJECTIVES.items():
        c = cells[label]
        q = c["quality"]
        rows.append([label, common.cell_fid(q), q.get("nfe", "n/a"), _bpd(c["ode_bpd"]), _bpd(c["ddpm_bound"]),
                     train[model].get("train_seconds", "pending")])
    note = (f"\nSame small U-Net ({setting.nf} channels, {setting.n_iters} steps, batch {setting.batch_size}) for "
            f"every objective. FID: domain classifier, {setting.num_samples} samples of "
            f"{sampler(setting.N)['label']}{common.real_note(real)}. bits/dim on {setting.lik_examples} test examples (ODE: Hutchinson, "
            f"rtol=atol={setting.lik_tol:g}, uniform dequantization; DDPM bound: all N={setting.N} terms).\n")
    return f"## Training objectives (setting {setting.name})\n\n" + common.markdown_table(header, rows) + note


def plot(cells: dict, path, setting) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(OBJECTIVES)
    fid = [cells[k]["quality"].get("fid", np.nan) for k in labels]
    bpd = [cells[k]["ode_bpd"].get("bpd", np.nan) for k in labels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, vals, name in zip(axes, (fid, bpd), ("domain-classifier FID", "ODE bits/dim")):
        ax.barh(range(len(labels)), vals)
        ax.set_yticks(range(len(labels)), [lbl.split(" (")[0] for lbl in labels], fontsize=8)
        ax.set_xlabel(name)
    fig.suptitle(f"Objectives ({setting.name}: {setting.base})")
    common.save_figure(fig, path)


def main(argv: Optional[list] = None) -> dict:
    return common.cli_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
