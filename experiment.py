"""The composition root: what every ``--mode`` runner is built from, wired in one place.

An ``Experiment`` is built once from a config (by ``main.py``, after the config checks and ``jax.distributed``):
SDE, model, optimizer, loss, the data shape and the single device mesh (``make_mesh``, the only ``Mesh`` built
anywhere; library code takes a mesh as an argument and is single-program without one). Here too: the train state,
the learning-rate schedule, EMA and the train step; sharding (one ``jax.jit`` over the ``data`` axis, the batch
split with ``NamedSharding`` and the state replicated); opening a workdir for training (the lock, the checkpoints,
the checks before the first write); restoring a checkpoint (``restore_eval_state``, ``load_workdir``); drawing and
writing samples. ``run_lib`` (the modes) and ``convert`` sit above this module, libraries below it.

Keys are derived, never carried: the step's key is ``fold_in(key(seed), step)``, so results do not depend on the
number of devices and a resumed run draws the same noise as an uninterrupted one.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Optional

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
# The train step on CPU is two programs (``SplitStep``). Its gradient at LLVM -O2 instead of the default -O3 (0.66x
# the compile for the small DDPM++, same losses), with XLA's YNNPACK library for reductions and single dots only:
# YNNPACK's convolutions (in XLA's default set) and elementwise fusions made the step 1.3-1.4x slower for
# configs/default.py; its reductions save 0.3x of the compile for 5% of the step. The optimizer half (clipping,
# Adam, EMA: ~640 small kernels for that config) without LLVM optimisation and with YNNPACK's elementwise and
# reduction fusions, which compile several times faster than LLVM's kernels for the ~5% of the step's time it
# takes (benchmarks/results/startup_cpu.md).
def _ynn_fusions(*types: str) -> dict:
    return {"xla_cpu_experimental_ynn_fusion_type": ",".join(f"LIBRARY_FUSION_TYPE_{t}" for t in types)}


STEP_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2, **_ynn_fusions("REDUCE", "INDIVIDUAL_DOT")}
APPLY_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, **_ynn_fusions("ELTWISE", "REDUCE", "INDIVIDUAL_DOT")}


# Samplers on CPU (``Experiment.sampler``) as the gradient: YNNPACK's convolutions, in XLA's default set, made the
# reverse-diffusion sampler of configs/default.py 1.7x slower (benchmarks/results/startup_cpu.md).
SAMPLER_COMPILER_OPTIONS = STEP_COMPILER_OPTIONS


def sampler_compiler_options() -> Optional[dict]:
    """XLA options for compiling ``Experiment.sampler`` on this backend (None: XLA's defaults)."""
    return SAMPLER_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def step_compiler_options() -> Optional[dict]:
    """XLA options for compiling the train step on this backend (None: XLA's defaults)."""
    return STEP_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def _init_fn(model: models.ScoreModel, optimizer, data_shape) -> Callable:
    def init(seed):
        key = jax.random.fold_in(jax.random.key(seed), -1 & 0x7FFFFFFF)  # traced: no eager key programs
        params = model.init(key, jnp.zeros((1,) + tuple(data_shape)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                          opt_state=optimizer.init(params))

    return init


def _init_seed(config) -> np.ndarray:
    """The argument of the init program: the seed as uint32 (``jax.random.key`` of a Python int wraps modulo 2**32
    alike, and gives the same key as of this array)."""
    return np.uint32(config.seed & 0xFFFFFFFF)


def trace_init(config, model: models.ScoreModel, optimizer, data_shape) -> jax.stages.Traced:
    """The program of ``init_train_state``, traced: ``.out_info`` is the state's structure (shapes, dtypes) and
    ``.lower()`` its program, so one tracing serves both (``Experiment.traced_init``)."""
    return jax.jit(_init_fn(model, optimizer, data_shape)).trace(_init_seed(config))


def _run_init(lowered, config) -> TrainState:
    return lowered.compile(INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)(_init_seed(config))


def init_train_state(config, model: models.ScoreModel, optimizer, data_shape) -> TrainState:
    """Step 0: parameters from ``fold_in(key(seed), 2**31 - 1)``, EMA = parameters, fresh optimizer state
    (one jitted computation, not one compilation per initializer)."""
    return _run_init(trace_init(config, model, optimizer, data_shape).lower(), config)


def initial_state_in_background(exp) -> concurrent.futures.Future:
    """``init_train_state`` of ``exp``: lowered here, compiled and run in a thread (XLA releases the GIL), so that
    a core is busy compiling it while this thread traces the train step."""
    lowered = exp.traced_init().lower()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="initial_state")
    future = pool.submit(_run_init, lowered, exp.config)
    pool.shutdown(wait=False)
    return future


def abstract_train_state(config, model: models.ScoreModel, optimizer, data_shape) -> TrainState:
    """The structure of ``init_train_state`` as zero host arrays, computed by ``jax.eval_shape`` (no compilation, no
    device memory): the template a checkpoint is restored into."""
    shapes = jax.eval_shape(_init_fn(model, optimizer, data_shape), _init_seed(config))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def make_train_step(loss_fn: Callable, optimizer, ema_rate: float, seed: int) -> Callable:
    """One optimisation step ``(state, batch) -> (state, metrics)``, pure; the batch mean is the global mean.

    The step's key is ``fold_in(key(seed), step)``; the loss draws the noise of the whole global batch from it, and
    with partitionable threefry each device computes its own rows of that draw, so devices get independent noise
    and the result does not depend on the device count. ``train_step.parts`` is the same step in two halves,
    ``gradient(state, batch) -> (grads, metrics)`` and ``apply(state, grads) -> state`` (clipping, Adam, EMA),
    which ``jit_sharded_step`` compiles as two programs on CPU (``SplitStep``)."""

    def objective(params, key, batch):
        per_example, metrics = loss_fn(params, key, batch)
        return jnp.mean(per_example), metrics

    def gradient(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.key(seed), state.step)  # traced: no eager program before the step
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, key, batch)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
        return grads, metrics

    def apply(state: TrainState, grads) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=ema_update(state.ema_params, params, ema_rate))

    def train_step(state: TrainState, batch):
        grads, metrics = gradient(state, batch)
        return apply(state, grads), metrics

    train_step.parts = (gradient, apply)
    return train_step


