"""Start-up speed: the persistent compilation cache (a second identical run loads its programs), the initial state
compiled cheaply and its abstract template, the first-step log line."""
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import experiment
import run_lib
import utils
from configs import default, toy

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cache_dir_flag_then_environment_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(utils.CACHE_ENV, raising=False)
    assert utils.compilation_cache_dir() == tmp_path / "xdg" / "score_sde_jax" / "jax_cache"
    monkeypatch.setenv(utils.CACHE_ENV, str(tmp_path / "env"))
    assert utils.compilation_cache_dir() == tmp_path / "env"
    assert utils.compilation_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert utils.compilation_cache_dir("off") is None
    monkeypatch.setenv(utils.CACHE_ENV, "off")
    assert utils.compilation_cache_dir() is None


def test_tests_do_not_use_the_user_cache():
    assert os.environ[utils.CACHE_ENV] == "off"
    assert utils.compilation_cache_dir() is None


def test_unwritable_cache_dir_is_one_line_and_no_cache(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert utils.enable_compilation_cache(str(blocker / "cache")) is None
    out = capsys.readouterr().out
    assert "running without it" in out and len(out.strip().splitlines()) == 1


def test_start_up_imports_neither_diffrax_nor_sklearn():
    """What every run imports (``main``) leaves diffrax and its dependencies (equinox) unexecuted until an ODE
    solver is used, and scikit-learn unimported: together 1.4 s of each start-up. Then an ODE solve loads
    diffrax through the lazy module and works."""
    code = ("import sys, main, samplers, jax.numpy as jnp; heavy = ('equinox', 'sklearn'); "
            "print(sorted(m for m in heavy if m in sys.modules)); "
            "y, nfe, ok = samplers.solve_ode(lambda t, y, a: -y, jnp.ones(2), 0.0, 1.0, 'rk45'); "
            "print(round(float(y[0]), 5), bool(ok), 'equinox' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first == "[]", first
    assert second == f"{round(float(np.exp(-1.0)), 5)} True True", second


def run_main(workdir, cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([sys.executable, "main.py", "--config=configs/toy.py:8gaussians", f"--workdir={workdir}",
                           "--config.training.n_iters=2", "--config.training.snapshot_sampling=False",
                           f"--compilation_cache={cache}"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def test_second_identical_run_loads_the_train_step_from_the_cache(tmp_path):
    """Two fresh processes, same config and cache directory: the first compiles and fills the cache, the second
    loads the train step from it (jax's own cache-hit counter) instead of compiling."""
    cache = tmp_path / "cache"
    first = run_main(tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr
    line = re.search(r"first step after .*", first.stdout).group(0)
    assert "from the compilation cache" not in line, line
    assert any(cache.iterdir()), "the first run wrote nothing to the cache"
    second = run_main(tmp_path / "b", cache)
    assert second.returncode == 0, second.stderr
    line = re.search(r"first step after .*", second.stdout).group(0)
    assert re.search(r"compile [0-9.]+ s from the compilation cache", line), line
    assert re.search(r"\(import [0-9.]+ s, init [0-9.]+ s, compile", line), line


def small_config():
    config = toy.get_config("8gaussians")
    config.model.hidden, config.model.num_layers = 16, 2
    return config


def test_initial_state_agrees_with_a_fully_optimised_compile():
    """The initial state is compiled without LLVM optimisation on CPU; it must equal the optimised program's
    result to float rounding (and be the same tree)."""
    config = small_config()
    exp = experiment.Experiment.from_config(config)
    fast = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    init = experiment._init_fn(exp.model, exp.optimizer, exp.data_shape)
    reference = jax.jit(init)(experiment._init_seed(config))
    assert jax.tree.structure(fast) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert float(np.std(np.asarray(fast.params["Dense_0"]["kernel"]))) > 0.01   # really random, not zeros
    key = jax.random.fold_in(jax.random.key(config.seed), 2 ** 31 - 1)  # the documented key, derived eagerly
    direct = jax.jit(exp.model.init)(key, jax.numpy.zeros((1,) + tuple(exp.data_shape)))
    for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(direct)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_abstract_state_is_the_template_of_the_real_one():
    config = small_config()
    exp = experiment.Experiment.from_config(config)
    real = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    abstract = experiment.abstract_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype and not a.any()


def test_first_step_line():
    line = run_lib.first_step_line({"import": 2.0, "init": 1.5, "compile": 0.25, "cached": True, "first step": 0.25})
    assert line == ("first step after 4.0 s (import 2.0 s, init 1.5 s, compile 0.2 s from the compilation cache, "
                    "step 0.2 s)")
    line = run_lib.first_step_line({"init": 1.0, "compile": 2.0, "first step": 0.5})
    assert line.startswith("first step after 3.5 s (init 1.0 s")


def test_sampling_batches_compiles_the_sampler_once(capsys):
    """Three batches, then a new key and new parameters: one compilation of the PC sampler, announced once."""
    config = small_config()
    config.sde.N = 8
    config.sampling.num_samples, config.sampling.batch_size = 12, 4
    exp = experiment.Experiment.from_config(config)
    params = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape).params
    x, nfe = experiment.draw_samples(exp, params, 12, jax.random.key(0))
    assert x.shape == (12, 2) and np.all(np.isfinite(x))
    assert not np.allclose(x[:4], x[4:8])                          # each batch draws its own noise
    assert capsys.readouterr().out.count("compiling PC sampler (N=8, batch 4)…") == 1
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") \
        else None
    other = jax.block_until_ready(jax.tree.map(lambda p: p * 1.01, params))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        y, _ = experiment.draw_samples(exp, other, 12, jax.random.key(1))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} programs compiled for a new key and new parameters"
    assert not np.allclose(x, y)
    (fn,) = exp.compiled_samplers.values()
    assert fn.jitted._cache_size() == 1
    assert "compiling" not in capsys.readouterr().out


def test_step_compiled_in_the_background_is_the_one_train_uses_and_gives_the_same_result(monkeypatch):
    """``compile_step_in_background`` (what ``run_lib.train`` uses) compiles the train step in a thread beside the
    init: that compilation must be for exactly the (state, batch) shapes the loop meets, and its result must equal
    the step compiled in the foreground bit for bit, and the step's CPU compile options (``experiment.STEP_COMPILER_OPTIONS``) must
    agree with XLA's defaults to float rounding. Fault injection: a wrong batch size must not match."""
    config = small_config()
    exp = experiment.Experiment.from_config(config)
    mesh = exp.mesh
    step_fn = experiment.jit_sharded_step(experiment.make_train_step(exp.loss_fn(), exp.optimizer,
                                                                     config.model.ema_rate, config.seed), mesh)
    compiling = experiment.compile_step_in_background(step_fn, exp)
    state = experiment.replicate(experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape),
                                 mesh)
    data = experiment.train_batches(config, mesh)
    batch = next(data)
    data.close()
    assert compiling.spec == experiment.spec_of((state, batch))
    background = compiling.future.result()
    foreground = step_fn.lower(state, batch).compile(experiment.step_compiler_options())
    fg_state, fg_metrics = foreground(jax.tree.map(jax.numpy.copy, state), batch)
    bg_state, bg_metrics = background(state, batch)
    for a, b in zip(jax.tree.leaves((fg_state, fg_metrics)), jax.tree.leaves((bg_state, bg_metrics))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    default = step_fn.lower(state, batch).compile()  # XLA's default options: agrees to float rounding
    ref_state, ref_metrics = default(jax.tree.map(jax.numpy.copy, fg_state), batch)
    bg_state, bg_metrics = background(bg_state, batch)
    for a, b in zip(jax.tree.leaves((ref_state, ref_metrics)), jax.tree.leaves((bg_state, bg_metrics))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    config.training.batch_size *= 2
    other = experiment.step_arguments_spec(exp)
    assert experiment.spec_of(other) != compiling.spec


def test_step_compilation_starts_only_after_the_checks_and_before_the_initial_state(tmp_path, monkeypatch):
    """``open_training``'s ``background`` (``run_lib.train`` compiles the train step there) starts once every
    check passed, while the initial state is built (its compilation started just before); a check that fails
    (fault injection: the data source raises) starts neither and leaves the workdir empty."""
    exp = experiment.Experiment.from_config(small_config())
    events = []
    init = experiment.initial_state_in_background
    monkeypatch.setattr(experiment, "initial_state_in_background", lambda *a: events.append("init") or init(*a))
    with experiment.open_training(exp, tmp_path / "ok", lambda: events.append("background") or 7) as opened:
        assert opened.background == 7
        reference = experiment.init_train_state(exp.config, exp.model, exp.optimizer, exp.data_shape)
        for a, b in zip(jax.tree.leaves(opened.state), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert events == ["init", "background"]
    events.clear()

    def broken(*args, **kwargs):
        raise FileNotFoundError("data directory /nowhere does not exist")
        yield

    monkeypatch.setattr(experiment, "train_batches", broken)
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        with experiment.open_training(exp, tmp_path / "bad", lambda: events.append("background")):
            pass
    assert events == [] and not any((tmp_path / "bad").rglob("*.json"))


EXIT_WHILE_COMPILING = """
import sys, threading, experiment
from configs import toy
config = toy.get_config("8gaussians")
exp = experiment.Experiment.from_config(config)
step = experiment.jit_sharded_step(experiment.make_train_step(exp.loss_fn(), exp.optimizer, 0.9, 0), exp.mesh)
experiment.compile_step_in_background(step, exp)
print([t.daemon for t in threading.enumerate() if t.name.startswith("compile_train_step")], flush=True)
raise SystemExit(2)
"""


def test_exit_while_the_step_compiles_waits_for_it_instead_of_aborting():
    """A run that fails while the train step compiles in the background must exit with its own status: the
    compiling thread is not a daemon, so the exit waits for it. With a daemon thread, XLA returning into the
    finalizing interpreter aborted the process ("FATAL: exception not rethrown", signal 6) in 3 of 5 probes with
    configs/default.py."""
    out = subprocess.run([sys.executable, "-c", EXIT_WHILE_COMPILING], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2 and "FATAL" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[False]"


def test_split_step_with_cpu_options_agrees_with_the_fused_default_program_on_a_convolutional_model():
    """On CPU the train step is two programs (``experiment.SplitStep``: gradient, then clipping/Adam/EMA), compiled
    with ``STEP_COMPILER_OPTIONS`` and ``APPLY_COMPILER_OPTIONS`` (LLVM levels, YNNPACK fusion sets). Over a few
    steps of a small U-Net it must give the losses and parameters of the one fused program under XLA's default
    options to float rounding, and report XLA's cost estimate summed over both programs."""
    config = default.get_config()
    config.model.nf, config.training.batch_size = 16, 16
    exp = experiment.Experiment.from_config(config)
    train_step = experiment.make_train_step(exp.loss_fn(), exp.optimizer, config.model.ema_rate, config.seed)
    split = experiment.jit_sharded_step(train_step, exp.mesh)
    fused = experiment.jit_sharded_step(train_step, exp.mesh, split=False)
    assert isinstance(split, experiment.SplitStep) and not isinstance(fused, experiment.SplitStep)
    state = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    data = experiment.train_batches(config, exp.mesh)
    batches = [next(data) for _ in range(3)]
    data.close()
    ours = split.lower(state, batches[0]).compile(experiment.step_compiler_options())
    xla = fused.lower(state, batches[0]).compile()
    results = []
    for compiled in (ours, xla):
        s, losses = jax.tree.map(jax.numpy.copy, state), []
        for batch in batches:
            s, metrics = compiled(s, batch)
            losses.append(float(metrics["loss"]))
        results.append((s, losses))
    (ours_state, our_losses), (xla_state, xla_losses) = results
    np.testing.assert_allclose(our_losses, xla_losses, rtol=1e-5)
    assert int(ours_state.step) == int(xla_state.step) == 3
    for a, b in zip(jax.tree.leaves((ours_state.params, ours_state.ema_params, ours_state.opt_state)),
                    jax.tree.leaves((xla_state.params, xla_state.ema_params, xla_state.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    flops = ours.cost_analysis()["flops"]
    parts = sum(float(c.cost_analysis()["flops"]) for c in (ours.gradient, ours.apply))
    assert flops == parts > 0


def test_sampler_cpu_options_agree_with_xla_defaults_on_a_convolutional_model():
    """``Experiment.sampler`` compiles with ``sampler_compiler_options()`` (on CPU: LLVM -O2, YNNPACK for
    reductions and dots only): a reverse-diffusion sampler of a small U-Net must give the default program's
    samples to float rounding for the same key."""
    config = default.get_config()
    config.model.nf, config.sde.N = 16, 25
    config.sampling.corrector = "none"  # Langevin's step size divides by the score's norm: NaN for a random net
    exp = experiment.Experiment.from_config(config)
    params = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape).params
    sampler = exp.sampler(8)
    x, nfe = sampler(params, jax.random.key(3))
    reference = jax.jit(sampler.jitted.__wrapped__)
    x_ref, nfe_ref = reference(params, jax.random.key(3))
    assert np.all(np.isfinite(np.asarray(x_ref))) and int(nfe) == int(nfe_ref)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), rtol=1e-4, atol=1e-4)
