"""Training, evaluation and sampling loops: the glue between configs, data, models, losses and samplers.

Parallelism lives only here: one ``jax.jit`` over a ``Mesh`` of all devices, the batch split over the ``data``
axis with ``NamedSharding`` and the train state replicated. Library code (losses, samplers) is single-program.
Keys are derived, never carried: the step's key is ``fold_in(key(seed), step)``, so results do not depend on the
number of devices and a resumed run draws the same noise as an uninterrupted one.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Optional, Tuple

import flax
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
import models
import sde_lib
import samplers
import utils
from evaluation import classifiers, features, inception, quality, reference, sample_files
from evaluation.metrics import palette_fit

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
    """Adam(W) with global-norm gradient clipping, from ``config.optim``. The optimizer state has the same
    structure whatever the values (clipping off is a clip at +inf), so a run resumes with changed settings."""
    if optim_cfg.optimizer.lower() != "adam":
        raise ValueError(f"unknown config.optim.optimizer {optim_cfg.optimizer!r}; supported: 'adam'")
    clip = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(learning_rate_schedule(optim_cfg), b1=optim_cfg.beta1, eps=optim_cfg.eps,
                                   weight_decay=optim_cfg.weight_decay))


def ema_update(ema_params, params, rate: float):
    """θ_ema ← rate θ_ema + (1 - rate) θ."""
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


# The initial state is computed once, so its program is compiled without LLVM's optimisations on CPU: that
# compiles 2-3x faster (the initializers' random-bit generation dominates) and the values agree to float rounding.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# The train step at LLVM -O2 instead of the default -O3 on CPU: in side-by-side probes it compiled 0.66x as long for
# the small DDPM++ (0.86x for configs/default.py) with steps within the noise (0.86-1.06x) and the same losses.
STEP_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def step_compiler_options() -> Optional[dict]:
    """XLA options for compiling the train step on this backend (None: XLA's defaults)."""
    return STEP_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def _init_fn(model: models.ScoreModel, optimizer, data_shape) -> Callable:
    def init(key):
        params = model.init(key, jnp.zeros((1,) + tuple(data_shape)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                          opt_state=optimizer.init(params))

    return init


def _init_key(config):
    return jax.random.fold_in(jax.random.key(config.seed), -1 & 0x7FFFFFFF)


def init_train_state(config, model: models.ScoreModel, optimizer, data_shape) -> TrainState:
    """Step 0: parameters from ``fold_in(key(seed), 2**31 - 1)``, EMA = parameters, fresh optimizer state
    (one jitted computation, not one compilation per initializer)."""
    key = _init_key(config)
    lowered = jax.jit(_init_fn(model, optimizer, data_shape)).lower(key)
    options = INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return lowered.compile(options)(key)


def abstract_train_state(config, model: models.ScoreModel, optimizer, data_shape) -> TrainState:
    """The structure of ``init_train_state`` as zero host arrays, computed by ``jax.eval_shape`` (no compilation, no
    device memory): the template a checkpoint is restored into."""
    shapes = jax.eval_shape(_init_fn(model, optimizer, data_shape), _init_key(config))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def make_train_step(loss_fn: Callable, optimizer, ema_rate: float, seed: int) -> Callable:
    """One optimisation step ``(state, batch) -> (state, metrics)``, pure; the batch mean is the global mean.

    The step's key is ``fold_in(key(seed), step)``; the loss draws the noise of the whole global batch from it, and
    with partitionable threefry each device computes its own rows of that draw, so devices get independent noise
    and the result does not depend on the device count."""
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
def make_mesh(devices=None) -> Mesh:
    """1-D ``data`` mesh of ``devices`` (default: every device), process-major, so process ``p``'s rows come before
    those of ``p + 1``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(sorted(devices, key=lambda d: (d.process_index, d.id))), ("data",))


def num_data_shards(config) -> int:
    """Data shards S the global batch is assembled from: ``config.training.data_shards`` (None: one per
    process). Each shard is a ``datasets`` stream (process_index=shard, process_count=S); a fixed S gives the same
    global batches on any number of processes."""
    shards = config.training.get("data_shards", None)
    return jax.process_count() if shards is None else int(shards)


def check_batch_size(batch_size: int, what: str = "config.training.batch_size", shards: Optional[int] = None):
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if batch_size % n_dev or batch_size % n_proc:
        raise ValueError(f"{what}={batch_size} is not divisible by the {n_dev} devices "
                         f"({n_proc} processes); the global batch is split evenly across devices")
    if shards is not None and (shards % n_proc or batch_size % shards):
        raise ValueError(f"config.training.data_shards={shards} must be a multiple of the {n_proc} processes and "
                         f"divide {what}={batch_size}")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Assemble host-local numpy batches into global arrays split over the ``data`` axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def train_batches(config, mesh: Mesh, start_step: int = 0) -> Iterator[dict]:
    """Global training batches from step ``start_step`` on: this process loads its data shards and the rows of
    all processes form one array sharded over ``data``. A pure function of (seed, step), so a resumed run sees the
    batches an uninterrupted one would."""
    shards = num_data_shards(config)
    check_batch_size(config.training.batch_size, shards=shards)
    per_process = shards // jax.process_count()
    first = jax.process_index() * per_process
    streams = [datasets.get_dataset(config, "train", infinite=True, seed=config.seed, process_index=s,
                                    process_count=shards, start_step=start_step)
               for s in range(first, first + per_process)]
    try:
        while True:
            parts = [next(s) for s in streams]
            yield shard_batch({k: np.concatenate([p[k] for p in parts]) for k in ("x", "label")}, mesh)
    finally:
        for s in streams:
            getattr(s, "close", lambda: None)()


def replicate(tree, mesh: Mesh):
    """Place a host (numpy) or single-device pytree replicated on every device of ``mesh``."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx: np.asarray(a)[idx]),
                        jax.device_get(tree))


def jit_sharded_step(train_step, mesh: Mesh):
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(train_step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (a signal may reach only some processes)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], bool))))