# ---- the device mesh --------------------------------------------------------------------------------------------
def make_mesh(devices=None) -> Mesh:
    """The 1-D ``data`` mesh of ``devices`` (default: every device of every process): the only place a ``Mesh`` is
    built. One device order everywhere: process-major, then by device id. Process-major because each process loads
    its own data shards (``train_batches``) and ``jax.make_array_from_process_local_data`` lays its rows on its
    devices in mesh order: process ``p``'s rows then come before those of ``p + 1``, so the global batch is shard
    0, 1, 2, ... whatever the number of processes; by id so the order does not depend on how a backend enumerates
    devices. A process's own mesh (``make_mesh(jax.local_devices())``) is the same order restricted to it."""
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


def split_step_by_default() -> bool:
    """Whether ``jit_sharded_step`` compiles the step as two programs (``SplitStep``) here: on CPU, where that
    compiled the optimizer's ~640 small per-parameter kernels cheaply and kept the gradient's fast
    (``benchmarks/results/startup_cpu.md``); elsewhere it was not measured, so the step stays one program."""
    return jax.default_backend() == "cpu"


def jit_sharded_step(train_step, mesh: Mesh, split: Optional[bool] = None):
    """``train_step`` jitted over ``mesh``: the state replicated (and donated), the batch split over ``data``. With
    ``split`` (default ``split_step_by_default()``) and ``train_step.parts``, a ``SplitStep`` of two programs."""
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    split = split_step_by_default() if split is None else split
    if not (split and hasattr(train_step, "parts")):
        return jax.jit(train_step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                       donate_argnums=0)
    gradient, apply = train_step.parts
    return SplitStep(jax.jit(gradient, in_shardings=(replicated, data), out_shardings=(replicated, replicated)),
                     jax.jit(apply, in_shardings=(replicated, replicated), out_shardings=replicated, donate_argnums=0))


