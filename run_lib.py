"""The ``--mode`` runners, each ``fn(experiment, workdir)``: train, evaluate, sample, fid_stats, eval_samples.

``main.py`` builds the ``experiment.Experiment`` once and calls ``MODES[mode](experiment, workdir)``. The runners
hold the loops and what they report (the train loop and its periodic work, per-checkpoint evaluation, the sample
folders); what they are built from (train state, train step, the mesh, restoring, drawing and writing samples)
is in ``experiment``, the libraries (losses, samplers, datasets, models, ...) below it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import pathlib
import subprocess
import sys
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import datasets
import sde_lib
import samplers
import utils
from evaluation import classifiers, features, inception, quality, reference, sample_files
from experiment import (EvalState, Experiment, StepCompilation, TrainState, any_process, check_batch_size,
                        compile_step, draw_samples, jit_sharded_step, learning_rate_schedule, make_train_step,
                        open_training, replicate, restore_eval_state, sample_folder, sample_manifest, sampler_name,
                        shard_batch, to_output, write_samples)

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
    with open_training(exp, workdir) as opened:
        timings["init"] = exp.build_seconds + time.time() - t0
        run = _start_run(exp, pathlib.Path(workdir), opened.ckpt, int(opened.state.step), timings)
        try:
            with utils.StopSignal("saving a checkpoint after this step (or sampling batch) and stopping") as stop:
                return _train_loop(run, replicate(opened.state, exp.mesh), opened.batches, stop)
        finally:
            run.logger.close()


def _start_run(exp: Experiment, workdir: pathlib.Path, ckpt, start: int, timings: dict) -> Run:
    """Say what runs, open the metric log and jit the step (``config.json`` is written by ``open_training``)."""
    config, is_main = exp.config, jax.process_index() == 0
    print(f"training steps {start}..{config.training.n_iters} on {jax.device_count()} devices "
          f"({jax.process_count()} processes), global batch {config.training.batch_size}, "
          f"lr {config.optim.lr:g} (warm-up {config.optim.warmup}), EMA rate {config.model.ema_rate}", flush=True)
    warn_ema_keeps_init(config.model.ema_rate, config.training.n_iters)
    warn_warmup_longer_than_run(config.optim.warmup, config.training.n_iters)
    step_fn = jit_sharded_step(make_train_step(exp.loss_fn(), exp.optimizer, config.model.ema_rate,
                                               config.seed), exp.mesh)
    logger = utils.MetricLogger(workdir, config.training.n_iters, start, config.training.log_freq, enabled=is_main,
                                pending=periodic_seconds(config, exp.sde))
    return Run(exp, workdir, ckpt, logger, learning_rate_schedule(config.optim), step_fn, is_main, timings)


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
    compiled, run.timings["compile"], run.timings["cached"] = compile_step(run.step_fn, state, batch, run.compiling)
    return compiled


def first_step_line(timings: dict) -> str:
    """``first step after 41.2 s (import 3.1 s, init 6.0 s, compile 30.4 s, step 1.7 s)``."""
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
    ``controllable_generation.run``. Returns the folder."""
    config = exp.config
    if config.sampling.get("task", "unconditional") != "unconditional":
        import controllable_generation

        return controllable_generation.run(config, workdir)["outdir"]
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
    (``eval.enable_loss``), bits/dim through ``likelihood.run`` (``eval.enable_bpd``) and sample quality
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
        metrics["likelihood"] = _likelihood(config, workdir, ev.step)
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


def _likelihood(config, workdir: str, step: int) -> dict:
    """bits/dim of checkpoint ``step`` by ``likelihood.run`` (settings ``config.eval.likelihood``)."""
    try:
        import likelihood
    except ImportError as e:
        raise ValueError(f"config.eval.enable_bpd=True needs likelihood.py, which failed to import: {e}") from e
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.eval.checkpoint = step
    return likelihood.run(cfg, workdir)


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