# ---- training ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Experiment:
    """The objects built once from a config: SDE, model, optimizer, loss."""

    config: ml_collections.ConfigDict
    sde: sde_lib.SDE
    model: models.ScoreModel
    optimizer: optax.GradientTransformation
    data_shape: tuple
    compiled_samplers: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # ``sampler``

    @classmethod
    def from_config(cls, config) -> "Experiment":
        sde = sde_lib.get_sde(config.sde)
        losses.check_loss_config(config, sde)
        model = models.create_model(config)
        return cls(config, sde, model, get_optimizer(config.optim), datasets.data_shape(config.data))

    def loss_fn(self):
        return losses.get_loss_fn(self.config, self.sde, self.model)

    def sample(self, key, params, n: int, mesh="auto"):
        """``(x (n, *data_shape), nfe)`` sharded over ``mesh`` ("auto": every device; with several processes each
        samples alone on its local devices; None: one device)."""
        if jax.process_count() > 1 and mesh == "auto":
            mesh = Mesh(np.array(jax.local_devices()), ("data",))
            params = jax.device_get(params)
        return self.sampler(n, make_mesh() if mesh == "auto" else mesh)(params, key)

    def sampler(self, n: int, mesh: Optional[Mesh] = None) -> Callable:
        """The jitted ``(params, key) -> (x, nfe)`` of ``config.sampling`` for batches of ``n``: built once per
        (n, mesh, sampling settings) and kept, so new parameters, keys and batches reuse one compilation (snapshot
        and final samples of a run, every batch of ``--mode=sample``). Says so before its first (long) compile."""
        cfg = self.config.sampling
        cache_key = (int(n), mesh, json.dumps(cfg.to_dict(), sort_keys=True, default=str))
        if cache_key not in self.compiled_samplers:
            shape, options = (int(n),) + self.data_shape, samplers.options_from_config(cfg)

            def run(params, key):
                with jax.ensure_compile_time_eval():  # the sampler's set-up (time grids, checks) stays concrete
                    fn, _ = samplers.build_sampler(self.sde, self.model.score_fn(params, self.sde), shape,
                                                   cfg.method, mesh=mesh, **options)
                return fn(key)

            self.compiled_samplers[cache_key] = _announce_first_call(jax.jit(run), sampler_description(
                cfg.method, options, self.sde, int(n)))
        return self.compiled_samplers[cache_key]


def sampler_description(method: str, options: dict, sde: sde_lib.SDE, n: int) -> str:
    """E.g. ``PC sampler (N=1000, batch 128)`` or ``ODE sampler (tsit5, rtol 1e-05, atol 1e-05, batch 64)``."""
    if method == "ode":
        opts = {"solver": "tsit5", "rtol": 1e-5, "atol": 1e-5, **options}
        return f"ODE sampler ({opts['solver']}, rtol {opts['rtol']:g}, atol {opts['atol']:g}, batch {n})"
    name = {"pc": "PC"}.get(method, method)
    steps = options.get("num_steps", sde.N if method == "pc" else None)
    return f"{name} sampler ({f'N={steps}, ' if steps else ''}batch {n})"