@dataclasses.dataclass(frozen=True)
class SplitStep:
    """The train step as two jitted programs, used like one: ``step(state, batch)``,
    ``step.lower(state, batch).compile(options)``. ``gradient`` (forward, backward, metrics) is compiled with the
    step's ``options``; ``apply`` (clipping, Adam, EMA: small elementwise kernels per parameter, most of the step's
    kernels but ~5% of its time) with ``APPLY_COMPILER_OPTIONS``, in a second thread."""

    gradient: Any
    apply: Any

    def __call__(self, state: TrainState, batch):
        grads, metrics = self.gradient(state, batch)
        return self.apply(state, grads), metrics

    def lower(self, state, batch) -> "SplitStep":
        return SplitStep(self.gradient.lower(state, batch), self.apply.lower(state, state.params))

    def compile(self, options: Optional[dict] = None) -> "SplitStep":
        """Both lowered programs compiled: ``apply`` in a thread while ``gradient`` compiles here."""
        apply_options = APPLY_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_apply") as pool:
            apply = pool.submit(self.apply.compile, apply_options)
            return SplitStep(self.gradient.compile(options), apply.result())

    def cost_analysis(self) -> dict:
        """XLA's cost estimates of the two compiled programs, summed (e.g. ``flops``)."""
        costs = [c[0] if isinstance(c, (list, tuple)) else (c or {})
                 for c in (self.gradient.cost_analysis(), self.apply.cost_analysis())]
        keys = {k for c in costs for k, v in c.items() if isinstance(v, (int, float))}
        return {k: sum(float(c.get(k, 0.0)) for c in costs) for k in keys}


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (a signal may reach only some processes)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], bool))))


# ---- the experiment ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Experiment:
    """The objects built once from a config: SDE, model, optimizer, loss, data shape and the device mesh
    (``mesh``: every device; ``local_mesh``: this process's devices, the same mesh with one process), and the
    compiled samplers. ``build_seconds``: how long ``from_config`` took (a start-up phase)."""

    config: ml_collections.ConfigDict
    sde: sde_lib.SDE
    model: models.ScoreModel
    optimizer: optax.GradientTransformation
    data_shape: tuple
    mesh: Mesh
    local_mesh: Mesh
    build_seconds: float = dataclasses.field(default=0.0, compare=False)
    compiled_samplers: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # ``sampler``
    traced: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # ``traced_init``

    @classmethod
    def from_config(cls, config) -> "Experiment":
        """Checks the loss against the SDE; builds the model (no parameters) and the mesh."""
        t0 = time.time()
        sde = sde_lib.get_sde(config.sde)
        losses.check_loss_config(config, sde)
        model = models.create_model(config)
        mesh = make_mesh()
        local_mesh = mesh if jax.process_count() == 1 else make_mesh(jax.local_devices())
        return cls(config, sde, model, get_optimizer(config.optim), datasets.data_shape(config.data), mesh,
                   local_mesh, time.time() - t0)

    def traced_init(self) -> jax.stages.Traced:
        """``trace_init`` of this experiment, traced once (the step's argument shapes and the initial state)."""
        if "init" not in self.traced:
            self.traced["init"] = trace_init(self.config, self.model, self.optimizer, self.data_shape)
        return self.traced["init"]

    def loss_fn(self):
        return losses.get_loss_fn(self.config, self.sde, self.model)

    def sample(self, key, params, n: int):
        """``(x (n, *data_shape), nfe)`` sharded over ``local_mesh``: with several processes each samples alone
        on its own devices."""
        if jax.process_count() > 1:
            params = jax.device_get(params)
        return self.sampler(n)(params, key)

    def sampler(self, n: int) -> Callable:
        """The jitted ``(params, key) -> (x, nfe)`` of ``config.sampling`` for batches of ``n`` on ``local_mesh``:
        built once per (n, sampling settings) and kept, so new parameters, keys and batches reuse one compilation
        (snapshot and final samples of a run, every batch of ``--mode=sample``). Says so before its first (long)
        compile."""
        cfg = self.config.sampling
        cache_key = (int(n), json.dumps(cfg.to_dict(), sort_keys=True, default=str))
        if cache_key not in self.compiled_samplers:
            shape, options = (int(n),) + self.data_shape, samplers.options_from_config(cfg)

            def run(params, key):
                with jax.ensure_compile_time_eval():  # the sampler's set-up (time grids, checks) stays concrete
                    fn, _ = samplers.build_sampler(self.sde, self.model.score_fn(params, self.sde), shape,
                                                   cfg.method, mesh=self.local_mesh, **options)
                return fn(key)

            jitted = jax.jit(run, compiler_options=sampler_compiler_options())
            self.compiled_samplers[cache_key] = _announce_first_call(jitted, sampler_description(
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
class StepCompilation:
    """A train step compiling in a background thread for arguments of ``spec`` (XLA releases the GIL)."""

    spec: Any
    future: concurrent.futures.Future
    cache_hits: int


def spec_of(tree):
    """The (shape, dtype) of every leaf: what a compiled program was compiled for."""
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)


def step_arguments_spec(exp: Experiment):
    """``(state, batch)`` of the train step as ``ShapeDtypeStruct``s sharded over ``exp.mesh``, from the config
    alone."""
    replicated, data = NamedSharding(exp.mesh, P()), NamedSharding(exp.mesh, P("data"))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                         exp.traced_init().out_info)
    b = exp.config.training.batch_size
    batch = {"x": jax.ShapeDtypeStruct((b,) + tuple(exp.data_shape), jnp.float32, sharding=data),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)}
    return state, batch


