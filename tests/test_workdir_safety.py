"""Nothing lost, nothing written before the checks: verified saves, refusals that leave the workdir as it was, one
trainer per workdir, non-finite states never saved, one metrics record per step, disk full, signals — fault
injection on the tiny toy config of test_run_lib."""
import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import experiment
import utils
from tests.test_run_lib import (REPO, compilation_cache, restore, sample, subprocess_env,  # noqa: F401 (fixture)
                                tiny_config, train)


def all_finite(state) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(state))
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def snapshot(workdir: pathlib.Path) -> dict:
    """Every path under ``workdir`` with its kind, size, mtime and (files) content hash."""
    out = {}
    for p in sorted(workdir.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(workdir))] = (digest, st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def step_dirs(workdir: pathlib.Path) -> list:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ---- verified saves -------------------------------------------------------------------------------------------------
def test_a_stray_higher_step_directory_does_not_swallow_saves(tmp_path):
    """An empty checkpoints/500 (unreadable, so restore falls back from it) made orbax skip every save below 500
    silently; now it is moved aside and the run's checkpoints exist."""
    train(tiny_config(2), str(tmp_path))
    (tmp_path / "checkpoints" / "500").mkdir()
    config = tiny_config(6, **{"training.snapshot_freq": 2})
    with pytest.warns(UserWarning, match="checkpoints/500 is unreadable"):
        final = train(config, str(tmp_path))
    assert step_dirs(tmp_path) == [2, 4, 6]
    assert (tmp_path / "checkpoints" / "500.unreadable").is_dir()
    assert int(restore(config, tmp_path).step) == 6 and int(final.step) == 6


def test_a_declined_save_is_an_error_naming_the_stray_directory(tmp_path):
    """A save orbax declines (a higher step it did not fall back from) raises one line naming that directory."""
    config = tiny_config(2)
    exp = experiment.Experiment.from_config(config)
    state = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    (tmp_path / "checkpoints" / "500").mkdir(parents=True)
    ckpt = utils.CheckpointManager(tmp_path / "checkpoints", config)
    with pytest.raises(utils.CheckpointNotSaved, match=r"checkpoints/460 was not saved.*checkpoints/500 exists"):
        ckpt.save(460, state)
    ckpt.close()


# ---- nothing written before the checks --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(2, **{"training.log_freq": 1}), str(workdir))
    return workdir


@pytest.fixture
def trained(trained_once, tmp_path):
    """A copy of a workdir trained for 2 steps (tiny_config(2))."""
    shutil.copytree(trained_once, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("overrides, error", [
    ({"model.hidden": 64}, r"model\.hidden: checkpoint 32 vs config 64"),
    ({"data.dataset": "no_such_toy"}, r"no_such_toy"),
    ({"training.batch_size": 0}, r"batch"),
])
def test_a_refused_resume_leaves_the_workdir_byte_for_byte_as_it_was(trained, overrides, error):
    before = snapshot(trained)
    time.sleep(0.01)
    with pytest.raises(Exception, match=error):
        train(tiny_config(4, **overrides), str(trained))
    assert snapshot(trained) == before


def test_a_refused_start_creates_no_workdir(tmp_path):
    with pytest.raises(Exception, match="no_such_toy"):
        train(tiny_config(2, **{"data.dataset": "no_such_toy"}), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


# ---- one trainer per workdir -----------------------------------------------------------------------------------------
HOLDER = """
import sys, time, utils
utils.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_one_trainer_per_workdir_and_a_killed_holder_does_not_block(trained, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(trained)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (trained / "train.lock").read_text().strip() == str(holder.pid)
        args = [sys.executable, "main.py", "--config=configs/toy.py:two_moons", f"--workdir={trained}",
                "--config.model.hidden=32", "--config.model.num_layers=1", "--config.model.embed_dim=16",
                "--config.training.batch_size=16", "--config.sde.N=20"]
        proc = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == [
            f"error: workdir {trained} is in use by another training process (pid {holder.pid}, lock "
            f"{trained / 'train.lock'}); wait for it to end or stop it, or train in another --workdir"]
        with pytest.raises(utils.WorkdirLocked, match=f"pid {holder.pid}"):
            train(tiny_config(4), str(trained))
        config = tiny_config(2, **{"sampling.num_samples": 8})
        sample(config, str(trained))  # reading a training workdir stays allowed
        assert list((trained / "samples").glob("*_step2_ema*/samples.npz"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    state = train(tiny_config(3), str(trained))  # the kernel dropped the killed holder's lock
    assert int(state.step) == 3
    assert (trained / "train.lock").read_text().strip() == str(os.getpid())


# ---- non-finite values --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_a_non_finite_state_is_never_saved(tmp_path):
    """lr=1e39 (inf in float32) with a checkpoint every step: the loss of the step is still finite, the new
    parameters are not. Training stops naming the last good step, whose checkpoint is finite everywhere."""
    train(tiny_config(2), str(tmp_path))
    absurd = tiny_config(6, **{"optim.lr": 1e39, "optim.warmup": 0, "training.snapshot_freq": 1})
    with pytest.raises(FloatingPointError, match=r"non-finite.*last good checkpoint is step 2 in"):
        train(absurd, str(tmp_path))
    assert step_dirs(tmp_path) == [2]
    state = restore(tiny_config(2), tmp_path)
    assert int(state.step) == 2 and all_finite(state)


def test_absurd_lr_with_a_checkpoint_every_step_keeps_finite_checkpoints(tmp_path):
    """lr=1e10: whatever step the divergence is caught at, every checkpoint left restores finite."""
    with pytest.raises(FloatingPointError, match=r"last good checkpoint is"):
        train(tiny_config(40, **{"optim.lr": 1e10, "optim.warmup": 0, "training.snapshot_freq": 1,
                                         "training.keep_checkpoints": 100}), str(tmp_path))
    for step in step_dirs(tmp_path):
        assert all_finite(restore(tiny_config(40), tmp_path, step)), step


def write_nan_checkpoint(config, workdir: pathlib.Path, step: int):
    """A checkpoint of ``step`` whose parameters are NaN (written around CheckpointManager's refusal)."""
    state = restore(config, workdir)
    state = state.replace(step=np.int32(step), params=jax.tree.map(lambda a: np.full_like(a, np.nan), state.params))
    ckpt = utils.CheckpointManager(workdir / "checkpoints", config)
    host = utils.serialization.to_state_dict(jax.device_get(state))
    meta = json.loads((workdir / "checkpoints" / str(int(restore(config, workdir).step)) / "meta" /
                       "metadata").read_text())
    ckpt.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                                    meta=ocp.args.JsonSave(dict(meta, step=step))))
    ckpt.wait()
    ckpt.close()


def test_a_non_finite_checkpoint_is_refused_or_fallen_back_from(trained):
    workdir = trained
    config = tiny_config(2)
    write_nan_checkpoint(config, workdir, 3)
    with pytest.raises(FloatingPointError, match=r"checkpoints/3 holds non-finite values in params"):
        restore(config, workdir, 3)
    with pytest.warns(UserWarning, match="checkpoints/3 is unreadable.*non-finite"):
        state = restore(config, workdir)
    assert int(state.step) == 2 and all_finite(state)


def test_non_finite_samples_are_written_and_reported(trained, monkeypatch):
    """A sampler whose output is NaN: --mode=sample writes the samples, then fails in one line."""
    original = experiment.Experiment.sample

    def nan_sampler(*args, **kwargs):
        x, nfe = original(*args, **kwargs)
        return x * np.nan, nfe

    monkeypatch.setattr(experiment.Experiment, "sample", nan_sampler)
    outdir = trained / "samples" / "nan_samples"
    shutil.rmtree(outdir, ignore_errors=True)
    with pytest.raises(FloatingPointError, match=r"8 of 8 samples hold NaN or inf values \(written to .*nan_samples"):
        sample(tiny_config(2, **{"sampling.num_samples": 8, "sampling.outdir": str(outdir)}), str(trained))
    assert np.isnan(np.load(outdir / "samples.npz")["samples"]).all()


# ---- metrics after a resume ----------------------------------------------------------------------------------------------
def test_metrics_have_one_record_per_step_after_a_resume(tmp_path):
    """A run killed after logging steps 4..6 but before checkpoint 6 (and mid-line) resumes from 3 and logs 4..6
    again: each step appears once."""
    config = tiny_config(6, **{"training.snapshot_freq": 3, "training.log_freq": 1})
    train(config, str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    train(config, str(tmp_path))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---- disk full ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["save", "background", "silent"])
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    """The write of checkpoint 4 fails: when orbax starts it (save), in its background thread (seen by
    wait_until_finished), or silently (the step directory is left incomplete)."""
    original_save, original_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(self, step, *args, **kwargs):
        if step == 4 and where == "save":
            raise full
        saved = original_save(self, step, *args, **kwargs)
        self.failing = step == 4
        return saved

    def wait_until_finished(self):
        original_wait(self)
        if getattr(self, "failing", False):
            self.failing = False
            if where == "background":  # the write failed before orbax renamed its temporary directory
                os.rename(tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1")
                raise RuntimeError("save finalize failed") from full
            shutil.rmtree(tmp_path / "checkpoints" / "4" / "meta")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait_until_finished)
    config = tiny_config(4, **{"training.snapshot_freq": 2})
    with pytest.raises(utils.CheckpointNotSaved) as info:
        train(config, str(tmp_path))
    message = str(info.value)
    reason = " is missing or incomplete" if where == "silent" else ": No space left on device"
    assert "\n" not in message and f"checkpoints/4{reason}" in message
    assert "the last good checkpoint is step 2" in message
    monkeypatch.undo()
    assert step_dirs(tmp_path) == [2] and int(restore(config, tmp_path).step) == 2
    left = [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.isdigit()]
    assert left == (["4.incomplete"] if where == "silent" else [])


# ---- signals --------------------------------------------------------------------------------------------------------------
def test_an_ignored_sigint_stays_ignored():
    """Started with SIGINT ignored (nohup, `cmd &` in a script), a run keeps ignoring it; SIGTERM still stops."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with utils.StopSignal() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_signal_test_passes_when_the_suite_ignores_sigint():
    code = ("import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); sys.exit(subprocess.run("
            "[sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_run_lib.py', '-k', "
            "'test_stop_signal_sets_a_flag_and_a_second_sigint_interrupts']).returncode)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