def _announce_first_call(fn: Callable, description: str) -> Callable:
    """``fn`` that prints "compiling <description>…" before its first call (when it compiles)."""
    state = {"first": True}

    def call(*args):
        if state["first"]:
            print(f"compiling {description}…", flush=True)
            state["first"] = False
        return fn(*args)

    call.jitted = fn
    return call


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


def train(config, workdir: str) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest readable checkpoint; returns the final state.

    Nothing is written before the checks pass (config, batch size, the checkpoint to resume, the first batch of
    data); one trainer per workdir (``utils.WorkdirLock``). SIGTERM/SIGINT save a checkpoint after the current step
    and return; a NaN/inf loss raises ``FloatingPointError`` without saving, so the last good checkpoint stays the
    latest."""
    timings = {"import": utils.process_age()} if _run_by_main() else {}
    t0 = time.time()
    exp = Experiment.from_config(config)
    mesh = make_mesh()
    check_batch_size(config.training.batch_size, shards=num_data_shards(config))
    workdir, is_main = pathlib.Path(workdir), jax.process_index() == 0
    with utils.WorkdirLock(workdir, enabled=is_main) as lock:
        ckpt, state, first, stream = _resume(config, workdir, exp, mesh)
        timings["init"] = time.time() - t0
        logger = None
        try:
            lock.acquire(create=True)  # the checks passed: from here on the workdir is written
            run = _start_run(config, workdir, exp, mesh, ckpt, int(state.step), is_main, timings)
            logger = run.logger
            with utils.StopSignal("saving a checkpoint after this step (or sampling batch) and stopping") as stop:
                state = _train_loop(run, replicate(state, mesh), itertools.chain([first], stream), stop)
        finally:
            _close_run(ckpt, logger, stream)
    return state


def _close_run(ckpt: utils.CheckpointManager, logger: Optional[utils.MetricLogger], stream: Iterator):
    """Wait for (and verify) the last save, then close everything, even when that save failed."""
    try:
        ckpt.wait()
    finally:
        ckpt.close()
        if logger is not None:
            logger.close()
        stream.close()


def _resume(config, workdir: pathlib.Path, exp: Experiment, mesh: Mesh) -> tuple:
    """The checks that need the workdir, writing nothing: the checkpoint to resume from (compatible, finite) and
    the first batch of data. Returns (ckpt, state, first batch, the stream of the following batches)."""
    ckpt = utils.CheckpointManager(workdir / "checkpoints", config)
    init = abstract_train_state if ckpt.steps() else init_train_state  # a restore needs only the structure
    try:
        state = ckpt.restore_or(lambda: init(config, exp.model, exp.optimizer, exp.data_shape))
        stream = train_batches(config, mesh, int(state.step))
        return ckpt, state, next(stream), stream
    except BaseException:
        ckpt.close()
        raise


def _start_run(config, workdir: pathlib.Path, exp: Experiment, mesh: Mesh, ckpt: utils.CheckpointManager,
               start: int, is_main: bool, timings: dict) -> Run:
    """Write the config, open the metric log and compile the step: the first writes of a run."""
    if is_main:
        utils.write_config(workdir, config)
    print(f"training steps {start}..{config.training.n_iters} on {jax.device_count()} devices "
          f"({jax.process_count()} processes), global batch {config.training.batch_size}, "
          f"lr {config.optim.lr:g} (warm-up {config.optim.warmup}), EMA rate {config.model.ema_rate}", flush=True)
    warn_ema_keeps_init(config.model.ema_rate, config.training.n_iters)
    warn_warmup_longer_than_run(config.optim.warmup, config.training.n_iters)
    step_fn = jit_sharded_step(make_train_step(exp.loss_fn(), exp.optimizer, config.model.ema_rate,
                                               config.seed), mesh)
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


@dataclasses.dataclass
class StepCompilation:
    """A train step compiling in a background thread for arguments of ``spec`` (XLA releases the GIL)."""

    spec: Any
    future: concurrent.futures.Future
    cache_hits: int


def _spec(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)


def step_arguments_spec(config, exp: Experiment, mesh: Mesh):
    """``(state, batch)`` of the train step as sharded ``ShapeDtypeStruct``s, from the config alone."""
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    shapes = jax.eval_shape(_init_fn(exp.model, exp.optimizer, exp.data_shape), _init_key(config))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
    b = config.training.batch_size
    batch = {"x": jax.ShapeDtypeStruct((b,) + tuple(exp.data_shape), jnp.float32, sharding=data),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)}
    return state, batch


def compile_step_in_background(step_fn, config, exp: Experiment, mesh: Mesh) -> StepCompilation:
    """Start compiling ``step_fn`` for the config's state and batch in a thread, so that the compilation overlaps
    building the initial state and loading the first batch; ``_compile_step`` collects it."""
    state, batch = step_arguments_spec(config, exp, mesh)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_train_step")
    hits = utils.compilation_cache_hits()
    future = pool.submit(lambda: step_fn.lower(state, batch).compile(step_compiler_options()))
    pool.shutdown(wait=False)
    return StepCompilation(_spec((state, batch)), future, hits)


def _compile_step(run: Run, state: TrainState, batch: dict) -> Callable:
    """The train step compiled for ``batch`` (or loaded from the persistent compilation cache), timed: the one
    compiled in the background when it was compiled for these shapes, otherwise compiled now."""
    t0, compiling = time.time(), run.compiling
    hits = compiling.cache_hits if compiling else utils.compilation_cache_hits()
    if compiling and compiling.spec == _spec((state, batch)):
        compiled = compiling.future.result()
    else:
        compiled = run.step_fn.lower(state, batch).compile(step_compiler_options())
    run.timings["compile"] = time.time() - t0
    run.timings["cached"] = utils.compilation_cache_hits() > hits
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
        run.eval_fn = make_test_loss_fn(run.exp.config, run.exp, make_mesh(), verbose=False)
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


# ---- sampling and evaluation ------------------------------------------------------------------------------------
def sampling_work(exp: Experiment, n: int) -> str:
    """One line saying how much work drawing ``n`` samples with ``config.sampling`` is, before it starts:
    network evaluations (NFE) per sample, their total and the batches. Builds the sampler without compiling."""
    cfg = exp.config.sampling
    size = min(int(cfg.get("batch_size", n) or n), n)
    batches = -(-n // size)
    _, nfe = samplers.build_sampler(exp.sde, lambda x, t: x, (size,) + exp.data_shape, cfg.method, mesh=None,
                                    **samplers.options_from_config(cfg))
    what = f"{n} {'images' if len(exp.data_shape) == 3 else 'points'} with {cfg.method}"
    if nfe is None:
        return (f"sampling {what} (adaptive {cfg.solver}, rtol {cfg.rtol:g}: its NFE are known only after "
                f"solving) in {batches} batch{'es' if batches > 1 else ''} of {size}")
    return (f"sampling {what}: {nfe} NFE each = {n * nfe / 1e6:.3g}M network evaluations in {batches} "
            f"batch{'es' if batches > 1 else ''} of {size}")


def draw_samples(exp: Experiment, params, n: int, key, what: str = "sampling", fold: bool = True) -> tuple:
    """``n`` samples in batches of ``config.sampling.batch_size`` (batch ``i`` uses ``fold_in(key, i)``; a single
    batch uses ``key`` itself when ``fold`` is False), as a host array, with the NFE of one batch. Prints a
    progress line per batch; a stop signal raises ``utils.Stopped`` after the current batch, carrying the samples
    drawn so far (``.partial``) and their NFE (``.nfe``)."""
    print(sampling_work(exp, n), flush=True)
    size = int(exp.config.sampling.get("batch_size", n) or n)
    batches = -(-n // size)
    progress = utils.Progress(what, batches, detail=f"{n} samples, {sampler_name(exp.config.sampling, exp.sde)}",
                              compiles=False)   # Experiment.sample says when it compiles
    out, nfe = [], None
    try:
        for i in range(batches):
            k = jax.random.fold_in(key, i) if fold or batches > 1 else key
            x, nfe = exp.sample(k, params, min(size, n - i * size))
            out.append(np.asarray(jax.device_get(x)))
            progress.update()
    except utils.Stopped as e:
        e.partial, e.nfe = (np.concatenate(out) if out else None), nfe
        raise
    return np.concatenate(out)[:n], nfe


def to_output(exp: Experiment, x: np.ndarray) -> np.ndarray:
    """Model-space samples -> uint8 images (N, H, W, C) for image data; vectors unchanged."""
    return datasets.get_data_transform(exp.config).inverse(x) if len(exp.data_shape) == 3 else x


def sampler_name(sampling_cfg, sde: sde_lib.SDE) -> str:
    """A short name of the sampler and its step count, e.g. ``pc_euler_maruyama_langevin_N1000``,
    ``dpm_solver++_N20``, ``ode_tsit5_rtol1e-05``: the part of a sample folder's name that says how it was drawn."""
    import inspect

    method = sampling_cfg.method
    opts = samplers.options_from_config(sampling_cfg)
    params = inspect.signature(samplers.SAMPLERS[method]).parameters
    steps = opts.get("num_steps", params["num_steps"].default if "num_steps" in params else None)
    if method == "pc":
        name = f"pc_{opts.get('predictor', 'euler_maruyama')}_{opts.get('corrector', 'langevin')}"
        return f"{name}_N{steps or sde.N}"
    if method == "ode" and samplers.ODE_SOLVERS.get(opts.get("solver", "tsit5"), (None, False))[1]:
        return f"ode_{opts.get('solver', 'tsit5')}_rtol{opts.get('rtol', 1e-5):g}"
    return f"{method}_{opts['solver']}_N{steps}" if method == "ode" else f"{method}_N{steps}"