def compile_step_in_background(step_fn, exp: Experiment) -> StepCompilation:
    """Start compiling ``step_fn`` for the config's state and batch in a thread, so that the compilation overlaps
    building the initial state; ``compile_step`` collects it. The thread is not a daemon: a process that exits
    meanwhile waits for it (a daemon thread returning from XLA into a finalizing interpreter aborts the process)."""
    state, batch = step_arguments_spec(exp)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_train_step")
    hits = utils.compilation_cache_hits()
    future = pool.submit(lambda: step_fn.lower(state, batch).compile(step_compiler_options()))
    pool.shutdown(wait=False)
    return StepCompilation(spec_of((state, batch)), future, hits)


def compile_step(step_fn, state: TrainState, batch: dict, compiling: Optional[StepCompilation] = None) -> tuple:
    """``step_fn`` compiled for ``(state, batch)`` (or loaded from the persistent compilation cache): the one
    ``compiling`` in the background when it was compiled for these shapes, otherwise compiled now. Returns
    (compiled, seconds, whether the compilation cache answered)."""
    t0 = time.time()
    hits = compiling.cache_hits if compiling else utils.compilation_cache_hits()
    if compiling and compiling.spec == spec_of((state, batch)):
        compiled = compiling.future.result()
    else:
        compiled = step_fn.lower(state, batch).compile(step_compiler_options())
    return compiled, time.time() - t0, utils.compilation_cache_hits() > hits


# ---- a workdir opened for training -------------------------------------------------------------------------------
@dataclasses.dataclass
class Training:
    """A workdir opened for training (``open_training``): its checkpoints, the state to start from (restored or
    initial, on the host), the global batches from that state's step on, and what ``background`` returned."""

    ckpt: utils.CheckpointManager
    state: TrainState
    batches: Iterator[dict]
    background: Any = None


