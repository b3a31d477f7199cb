"""Training system: exact resume, checkpoint fallback and refusal, signals, NaN stop, device-count independence,
logging and eval mode, on a tiny 2-D toy config (a few steps, N=20)."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import datasets
import experiment
import run_lib
import utils
from configs import toy

REPO = pathlib.Path(__file__).resolve().parents[1]
COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds={}"  # a hang fails instead of waiting


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: every test re-jits the same few tiny programs, in this process and in
    subprocesses (through ``CACHE_ENV``); on a loaded 2-core machine compiling dominates."""
    from jax._src import compilation_cache as cc

    directory = str(tmp_path_factory.mktemp("jax_cache"))
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=directory, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    yield
    CACHE_ENV.clear()
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    cc.reset_cache()


CACHE_ENV: dict = {}


def subprocess_env(devices: int = 1, collective_timeout_s: int = 20) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **CACHE_ENV,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                          f"{COLLECTIVE_TIMEOUT.format(collective_timeout_s)}")


def tiny_config(n_iters: int = 6, **overrides):
    """A config whose steps take milliseconds: MLP of width 32, batch 16, 20 noise levels, no sampling."""
    config = toy.get_config("two_moons")
    flat = {"training.n_iters": n_iters, "training.batch_size": 16, "training.snapshot_freq": n_iters,
            "training.log_freq": n_iters, "training.snapshot_sampling": False, "sde.N": 20,
            "model.hidden": 32, "model.num_layers": 1, "model.embed_dim": 16, "optim.warmup": 2,
            "optim.lr": 1e-2, "data.prefetch": 1, "sampling.num_samples": 32, "eval.num_samples": 32,
            "eval.batch_size": 64, "data.toy_eval_size": 128}
    flat.update(overrides)
    for key, value in flat.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def train(config, workdir):
    """``--mode=train`` as ``main.py`` runs it: the experiment built once, then the runner."""
    return run_lib.train(experiment.Experiment.from_config(config), str(workdir))


def evaluate(config, workdir):
    return run_lib.evaluate(experiment.Experiment.from_config(config), str(workdir))


def sample(config, workdir):
    return run_lib.sample(experiment.Experiment.from_config(config), str(workdir))


def leaves(state) -> list:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def assert_states_equal(a, b, rtol=0.0, atol=0.0):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if rtol == 0 and atol == 0:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def restore(config, workdir, step=None):
    exp = experiment.Experiment.from_config(config)
    template = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    ckpt = utils.CheckpointManager(pathlib.Path(workdir) / "checkpoints", config)
    try:
        return ckpt.restore(template, step)
    finally:
        ckpt.close()