def sample_folder(config, workdir, sde: sde_lib.SDE, step: int, task: str = "unconditional") -> pathlib.Path:
    """Where ``--mode=sample`` writes: ``config.sampling.outdir`` when set (refused if it already holds samples),
    else ``<workdir>/samples/<task>_<sampler>_seed<s>[_label<y>][_w<g>]_step<k>_<ema|raw>``, numbered ``-2``,
    ``-3``, ... when that exists, so no run overwrites another."""
    s = config.sampling
    if s.get("outdir", None):
        out = pathlib.Path(s.outdir)
        if (out / "samples.npz").exists() or (out / "manifest.json").exists():
            raise FileExistsError(f"config.sampling.outdir={s.outdir} already holds samples; choose another folder")
        return out
    parts = ([] if task == "unconditional" else [task]) + [sampler_name(s, sde), f"seed{config.seed}"]
    if task in ("class_conditional", "cfg"):
        parts += ([f"label{s.label}"] if s.get("label", None) is not None else []) + [f"w{s.guidance_scale:g}"]
    if task == "inpaint":
        parts.append(f"mask-{pathlib.Path(str(s.get('mask', None) or 'left')).stem}")
    name = "_".join(parts + [f"step{step}", "ema" if config.eval.use_ema else "raw"])
    base = pathlib.Path(workdir) / "samples" / name
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{name}-{i}")
    return out


