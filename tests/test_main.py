"""main.py end to end: the toy configs learn their distribution; bad input gives one clear error and writes nothing."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import datasets
import experiment
import run_lib
from analytic import sliced_wasserstein
from configs import toy

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "main.py", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def toy_config(dataset, sde, n_iters):
    config = toy.get_config(f"{dataset},{sde}")
    config.training.n_iters = n_iters
    config.training.snapshot_freq = n_iters
    config.training.snapshot_sampling = False
    config.training.log_freq = n_iters
    config.sampling.num_samples = 1000
    return config


@pytest.mark.parametrize("sde", ["vpsde", "vesde"])
def test_toy_config_learns_its_distribution(tmp_path, sde):
    """A few hundred steps bring samples within a sliced-Wasserstein bound of held-out data that the untrained
    model misses by far."""
    config = toy_config("two_moons", sde, 600)
    exp = experiment.Experiment.from_config(config)
    state = run_lib.train(exp, str(tmp_path))
    real = datasets.draw_examples(config, "test", 2000, seed=config.seed + 7)
    key = jax.random.key(0)
    trained = np.asarray(exp.sample(jax.random.key(1), state.ema_params, 1000)[0])
    untrained_params = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape).params
    untrained = np.asarray(exp.sample(jax.random.key(1), untrained_params, 1000)[0])
    floor = float(sliced_wasserstein(key, real[:1000], real[1000:]))
    d_trained = float(sliced_wasserstein(key, trained, real[:1000]))
    d_untrained = float(sliced_wasserstein(key, np.nan_to_num(untrained, nan=1e3), real[:1000]))
    print(f"{sde}: SW real-real {floor:.3f}, trained {d_trained:.3f}, untrained {d_untrained:.3f}")
    assert d_trained < 0.12
    assert d_untrained > 0.3


def test_train_writes_checkpoint_samples_and_metrics(tmp_path):
    out = run_main("--config=configs/toy.py:8gaussians", f"--workdir={tmp_path}", "--config.training.n_iters=30",
                   "--config.training.snapshot_freq=30", "--config.training.log_freq=10",
                   "--config.sampling.num_samples=50", "--config.sde.N=20")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "config.json").exists() and (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "checkpoints" / "30").is_dir()
    assert (tmp_path / "samples" / "step_30" / "samples.png").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    # resuming a finished run is a no-op that keeps the checkpoint
    again = run_main("--config=configs/toy.py:8gaussians", f"--workdir={tmp_path}", "--config.training.n_iters=30",
                     "--config.sampling.num_samples=50", "--config.sde.N=20")
    assert again.returncode == 0, again.stderr
    assert "resumed from step 30" in again.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.training.n_iterz=5"], "n_iterz"),
    (["--config.training.n_iters=abc"], "n_iters"),
    (["--mode=dance"], "dance"),
    (["--config.sde.name=cld"], "cld"),
    (["--config.model.name=resnet9000"], "resnet9000"),
    (["--config.training.loss=foo"], "foo"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, args, message):
    workdir = tmp_path / "w"
    out = run_main("--config=configs/toy.py", f"--workdir={workdir}", "--config.training.n_iters=2", *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


def test_non_writable_workdir(tmp_path):
    """A workdir below a regular file cannot be created, even by root."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = run_main("--config=configs/toy.py", f"--workdir={blocker / 'run'}")
    assert out.returncode != 0 and "not writable" in out.stderr and str(blocker) in out.stderr
    assert blocker.read_text() == "not a directory"
