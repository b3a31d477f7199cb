"""The daily loop on a trained workdir: modes from the saved config alone, ``experiment.load_workdir``, progress
lines, stopping within one batch, sample folders that never overwrite each other, and ``training.eval_freq``."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import experiment
import run_lib
import utils
from test_run_lib import sample, tensorboard_scalars, tiny_config, train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step toy run (MLP width 32, N=20) whose config differs from configs/toy.py in shape-changing fields."""
    workdir = tmp_path_factory.mktemp("run")
    train(tiny_config(4, **{"training.snapshot_freq": 2, "model.ema_rate": 0.5}), str(workdir))
    return workdir


def env(cache: pathlib.Path) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run_main(*args, cache):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env(cache), timeout=300)


# ---- item 1: from the workdir alone ---------------------------------------------------------------------------------
def test_saved_config_is_the_base_and_overrides_apply_on_top(trained):
    from configs import toy

    cli = toy.get_config("two_moons")                      # hidden 128, N 500: not what was trained
    config = utils.workdir_config(trained, cli, {"sampling.method": "ode", "sampling.rtol": 1e-3}, quiet=True)
    assert (config.model.hidden, config.sde.N) == (32, 20)  # from config.json
    assert (config.sampling.method, config.sampling.rtol) == ("ode", 1e-3)
    assert isinstance(utils.saved_config(trained).model.ch_mult, tuple)  # JSON lists back to the base's tuples
    assert utils.workdir_config(trained / "nothing", cli, {}) is cli     # no saved config: --config as given


def test_sample_mode_from_the_workdir_alone_and_with_a_different_config(trained, tmp_path):
    out = run_main(f"--workdir={trained}", "--mode=sample", "--config.sampling.num_samples=8",
                   "--config.sampling.method=ddim", "--config.sampling.num_steps=3", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "using the config saved in" in out.stdout and "with 3 command-line override(s)" in out.stdout
    folders = sorted((trained / "samples").glob("ddim_N3_seed42_step4_ema*"))
    assert len(folders) == 1 and (folders[0] / "samples.npz").exists()
    # --config of another shape: the saved config wins for the model, the override still applies
    out = run_main("--config=configs/toy.py:two_moons", f"--workdir={trained}", "--mode=sample",
                   "--config.sampling.num_samples=8", "--config.sampling.corrector=none", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--config differs in" in out.stdout and "model.hidden" in out.stdout
    manifest = json.loads(next((trained / "samples").glob("pc_*/manifest.json")).read_text())
    assert manifest["num_samples"] == 8 and manifest["options"]["corrector"] == "none"


def test_load_workdir_gives_config_params_sde_score_and_sampler(trained):
    ema = experiment.load_workdir(str(trained))
    raw = experiment.load_workdir(str(trained), use_ema=False, step=2)
    assert (ema.step, raw.step, ema.ema, raw.ema) == (4, 2, True, False)
    assert ema.config.model.hidden == 32 and ema.sde.N == 20
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ema.params), jax.tree.leaves(raw.params)))
    x = jax.numpy.ones((3, 2))
    assert ema.score_fn(x, jax.numpy.full((3,), 0.5)).shape == (3, 2)
    samples, nfe = ema.sample(jax.random.key(0), 5, method="ddim", num_steps=4)
    assert samples.shape == (5, 2) and int(nfe) == 4 and np.all(np.isfinite(samples))
    assert ema.to_output(samples).shape == (5, 2)


# ---- item 4: outputs never overwrite each other ---------------------------------------------------------------------
def test_sampling_runs_get_their_own_folders_and_manifests(trained, tmp_path):
    config = utils.saved_config(trained)
    config.sampling.num_samples, config.sampling.corrector = 6, "none"
    first = sample(config, str(trained))
    config.sampling.method, config.sampling.num_steps, config.seed = "ddim", 5, 7
    second = sample(config, str(trained))
    again = sample(config, str(trained))           # same settings: numbered, not overwritten
    assert len({first, second, again}) == 3 and again.name == second.name + "-2"
    assert re.fullmatch(r"pc_euler_maruyama_none_N20_seed42_step4_ema(-\d+)?", first.name)  # other tests share it
    assert second.name == "ddim_N5_seed7_step4_ema"
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (first, second))
    assert (m1["method"], m1["seed"], m1["params"], m1["checkpoint_step"], m1["partial"]) == ("pc", 42, "ema", 4, False)
    assert (m2["method"], m2["options"]["num_steps"], m2["seed"], m2["num_written"]) == ("ddim", 5, 7, 6)
    assert not np.array_equal(np.load(first / "samples.npz")["samples"], np.load(second / "samples.npz")["samples"])
    config.sampling.outdir = str(tmp_path / "mine")
    assert sample(config, str(trained)) == tmp_path / "mine"
    with pytest.raises(FileExistsError, match="already holds samples"):
        sample(config, str(trained))


def test_inpainting_inputs_show_the_unknown_pixels():
    images = np.full((2, 4, 4, 1), 200, np.uint8)
    mask = np.zeros((4, 4, 1))
    mask[:, :2] = 1                                        # left half known
    out = utils.hatch_unknown(images, mask)
    assert np.all(out[:, :, :2] == 200)
    assert set(np.unique(out[:, :, 2:])) == {96, 176}      # gray checkerboard where unknown