def sample_manifest(config, workdir, step: int, ema: bool, task: str = "unconditional", **extra) -> dict:
    """What made a sample folder: task, sampler and its options, seed, checkpoint step, EMA or raw weights."""
    import sys

    s = config.sampling
    return {"task": task, "method": s.method, "sampler": sampler_name(s, sde_lib.get_sde(config.sde)),
            "options": samplers.options_from_config(s), "num_samples": int(s.num_samples),
            "batch_size": s.get("batch_size", None), "seed": int(config.seed), "checkpoint_step": int(step),
            "params": "ema" if ema else "raw", "label": s.get("label", None),
            "guidance_scale": s.get("guidance_scale", None) if task in ("class_conditional", "cfg") else None,
            "mask": s.get("mask", None) if task == "inpaint" else None,
            "workdir": str(pathlib.Path(workdir).absolute()), "command": " ".join(sys.argv), "time": time.time(),
            "partial": False, **extra}


def save_sample_files(exp: Experiment, out: np.ndarray, nfe, outdir: pathlib.Path, manifest: Optional[dict] = None,
                      title: str = ""):
    """``samples.npz``, ``samples.png`` (image grid, or a scatter over held-out real data for 2-D data),
    ``manifest.json`` and, with ``config.sampling.save_pngs``, one PNG per image in ``images/``."""
    outdir.mkdir(parents=True, exist_ok=True)
    utils.atomic_savez(outdir / "samples.npz", samples=out, nfe=nfe)
    if len(exp.data_shape) == 3:
        utils.save_image_grid(out, outdir / "samples.png")
        if exp.config.sampling.get("save_pngs", False):
            utils.save_images(out, outdir / "images")
    else:
        real = datasets.draw_examples(exp.config, "test", max(len(out), 1000), seed=exp.config.seed + 7)
        utils.save_scatter(out, outdir / "samples.png", reference=real, title=title)
    if manifest is not None:
        utils.atomic_write_json(outdir / "manifest.json", {**manifest, "nfe": nfe, "num_written": len(out)})


def write_samples(exp: Experiment, params, outdir: pathlib.Path, seed_step: int, write: bool = True,
                  strict: bool = False, manifest: Optional[dict] = None) -> np.ndarray:
    """Sample ``config.sampling.num_samples`` points (in batches of ``config.sampling.batch_size`` when there are
    more), write them with ``save_sample_files`` (unless ``write`` is False); return them quantised to uint8
    (images) or as float (vectors). Non-finite samples are reported after writing (``report_non_finite``). Stopped
    by a signal, it keeps the batches drawn so far (manifest ``partial``)."""
    cfg = exp.config
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), seed_step)
    title = f"{cfg.sampling.num_samples} samples, step {seed_step}, {sampler_name(cfg.sampling, exp.sde)}"
    try:
        x, nfe = draw_samples(exp, params, int(cfg.sampling.num_samples), key, fold=False)
    except utils.Stopped as e:
        if write and e.partial is not None and manifest is not None:
            save_sample_files(exp, to_output(exp, e.partial), e.nfe, outdir, {**manifest, "partial": True}, title)
            e.message += f"; kept the {len(e.partial)} samples drawn so far in {outdir}"
        else:
            e.message += "; no samples written"
        raise
    out = to_output(exp, np.asarray(jax.device_get(x)))
    if write:
        save_sample_files(exp, out, nfe, outdir, manifest, title)
    report_non_finite(np.asarray(jax.device_get(x)), outdir, strict)
    return out