@contextlib.contextmanager
def open_training(exp: Experiment, workdir, background: Optional[Callable[[], Any]] = None) -> Iterator[Training]:
    """Open ``workdir`` to train ``exp``: the one place that decides when a run starts writing.

    First the checks, which write nothing: the batch size against the devices and data shards, one trainer per
    workdir (``utils.WorkdirLock``), the checkpoint to resume (compatible with the config, finite; the latest
    readable one) and the first batch of data. ``background`` (e.g. ``compile_step_in_background``) is started
    once those checks passed, so on a fresh run it overlaps building the initial state. Only then the lock file
    and ``config.json`` are written. On exit the last save is waited for (and verified), then checkpoints and data
    are closed, even when that save failed."""
    config, workdir = exp.config, pathlib.Path(workdir)
    check_batch_size(config.training.batch_size, shards=num_data_shards(config))
    is_main = jax.process_index() == 0
    with utils.WorkdirLock(workdir, enabled=is_main) as lock:
        ckpt, state, first, stream, started = _resume(exp, workdir, background or (lambda: None))
        try:
            lock.acquire(create=True)  # the checks passed: from here on the workdir is written
            if is_main:
                utils.write_config(workdir, config)
            yield Training(ckpt, state, itertools.chain([first], stream), started)
        finally:
            try:
                ckpt.wait()
            finally:
                ckpt.close()
                stream.close()


def _resume(exp: Experiment, workdir: pathlib.Path, background: Callable[[], Any]) -> tuple:
    """The checks that need the workdir, writing nothing: the checkpoint to resume from (compatible, finite) and
    the first batch of data; then ``background()`` is started. A fresh run reads its first batch before building
    the initial state, so that the state is built while ``background`` runs (a failed check never waits for it).
    Returns (ckpt, state, first batch, the stream of the following batches, what ``background`` returned)."""
    ckpt = utils.CheckpointManager(workdir / "checkpoints", exp.config)
    stream = None
    try:
        if ckpt.steps():  # a restore needs only the structure
            state = ckpt.restore_or(lambda: abstract_train_state(exp.config, exp.model, exp.optimizer,
                                                                 exp.data_shape))
            stream = train_batches(exp.config, exp.mesh, int(state.step))
            first = next(stream)
            started = background()
        else:
            stream = train_batches(exp.config, exp.mesh, 0)
            first = next(stream)
            initial = initial_state_in_background(exp)
            started = background()
            state = initial.result()
        return ckpt, state, first, stream, started
    except BaseException:
        if stream is not None:
            stream.close()
        ckpt.close()
        raise


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


def restore_eval_state(exp: Experiment, workdir: str, step: Optional[int] = None) -> EvalState:
    """Model, parameters (EMA when ``config.eval.use_ema``), SDE and step of a checkpoint of ``exp`` in
    ``workdir`` (default: the latest readable one), on the default device whatever the devices it was trained on.
    A checkpoint of another config is refused (``utils.IncompatibleCheckpointError``)."""
    config = exp.config
    ckpt = utils.CheckpointManager(pathlib.Path(workdir) / "checkpoints", config)
    try:
        state = ckpt.restore(abstract_train_state(config, exp.model, exp.optimizer, exp.data_shape), step)
    finally:
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
    mesh: Optional[Mesh] = None  # the batch of ``sample`` is split over its devices

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
                                           mesh=self.mesh)

    def to_output(self, x) -> np.ndarray:
        x = np.asarray(jax.device_get(x))
        return datasets.get_data_transform(self.config).inverse(x) if x.ndim == 4 else x


def load_workdir(workdir: str, use_ema: bool = True, step: Optional[int] = None, **overrides) -> Pretrained:
    """Load a trained workdir from its saved ``config.json`` and checkpoint ``step`` (default the latest readable
    one): EMA parameters (``use_ema``) or the raw ones. ``overrides`` set config fields by dotted path with "."
    written as "__", e.g. ``sampling__method="ode"``.

        run = experiment.load_workdir("/tmp/fm")
        x, nfe = run.sample(jax.random.key(0), 16, method="dpm_solver++", num_steps=20)
        images = run.to_output(x)                       # (16, 28, 28, 1) uint8
    """
    config = utils.workdir_config(workdir, None, {k.replace("__", "."): v for k, v in overrides.items()},
                                  quiet=True)
    config.eval.use_ema = bool(use_ema)
    exp = Experiment.from_config(config)
    ev = restore_eval_state(exp, workdir, step)
    return Pretrained(config, ev.params, ev.sde, ev.model, ev.step, bool(use_ema), pathlib.Path(workdir), exp.mesh)
