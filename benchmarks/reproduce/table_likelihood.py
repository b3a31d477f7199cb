"""bits/dim by the probability-flow ODE (VP, sub-VP, VE) and the DDPM variational bound on the same test data.

    python -m benchmarks.reproduce.table_likelihood --workdir=/tmp/repro --setting=tiny [--publish]

Models are those of table1 (continuous DSM) plus the DDPM L_simple model, all on the same network; every figure is
on the first ``setting.lik_examples`` test examples (8-bit data, bits/dim of the integer images).
"""
from __future__ import annotations

import pathlib
from typing import Optional

from benchmarks.reproduce import common

MODELS = {"VP (cont. DSM)": "vp_dsm", "sub-VP (cont. DSM)": "subvp_dsm", "VE (cont. DSM)": "ve_dsm",
          "VP (DDPM L_simple)": "vp_ddpm"}
METHODS = {"ODE": "ode", "DDPM bound": "ddpm_bound"}


def _compute(models: common.ModelCache, workdir: pathlib.Path, setting, model: str, method: str):
    def compute() -> dict:
        cfg, _ = models.get(model)
        return common.bits_per_dim(cfg, common.model_dir(workdir, setting, model), setting, method)

    return compute


def run(workdir: str, setting_name: str = "tiny", publish: bool = False,
        report_only: bool = False) -> dict:
    setting = common.get_setting(setting_name)
    workdir = pathlib.Path(workdir)
    out_dir = workdir / f"table_likelihood_{setting.name}"
    store = common.CellStore(out_dir, "likelihood", len(MODELS) * len(METHODS), report_only)
    models = common.ModelCache(workdir, setting)
    cells = {}
    for label, model in MODELS.items():
        for mlabel, method in METHODS.items():
            cells.setdefault(label, {})[mlabel] = store.run(f"{model}__{method}",
                                                            _compute(models, workdir, setting, model, method))
    results = {"setting": setting.__dict__, "cells": cells, "computed_cells": store.computed,
               "pending_cells": store.pending}
    common.write_outputs(out_dir, f"table_likelihood_{setting.name}", markdown(cells, setting), results,
                         lambda p: plot(cells, p, setting), publish)
    return results


def markdown(cells: dict, setting) -> str:
    header = ["model"] + [f"{m} bits/dim" for m in METHODS] + [f"{m} NFE" for m in METHODS] + ["ODE s"]
    rows = []
    for label in MODELS:
        c = cells[label]
        bpd = [common.cell_text(c[m], lambda r: f"{r['bpd']:.3f} ± {r['bpd_stderr'] or 0:.3f}") for m in METHODS]
        nfe = [common.cell_text(c[m], lambda r: f"{r['nfe']:.0f}") for m in METHODS]
        rows.append([label] + bpd + nfe + [c["ODE"].get("seconds", "n/a")])
    note = (f"\n{setting.lik_examples} test examples; ODE: Tsit5, rtol=atol={setting.lik_tol:g}, Hutchinson trace "
            f"(Gaussian probe), one uniform dequantization (an upper bound on -log P(k)); DDPM bound: exact sum of "
            f"all N={setting.N} terms (VP chain only). NFE: per example, mean.\n")
    return f"## Likelihood (setting {setting.name})\n\n" + common.markdown_table(header, rows) + note


def plot(cells: dict, path, setting) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(MODELS)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, m in enumerate(METHODS):
        vals = [cells[k][m].get("bpd", np.nan) for k in labels]
        ax.bar(np.arange(len(labels)) + (j - 0.5) * width, vals, width, label=m)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("bits/dim")
    ax.set_title(f"Likelihood ({setting.name}: {setting.base})")
    ax.legend()
    common.save_figure(fig, path)


def main(argv: Optional[list] = None) -> dict:
    return common.cli_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