def report_non_finite(x: np.ndarray, outdir: pathlib.Path, strict: bool):
    """Say so when samples hold NaN or inf (a diverged model or sampler): ``FloatingPointError`` when ``strict``
    (the samples are written by then, for inspection), else a warning."""
    bad = int(np.sum(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)))
    if bad:
        message = (f"{bad} of {len(x)} samples hold NaN or inf values (written to {outdir} for inspection); "
                   "the model or the sampler diverged")
        if strict:
            raise FloatingPointError(message)
        logging.warning(message)


@dataclasses.dataclass
class EvalState:
    model: models.ScoreModel
    params: Any
    sde: sde_lib.SDE
    step: int


def restore_eval_state(config, workdir: str, step: Optional[int] = None,
                       exp: Optional[Experiment] = None) -> EvalState:
    """Model, parameters (EMA when ``config.eval.use_ema``), SDE and step of a checkpoint in ``workdir``
    (default: the latest readable one), on the default device whatever the devices it was trained on. ``exp``:
    the experiment of ``config`` when already built."""
    exp = Experiment.from_config(config) if exp is None else exp
    ckpt = utils.CheckpointManager(pathlib.Path(workdir) / "checkpoints", config)
    template = abstract_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    state = ckpt.restore(template, step)
    ckpt.close()
    params = state.ema_params if config.eval.use_ema else state.params
    return EvalState(exp.model, jax.device_put(params), exp.sde, int(state.step))


@dataclasses.dataclass
class Pretrained:
    """A trained workdir loaded for use from Python (``load_workdir``): its config, parameters, SDE and model.

    ``score_fn(x, t)`` is the score ∇ log p_t(x) of model-space x (batch first, t of shape (batch,));
    ``sample(key, n, **sampling)`` draws n samples with ``config.sampling`` (fields overridden by keyword, e.g.
    ``method="dpm_solver++", num_steps=20``) and returns ``(x, nfe)`` in model space; ``to_output(x)`` turns
    them into uint8 images (image data) or leaves vectors as they are."""

    config: ml_collections.ConfigDict
    params: Any
    sde: sde_lib.SDE
    model: models.ScoreModel
    step: int
    ema: bool
    workdir: pathlib.Path

    def __post_init__(self):
        self.score_fn = self.model.score_fn(self.params, self.sde)

    @property
    def data_shape(self) -> tuple:
        return datasets.data_shape(self.config.data)

    def sample(self, key, n: int, **sampling) -> tuple:
        cfg = ml_collections.ConfigDict(self.config.to_dict())
        for k, v in sampling.items():
            utils.set_path(cfg, f"sampling.{k}", v)
        return samplers.sample_from_config(key, self.sde, self.score_fn, (int(n),) + self.data_shape, cfg.sampling,
                                           make_mesh())

    def to_output(self, x) -> np.ndarray:
        x = np.asarray(jax.device_get(x))
        return datasets.get_data_transform(self.config).inverse(x) if x.ndim == 4 else x


def load_workdir(workdir: str, use_ema: bool = True, step: Optional[int] = None, **overrides) -> Pretrained:
    """Load a trained workdir from its saved ``config.json`` and checkpoint ``step`` (default the latest readable
    one): EMA parameters (``use_ema``) or the raw ones. ``overrides`` set config fields by dotted path with "."
    written as "__", e.g. ``sampling__method="ode"``.

        run = run_lib.load_workdir("/tmp/fm")
        x, nfe = run.sample(jax.random.key(0), 16, method="dpm_solver++", num_steps=20)
        images = run.to_output(x)                       # (16, 28, 28, 1) uint8
    """
    config = utils.workdir_config(workdir, None, {k.replace("__", "."): v for k, v in overrides.items()},
                                  quiet=True)
    config.eval.use_ema = bool(use_ema)
    ev = restore_eval_state(config, workdir, step)
    return Pretrained(config, ev.params, ev.sde, ev.model, ev.step, bool(use_ema), pathlib.Path(workdir))