def run_python(code: str, *args: str, devices: int = 1, timeout: int = 240):
    """Run ``code`` in a fresh interpreter with ``devices`` forced CPU devices."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)


WORKER = """
import json, sys
import experiment
from tests.test_run_lib import tiny_config, train
config = tiny_config(**json.loads(sys.argv[1]))
"""


# ---- exact resume -------------------------------------------------------------------------------------------------
def test_data_stream_start_step_is_exact():
    config = tiny_config()
    stream = datasets.get_dataset(config, "train", infinite=True, seed=5, process_index=0, process_count=1)
    straight = [next(stream)["x"] for _ in range(4)]
    resumed = datasets.get_dataset(config, "train", infinite=True, seed=5, process_index=0, process_count=1,
                                   start_step=2)
    np.testing.assert_array_equal(next(resumed)["x"], straight[2])


def test_exact_resume_gives_identical_state(tmp_path, capsys):
    """2N steps straight == N steps, stop, resume for N: bit-identical params, EMA and Adam moments."""
    straight = train(tiny_config(8), str(tmp_path / "a"))
    train(tiny_config(4), str(tmp_path / "b"))
    resumed = train(tiny_config(8), str(tmp_path / "b"))
    assert "resumed from step 4" in capsys.readouterr().out
    assert int(resumed.step) == 8
    assert_states_equal(straight, resumed)
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]


def test_resume_with_changed_lr_and_ema_rate_uses_new_values(tmp_path, capsys):
    """Resuming with lr=0 and ema_rate=1 freezes params and EMA exactly (Adam's step is lr-scaled)."""
    first = train(tiny_config(4), str(tmp_path))
    capsys.readouterr()
    again = train(tiny_config(7, **{"optim.lr": 0.0, "model.ema_rate": 1.0}), str(tmp_path))
    out = capsys.readouterr().out
    assert "config.optim.lr: 0.01 in the checkpoint -> 0.0 now" in out
    assert "config.model.ema_rate: 0.99 in the checkpoint -> 1.0 now" in out
    assert int(again.step) == 7
    assert_states_equal(first.params, again.params)
    assert_states_equal(first.ema_params, again.ema_params)


def test_kill9_during_save_falls_back_and_resumes_exactly(tmp_path, capsys):
    """A process SIGKILLed while its checkpoint of step 6 is being written leaves no readable step 6; the next
    run resumes from step 3 and ends with the state of an uninterrupted run."""
    code = WORKER + """
import os, signal, utils
original = utils.CheckpointManager.save
def save_then_die(self, step, state):
    original(self, step, state)
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
utils.CheckpointManager.save = save_then_die
train(config, sys.argv[2])
"""
    workdir = tmp_path / "killed"
    overrides = {"n_iters": 9, "training.snapshot_freq": 3}
    proc = run_python(code, json.dumps(overrides), str(workdir))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "3" in left and "6" not in left and any(n.startswith("6.orbax-checkpoint-tmp") for n in left), left
    resumed = train(tiny_config(9, **{"training.snapshot_freq": 3}), str(workdir))
    assert "resumed from step 3" in capsys.readouterr().out
    straight = train(tiny_config(9, **{"training.snapshot_freq": 3}), str(tmp_path / "straight"))
    assert_states_equal(straight, resumed)


# ---- checkpoint integrity -----------------------------------------------------------------------------------------
def corrupt(step_dir: pathlib.Path):
    """Overwrite every data file of a checkpoint's state with garbage of the same size."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.name != "commit_success.txt"]
    assert files
    for p in files:
        p.write_bytes(b"\x00garbage" * max(1, p.stat().st_size // 8))


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, capsys):
    config = tiny_config(6, **{"training.snapshot_freq": 3})
    train(config, str(tmp_path))
    at3 = restore(config, tmp_path, 3)
    corrupt(tmp_path / "checkpoints" / "6")
    with pytest.warns(UserWarning, match="checkpoints/6 is unreadable.*falling back"):
        state = restore(config, tmp_path)
    assert int(state.step) == 3
    assert_states_equal(at3, state)
    with pytest.warns(UserWarning, match="falling back"):
        again = train(config, str(tmp_path))  # resumes at 3 and rewrites the corrupt step 6
    assert_states_equal(again, restore(config, tmp_path, 6))


def test_periodic_saves_keep_the_last_k(tmp_path):
    train(tiny_config(8, **{"training.snapshot_freq": 2, "training.keep_checkpoints": 2}), str(tmp_path))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [6, 8]


def test_incompatible_checkpoint_is_refused_with_the_differing_key(tmp_path):
    train(tiny_config(2), str(tmp_path))
    with pytest.raises(utils.IncompatibleCheckpointError, match=r"model\.hidden: checkpoint 32 vs config 64"):
        train(tiny_config(4, **{"model.hidden": 64}), str(tmp_path))
    with pytest.raises(utils.IncompatibleCheckpointError, match=r"sde\.name"):
        restore(tiny_config(4, **{"sde.name": "vesde"}), tmp_path)


# ---- signals and NaN ------------------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    args = [sys.executable, "main.py", "--config=configs/toy.py:two_moons", f"--workdir={tmp_path}",
            "--config.training.n_iters=100000", "--config.training.log_freq=1", "--config.training.batch_size=16",
            "--config.model.hidden=16", "--config.model.num_layers=1", "--config.training.snapshot_sampling=False"]
    proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGTERM" in out and "stopped by signal after step" in out
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [last_logged] and 3 <= last_logged < 100000


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    good = train(tiny_config(2), str(tmp_path))
    absurd = tiny_config(50, **{"optim.lr": 1e30, "optim.warmup": 0, "training.snapshot_freq": 50})
    message = r"(loss|grad norm) became (nan|inf) at step \d+.*last good checkpoint is step 2"
    with pytest.raises(FloatingPointError, match=message):
        train(absurd, str(tmp_path))
    state = restore(tiny_config(2), tmp_path)
    assert int(state.step) == 2
    assert_states_equal(good, state)


# ---- devices --------------------------------------------------------------------------------------------------------
SHARDED_WORKER = WORKER + """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
assert jax.device_count() == int(sys.argv[3])
try:
    experiment.check_batch_size(6)
except ValueError as e:
    print("BATCH ERROR:", e)
mesh = experiment.make_mesh()  # noise drawn under the data sharding: shards differ, the whole equals the 1-device draw
data = NamedSharding(mesh, P("data"))
z = jax.jit(lambda key, x: jax.random.normal(key, x.shape), out_shardings=data)(
    jax.random.key(0), jax.device_put(jnp.zeros((8, 3)), data))
shards = [np.asarray(s.data) for s in z.addressable_shards]
distinct = all(not np.allclose(shards[0], s) for s in shards[1:])
same = np.array_equal(np.asarray(z), np.asarray(jax.random.normal(jax.random.key(0), (8, 3))))
print("NOISE", len(shards), distinct, same)
state = train(config, sys.argv[2])
np.savez(sys.argv[2] + "/params.npz", *[np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))])
"""


def run_sharded(workdir: pathlib.Path, devices: int) -> str:
    """4 training steps (and the checks above) on ``devices`` forced host devices; returns stdout."""
    proc = run_python(SHARDED_WORKER, json.dumps({"n_iters": 4}), str(workdir), str(devices), devices=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("four_devices") / "run"
    return workdir, run_sharded(workdir, 4)


def test_batch_size_not_divisible_by_devices_is_a_clear_error(four_devices):
    assert ("BATCH ERROR: config.training.batch_size=6 is not divisible by the 4 devices (1 processes)"
            in four_devices[1])


def test_noise_differs_across_devices(four_devices):
    """The step key draws one global noise array; its 4 device shards are not copies of each other, and together
    they equal the 1-device draw."""
    assert "NOISE 4 True True" in four_devices[1]


@pytest.mark.parametrize("devices", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_sharded_training_matches_one_device_and_restores_onto_one(tmp_path, devices, four_devices):
    """N steps on 4 (8) forced host devices == N steps on 1 device (to float tolerance); that checkpoint resumed
    on 1 device for N more steps == 2N steps on 1 device."""
    workdir = four_devices[0] if devices == 4 else tmp_path / "multi"
    if devices != 4:
        run_sharded(workdir, devices)
    multi = np.load(workdir / "params.npz")
    one4 = train(tiny_config(4), str(tmp_path / "one"))
    for i, x in enumerate(leaves(one4)):  # atol 1e-5: Adam's m / (sqrt(v) + eps) magnifies the rounding of the
        np.testing.assert_allclose(multi[f"arr_{i}"], x, rtol=1e-5, atol=1e-5)   # reduction order where grads ~ 0
    resumed = train(tiny_config(8), str(workdir))
    one8 = train(tiny_config(8), str(tmp_path / "one"))
    assert_states_equal(one8, resumed, rtol=1e-4, atol=1e-5)


# ---- logging and eval ------------------------------------------------------------------------------------------------
def test_logging_writes_jsonl_tensorboard_and_sample_grids(tmp_path, capsys):
    config = tiny_config(4, **{"training.log_freq": 2, "training.snapshot_sampling": True,
                               "training.sample_freq": 2, "training.snapshot_freq": 4})
    train(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "step 2/4" in out and "ETA" in out and "samples/s" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "grad_norm", "steps_per_s", "samples_per_s"} <= set(records[0])
    np.testing.assert_allclose(records[0]["lr"], 1e-2 * 1 / 2)  # linear warm-up over 2 steps, lr at step index 1
    assert (tmp_path / "samples" / "step_2" / "samples.png").exists()
    assert (tmp_path / "samples" / "step_4" / "samples.png").exists()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/steps_per_s", "train/samples_per_s"} <= set(scalars)
    assert [step for step, _ in scalars["train/loss"]] == [2, 4]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in records], rtol=1e-6)


def tensorboard_scalars(directory: pathlib.Path) -> dict:
    """{tag: [(step, value)]} read from the TFRecord event files (u64 length, u32 crc, payload, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_eval_mode_evaluates_every_checkpoint_with_provenance(tmp_path, capsys):
    config = tiny_config(4, **{"training.snapshot_freq": 2})
    train(config, str(tmp_path))
    results = evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert f"step 2 (EMA weights; {config.eval.num_samples} samples):" in out, out[-2000:]
    assert sorted(results) == [2, 4]
    for step in (2, 4):
        saved = json.loads((tmp_path / "eval" / f"step_{step}.json").read_text())
        assert saved["provenance"]["checkpoint_step"] == step
        assert saved["metrics"]["num_test_examples"] == 128
        assert np.isfinite(saved["metrics"]["test_loss"]) and "sliced_wasserstein_samples" in saved["metrics"]
        assert saved["metrics"]["num_samples"] == config.eval.num_samples
        assert {"config_sha256", "git_commit", "nfe", "seed", "ema"} <= set(saved["provenance"])
    assert results[2]["metrics"]["test_loss"] != results[4]["metrics"]["test_loss"]


@pytest.mark.slow
def test_eval_mode_adds_bits_per_dim_through_likelihood(tmp_path):
    config = tiny_config(2, **{"eval.enable_bpd": True, "eval.likelihood.num_examples": 16,
                               "eval.likelihood.divergence": "exact", "eval.enable_sampling": False})
    train(config, str(tmp_path))
    result = evaluate(config, str(tmp_path))[2]["metrics"]
    assert result["likelihood"]["num_examples"] == 16 and np.isfinite(result["likelihood"]["bpd"])
    assert (tmp_path / "likelihood" / "step_2_ode_test.json").exists()


def test_stop_signal_sets_a_flag_and_a_second_sigint_interrupts():
    """Under Python's own SIGINT handler (installed here: a suite started with SIGINT ignored has none); on exit
    the handler installed before is back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with utils.StopSignal() as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.requested and stop.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_paper_optimizer_defaults_warmup_and_clipping():
    """Base config: Adam lr 2e-4 reached linearly over 5000 steps; gradients clipped to global norm 1 before Adam
    (the first moment after one step is (1 - β1) times the clipped gradient)."""
    from configs.base import get_base_config

    optim = get_base_config().optim
    assert (optim.lr, optim.warmup, optim.grad_clip) == (2e-4, 5000, 1.0)
    schedule = experiment.learning_rate_schedule(optim)
    np.testing.assert_allclose([schedule(0), schedule(2500), schedule(5000), schedule(10 ** 6)],
                               [0.0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
    params = {"w": np.zeros(4, np.float32)}
    grads = {"w": np.array([60.0, 80.0, 0.0, 0.0], np.float32)}  # global norm 100
    optimizer = experiment.get_optimizer(optim)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")["w"]  # Adam's first moment
    np.testing.assert_allclose(mu, (1 - optim.beta1) * np.array([0.6, 0.8, 0, 0]), rtol=1e-5)


def test_ema_keeping_the_init_is_warned(caplog):
    """rate**n of the EMA is the random init's share after n steps: 0.999**2000 = 13.5% (noise-like samples,
    seen on Fashion-MNIST) is warned with the config field; 0.99**2000 is not."""
    import logging

    with caplog.at_level(logging.WARNING):
        share = run_lib.warn_ema_keeps_init(0.999, 2000)
    assert share == pytest.approx(0.999**2000) and "config.model.ema_rate=0.999" in caplog.text
    assert "14% of the random initialisation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_lib.warn_ema_keeps_init(0.99, 2000)
    assert caplog.text == ""


def test_warmup_longer_than_the_run_is_warned(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        assert run_lib.warn_warmup_longer_than_run(500, 300)
    assert "config.optim.warmup=500 is longer than config.training.n_iters=300" in caplog.text
    assert "60% of config.optim.lr" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not run_lib.warn_warmup_longer_than_run(100, 300)
    assert caplog.text == ""
