"""The ``--mode`` runners, each ``fn(experiment, workdir)``: train, evaluate, sample (with a task: ``controllable``),
likelihood, fid_stats, eval_samples.

``main.py`` builds the ``experiment.Experiment`` once and calls ``MODES[mode](experiment, workdir)``. The runners
hold the loops and what they report (the train loop and its periodic work, per-checkpoint evaluation, the sample
folders); what they are built from (train state, train step, the mesh, restoring, drawing and writing samples)
is in ``experiment``, the libraries (losses, samplers, datasets, models, ...) below it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import controllable_generation
import datasets
import likelihood as lik
import losses
import sde_lib
import samplers
import utils
from evaluation import classifiers, features, inception, quality, reference, sample_files
from evaluation.metrics import palette_fit
from experiment import (EvalState, Experiment, StepCompilation, Training, TrainState, any_process, check_batch_size,
                        compile_step, compile_step_in_background, draw_samples, jit_sharded_step,
                        learning_rate_schedule, make_train_step, open_training, replicate, restore_eval_state,
                        sample_folder, sample_manifest, sampler_name, shard_batch, to_output, write_samples)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What the training loop needs besides the state."""

    exp: Experiment
    workdir: pathlib.Path
    ckpt: utils.CheckpointManager
    logger: utils.MetricLogger
    schedule: optax.Schedule
    step_fn: Callable
    is_main: bool
    timings: dict = dataclasses.field(default_factory=dict)  # start-up phases (s), reported after the first step
    compiling: Optional[StepCompilation] = None  # the train step being compiled in the background
    init_done: float = 0.0  # time.time() when the state to start from was ready (the compile phase starts)
    eval_fn: Optional[Callable] = None   # the held-out loss of training.eval_freq, compiled on first use


def warn_ema_keeps_init(ema_rate: float, n_iters: int, limit: float = 0.05) -> float:
    """The weight rate**n_iters that the EMA parameters still give the random initialisation after the run;
    warns (naming config.model.ema_rate) when it exceeds ``limit`` — such EMA samples are noise-like."""
    share = float(ema_rate) ** int(n_iters)
    if share > limit:
        logging.warning("config.model.ema_rate=%g over config.training.n_iters=%d leaves %.0f%% of the random "
                        "initialisation in the EMA parameters used for sampling; lower the rate (e.g. %.3g) or train "
                        "longer", ema_rate, n_iters, 100 * share, 1 - 3.0 / max(int(n_iters), 1))
    return share


