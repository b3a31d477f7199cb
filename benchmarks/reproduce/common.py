"""Shared machinery of the table commands: settings, cached model training, cached cells, tables, plots."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"


# ---- settings ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """Scale of a reproduction: data (``base`` config), training length, chain length N, sample counts."""

    name: str
    base: str                 # "digits" (configs/default.py) or "fashion_mnist" (configs/fashion_mnist.py)
    n_iters: int              # training steps per model
    N: int                    # discretisation steps of every SDE (the paper's 1000)
    num_samples: int          # samples per table cell (quality figure)
    batch_size: int           # training batch
    nf: int                   # U-Net base width
    ch_mult: tuple
    low_nfe_steps: int        # time nodes of DDIM / DPM-Solver++ / Heun
    lik_examples: int         # test examples per bits/dim figure
    lik_tol: float            # rtol = atol of the likelihood ODE
    sigma_max: float          # VE σ_max (≈ the largest pairwise data distance, Song & Ermon 2020)
    # None below: the base config's value
    num_res_blocks: Optional[int] = None  # residual blocks per U-Net level
    dropout: Optional[float] = None       # U-Net dropout
    warmup: Optional[int] = None          # learning-rate warm-up steps
    ema_rate: Optional[float] = None      # EMA decay; keep rate**n_iters ≈ 0 (else the EMA keeps the init)


SETTINGS: Dict[str, Setting] = {
    # for tests/test_reproduce.py: seconds per model, meaningless numbers
    "minimal": Setting("minimal", "digits", 20, 40, 16, 32, 8, (1,), 4, 4, 1e-3, 20.0, num_res_blocks=1,
                       warmup=5),
    # digits 8×8: minutes on 2 cores
    "tiny": Setting("tiny", "digits", 500, 100, 256, 64, 32, (1, 2), 10, 64, 1e-5, 20.0),
    # Fashion-MNIST 28×28, small U-Net (0.24 M parameters; one training step of batch 64 ≈ 0.4 s and one forward
    # pass of 128 images ≈ 0.25 s on 2 cores; nf=32 with 2 blocks costs 1.8 s a step): about an hour per table.
    # EMA 0.99: with Fashion-MNIST's 0.999 over 1500 steps 22% of the EMA would still be the random init.
    "cpu": Setting("cpu", "fashion_mnist", 1500, 100, 128, 64, 16, (1, 2, 2), 10, 64, 1e-5, 50.0,
                   num_res_blocks=1, dropout=0.0, warmup=150, ema_rate=0.99),
}


def get_setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise ValueError(f"unknown --setting={name!r}; valid settings: {sorted(SETTINGS)}")
    return SETTINGS[name]


def base_config(setting: Setting, sde: str, **training):
    """The base config of ``setting`` with SDE ``sde`` and the given ``config.training`` fields."""
    if setting.base == "digits":
        from configs.default import get_config
    else:
        from configs.fashion_mnist import get_config
    config = get_config()
    t = config.training
    t.n_iters, t.batch_size = setting.n_iters, setting.batch_size
    t.snapshot_freq = setting.n_iters
    t.snapshot_sampling = False
    t.log_freq = max(1, min(100, setting.n_iters // 5))
    t.eval_freq = setting.n_iters
    for k, v in training.items():
        t[k] = v
    config.sde.name, config.sde.N, config.sde.sigma_max = sde, setting.N, setting.sigma_max
    config.model.nf, config.model.ch_mult = setting.nf, tuple(setting.ch_mult)
    for section, field, value in ((config.model, "num_res_blocks", setting.num_res_blocks),
                                  (config.model, "dropout", setting.dropout), (config.optim, "warmup", setting.warmup),
                                  (config.model, "ema_rate", setting.ema_rate)):
        if value is not None:
            section[field] = value
    config.sampling.num_samples = config.sampling.batch_size = setting.num_samples
    config.eval.batch_size = min(setting.lik_examples, 128)
    config.eval.num_samples = setting.num_samples
    return config


# ---- models: trained once, shared by the tables -------------------------------------------------------------------
# name -> (sde, config.training fields)
MODELS: Dict[str, tuple] = {
    "ve_dsm": ("vesde", {"loss": "dsm"}),
    "vp_dsm": ("vpsde", {"loss": "dsm"}),
    "subvp_dsm": ("subvpsde", {"loss": "dsm"}),
    "vp_ddpm": ("vpsde", {"loss": "ddpm", "continuous": False}),
    "vp_dsm_lw": ("vpsde", {"loss": "dsm", "likelihood_weighting": True, "importance_sampling": True}),
    "ve_smld": ("vesde", {"loss": "smld", "continuous": False}),
}
SHARED_WITH_TABLE1 = ("ve_dsm", "vp_dsm", "subvp_dsm")


def model_config(setting: Setting, name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    sde, training = MODELS[name]
    return base_config(setting, sde, **training)


def model_dir(workdir: pathlib.Path, setting: Setting, name: str) -> pathlib.Path:
    return pathlib.Path(workdir) / "models" / f"{setting.name}_{name}"


def ensure_model(workdir: pathlib.Path, setting: Setting, name: str) -> dict:
    """Train model ``name`` with ``run_lib.train`` unless ``done.json`` says it finished; returns that record.
    An exclusive lock on ``<model dir>.lock`` lets several table commands (or ``python -m
    benchmarks.reproduce.common --train``) share a workdir: a second one waits for the training, then reads it."""
    import fcntl

    import experiment
    import run_lib

    d = model_dir(workdir, setting, name)
    done = d / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f"{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():   # trained by another process while this one waited
            return json.loads(done.read_text())
        print(f"training {name} ({setting.n_iters} steps) in {d}", flush=True)
        t0 = time.time()
        state = run_lib.train(experiment.Experiment.from_config(model_config(setting, name)), str(d))
        if int(state.step) < setting.n_iters:   # stopped by a signal: resumable, not done
            raise SystemExit(f"training of {name} stopped at step {int(state.step)} of {setting.n_iters}; "
                             f"rerun the command to resume it")
        record = {"model": name, "n_iters": setting.n_iters, "train_seconds": round(time.time() - t0, 1)}
        _write_json(done, record)
    return record


class ModelCache:
    """Restored eval states (EMA parameters) by model name, loaded on first use."""

    def __init__(self, workdir: pathlib.Path, setting: Setting):
        self.workdir, self.setting, self._states = pathlib.Path(workdir), setting, {}

    def get(self, name: str):
        import experiment

        if name not in self._states:
            ensure_model(self.workdir, self.setting, name)
            cfg = model_config(self.setting, name)
            exp = experiment.Experiment.from_config(cfg)
            self._states[name] = (cfg, experiment.restore_eval_state(exp, str(model_dir(self.workdir, self.setting,
                                                                                        name))))
        return self._states[name]


# ---- one cell: sampling and its quality figure ---------------------------------------------------------------------
def draw(cfg, ev, method: str, options: dict, n: int, seed: int, N: Optional[int] = None,
         batch_index: int = 0) -> dict:
    """``n`` samples of ``method`` (SDE rebuilt with ``N`` steps when given) from key fold_in(key(seed),
    batch_index): uint8 images, NFE, compile and sampling seconds (the sampler is compiled ahead, so
    ``sample_s`` excludes compilation)."""
    import datasets
    import jax
    import samplers

    sde = ev.sde if N is None else dataclasses.replace(ev.sde, N=int(N))
    shape = (n,) + tuple(run_data_shape(cfg))
    fn, _ = samplers.build_sampler(sde, ev.model.score_fn(ev.params, sde), shape, method, mesh=None, **options)
    key = jax.random.fold_in(jax.random.key(seed), batch_index)
    t0 = time.time()
    compiled = fn.lower(key).compile()
    t1 = time.time()
    x, nfe = jax.block_until_ready(compiled(key))
    t2 = time.time()
    images = datasets.get_data_transform(cfg).inverse(np.asarray(x))
    return {"images": images, "nfe": int(nfe), "compile_s": round(t1 - t0, 2), "sample_s": round(t2 - t1, 2)}


def run_data_shape(cfg) -> tuple:
    import datasets

    return datasets.data_shape(cfg.data)


def quality(cfg, workdir: pathlib.Path, images: np.ndarray) -> dict:
    """Domain-classifier FID of uint8 samples: digits classifier (digits), else the Fashion-MNIST domain
    classifier of ``evaluation/classifiers.py`` against train-split statistics built once in ``<workdir>/fid``."""
    import experiment
    import run_lib
    from evaluation import digits

    if cfg.data.source == "digits":
        q = digits.digits_quality(images)
        return {"fid": q["samples"]["domain_fid"], "fid_real_heldout": q["real_heldout"]["domain_fid"],
                "classifier_score": q["samples"]["classifier_score"]}
    cfg = _fid_config(cfg, workdir)
    exp = experiment.Experiment.from_config(cfg)
    if not run_lib.fid_stats_path(cfg, workdir, "domain").exists():
        run_lib.fid_stats(exp, str(workdir))
    out = run_lib.fid_figures(exp, str(workdir), images, len(images))
    return {"fid": out["domain"]["fid"], "kid": out["domain"].get("kid")}


REAL_SUBSETS = 8  # disjoint sets of held-out real images behind the reference figure and its spread


def real_reference(setting: Setting, workdir: pathlib.Path, report_only: bool = False) -> Optional[dict]:
    """The quality figure of real held-out test images, the floor a sampler can reach, and how much it moves
    between sets of the cells' size: ``{"fid": mean, "fid_std": std, "fid_subsets": [...], "size": n}`` over
    ``REAL_SUBSETS`` disjoint sets of ``setting.num_samples`` test images (std: the noise of one cell's FID that
    comes from using only n images). Computed once into ``<workdir>/fid/real_heldout_<setting>.json``; None for
    digits, whose cells carry their own reference. ``report_only``: only what is stored (None if nothing)."""
    if setting.base == "digits":
        return None
    path = pathlib.Path(workdir) / "fid" / f"real_heldout_{setting.name}.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    if report_only:
        return stored or None
    if "fid_subsets" not in stored:  # also upgrades a file written before the spread was recorded
        import datasets

        cfg = model_config(setting, "vp_dsm")
        images, _ = datasets.uint8_split(cfg, "test")
        stored = real_spread([quality(cfg, workdir, part)["fid"] for part in
                              disjoint_subsets(images, setting.num_samples, REAL_SUBSETS)], setting.num_samples)
        _write_json(path, stored)
    return stored


def disjoint_subsets(images: np.ndarray, n: int, k: int) -> List[np.ndarray]:
    """The first ``k`` consecutive blocks of ``n`` images (fewer when there are not enough)."""
    return [images[i * n:(i + 1) * n] for i in range(min(k, len(images) // n))]


def real_spread(fids: List[float], size: int) -> dict:
    return {"fid": float(np.mean(fids)), "fid_std": float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
            "fid_subsets": [float(f) for f in fids], "size": size}


def real_note(real: Optional[dict], what: str = "held-out real test images") -> str:
    if real is None:
        return ""
    spread = "" if real.get("fid_std") is None else (
        f" ± {real['fid_std']:.2f} (mean ± std over {len(real['fid_subsets'])} disjoint sets of {real['size']}; the "
        f"std is a lower bound on the noise of one cell's figure, which also uses {real['size']} images)")
    return f"; {what} score {real['fid']:.2f}{spread}"


def _fid_config(cfg, workdir):
    import ml_collections

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.eval.fid_extractors = "domain"
    cfg.eval.fid_stats_dir = str(pathlib.Path(workdir) / "fid")
    cfg.eval.classifier_dir = str(pathlib.Path(workdir) / "fid" / "classifiers")
    return cfg


def bits_per_dim(cfg, mdir: pathlib.Path, setting: Setting, method: str) -> dict:
    """bits/dim of a trained model on ``setting.lik_examples`` test examples by ``run_lib.likelihood``:
    ``method`` "ode" (probability-flow ODE, Hutchinson with Gaussian probes, uniform dequantization) or
    "ddpm_bound" (the DDPM variational bound summed over all N steps)."""
    import ml_collections

    import experiment
    import run_lib

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    lik = cfg.eval.likelihood
    lik.method, lik.num_examples = method, setting.lik_examples
    lik.rtol = lik.atol = setting.lik_tol
    r = run_lib.likelihood(experiment.Experiment.from_config(cfg), str(mdir))
    return {"bpd": r["bpd"], "bpd_stderr": r["bpd_stderr"], "nfe": r["nfe_mean"], "seconds": r["wall_time_s"],
            "num_examples": r["num_examples"]}


# ---- resumable cells ------------------------------------------------------------------------------------------------
class CellStore:
    """Per-cell JSON results in ``<dir>/cells/<key>.json``; ``run`` computes a cell only when its file is missing,
    printing a progress line ``[table k/n] key: summary``. A result's ``images`` (uint8 samples) are not stored
    but tiled (first 64) into ``<key>.png``."""

    def __init__(self, directory: pathlib.Path, table: str, total: int, report_only: bool = False):
        self.dir = pathlib.Path(directory) / "cells"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.table, self.total, self.done, self.computed, self.t0 = table, total, 0, 0, time.time()
        self.report_only, self.pending = report_only, 0

    def path(self, key: str) -> pathlib.Path:
        return self.dir / f"{key.replace('/', '_')}.json"

    def run(self, key: str, compute: Callable[[], dict]) -> dict:
        self.done += 1
        p = self.path(key)
        if p.exists():
            result, status = json.loads(p.read_text()), "cached"
        elif self.report_only:  # render what exists; the cell stays missing
            self.pending += 1
            return {"pending": True}
        else:
            t0 = time.time()
            try:
                result = compute()
            except (ValueError, NotImplementedError) as e:  # e.g. no ancestral chain for sub-VP: an n/a cell
                result = {"error": f"{type(e).__name__}: {e}"}
            result["cell_seconds"] = round(time.time() - t0, 2)
            images = result.pop("images", None)
            if images is not None and np.ndim(images) == 4:   # a look at the samples beside the figure
                import utils

                utils.save_image_grid(np.asarray(images)[:64], p.with_suffix(".png"))
            _write_json(p, result)
            self.computed += 1
            status = f"{result['cell_seconds']:.1f}s"
        summary = result.get("error", "")[:60] or ", ".join(
            f"{k}={_fmt(result[k])}" for k in ("fid", "bpd", "nfe") if result.get(k) is not None)
        print(f"[{self.table} {self.done}/{self.total}] {key}: {summary} ({status}; "
              f"elapsed {time.time() - self.t0:.0f}s{self.eta()})", flush=True)
        self.check_stop()
        return result

    def eta(self) -> str:
        """``, ETA ~12m`` from the mean time of the cells computed so far (cached cells cost nothing)."""
        if not self.computed or self.done >= self.total:
            return ""
        per_cell = (time.time() - self.t0) / self.computed
        return f", ETA ~{(self.total - self.done) * per_cell / 60:.0f} min if the rest are computed"

    def check_stop(self):
        """After a cell: stop (``utils.Stopped``) when a signal asked to; finished cells stay cached."""
        import utils

        signum = utils.stop_requested()
        if signum is not None and self.done < self.total:
            raise utils.Stopped(signum, f"stopped after cell {self.done}/{self.total} of {self.table}; the finished "
                                        f"cells are kept in {self.dir}: rerun the same command to resume")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    os.replace(tmp, path)


# ---- outputs ------------------------------------------------------------------------------------------------------------
def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


def write_outputs(out_dir: pathlib.Path, stem: str, markdown: str, results: dict, plot: Callable,
                  publish: bool) -> List[pathlib.Path]:
    """``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` (``plot(path)``) in ``out_dir``; copied to
    ``benchmarks/results/`` with ``publish``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.json", out_dir / f"{stem}.png"]
    paths[0].write_text(markdown)
    _write_json(paths[1], results)
    import matplotlib

    matplotlib.use("Agg")
    plot(paths[2])
    if publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, RESULTS_DIR / p.name)
        print(f"published {[p.name for p in paths]} to {RESULTS_DIR}")
    print(f"wrote {paths[0]}\n\n{markdown}", flush=True)
    return paths


def parse_args(argv, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", required=True, help="models, cached cells and outputs go here (resumable)")
    p.add_argument("--setting", default="tiny", help=f"one of {sorted(SETTINGS)}")
    p.add_argument("--publish", action="store_true", help="copy the table, plot and JSON to benchmarks/results/")
    p.add_argument("--report_only", action="store_true",
                   help="compute nothing: render the table from the cached cells, missing ones shown as 'pending'")
    args = p.parse_args(argv)
    get_setting(args.setting)
    return args


def cell_fid(result: dict) -> str:
    if result.get("pending"):
        return "pending"
    if "error" in result:
        return "n/a"
    return f"{result['fid']:.2f}"


def cell_text(result: dict, fmt: Callable[[dict], str]) -> str:
    """``fmt(result)``, or "pending" (not computed yet, ``--report_only``) / "n/a" (not applicable)."""
    if result.get("pending"):
        return "pending"
    return "n/a" if "error" in result else fmt(result)


def ensure_or_read_model(workdir, setting, name, report_only: bool) -> dict:
    """``ensure_model``, except with ``report_only``: the training record if it exists, else {}."""
    if not report_only:
        return ensure_model(workdir, setting, name)
    done = model_dir(workdir, setting, name) / "done.json"
    return json.loads(done.read_text()) if done.exists() else {}


def save_figure(fig, path) -> None:
    """Lay out, write (120 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli_main(run: Callable, doc: str, argv: Optional[list] = None) -> dict:
    """The command line of a table script: parse the shared flags and call ``run``."""
    import utils

    args = parse_args(sys.argv[1:] if argv is None else argv, doc.splitlines()[0])
    with utils.StopSignal("stopping after the current batch or cell (finished cells are kept)", hard_exit=True):
        return run(args.workdir, args.setting, args.publish, args.report_only)


def train_all(argv: Optional[list] = None) -> None:
    """``python -m benchmarks.reproduce.common --workdir=W --setting=S [model ...]``: train the models of the
    tables ahead (all of ``MODELS`` by default), e.g. in a second process beside a table command."""
    p = argparse.ArgumentParser(description="train the tables' models ahead (default: all of MODELS)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--setting", default="tiny")
    p.add_argument("models", nargs="*", default=list(MODELS))
    args = p.parse_args(argv)
    setting = get_setting(args.setting)
    for name in args.models:
        print(ensure_model(pathlib.Path(args.workdir), setting, name), flush=True)


if __name__ == "__main__":
    train_all()