def sample(config, workdir: str) -> pathlib.Path:
    """``--mode=sample``: write samples of the latest (or ``config.eval.checkpoint``) checkpoint to a new folder
    (``sample_folder``) with a ``manifest.json``; a ``config.sampling.task`` other than "unconditional" is run by
    ``controllable``. Returns the folder."""
    if config.sampling.get("task", "unconditional") != "unconditional":
        return controllable(config, workdir)["outdir"]
    exp = Experiment.from_config(config)
    samplers.options_from_config(config.sampling)  # an unknown method fails before restoring
    ev = restore_eval_state(config, workdir, config.eval.checkpoint, exp)
    outdir = sample_folder(config, workdir, exp.sde, ev.step)
    manifest = sample_manifest(config, workdir, ev.step, bool(config.eval.use_ema))
    t0 = time.time()
    write_samples(exp, ev.params, outdir, ev.step, write=jax.process_index() == 0, strict=True,
                  manifest=manifest)
    print(f"wrote {config.sampling.num_samples} samples of step {ev.step} to {outdir} in {time.time() - t0:.1f}s")
    return outdir


def evaluate(config, workdir: str) -> dict:
    """``--mode=eval``: for each checkpoint in ``workdir`` (or only ``config.eval.checkpoint``): test loss
    (``eval.enable_loss``), bits/dim through ``checkpoint_likelihood`` (``eval.enable_bpd``) and sample quality
    (``eval.enable_sampling``), written with provenance to ``eval/step_<k>.json``. Returns {step: result}."""
    exp = Experiment.from_config(config)
    ckpt = utils.CheckpointManager(pathlib.Path(workdir) / "checkpoints", config)
    steps = ckpt.steps() if config.eval.checkpoint is None else [int(config.eval.checkpoint)]
    if not steps:
        raise FileNotFoundError(f"no checkpoint to evaluate in {ckpt.directory}")
    results = {}
    for i, step in enumerate(steps):
        print(f"evaluating checkpoint {step} ({i + 1} of {len(steps)})", flush=True)
        try:
            ev = restore_eval_state(config, workdir, step, exp)
        except utils.IncompatibleCheckpointError:
            raise
        except Exception as e:  # a corrupt checkpoint among several: report it and go on
            if config.eval.checkpoint is not None:
                raise
            print(f"skipping unreadable checkpoint {ckpt.directory / str(step)}: {type(e).__name__}: {e}")
            continue
        results[step] = evaluate_checkpoint(config, workdir, exp, ev)
    ckpt.close()
    return results


def evaluate_checkpoint(config, workdir: str, exp: Experiment, ev: EvalState) -> dict:
    """The figures of one checkpoint, written (by process 0) to ``eval/step_<k>.json`` with provenance."""
    t0 = time.time()
    metrics = {}
    if config.eval.get("enable_loss", True):
        metrics.update(compute_test_loss(config, exp, ev.params, ev.step))
    if config.eval.get("enable_bpd", False):
        metrics["likelihood"] = checkpoint_likelihood(config, workdir, ev)
    nfe = None
    if config.eval.get("enable_sampling", True):
        quality, nfe = sample_quality(config, workdir, exp, ev)
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


def compute_test_loss(config, exp: Experiment, params, step: int, max_batches: Optional[int] = None) -> dict:
    """Mean training objective over the test split (its first ``max_batches`` batches when given; padding rows
    masked), with a fixed key per batch."""
    return make_test_loss_fn(config, exp, make_mesh())(params, step, max_batches)


def make_test_loss_fn(config, exp: Experiment, mesh: Mesh, verbose: bool = True) -> Callable:
    """``test_loss(params, step, max_batches=None) -> {"test_loss", "num_test_examples"}``, compiled once: batch
    ``b`` of the test split uses the key ``fold_in(fold_in(key(seed + 2), step), b)``. ``verbose``: progress
    lines (a stop signal ends it after the current batch either way)."""
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


def sample_quality(config, workdir: str, exp: Experiment, ev: EvalState) -> tuple:
    """``config.eval.num_samples`` samples: the data source's quality figure (``evaluation.quality``), and FID/KID/IS
    through ``fid_figures`` when its reference statistics exist. Returns (figures, nfe)."""
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
            figures["fid"] = fid_figures(config, workdir, out, n)
        else:
            print(f"no FID reference statistics for {names} (run --mode=fid_stats); FID skipped")
    return figures, nfe


def _provenance(config, workdir: str, ev: EvalState, nfe, seconds: float) -> dict:
    import hashlib
    import subprocess

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