# ---- item 2: progress and stopping ----------------------------------------------------------------------------------
def test_progress_prints_eta_and_raises_stopped_after_a_signal(capsys):
    progress = utils.Progress("sampling", 3, detail="x", min_interval=0.0, enabled=True)
    progress.update()
    progress.update()
    out = capsys.readouterr().out
    assert "sampling: 3 batches, x; compiling on the first batch..." in out
    assert re.search(r"sampling batch 1/3, [\d.]+ s/batch \(incl. compiling\), ETA", out)
    assert re.search(r"sampling batch 2/3, [\d.]+ s/batch, ETA", out)
    with pytest.raises(utils.Stopped) as e:
        with utils.StopSignal() as stop:
            stop.signum = signal.SIGTERM
            progress.update(0)
    assert e.value.code == 128 + signal.SIGTERM and "sampling ended after batch 2/3" in e.value.message
    assert "sampling ended after batch 2/3" in capsys.readouterr().err  # said once, on leaving
    progress.update()                                      # no active StopSignal: no stop


def wait_for_line(proc, pattern: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if re.search(pattern, line):
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no line matching {pattern!r}; stderr: {proc.stderr.read()[-2000:]}")


def start_sampling(trained, tmp_path, outdir: str):
    args = [sys.executable, "main.py", f"--workdir={trained}", "--mode=sample", "--config.sampling.num_samples=400",
            "--config.sampling.batch_size=8", "--config.sampling.method=ddim", "--config.sampling.num_steps=200",
            f"--config.sampling.outdir={outdir}"]
    return subprocess.Popen(args, cwd=REPO, env=env(tmp_path / "cache"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def sigterm_after_a_batch(proc, pattern: str):
    """SIGTERM once ``pattern`` (with its s/batch) is printed; (stdout, stderr, seconds to exit, s/batch)."""
    try:
        line = wait_for_line(proc, pattern, 240)
        per_batch = float(re.search(r"([\d.]+) s/batch", line).group(1))
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        out, err = proc.communicate(timeout=60 + 3 * per_batch)
        return out, err, time.time() - t0, per_batch
    finally:
        proc.kill()


def test_sigterm_stops_sampling_within_a_batch_and_keeps_the_batches_drawn(trained, tmp_path):
    proc = start_sampling(trained, tmp_path, str(tmp_path / "out"))
    _, err, waited, per_batch = sigterm_after_a_batch(proc, r"sampling batch \d+/50, ([\d.]+) s/batch")
    assert proc.returncode == 128 + signal.SIGTERM
    assert waited < 2 * per_batch + 10, (waited, per_batch)
    lines = [ln for ln in err.splitlines() if ln.strip() and "stopped by" in ln]
    assert len(lines) == 1 and "Traceback" not in err and "kept the" in lines[0], err[-2000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["partial"] and 0 < manifest["num_written"] < 400


def test_a_second_sigint_exits_at_once_without_a_traceback(trained, tmp_path):
    proc = start_sampling(trained, tmp_path, str(tmp_path / "out"))
    try:
        wait_for_line(proc, r"^sampling: 50 batches", 240)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT
    assert "received SIGINT again: exiting now" in err and "Traceback" not in err


# ---- item 6: periodic evaluation during training --------------------------------------------------------------------
def test_eval_freq_logs_held_out_loss_to_jsonl_and_tensorboard(tmp_path, capsys):
    config = tiny_config(4, **{"training.eval_freq": 2, "training.eval_batches": 1, "training.log_freq": 2})
    train(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(np.isfinite(r["eval_loss"]) and np.isfinite(r["eval_loss_ema"]) for r in evals)
    assert all(r["eval_examples"] == 64 for r in evals)    # one batch of config.eval.batch_size
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["eval/eval_loss"]] == [2, 4] and "train/loss" in scalars
    assert "eval at step 2: eval_loss" in capsys.readouterr().out


def test_training_eta_counts_the_sample_grids_still_to_come():
    config = tiny_config(1000, **{"training.snapshot_sampling": True, "training.snapshot_freq": 500,
                                  "training.eval_freq": 10**9})
    sde = experiment.Experiment.from_config(config).sde
    pending = run_lib.periodic_seconds(config, sde)
    # grids at 500 and 1000; a guessed grid costs nfe * samples * (step time / batch / 3)
    guess = run_lib.nfe_guess(config.sampling, sde) * 32 * (0.3 / 16 / 3)
    assert pending(100, {}, 0.3) == pytest.approx(2 * guess)
    assert pending(100, {"first_step": 5.0}, 0.3) == pytest.approx(2 * (guess + 5.0))   # plus compiling
    assert pending(600, {"sampling": 7.0}, 0.3) == pytest.approx(7.0)
    assert pending(1000, {"sampling": 7.0}, 0.3) == 0


@pytest.mark.slow
def test_sigterm_during_the_end_of_training_sampling_stops_within_a_batch_and_saves(tmp_path):
    """Before: the end-of-training grid ignored SIGTERM (the training loop's flag was read only between steps)."""
    args = [sys.executable, "-u", "main.py", "--config=configs/toy.py:two_moons", f"--workdir={tmp_path / 'w'}",
            "--config.training.n_iters=4", "--config.training.snapshot_freq=4", "--config.sde.N=20",
            "--config.model.hidden=32", "--config.sampling.num_samples=400", "--config.sampling.batch_size=8",
            "--config.sampling.method=ddim", "--config.sampling.num_steps=200"]
    proc = subprocess.Popen(args, cwd=REPO, env=env(tmp_path / "cache"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err, waited, per_batch = sigterm_after_a_batch(proc, r"sampling batch 1/50, ([\d.]+) s/batch")
    assert proc.returncode == 0 and waited < 2 * per_batch + 15, (waited, per_batch, err[-2000:])
    assert "stopped by signal after step 4; checkpoint saved" in out and "Traceback" not in err
    assert (tmp_path / "w" / "checkpoints" / "4").is_dir()
    assert json.loads((tmp_path / "w" / "samples" / "step_4" / "manifest.json").read_text())["partial"]
