"""Training, evaluation and sampling loops: the glue between configs, data, models, losses and samplers.

Parallelism lives only here: one ``jax.jit`` over a ``Mesh`` of all devices, the batch split over the ``data``
axis with ``NamedSharding`` and the train state replicated. Library code (losses, samplers) is single-program.
Keys are derived, never carried: the step's key is ``fold_in(key(seed), step)``, so results do not depend on the
number of devices and a resumed run draws the same noise as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import datasets
import losses
import models
import sde_lib
import samplers
import utils

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; keys are derived from (seed, step) and are not stored."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


# ---- optimisation ----------------------------------------------------------------------------------------------
def learning_rate_schedule(optim_cfg) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then constant (the SDE paper's schedule)."""
    if optim_cfg.warmup > 0:
        return optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup)
    return optax.constant_schedule(optim_cfg.lr)


def get_optimizer(optim_cfg) -> optax.GradientTransformation:
    """Adam(W) with global-norm gradient clipping, from ``config.optim``."""
    if optim_cfg.optimizer.lower() != "adam":
        raise ValueError(f"unknown config.optim.optimizer {optim_cfg.optimizer!r}; supported: 'adam'")
    chain = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    chain.append(optax.adamw(learning_rate_schedule(optim_cfg), b1=optim_cfg.beta1, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay))
    return optax.chain(*chain)


def ema_update(ema_params, params, rate: float):
    """θ_ema ← rate θ_ema + (1 - rate) θ."""
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


def init_train_state(config, model: models.ScoreModel, optimizer, data_shape) -> TrainState:
    key = jax.random.fold_in(jax.random.key(config.seed), -1 & 0x7FFFFFFF)
    params = model.init(key, jnp.zeros((1,) + tuple(data_shape)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params))


def make_train_step(loss_fn: Callable, optimizer, ema_rate: float, seed: int) -> Callable:
    """One optimisation step ``(state, batch) -> (state, metrics)``, pure; the batch mean is the global mean."""
    base_key = jax.random.key(seed)

    def objective(params, key, batch):
        per_example, metrics = loss_fn(params, key, batch)
        return jnp.mean(per_example), metrics

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(base_key, state.step)
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, key, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               ema_params=ema_update(state.ema_params, params, ema_rate))
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
        return new_state, metrics

    return train_step


# ---- sharding ------------------------------------------------------------------------------------------------
def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def check_batch_size(batch_size: int, what: str = "config.training.batch_size"):
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if batch_size % n_dev or batch_size % n_proc:
        raise ValueError(f"{what}={batch_size} is not divisible by the {n_dev} devices "
                         f"({n_proc} processes); the global batch is split evenly across devices")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Assemble host-local numpy batches into global arrays split over the ``data`` axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def jit_sharded_step(train_step, mesh: Mesh):
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(train_step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def data_shape(config) -> tuple:
    """Shape of one example: (D,) for toy vectors, (H, W, C) for images."""
    if config.data.source == "toy":
        return (config.data.get("dim", 2),)
    return (config.data.image_size, config.data.image_size, config.data.num_channels)


# ---- training ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Experiment:
    """The objects built once from a config: SDE, model, optimizer, loss."""

    config: ml_collections.ConfigDict
    sde: sde_lib.SDE
    model: models.ScoreModel
    optimizer: optax.GradientTransformation
    data_shape: tuple

    @classmethod
    def from_config(cls, config) -> "Experiment":
        sde = sde_lib.get_sde(config.sde)
        losses.check_loss_config(config, sde)
        model = models.create_model(config)
        return cls(config, sde, model, get_optimizer(config.optim), data_shape(config))

    def loss_fn(self):
        return losses.get_loss_fn(self.config, self.sde, self.model)

    def sample(self, key, params, n: int):
        score_fn = self.model.score_fn(params, self.sde)
        return samplers.sample_from_config(key, self.sde, score_fn, (n,) + self.data_shape, self.config.sampling)


def train(config, workdir: str) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint; returns the final state."""
    exp = Experiment.from_config(config)
    check_batch_size(config.training.batch_size)
    workdir = pathlib.Path(workdir)
    utils.write_config(workdir, config)
    mesh = make_mesh()
    ckpt = utils.CheckpointManager(workdir / "checkpoints", config)
    state = ckpt.restore_or(lambda: init_train_state(config, exp.model, exp.optimizer, exp.data_shape))
    start = int(state.step)
    step_fn = jit_sharded_step(make_train_step(exp.loss_fn(), exp.optimizer, config.model.ema_rate,
                                               config.seed), mesh)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    data = datasets.get_dataset(config, "train", infinite=True, seed=config.seed + start)
    logger = utils.MetricLogger(workdir, config.training.n_iters, start, config.training.log_freq)
    for step in range(start, config.training.n_iters):
        state, metrics = step_fn(state, shard_batch(next(data), mesh))
        metrics = jax.device_get(jax.block_until_ready(metrics))
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss became {metrics['loss']} at step {step + 1}; stopping. The last good "
                                     f"checkpoint in {ckpt.directory} is kept")
        logger.log(step + 1, metrics, config.training.batch_size)
        last = step + 1 == config.training.n_iters
        if (step + 1) % config.training.snapshot_freq == 0 or last:
            ckpt.save(step + 1, state)
            if config.training.snapshot_sampling:
                samples = write_samples(exp, state.ema_params, workdir / "samples" / f"step_{step + 1}", step + 1)
                if last:
                    report_quality(config, samples, workdir, step + 1)
    ckpt.wait()
    return state


def report_quality(config, samples, workdir: pathlib.Path, step: int) -> dict:
    """Print and save (``samples/step_<k>/quality.json``) the quality figures of samples next to real data."""
    figures = quality_figures(config, samples)
    if figures:
        utils.atomic_write_json(workdir / "samples" / f"step_{step}" / "quality.json", figures)
        print("sample quality (samples vs held-out real data):")
        for k, v in _flatten(figures).items():
            print(f"  {k:45s} {v:.4f}" if isinstance(v, float) else f"  {k:45s} {v}")
    return figures


def _flatten(d: dict, prefix: str = "") -> dict:
    """Scalar leaves of a nested dict, keyed 'a/b'."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif np.isscalar(v):
            out[f"{prefix}{k}"] = v
    return out


# ---- sampling and evaluation ------------------------------------------------------------------------------------
def write_samples(exp: Experiment, params, outdir: pathlib.Path, seed_step: int) -> np.ndarray:
    """Sample ``config.sampling.num_samples`` points, write ``samples.npz`` and ``samples.png``; return them
    quantised to uint8 (images) or as float (vectors)."""
    cfg = exp.config
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), seed_step)
    x, nfe = exp.sample(key, params, cfg.sampling.num_samples)
    x = np.asarray(jax.device_get(x))
    outdir.mkdir(parents=True, exist_ok=True)
    if len(exp.data_shape) == 3:
        images = datasets.get_data_transform(cfg).inverse(x)
        utils.atomic_savez(outdir / "samples.npz", samples=images, nfe=nfe)
        utils.save_image_grid(images, outdir / "samples.png")
        return images
    utils.atomic_savez(outdir / "samples.npz", samples=x, nfe=nfe)
    utils.save_scatter(x, outdir / "samples.png")
    return x