def feature_sharding() -> Optional[NamedSharding]:
    """The batch axis of feature extraction split over the mesh, when one process holds several devices (every
    process extracts the features of all images; a host-local batch cannot be placed on a multi-process mesh)."""
    if jax.process_count() > 1 or jax.local_device_count() == 1:
        return None
    return NamedSharding(make_mesh(), P("data"))


def fid_figures(config, workdir, samples_uint8, num_samples: Optional[int] = None) -> dict:
    """FID/KID (and the classifier score) of uint8 samples (N, H, W, C) for every extractor of
    ``fid_extractor_names``, against the statistics at ``fid_stats_path``: {"<extractor>": {fid, kid, kid_std,
    num_samples, notes, reference_stats, reference_sha256, ...}, "num_samples": n}. The first ``num_samples``
    (default ``config.eval.num_samples``) are used; fewer is an error."""
    samples = features.check_samples(samples_uint8, int(config.eval.num_samples if num_samples is None
                                                        else num_samples))
    out = {"num_samples": int(len(samples))}
    for name in fid_extractor_names(config):
        stats = reference.load_stats(fid_stats_path(config, workdir, name), resolution=samples.shape[1],
                                     extractor=name, num_channels=samples.shape[-1])
        out[name] = features.evaluate_against(samples, feature_extractor(name, config, workdir), stats,
                                              config.eval.batch_size, feature_sharding())
    return out


def fid_stats(config, workdir: str) -> None:
    """``--mode=fid_stats``: statistics of every image (or the first ``config.eval.fid_num_images``) of
    ``config.eval.fid_split`` (default "train"), as stored (uint8), for each extractor of ``fid_extractor_names``;
    written by process 0 to ``fid_stats_path``. Prints a progress line per batch; a stop signal ends it after the
    current batch, writing nothing."""
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
                                                 sharding=feature_sharding())
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


def eval_samples(config, workdir: str) -> dict:
    """``--mode=eval_samples``: FID/KID (and the classifier score) of ``config.eval.samples`` (a samples.npz or a
    folder of PNGs) against the reference statistics of ``fid_extractor_names`` (written by ``--mode=fid_stats``;
    ``config.eval.fid_stats_dir``). Written to ``<workdir>/eval_samples/<name>_<sha256[:8]>.json``."""
    source = config.eval.get("samples", None)
    if not source:
        raise ValueError("--mode=eval_samples needs --config.eval.samples=<samples.npz or a folder of PNGs>")
    refs = _check_reference_stats(config, workdir)
    samples = sample_files.load_samples(source, int(config.data.image_size), int(config.data.num_channels))
    print(f"evaluating {len(samples)} samples from {source} against {', '.join(map(str, refs))}", flush=True)
    metrics = fid_figures(config, workdir, samples, len(samples))
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


def likelihood(config, workdir: str) -> dict:
    """``--mode=likelihood``: bits/dim of checkpoint ``config.eval.checkpoint`` (default the latest) on
    ``config.eval.likelihood.split`` (``checkpoint_likelihood``)."""
    likelihood_settings(config, sde_lib.get_sde(config.sde))  # fail before restoring anything
    return checkpoint_likelihood(config, workdir, restore_eval_state(config, workdir, config.eval.checkpoint))


def checkpoint_likelihood(config, workdir: str, ev: EvalState) -> dict:
    """Bits/dim of the restored checkpoint ``ev`` on ``config.eval.likelihood.split``, written with every setting
    that produced it to ``<workdir>/likelihood/step_<k>_<method>_<split>.json``. Each process evaluates its share
    of the split on its local devices."""
    settings = likelihood_settings(config, ev.sde)
    space = likelihood_data_space(config)
    n_local = len(jax.local_devices())
    mesh = make_mesh(jax.local_devices()) if n_local > 1 else None
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


def controllable(config, workdir: str) -> dict:
    """``--mode=sample`` for ``config.sampling.task`` in inpaint | colorize | class_conditional | cfg: writes
    ``samples.{npz,png}``, ``manifest.json`` (and ``inputs.png`` for imputation, the unknown pixels hatched gray)
    to a new folder ``sample_folder`` names after the task and its settings; returns the arrays and the folder
    (``"outdir"``). ``config.sampling.num_samples`` are drawn in batches of ``config.sampling.batch_size``."""
    task = config.sampling.get("task", "unconditional")
    if task not in SAMPLING_TASKS:
        raise ValueError(f"unknown config.sampling.task {task!r}; expected one of {list(SAMPLING_TASKS)}")
    exp = Experiment.from_config(config)
    ev = restore_eval_state(config, workdir, config.eval.checkpoint, exp)
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
    """The classifier's eval state, restored once per (workdir, config) for the batches of a run."""
    return restore_eval_state(ml_collections.ConfigDict(json.loads(config_json)), workdir)


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
