"""Multi-host training: two jax.distributed CPU processes on this machine (gloo collectives), each loading its own
data shard through main.py's --coordinator_address/--num_processes/--process_id, end with the parameters of a
1-process run over the same global batches (config.training.data_shards fixes the batch composition)."""
import json
import os
import signal
import socket
import time
import subprocess
import sys

import numpy as np
import pytest

import experiment
from tests.test_run_lib import (REPO, compilation_cache, leaves, restore, subprocess_env,  # noqa: F401 (fixture)
                                tiny_config, train)

MAIN_ARGS = ["--config=configs/toy.py:two_moons", "--config.training.batch_size=16", "--config.sde.N=20",
             "--config.training.snapshot_sampling=False", "--config.model.hidden=32", "--config.model.num_layers=1",
             "--config.model.embed_dim=16", "--config.optim.warmup=2", "--config.optim.lr=0.01",
             "--config.data.prefetch=1", "--config.training.data_shards=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, n_iters: int, num_processes: int, devices_per_process: int, use_env: bool = False,
           log_freq=None, on_start=None):
    """Run ``num_processes`` main.py processes (coordinator via flags, or via JAX_* environment variables) to the
    end; ``on_start(procs)`` is called once they are started."""
    port = free_port()
    procs = []
    for i in range(num_processes):
        args = [sys.executable, "main.py", *MAIN_ARGS, f"--workdir={workdir}",
                f"--config.training.n_iters={n_iters}", f"--config.training.snapshot_freq={n_iters}",
                f"--config.training.log_freq={log_freq or n_iters}"]
        env = subprocess_env(devices_per_process, collective_timeout_s=90)  # processes may lag while compiling
        if use_env:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                       JAX_PROCESS_ID=str(i))
        else:
            args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                     f"--process_id={i}"]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    if on_start is not None:
        on_start(procs)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"process exited with {p.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return outs


def test_two_processes_match_one_process(tmp_path):
    """2 processes x 2 devices, 4 steps == 1 process x 1 device, 4 steps (to float tolerance); the multi-host
    checkpoint restores in a single process."""
    outs = launch(tmp_path / "multi", n_iters=4, num_processes=2, devices_per_process=2)
    assert "process 1 of 2: 2 local devices, 4 in all" in outs[1][0]
    assert "step 4/4" in outs[0][0] and "step 4/4" not in outs[1][0]  # only process 0 logs
    config = tiny_config(4, **{"training.data_shards": 2})
    multi = restore(config, tmp_path / "multi")
    single = train(config, str(tmp_path / "single"))
    assert int(multi.step) == 4
    for a, b in zip(leaves(multi), leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_from_environment_resume_exactly(tmp_path):
    """Coordinator from JAX_* environment variables; 2 processes resume a 1-process checkpoint and match 2N
    straight single-process steps."""
    config = tiny_config(6, **{"training.data_shards": 2})
    train(tiny_config(3, **{"training.data_shards": 2}), str(tmp_path / "multi"))
    launch(tmp_path / "multi", n_iters=6, num_processes=2, devices_per_process=1, use_env=True)
    single = train(config, str(tmp_path / "single"))
    for a, b in zip(leaves(restore(config, tmp_path / "multi")), leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_data_shards_must_divide_over_processes():
    with pytest.raises(ValueError, match="data_shards=3 must be a multiple of the 1 processes and divide "
                                         "config.training.batch_size=16"):
        experiment.check_batch_size(16, shards=3)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    workdir = tmp_path / "multi"

    def terminate_process_0(procs):
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)

    outs = launch(workdir, n_iters=100000, num_processes=2, devices_per_process=1, log_freq=1,
                  on_start=terminate_process_0)
    assert "received SIGTERM" in outs[0][0] and "received SIGTERM" not in outs[1][0]
    stopped = [int(out.split("stopped by signal after step ")[1].split(";")[0]) for out, _ in outs]
    assert stopped[0] == stopped[1] and stopped[0] % 10 == 0
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [stopped[0]]
    assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == stopped[0]