@dataclasses.dataclass
class EvalState:
    model: models.ScoreModel
    params: Any
    sde: sde_lib.SDE
    step: int


def restore_eval_state(config, workdir: str, step: Optional[int] = None) -> EvalState:
    """Model, parameters (EMA when ``config.eval.use_ema``), SDE and step of a checkpoint in ``workdir``."""
    exp = Experiment.from_config(config)
    ckpt = utils.CheckpointManager(pathlib.Path(workdir) / "checkpoints", config)
    template = init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    state = ckpt.restore(template, step)
    params = state.ema_params if config.eval.use_ema else state.params
    return EvalState(exp.model, params, exp.sde, int(state.step))


def sample(config, workdir: str) -> None:
    """``--mode=sample``: write samples of the latest (or ``config.eval.checkpoint``) checkpoint."""
    ev = restore_eval_state(config, workdir, config.eval.checkpoint)
    exp = Experiment.from_config(config)
    outdir = pathlib.Path(workdir) / "samples" / f"sample_mode_step_{ev.step}"
    t0 = time.time()
    write_samples(exp, ev.params, outdir, ev.step)
    print(f"wrote {config.sampling.num_samples} samples of step {ev.step} to {outdir} in {time.time() - t0:.1f}s")


def evaluate(config, workdir: str) -> dict:
    """``--mode=eval``: test loss and sample quality of a checkpoint, written to ``eval/step_<k>.json``."""
    ev = restore_eval_state(config, workdir, config.eval.checkpoint)
    exp = Experiment.from_config(config)
    loss_fn = jax.jit(exp.loss_fn())
    total, count = 0.0, 0
    for i, batch in enumerate(datasets.get_dataset(config, "test", infinite=False, seed=config.seed)):
        per_example, _ = loss_fn(ev.params, jax.random.fold_in(jax.random.key(config.seed), i),
                                 {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(jnp.sum(per_example)), count + per_example.shape[0]
    result = {"step": ev.step, "test_loss": total / max(count, 1), "num_test_examples": count,
              "ema": bool(config.eval.use_ema)}
    samples_out = write_samples(exp, ev.params, pathlib.Path(workdir) / "eval" / f"samples_{ev.step}", ev.step)
    result.update(quality_figures(config, samples_out))
    utils.atomic_write_json(pathlib.Path(workdir) / "eval" / f"step_{ev.step}.json", result)
    print(json.dumps(result, indent=1, default=float))
    return result


def quality_figures(config, samples: np.ndarray) -> dict:
    """A sample-quality figure next to the same figure on real held-out data.

    Digits: a classifier trained on the real digits (confidence, entropy, domain FID). Toy data: sliced
    Wasserstein distance to held-out data (and between two held-out sets as the floor).
    """
    if config.data.source == "digits":
        import evaluation

        return evaluation.digits_quality(samples)
    if config.data.source == "toy":
        from analytic import sliced_wasserstein

        real = _collect(config, "test", 2 * len(samples))
        key = jax.random.key(0)
        return {"sliced_wasserstein_samples": float(sliced_wasserstein(key, samples, real[:len(samples)])),
                "sliced_wasserstein_real": float(sliced_wasserstein(key, real[len(samples):], real[:len(samples)]))}
    return {}


def _collect(config, split: str, n: int) -> np.ndarray:
    out, got = [], 0
    for batch in datasets.get_dataset(config, split, infinite=True, seed=config.seed + 7):
        out.append(np.asarray(batch["x"]))
        got += len(out[-1])
        if got >= n:
            break
    return np.concatenate(out)[:n]