def warn_warmup_longer_than_run(warmup: int, n_iters: int) -> bool:
    """Warns (naming config.optim.warmup) when the linear warm-up does not finish within the run: the learning
    rate then never reaches config.optim.lr. Returns whether it warned."""
    if int(warmup) <= int(n_iters):
        return False
    logging.warning("config.optim.warmup=%d is longer than config.training.n_iters=%d: the learning rate only "
                    "reaches %.0f%% of config.optim.lr; lower the warm-up (e.g. --config.optim.warmup=%d)",
                    warmup, n_iters, 100 * n_iters / warmup, max(int(n_iters) // 10, 0))
    return True


def train(exp: Experiment, workdir: str) -> TrainState:
    """``--mode=train``: train ``exp`` in ``workdir``, resuming from its latest readable checkpoint; returns the
    final state.

    Nothing is written before the checks of ``experiment.open_training`` pass (batch size, one trainer per
    workdir, the checkpoint to resume, the first batch of data). SIGTERM/SIGINT save a checkpoint after the current
    step and return; a NaN/inf loss raises ``FloatingPointError`` without saving, so the last good checkpoint stays
    the latest."""
    timings = {"import": max(utils.process_age() - exp.build_seconds, 0.0)} if _run_by_main() else {}
    t0 = time.time()
    step_fn = jit_sharded_step(make_train_step(exp.loss_fn(), exp.optimizer, exp.config.model.ema_rate,
                                               exp.config.seed), exp.mesh)
    with open_training(exp, workdir, lambda: compile_step_in_background(step_fn, exp)) as opened:
        init_done = time.time()
        timings["init"] = exp.build_seconds + init_done - t0
        run = _start_run(exp, pathlib.Path(workdir), opened, timings, step_fn, init_done)
        try:
            with utils.StopSignal("saving a checkpoint after this step (or sampling batch) and stopping") as stop:
                return _train_loop(run, replicate(opened.state, exp.mesh), opened.batches, stop)
        finally:
            run.logger.close()


def _start_run(exp: Experiment, workdir: pathlib.Path, opened: Training, timings: dict, step_fn: Callable,
               init_done: float) -> Run:
    """Say what runs and open the metric log (``config.json`` is written by ``open_training``)."""
    config, is_main, start = exp.config, jax.process_index() == 0, int(opened.state.step)
    print(f"training steps {start}..{config.training.n_iters} on {jax.device_count()} devices "
          f"({jax.process_count()} processes), global batch {config.training.batch_size}, "
          f"lr {config.optim.lr:g} (warm-up {config.optim.warmup}), EMA rate {config.model.ema_rate}", flush=True)
    warn_ema_keeps_init(config.model.ema_rate, config.training.n_iters)
    warn_warmup_longer_than_run(config.optim.warmup, config.training.n_iters)
    logger = utils.MetricLogger(workdir, config.training.n_iters, start, config.training.log_freq, enabled=is_main,
                                pending=periodic_seconds(config, exp.sde))
    return Run(exp, workdir, opened.ckpt, logger, learning_rate_schedule(config.optim), step_fn, is_main, timings,
               compiling=opened.background, init_done=init_done)


def _train_loop(run: Run, state: TrainState, data: Iterator, stop: utils.StopSignal) -> TrainState:
    config = run.exp.config
    start, n_iters = int(state.step), config.training.n_iters
    for step in range(start, n_iters):
        batch = next(data)
        if step == start:
            run.step_fn = _compile_step(run, state, batch)
            t_first = time.time()
        state, metrics = run.step_fn(state, batch)
        metrics = jax.device_get(metrics)  # also blocks: CPU collectives can deadlock when steps pile up
        if step == start:
            run.timings["first step"] = time.time() - t_first
            print(first_step_line(run.timings), flush=True)
        _check_finite(run, metrics, step)
        metrics["lr"] = float(run.schedule(step))
        run.logger.log(step + 1, metrics, config.training.batch_size)
        if step == start:
            run.logger.mark(step + 1)  # rates and ETA without the compilation of the first step
        stopped = _periodic_work(run, state, step + 1)
        if stopped or _stop_requested(stop, step + 1, n_iters):
            run.ckpt.save(step + 1, state)
            run.ckpt.wait()
            print(f"stopped by signal after step {step + 1}; checkpoint saved in {run.ckpt.directory}", flush=True)
            break
    return state


def _run_by_main() -> bool:
    """Whether this process is ``python main.py`` (its start-up then counts towards the time to the first step)."""
    return pathlib.Path(getattr(sys.modules.get("__main__"), "__file__", None) or "-").name == "main.py"



def _compile_step(run: Run, state: TrainState, batch: dict) -> Callable:
    """The train step compiled for ``batch`` (``experiment.compile_step``), its time kept in ``run.timings``."""
    compiled, _, run.timings["cached"] = compile_step(run.step_fn, state, batch, run.compiling)
    run.timings["compile"] = time.time() - run.init_done
    return compiled


def first_step_line(timings: dict) -> str:
    """``first step after 41.2 s (import 3.1 s, init 6.0 s, compile 30.4 s, step 1.7 s)``: consecutive phases of
    the process (under ``main.py``), from its start to the first step done. "compile" runs from the state being
    ready to the train step compiled (what of its compilation did not overlap the init, plus the set-up between)."""
    phases = [k for k in ("import", "init", "compile", "first step") if k in timings]
    parts = ", ".join(f"{k.split()[-1]} {timings[k]:.1f} s" + (" from the compilation cache"
                                                              if k == "compile" and timings.get("cached") else "")
                      for k in phases)
    return f"first step after {sum(timings[k] for k in phases):.1f} s ({parts})"


def _periodic_work(run: Run, state: TrainState, step: int) -> bool:
    """Checkpoint, sample grid and periodic evaluation after ``step``, their time kept out of the step rate (and
    counted in the ETA); True when a stop signal interrupted them (the partial work is reported). With several
    processes they are not interrupted (``utils.DeferStops``): the loop's agreed stop follows them."""
    t0 = time.time()
    try:
        with utils.DeferStops() if jax.process_count() > 1 else contextlib.nullcontext():
            _after_step(run, state, step)
            _periodic_eval(run, state, step)
    except utils.Stopped as e:
        print(e.message, flush=True)
        return True
    finally:
        run.logger.exclude(time.time() - t0)
    return False


SIGNAL_SYNC_EVERY = 10  # multi-process: steps between agreeing on a stop signal (one all-gather each time)


def _stop_requested(stop: utils.StopSignal, step: int, n_iters: int) -> bool:
    """Whether to save and stop after ``step``; every process gets the same answer at the same step."""
    if jax.process_count() == 1:
        return stop.requested
    if step % SIGNAL_SYNC_EVERY and step != n_iters:
        return False
    return any_process(stop.requested)


def _check_finite(run: Run, metrics: dict, step: int):
    """Stop (FloatingPointError) before a non-finite loss or gradient norm can reach a checkpoint."""
    for name in ("loss", "grad_norm"):
        if not np.isfinite(metrics[name]):
            run.ckpt.wait()
            raise FloatingPointError(
                f"{name.replace('_', ' ')} became {metrics[name]} at step {step + 1} (lr {run.schedule(step):.3g});"
                f" training stopped without saving. The last good checkpoint is {run.ckpt.last_good()}; lower "
                "config.optim.lr or check the data")


def _after_step(run: Run, state: TrainState, step: int):
    """Periodic checkpoint (every ``snapshot_freq`` steps and at the end) and sample grid (every
    ``sample_freq`` steps, default the snapshot steps, when ``snapshot_sampling``)."""
    cfg = run.exp.config.training
    last = step == cfg.n_iters
    if step % cfg.snapshot_freq == 0 or last:
        run.ckpt.save(step, state)
    if _is_sample_step(cfg, step):
        t0 = time.time()
        outdir = run.workdir / "samples" / f"step_{step}"
        manifest = sample_manifest(run.exp.config, run.workdir, step, True, source="training snapshot")
        samples = write_samples(run.exp, state.ema_params, outdir, step, write=run.is_main, manifest=manifest)
        run.logger.image("samples", outdir / "samples.png", step)
        run.logger.timed("sampling", time.time() - t0)
        if last and run.is_main:
            report_quality(run.exp.config, samples, run.workdir, step)


def _count_multiples(freq: int, after: int, upto: int, last_too: bool = True) -> int:
    """How many of after+1 .. upto are multiples of ``freq``, plus ``upto`` itself if it is not one."""
    n = upto // freq - after // freq if freq else 0
    return n + int(last_too and after < upto and (not freq or upto % freq))


def nfe_guess(sampling_cfg, sde: sde_lib.SDE) -> int:
    """Score evaluations of one batch of ``config.sampling`` as configured (adaptive ODE solvers: a guess of 100)."""
    name = sampler_name(sampling_cfg, sde)
    if "rtol" in name:
        return 100
    steps = int(name.rsplit("_N", 1)[1])
    if sampling_cfg.method == "pc":
        corrector = sampling_cfg.corrector != "none"
        return steps * (1 + corrector * int(sampling_cfg.n_steps))
    return 2 * steps if sampling_cfg.method == "heun" else steps


def periodic_seconds(config, sde: sde_lib.SDE) -> Callable:
    """``pending(step, measured, seconds_per_step)``: seconds of sample grids and periodic evaluations still to come
    after ``step``, each at its last measured time, or before the first at a guess from the step time (a forward
    pass costs about a third of a training step per example) plus, for a grid, one compilation as long as the
    first training step's (``measured["first_step"]``)."""
    cfg = config.training

    def pending(step: int, measured: dict, step_s: float) -> float:
        per_example = step_s / cfg.batch_size / 3
        grids = _count_multiples(cfg.get("sample_freq", None) or cfg.snapshot_freq, step, cfg.n_iters) \
            if cfg.snapshot_sampling else 0
        grid_s = measured.get("sampling", measured.get("first_step", 0.0)
                              + nfe_guess(config.sampling, sde) * config.sampling.num_samples * per_example)
        evals = _count_multiples(int(cfg.get("eval_freq", 0) or 0), step, cfg.n_iters, last_too=False)
        examples = 2 * (cfg.get("eval_batches", None) or 10) * config.eval.batch_size
        eval_s = measured.get("eval", examples * per_example)
        return grids * grid_s + evals * eval_s

    return pending


def _is_sample_step(cfg, step: int) -> bool:
    sample_freq = cfg.get("sample_freq", None) or cfg.snapshot_freq
    return bool(cfg.snapshot_sampling) and (step % sample_freq == 0 or step == cfg.n_iters)


def _periodic_eval(run: Run, state: TrainState, step: int) -> Optional[dict]:
    """Every ``training.eval_freq`` steps (never when above ``training.n_iters``): the objective on ``training.eval_batches`` batches of
    held-out data with the current and the EMA parameters, and (``training.eval_quality``) the quality figures of
    ``eval.num_samples`` EMA samples; logged to metrics.jsonl and TensorBoard (``eval/...``) by ``logger.log_eval``."""
    cfg = run.exp.config.training
    freq = cfg.get("eval_freq", None)
    if not freq or step % int(freq):
        return None
    t0 = time.time()
    if run.eval_fn is None:
        run.eval_fn = make_test_loss_fn(run.exp, verbose=False)
    batches = cfg.get("eval_batches", 0) or None
    raw, ema = (run.eval_fn(p, step, batches) for p in (state.params, state.ema_params))
    metrics = {"eval_loss": raw["test_loss"], "eval_loss_ema": ema["test_loss"],
               "eval_examples": raw["num_test_examples"]}
    if cfg.get("eval_quality", False):
        key = jax.random.fold_in(jax.random.key(run.exp.config.seed + 3), step)
        x, _ = draw_samples(run.exp, state.ema_params, int(run.exp.config.eval.num_samples), key, "eval sampling")
        figures = quality.quality_figures(run.exp.config, to_output(run.exp, x))
        metrics.update({k: v for k, v in _flatten(figures).items() if isinstance(v, (int, float))})
    run.logger.log_eval(step, metrics, time.time() - t0)
    return metrics


def report_quality(config, samples, workdir: pathlib.Path, step: int) -> dict:
    """Print and save (``samples/step_<k>/quality.json``) the quality figures of samples next to real data."""
    figures = quality.quality_figures(config, samples)
    if figures:
        utils.atomic_write_json(workdir / "samples" / f"step_{step}" / "quality.json", figures)
        print(f"sample quality ({len(samples)} samples of the EMA weights vs held-out real data):")
        for k, v in _flatten(figures).items():
            print(f"  {k:45s} {v:.4f}" if isinstance(v, float) else f"  {k:45s} {v}")
        for note in _notes(figures):
            print(f"  note: {note}")
    return figures


def _notes(d: dict) -> list:
    """The distinct caveats (``notes`` lists) anywhere in a nested dict of figures, in order."""
    out = list(d.get("notes", []))
    for v in d.values():
        if isinstance(v, dict):
            out += [n for n in _notes(v) if n not in out]
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    """Scalar leaves of a nested dict, keyed 'a/b'."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif np.isscalar(v):
            out[f"{prefix}{k}"] = v
    return out


def sample(exp: Experiment, workdir: str) -> pathlib.Path:
    """``--mode=sample``: write samples of the latest (or ``config.eval.checkpoint``) checkpoint to a new folder
    (``sample_folder``) with a ``manifest.json``; a ``config.sampling.task`` other than "unconditional" is run by
    ``controllable``. Returns the folder."""
    config = exp.config
    if config.sampling.get("task", "unconditional") != "unconditional":
        return controllable(exp, workdir)["outdir"]
    samplers.options_from_config(config.sampling)  # an unknown method fails before restoring
    ev = restore_eval_state(exp, workdir, config.eval.checkpoint)
    outdir = sample_folder(config, workdir, exp.sde, ev.step)
    manifest = sample_manifest(config, workdir, ev.step, bool(config.eval.use_ema))
    t0 = time.time()
    write_samples(exp, ev.params, outdir, ev.step, write=jax.process_index() == 0, strict=True,
                  manifest=manifest)
    print(f"wrote {config.sampling.num_samples} samples of step {ev.step} to {outdir} in {time.time() - t0:.1f}s")
    return outdir


def evaluate(exp: Experiment, workdir: str) -> dict:
    """``--mode=eval``: for each checkpoint in ``workdir`` (or only ``config.eval.checkpoint``): test loss
    (``eval.enable_loss``), bits/dim through ``checkpoint_likelihood`` (``eval.enable_bpd``) and sample quality
    (``eval.enable_sampling``), written with provenance to ``eval/step_<k>.json``. Returns {step: result}."""
    config = exp.config
    ckpt = utils.CheckpointManager(pathlib.Path(workdir) / "checkpoints", config)
    steps = ckpt.steps() if config.eval.checkpoint is None else [int(config.eval.checkpoint)]
    if not steps:
        raise FileNotFoundError(f"no checkpoint to evaluate in {ckpt.directory}")
    results = {}
    for i, step in enumerate(steps):
        print(f"evaluating checkpoint {step} ({i + 1} of {len(steps)})", flush=True)
        try:
            ev = restore_eval_state(exp, workdir, step)
        except utils.IncompatibleCheckpointError:
            raise
        except Exception as e:  # a corrupt checkpoint among several: report it and go on
            if config.eval.checkpoint is not None:
                raise
            print(f"skipping unreadable checkpoint {ckpt.directory / str(step)}: {type(e).__name__}: {e}")
            continue
        results[step] = evaluate_checkpoint(exp, workdir, ev)
    ckpt.close()
    return results


def evaluate_checkpoint(exp: Experiment, workdir: str, ev: EvalState) -> dict:
    """The figures of one checkpoint, written (by process 0) to ``eval/step_<k>.json`` with provenance."""
    config, t0 = exp.config, time.time()
    metrics = {}
    if config.eval.get("enable_loss", True):
        metrics.update(compute_test_loss(exp, ev.params, ev.step))
    if config.eval.get("enable_bpd", False):
        metrics["likelihood"] = checkpoint_likelihood(exp, workdir, ev)
    nfe = None
    if config.eval.get("enable_sampling", True):
        quality, nfe = sample_quality(exp, workdir, ev)
        metrics.update(quality)
    provenance = _provenance(config, workdir, ev, nfe, time.time() - t0)
    if jax.process_index() == 0:
        path = pathlib.Path(workdir) / "eval" / f"step_{ev.step}.json"
        utils.atomic_write_json(path, {"metrics": metrics, "provenance": provenance})
        print(f"step {ev.step} ({eval_weights(config)}; {int(config.eval.num_samples)} samples): "
              + "  ".join(f"{k} {v:.4g}" for k, v in _headline(metrics).items()) + f"  -> {path}", flush=True)
        for note in _notes(metrics):
            print(f"  note: {note}")
    return {"metrics": metrics, "provenance": provenance}


def eval_weights(config) -> str:
    """Which parameters an evaluation uses, in words."""
    return "EMA weights" if config.eval.use_ema else "raw (non-EMA) weights"


def _headline(metrics: dict) -> dict:
    """The figures worth a console line: losses, bits/dim, FID/KID/IS, distances, confidences."""
    words = ("loss", "bpd", "fid", "kid", "classifier_score", "wasserstein", "confidence", "entropy")
    return {k: v for k, v in _flatten(metrics).items()
            if isinstance(v, float) and any(w in k for w in words) and not k.endswith(("stderr", "_std"))}


def compute_test_loss(exp: Experiment, params, step: int, max_batches: Optional[int] = None) -> dict:
    """Mean training objective over the test split (its first ``max_batches`` batches when given; padding rows
    masked), with a fixed key per batch."""
    return make_test_loss_fn(exp)(params, step, max_batches)


def make_test_loss_fn(exp: Experiment, verbose: bool = True) -> Callable:
    """``test_loss(params, step, max_batches=None) -> {"test_loss", "num_test_examples"}``, compiled once: batch
    ``b`` of the test split uses the key ``fold_in(fold_in(key(seed + 2), step), b)``. ``verbose``: progress
    lines (a stop signal ends it after the current batch either way). The batches are split over ``exp.mesh``."""
    config, mesh = exp.config, exp.mesh
    check_batch_size(config.eval.batch_size, "config.eval.batch_size")
    loss_fn = exp.loss_fn()

    def batch_sums(params, key, batch):
        per_example, _ = loss_fn(params, key, batch)
        mask = batch["mask"].astype(per_example.dtype)
        return jnp.sum(per_example * mask), jnp.sum(mask)

    replicated = NamedSharding(mesh, P())
    fn = jax.jit(batch_sums, in_shardings=(replicated, replicated, NamedSharding(mesh, P("data"))),
                 out_shardings=replicated)

    def test_loss(params, step: int, max_batches: Optional[int] = None) -> dict:
        base = jax.random.fold_in(jax.random.key(config.seed + 2), step)
        params = replicate(params, mesh)
        data = datasets.get_dataset(config, "test", infinite=False, seed=config.seed)
        total_batches = min([b for b in (max_batches, getattr(data, "num_batches", None)) if b], default=None)
        progress = utils.Progress("test loss", total_batches, detail=f"batches of {config.eval.batch_size}",
                                  min_interval=10.0, enabled=verbose and jax.process_index() == 0)
        total, count = 0.0, 0.0
        try:
            for i, batch in enumerate(data):
                s, c = jax.device_get(fn(params, jax.random.fold_in(base, i), shard_batch(batch, mesh)))
                total, count = total + float(s), count + float(c)
                progress.update()
                if max_batches is not None and i + 1 >= max_batches:
                    break
        finally:
            getattr(data, "close", lambda: None)()
        return {"test_loss": total / max(count, 1.0), "num_test_examples": int(count)}

    return test_loss


def sample_quality(exp: Experiment, workdir: str, ev: EvalState) -> tuple:
    """``config.eval.num_samples`` samples: the data source's quality figure (``evaluation.quality``), and FID/KID/IS
    through ``fid_figures`` when its reference statistics exist. Returns (figures, nfe)."""
    config = exp.config
    n = int(config.eval.num_samples)
    x, nfe = draw_samples(exp, ev.params, n, jax.random.fold_in(jax.random.key(config.seed + 3), ev.step))
    out = to_output(exp, x)
    if jax.process_index() == 0:
        outdir = pathlib.Path(workdir) / "eval" / f"samples_{ev.step}"
        outdir.mkdir(parents=True, exist_ok=True)
        utils.atomic_savez(outdir / "samples.npz", samples=out, nfe=nfe)
    figures = dict(quality.quality_figures(config, out))
    if len(exp.data_shape) == 3:
        names = fid_extractor_names(config)
        if all(fid_stats_path(config, workdir, name).exists() for name in names):
            figures["fid"] = fid_figures(exp, workdir, out, n)
        else:
            print(f"no FID reference statistics for {names} (run --mode=fid_stats); FID skipped")
    return figures, nfe


def _provenance(config, workdir: str, ev: EvalState, nfe, seconds: float) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=pathlib.Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cfg_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return {"checkpoint": str(pathlib.Path(workdir).absolute() / "checkpoints" / str(ev.step)),
            "checkpoint_step": ev.step, "ema": bool(config.eval.use_ema), "seed": int(config.seed),
            "num_samples": int(config.eval.num_samples), "nfe": None if nfe is None else np.asarray(nfe).tolist(),
            "sampler": config.sampling.to_dict(), "eval": {k: v for k, v in config.eval.to_dict().items()},
            "config_sha256": hashlib.sha256(cfg_json.encode()).hexdigest(), "git_commit": commit,
            "jax": jax.__version__, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "processes": jax.process_count(), "wall_time_s": round(seconds, 2), "time": time.time()}


# =================================================================================================================
# FID reference statistics and sample files: --mode=fid_stats, --mode=eval_samples (issue 20: moved here from
# evaluation.py; the evaluation/ package holds the math, networks and files these runners combine)
# =================================================================================================================

FEATURE_EXTRACTORS = {   # name (config.eval.fid_extractors) -> fn(config, workdir) -> extractor
    "inception": lambda config, workdir: inception.InceptionExtractor(config.eval.get("inception_weights", None)),
    "domain": lambda config, workdir: domain_classifier(config, _classifier_dir(config, workdir)),
}


def feature_extractor(name: str, config, workdir):
    """The feature extractor ``name`` of ``FEATURE_EXTRACTORS``: 'inception' or 'domain'."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r} (config.eval.fid_extractors); valid: "
                         f"{sorted(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](config, workdir)


def fid_extractor_names(config) -> tuple:
    """``config.eval.fid_extractors``, else Inception, plus the domain classifier for small grayscale data."""
    return features.default_extractors(config.eval.get("fid_extractors", None), config.data.num_channels,
                                       config.data.image_size)


def fid_stats_path(config, workdir, extractor: str, split: Optional[str] = None) -> pathlib.Path:
    """``config.eval.fid_stats_dir`` (default ``<workdir>/fid_stats``)/<dataset>_<split>[<n>]_<res>px_<extractor>.npz
    with n = ``config.eval.fid_num_images`` when the statistics cover only the first n images."""
    directory = config.eval.get("fid_stats_dir", None) or pathlib.Path(workdir) / "fid_stats"
    return reference.stats_path(directory, dataset=config.data.dataset, split=split or config.eval.get(
        "fid_split", "train"), image_size=config.data.image_size, extractor=extractor,
        num_images=config.eval.get("fid_num_images", None))


def _classifier_dir(config, workdir) -> pathlib.Path:
    return pathlib.Path(config.eval.get("classifier_dir", None) or pathlib.Path(workdir) / "classifiers")


def domain_classifier(config, cache_dir, num_steps: int = classifiers.DOMAIN_STEPS) -> classifiers.DomainExtractor:
    """The domain classifier of ``config.data`` from ``cache_dir``, trained on its train split (key
    ``config.seed``) and saved there when missing."""
    d = config.data
    path = classifiers.domain_classifier_path(cache_dir, d.dataset, d.image_size, d.num_channels)
    info = {"dataset": d.dataset, "image_size": int(d.image_size), "num_channels": int(d.num_channels)}
    return classifiers.get_domain_classifier(path, lambda split: datasets.uint8_split(config, split),
                                             jax.random.key(int(config.seed)), num_steps, info)


def feature_sharding(exp: Experiment) -> Optional[NamedSharding]:
    """The batch axis of feature extraction split over ``exp.mesh``, when one process holds several devices (every
    process extracts the features of all images; a host-local batch cannot be placed on a multi-process mesh)."""
    if jax.process_count() > 1 or jax.local_device_count() == 1:
        return None
    return NamedSharding(exp.mesh, P("data"))


def fid_figures(exp: Experiment, workdir, samples_uint8, num_samples: Optional[int] = None) -> dict:
    """FID/KID (and the classifier score) of uint8 samples (N, H, W, C) for every extractor of
    ``fid_extractor_names``, against the statistics at ``fid_stats_path``: {"<extractor>": {fid, kid, kid_std,
    num_samples, notes, reference_stats, reference_sha256, ...}, "num_samples": n}. The first ``num_samples``
    (default ``config.eval.num_samples``) are used; fewer is an error."""
    config = exp.config
    samples = features.check_samples(samples_uint8, int(config.eval.num_samples if num_samples is None
                                                        else num_samples))
    out = {"num_samples": int(len(samples))}
    for name in fid_extractor_names(config):
        stats = reference.load_stats(fid_stats_path(config, workdir, name), resolution=samples.shape[1],
                                     extractor=name, num_channels=samples.shape[-1])
        out[name] = features.evaluate_against(samples, feature_extractor(name, config, workdir), stats,
                                              config.eval.batch_size, feature_sharding(exp))
    return out


def fid_stats(exp: Experiment, workdir: str) -> None:
    """``--mode=fid_stats``: statistics of every image (or the first ``config.eval.fid_num_images``) of
    ``config.eval.fid_split`` (default "train"), as stored (uint8), for each extractor of ``fid_extractor_names``;
    written by process 0 to ``fid_stats_path``. Prints a progress line per batch; a stop signal ends it after the
    current batch, writing nothing."""
    config = exp.config
    split, limit = config.eval.get("fid_split", "train"), config.eval.get("fid_num_images", None)
    names, d, batch_size = fid_extractor_names(config), config.data, int(config.eval.batch_size)
    print(f"FID reference statistics over {'every image' if limit is None else f'the first {limit} images'} of "
          f"{d.dataset}/{split} with {', '.join(names)} features (config.eval.fid_num_images)", flush=True)
    for name in names:
        extractor = feature_extractor(name, config, workdir)
        total = datasets.count_uint8_batches(config, split)
        if limit is not None:
            total = min(total or 1 << 62, -(-int(limit) // batch_size))
        progress = utils.Progress(f"{name} features of {d.dataset}/{split}", total,
                                  detail=f"batches of {batch_size}", min_interval=5.0)
        images = (x for x, _ in datasets.uint8_batches(config, split))
        try:
            feats, _ = features.extract_features(extractor, images, batch_size, limit, progress=progress.update,
                                                 sharding=feature_sharding(exp))
        except utils.Stopped as e:
            e.message += f"; no {name} statistics written"
            raise
        if jax.process_index() == 0:
            path = reference.save_stats(fid_stats_path(config, workdir, name, split), feats, dataset=d.dataset,
                                        split=split, resolution=int(d.image_size), num_channels=int(d.num_channels),
                                        extractor=name)
            print(f"wrote {name} statistics of {len(feats)} {d.dataset}/{split} images to {path}")


def _check_reference_stats(config, workdir) -> list:
    """The reference statistics files ``fid_figures`` will read; a missing one is an error naming it."""
    paths = [fid_stats_path(config, workdir, name) for name in fid_extractor_names(config)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"reference statistics {missing} do not exist; write them with --mode=fid_stats "
                                f"or point --config.eval.fid_stats_dir at them")
    return paths


def eval_samples(exp: Experiment, workdir: str) -> dict:
    """``--mode=eval_samples``: FID/KID (and the classifier score) of ``config.eval.samples`` (a samples.npz or a
    folder of PNGs) against the reference statistics of ``fid_extractor_names`` (written by ``--mode=fid_stats``;
    ``config.eval.fid_stats_dir``). Written to ``<workdir>/eval_samples/<name>_<sha256[:8]>.json``."""
    config = exp.config
    source = config.eval.get("samples", None)
    if not source:
        raise ValueError("--mode=eval_samples needs --config.eval.samples=<samples.npz or a folder of PNGs>")
    refs = _check_reference_stats(config, workdir)
    samples = sample_files.load_samples(source, int(config.data.image_size), int(config.data.num_channels))
    print(f"evaluating {len(samples)} samples from {source} against {', '.join(map(str, refs))}", flush=True)
    metrics = fid_figures(exp, workdir, samples, len(samples))
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    unknown = dict.fromkeys(("reference_sha256", "sampler", "sampler_options", "nfe", "ema", "denoise", "seed",
                             "checkpoint_step"))   # samples made elsewhere: how is not known here
    provenance = {"num_samples": len(samples), "reference_stats": [str(p) for p in refs], **unknown,
                  "samples": str(pathlib.Path(source).absolute()), "samples_sha256": digest}
    name = pathlib.Path(source).stem if pathlib.Path(source).is_file() else pathlib.Path(source).name
    path = pathlib.Path(workdir) / "eval_samples" / f"{name}_{digest[:8]}.json"
    utils.atomic_write_json(path, {"metrics": metrics, "provenance": provenance})
    for extractor in fid_extractor_names(config):
        m = metrics[extractor]
        kid = f", KID {m['kid']:.4g}" if "kid" in m else ""
        print(f"{extractor}: FID {m['fid']:.4g}{kid} ({m['num_samples']} samples)")
        for note in m.get("notes", []):
            print(f"  note: {note}")
    print(f"wrote {path}")
    return {"metrics": metrics, "provenance": provenance, "path": str(path)}


# ==== --mode=likelihood (was likelihood.run) ========================================================================
def likelihood_data_space(config) -> lik.DataSpace:
    """The data convention of ``config.data``: 8-bit images in [0, 1] or [-1, 1], or continuous toy vectors."""
    if not isinstance(datasets.get_data_transform(config), datasets.ImageTransform):
        return lik.DataSpace(bits=None, centered=bool(config.data.centered))
    bits = int(config.eval.likelihood.bits)
    if bits != 8:
        raise ValueError(f"config.eval.likelihood.bits={bits}: the image pipeline (datasets.py) loads 8-bit data")
    return lik.DataSpace(bits=8, centered=bool(config.data.centered))


def likelihood_settings(config, sde: sde_lib.SDE) -> dict:
    """Every setting that produces the figure, validated; errors name the config key."""
    opts = config.eval.likelihood
    for key, valid in (("method", lik.METHODS), ("divergence", lik.DIVERGENCES),
                       ("solver", lik.SOLVERS), ("dequantization", lik.DEQUANTIZATIONS),
                       ("ddpm_variance", ("beta", "posterior"))):
        if opts[key] not in valid:
            raise ValueError(f"unknown config.eval.likelihood.{key} {opts[key]!r}; valid: {sorted(valid)}")
    space = likelihood_data_space(config)
    out = {"method": opts.method, "split": opts.split, "data_bits": space.bits, "centered": space.centered,
           "ema": bool(config.eval.use_ema), "sde": type(sde).__name__, "seed": int(config.seed),
           "batch_size": int(config.eval.batch_size)}
    if opts.method == "ddpm_bound":
        lik.check_ddpm_bound_inputs(sde, space, opts.ddpm_num_steps)
        chain = losses.resolve_loss_name(config, sde) in ("ddpm", "ddpm_vlb")  # trained on the chain's labels
        return {**out, "ddpm_variance": opts.ddpm_variance, "ddpm_num_steps": opts.ddpm_num_steps or sde.N,
                "ddpm_exact_sum": opts.ddpm_num_steps is None, "is_bound": True,
                "ddpm_eps": "network at step labels" if chain else "score at t with alpha(t) = sqrt(abar_i)"}
    dequantization = "none" if space.bits is None else opts.dequantization
    if int(opts.num_draws) < 1 or int(opts.num_probes) < 1:
        raise ValueError("config.eval.likelihood.num_draws and .num_probes must be >= 1")
    return {**out, "estimator": opts.divergence, "num_probes": int(opts.num_probes) if opts.divergence != "exact"
            else 0, "rtol": float(opts.rtol), "atol": float(opts.atol), "solver": opts.solver,
            "max_steps": int(opts.max_steps), "eps": float(sde.eps if opts.eps is None else opts.eps),
            "dequantization": dequantization, "num_draws": int(opts.num_draws) if dequantization == "uniform" else 1,
            "is_bound": dequantization == "uniform"}


def likelihood_work(settings: dict, limit: Optional[int]) -> str:
    """One line saying how much work ``likelihood`` is about to do, before it starts."""
    what = f"every {settings['split']} example" if limit is None else \
        f"the first {limit} {settings['split']} example{'s' if limit != 1 else ''}"
    if settings["method"] == "ddpm_bound":
        return (f"DDPM bound on {what}: {settings['ddpm_num_steps']} network evaluations each "
                f"(config.eval.likelihood.num_examples, .ddpm_num_steps)")
    return (f"likelihood on {what} ({settings['solver']}, rtol {settings['rtol']:g}, {settings['estimator']} "
            f"divergence, {settings['num_draws']} dequantization draw(s)): one adaptive ODE solve per example and "
            f"draw, whose network evaluations grow as rtol shrinks (config.eval.likelihood.num_examples, .rtol; "
            f"the result records nfe_mean)")


def _likelihood_evaluator(ev: EvalState, settings: dict, space: lik.DataSpace,
                          mesh: Optional[Mesh]) -> Callable:
    """``evaluate(key, x) -> (bpd (b,), nfe (b,))`` for one batch of model-space lattice data."""
    score_fn_of = functools.partial(_model_score_fn, ev.model, ev.sde)
    if settings["method"] == "ddpm_bound":
        eps_fn_of = None
        if settings["ddpm_eps"].startswith("network"):
            eps_fn_of, score_fn_of = functools.partial(_model_eps_fn, ev.model, ev.sde), None
        fn = lik.ddpm_bound_fn(ev.sde, eps_fn_of=eps_fn_of, score_fn_of=score_fn_of, space=space, mesh=mesh,
                                      variance=settings["ddpm_variance"],
                                      num_steps=None if settings["ddpm_exact_sum"] else settings["ddpm_num_steps"])
        return lambda key, x: (fn(ev.params, key, x)["bpd"], jnp.full((x.shape[0],), settings["ddpm_num_steps"]))
    ll = lik.log_likelihood_fn(ev.sde, score_fn_of, divergence=settings["estimator"], mesh=mesh,
                                      num_probes=max(settings["num_probes"], 1), rtol=settings["rtol"],
                                      atol=settings["atol"], eps=settings["eps"], solver=settings["solver"],
                                      max_steps=settings["max_steps"])

    def model_logp(key, xm):
        logp, _, nfe = ll(ev.params, key, xm)
        return logp, nfe

    def evaluate(key, x):
        out = lik.data_log_likelihood(key, model_logp, x, space, dequantization=settings["dequantization"],
                                             num_draws=settings["num_draws"])
        return out["bpd"], out["nfe"]

    return evaluate


def _model_score_fn(model, sde, params):
    return model.score_fn(params, sde)


def _model_eps_fn(model, sde, params):
    return lambda x, i: losses.model_eps(model, params, sde, x, i)


def _lattice_batches(batches, transform, space: lik.DataSpace) -> Iterator[dict]:
    """Batches as loaded, "x" mapped to the 8-bit lattice (undoing the pipeline's own dequantization, if any)."""
    undo = space.bits is not None and getattr(transform, "uniform_dequantization", False)
    for batch in batches:
        x = np.asarray(space.lattice(transform.inverse(np.asarray(batch["x"])))) if undo else np.asarray(batch["x"])
        yield {**batch, "x": x}


def _gather(a: np.ndarray) -> np.ndarray:
    """Concatenate per-process arrays (possibly of different lengths) on every process."""
    if jax.process_count() == 1:
        return a
    from jax.experimental import multihost_utils

    n = multihost_utils.process_allgather(np.array([len(a)]))
    padded = np.zeros(int(n.max()), a.dtype)
    padded[:len(a)] = a
    allv = multihost_utils.process_allgather(padded)
    return np.concatenate([allv[p, :int(n[p, 0])] for p in range(len(n))])


def likelihood(exp: Experiment, workdir: str) -> dict:
    """``--mode=likelihood``: bits/dim of checkpoint ``config.eval.checkpoint`` (default the latest) on
    ``config.eval.likelihood.split`` (``checkpoint_likelihood``)."""
    likelihood_settings(exp.config, exp.sde)  # fail before restoring anything
    return checkpoint_likelihood(exp, workdir, restore_eval_state(exp, workdir, exp.config.eval.checkpoint))


def checkpoint_likelihood(exp: Experiment, workdir: str, ev: EvalState) -> dict:
    """Bits/dim of the restored checkpoint ``ev`` on ``config.eval.likelihood.split``, written with every setting
    that produced it to ``<workdir>/likelihood/step_<k>_<method>_<split>.json``. Each process evaluates its share
    of the split on its local devices (``exp.local_mesh``)."""
    config = exp.config
    settings = likelihood_settings(config, ev.sde)
    space = likelihood_data_space(config)
    n_local = len(jax.local_devices())
    mesh = exp.local_mesh if n_local > 1 else None
    b = int(config.eval.batch_size) // jax.process_count()
    if b % n_local:
        raise ValueError(f"config.eval.batch_size={config.eval.batch_size} gives {b} examples per process, not "
                         f"divisible by its {n_local} devices")
    limit = config.eval.likelihood.num_examples
    local_limit = None if limit is None else -(-int(limit) // jax.process_count())
    if jax.process_index() == 0:
        print(likelihood_work(settings, limit), flush=True)
    start = time.time()
    progress = utils.Progress(f"likelihood ({settings['method']})", None if local_limit is None else
                              -(-local_limit // b), detail=f"{'all' if limit is None else limit} {settings['split']} "
                              f"examples in batches of {config.eval.batch_size}")
    batches = _lattice_batches(datasets.get_dataset(config, settings["split"], infinite=False, seed=config.seed),
                               datasets.get_data_transform(config), space)
    key = jax.random.fold_in(jax.random.key(int(config.seed)), jax.process_index())
    try:
        bpd, nfe = lik.evaluate_batches(_likelihood_evaluator(ev, settings, space, mesh), batches, key,
                                               local_limit, progress.update)
    except utils.Stopped as e:
        e.message += "; no result written"
        raise
    bpd, nfe = _gather(bpd.astype(np.float64)), _gather(nfe.astype(np.float64))
    result = {"bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd)))
              if len(bpd) > 1 else None, "num_examples": int(len(bpd)), "nfe_mean": float(nfe.mean()),
              "checkpoint_step": int(ev.step), "wall_time_s": round(time.time() - start, 2), **settings}
    out = pathlib.Path(workdir) / "likelihood" / f"step_{ev.step}_{settings['method']}_{settings['split']}.json"
    if jax.process_index() == 0:
        utils.atomic_write_json(out, result)
        print(f"{settings['method']} bits/dim on {settings['split']} ({len(bpd)} examples, step {ev.step}, "
              f"{'EMA' if settings['ema'] else 'raw (non-EMA)'} weights): "
              f"{result['bpd']:.4f} ± {result['bpd_stderr'] or 0:.4f}; wrote {out}")
    return result


# ==== --mode=sample with config.sampling.task (was controllable_generation.run) =====================================
SAMPLING_TASKS = ("unconditional", "inpaint", "colorize", "class_conditional", "cfg")


def controllable(exp: Experiment, workdir: str) -> dict:
    """``--mode=sample`` for ``config.sampling.task`` in inpaint | colorize | class_conditional | cfg: writes
    ``samples.{npz,png}``, ``manifest.json`` (and ``inputs.png`` for imputation, the unknown pixels hatched gray)
    to a new folder ``sample_folder`` names after the task and its settings; returns the arrays and the folder
    (``"outdir"``). ``config.sampling.num_samples`` are drawn in batches of ``config.sampling.batch_size``."""
    config = exp.config
    task = config.sampling.get("task", "unconditional")
    if task not in SAMPLING_TASKS:
        raise ValueError(f"unknown config.sampling.task {task!r}; expected one of {list(SAMPLING_TASKS)}")
    ev = restore_eval_state(exp, workdir, config.eval.checkpoint)
    outdir = sample_folder(config, workdir, ev.sde, ev.step, task)
    n, size = int(config.sampling.num_samples), config.sampling.get("batch_size", None)
    key = jax.random.fold_in(jax.random.key(config.seed + 1), ev.step)
    progress = utils.Progress(f"{task} sampling", -(-n // max(1, min(int(size or n), n))),
                              detail=f"{n} samples, {sampler_name(config.sampling, ev.sde)}").update
    try:
        out = _draw_task(config, ev, exp, key, n, size, task, progress)
    except utils.Stopped as e:
        e.message += "; no samples written"
        raise
    images = {k: to_output(exp, v) for k, v in out.items() if k in ("samples", "inputs")}
    if "mask" in out and "inputs" in images:
        images["inputs"] = utils.hatch_unknown(images["inputs"], out["mask"])
    if jax.process_index() == 0:
        manifest = sample_manifest(config, workdir, ev.step, bool(config.eval.use_ema), task)
        _write_task_outputs(outdir, out, images, manifest, bool(config.sampling.get("save_pngs", False)))
    _report(config, out, images)
    print(f"wrote {len(out['samples'])} {task} samples of step {ev.step} to {outdir}", flush=True)
    return {**out, **{f"{k}_uint8": v for k, v in images.items()}, "outdir": outdir}


def in_batches(n: int, size: int, key, draw: Callable[[Any, int, int], dict],
               progress: Optional[Callable[[], None]] = None) -> dict:
    """``draw(key_i, lo, hi)`` (a dict of per-sample arrays, or shared ones under "mask") for the batches
    [lo, hi) of ``size`` covering n, batch i with ``fold_in(key, i)``; the batches' arrays concatenated.
    ``progress()`` (optional) is called after each batch (it may raise to stop)."""
    size = max(1, min(int(size or n), n))
    parts = []
    for i, lo in enumerate(range(0, n, size)):
        parts.append(draw(jax.random.fold_in(key, i), lo, min(lo + size, n)))
        if progress is not None:
            progress()
    return {k: parts[0][k] if k == "mask" else np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def _draw_task(config, ev: EvalState, exp: Experiment, key, n: int, size, task: str, progress) -> dict:
    if task in ("inpaint", "colorize"):
        return _run_imputation(config, ev, key, n, size, task, progress)
    if task == "unconditional":
        return in_batches(n, size, key, lambda k, lo, hi: {"samples": exp.sample(k, ev.params, hi - lo)[0]},
                          progress)
    _, y = guided_score_fn(config, ev.model, ev.params, ev.sde, n)   # checks the task and the labels

    def draw(k, lo, hi):
        score, yb = guided_score_fn(config, ev.model, ev.params, ev.sde, hi - lo, labels=y[lo:hi])
        x, _ = samplers.sample_from_config(k, ev.sde, score, (hi - lo,) + exp.data_shape, config.sampling)
        return {"samples": x, "labels": yb}

    return in_batches(n, size, key, draw, progress)


def _write_task_outputs(outdir: pathlib.Path, out: dict, images: dict, manifest: dict, save_pngs: bool):
    outdir.mkdir(parents=True, exist_ok=True)
    utils.atomic_savez(outdir / "samples.npz", **{**out, **{f"{k}_uint8": v for k, v in images.items()}})
    for k, v in images.items():
        utils.save_image_grid(v, outdir / f"{k}.png") if v.ndim == 4 else utils.save_scatter(v, outdir / f"{k}.png")
    if save_pngs and images["samples"].ndim == 4:
        utils.save_images(images["samples"], outdir / "images")
    utils.atomic_write_json(outdir / "manifest.json", {**manifest, "num_written": len(out["samples"])})


def _test_data(config, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The first n test examples (model space) and their labels."""
    xs, ys, got = [], [], 0
    for batch in datasets.get_dataset(config, "test", infinite=True, seed=config.seed):
        keep = np.asarray(batch.get("mask", np.ones(len(batch["x"])))).astype(bool)
        xs.append(np.asarray(batch["x"])[keep])
        ys.append(np.asarray(batch["label"])[keep])
        got += int(keep.sum())
        if got >= n:
            break
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def imputation_options(sampling_cfg, method: str) -> dict:
    """Options of an imputation ``method`` (``controllable_generation.imputation_methods()``) from
    ``config.sampling``."""
    methods = controllable_generation.imputation_methods()
    if method not in methods:
        raise ValueError(f"config.sampling.method={method!r} cannot impute; expected one of {methods}")
    if method == "smc":
        names = ("num_particles", "num_steps", "eps", "denoise")
        return {k: sampling_cfg[k] for k in names if sampling_cfg.get(k, None) is not None}
    return samplers.options_from_config(sampling_cfg, method)


def _run_imputation(config, ev: EvalState, key, n, size, task, progress=None) -> dict:
    cg = controllable_generation
    data, _ = _test_data(config, n)
    method = config.sampling.method
    opts = imputation_options(config.sampling, method)
    score_fn = ev.model.score_fn(ev.params, ev.sde)
    if task == "colorize":
        if data.ndim != 4 or data.shape[-1] != 3:
            raise ValueError(f"task 'colorize' needs RGB images (config.data.num_channels=3), got data of shape "
                             f"{data.shape[1:]}")
        out = in_batches(n, size, key, lambda k, lo, hi: {"samples": cg.colorize(k, ev.sde, score_fn, data[lo:hi],
                                                                                  method, **opts)[0]}, progress)
        gray = np.mean(data, -1, keepdims=True)
        return {**out, "inputs": np.broadcast_to(gray, data.shape), "data": data}
    mask = cg.load_mask(config.sampling.get("mask", None) or "left", data.shape[1:])
    out = in_batches(n, size, key, lambda k, lo, hi: {"samples": cg.inpaint(k, ev.sde, score_fn, data[lo:hi], mask,
                                                                            method, **opts)[0]}, progress)
    lo = -1.0 if config.data.get("centered", True) else 0.0
    return {**out, "inputs": np.where(mask > 0, data, lo), "data": data, "mask": mask}


def _labels_for(config, n: int, num_classes: int):
    label = config.sampling.get("label", None)
    y = np.arange(n) % num_classes if label is None else np.full((n,), int(label))
    return controllable_generation.check_labels(y, num_classes, n)


def _labels(config, n: int, num_classes: int, labels):
    if labels is None:
        return _labels_for(config, n, num_classes)
    return controllable_generation.check_labels(labels, num_classes, n)


def _classifier_logits_fn(config) -> Callable:
    """``logits_fn(x, t)`` of the classifier trained in ``config.sampling.classifier_workdir``."""
    wd = config.sampling.get("classifier_workdir", None)
    if not wd or not (pathlib.Path(wd) / "config.json").is_file():
        raise ValueError(f"config.sampling.classifier_workdir={wd!r} must be the workdir of a classifier trained "
                         f"with --mode=train (e.g. configs/digits_classifier.py); no config.json there")
    ev = _restore_classifier(str(pathlib.Path(wd).resolve()), (pathlib.Path(wd) / "config.json").read_text())
    return lambda x, t: ev.model.output(ev.params, ev.sde, x, t)


@functools.lru_cache(maxsize=4)
def _restore_classifier(workdir: str, config_json: str) -> EvalState:
    """The classifier's eval state (its own experiment), restored once per (workdir, config) for the batches of a
    run."""
    return restore_eval_state(Experiment.from_config(ml_collections.ConfigDict(json.loads(config_json))), workdir)


def guided_score_fn(config, model, params, sde: sde_lib.SDE, n: int, labels=None) -> tuple:
    """Score and labels (n,) of ``task`` class_conditional (classifier guidance) or cfg; ``labels`` (n,) default
    to ``config.sampling.label`` (or 0, 1, ..., K-1 repeated)."""
    cg = controllable_generation
    task, w = config.sampling.task, float(config.sampling.get("guidance_scale", 1.0))
    if task == "cfg":
        if not cg.is_class_conditional(model):
            raise ValueError("config.sampling.task='cfg' (classifier-free guidance) needs a class-conditional score "
                             "model (config.model.name='class_conditional', loss 'dsm_cfg'), not "
                             f"{config.model.name!r}")
        y = _labels(config, n, int(model.module.num_classes), labels)
        return cg.model_cfg_score_fn(model, params, sde, y, w), y
    y = _labels(config, n, int(config.data.num_classes), labels)
    return cg.classifier_guided_score_fn(model.score_fn(params, sde), _classifier_logits_fn(config), y, w), y


def _report(config, out: dict, images: dict) -> None:
    """Print the error on the known part (imputation), how many colorized samples are one colour of the source's
    palette, or the source's label classifier's accuracy (class tasks; ``evaluation.quality``); the figures are
    added to ``out``."""
    if "mask" in out:
        reps = len(out["samples"]) // len(out["data"])
        err = np.abs(np.repeat(out["data"], reps, 0) - out["samples"]) * out["mask"]
        print(f"max |x - data| on the known pixels: {err.max():.3g}")
        out["known_error"] = float(err.max())
    elif config.sampling.get("task") == "colorize":
        reps = len(out["samples"]) // len(out["data"])
        err = np.abs(np.repeat(out["data"], reps, 0).mean(-1) - out["samples"].mean(-1))
        print(f"max |gray(x) - gray(data)|: {err.max():.3g}")
        out["known_error"] = float(err.max())
    palette = quality.PALETTES.get(config.data.source)
    if config.sampling.get("task") == "colorize" and palette is not None:
        fit = palette_fit(images["samples"], palette)
        single = fit["residual"] < 0.15
        out["palette_fraction"], out["palette_colors"] = float(single.mean()), int(len(np.unique(fit["color"][single])))
        print(f"{single.mean():.1%} of colorized samples are one palette colour (residual < 0.15; gray inputs: "
              f"1/3), {out['palette_colors']} of {len(palette)} colours used")
    classify = quality.LABEL_CLASSIFIERS.get(config.data.source)
    if "labels" in out and classify is not None:
        logits = classify(images["samples"])
        acc = float(np.mean(np.argmax(logits, -1) == out["labels"]))
        print(f"the {config.data.source} classifier agrees with the requested label on {acc:.1%} of samples "
              f"(chance {1 / logits.shape[-1]:.0%})")
        out["label_accuracy"] = acc
