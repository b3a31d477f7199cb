"""main.py's command line: every user error is ONE line on stderr, a non-zero exit, and nothing written.

Each case runs ``python main.py ...`` in a subprocess; they fail while parsing flags and the config, before JAX is
imported, so the whole file takes a few seconds.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = "--config=configs/toy.py"


def run_main(*args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("SCORE_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)


def stderr_lines(out) -> list:
    return [line for line in out.stderr.splitlines() if line.strip()]


def config_files(tmp_path) -> dict:
    files = {"syntax": "def get_config(:\n    pass\n", "no_get_config": "x = 1\n",
             "raises": "def get_config():\n    raise RuntimeError('boom')\n",
             "import_error": "import not_a_module_anywhere\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    return {name: str(tmp_path / f"{name}.py") for name in files}


# (arguments, text the one line must contain); {cfg[name]} are the broken config files above
CASES = [
    ([TOY, "--config.training.foo=1"], "unknown config key training.foo"),
    ([TOY, "--config.sampling.steps=10"], "unknown config key sampling.steps (did you mean num_steps"),
    ([TOY, "--config.sampler.num_steps=10"], "unknown config key sampler.num_steps (did you mean sampling?)"),
    ([TOY, "--config.training.lr=0.1"], "did you mean optim.lr?"),
    ([TOY, "--config.sde.N.x=1"], "sde.N is a value, not a section"),
    ([TOY, "--config.training.n_iters=abc"], "--config.training.n_iters=abc"),
    (["--config=configs/nope.py"], "config file configs/nope.py does not exist"),
    (["--config={syntax}"], "syntax.py line 1: invalid syntax"),
    (["--config={no_get_config}"], "defines no get_config()"),
    (["--config={raises}"], "RuntimeError: boom"),
    (["--config={import_error}"], "import_error.py line 1: ModuleNotFoundError"),
    (["--config=configs/toy.py:spiral"], "unknown toy dataset 'spiral'"),
    ([], "--config is required"),
    (["--config.training.n_iters=2"], "--config.training.n_iters overrides a field of the config: give --config="),
    ([TOY, "--mode=dance"], "unknown --mode='dance'"),
    ([TOY, "--workdirr=x"], "Unknown command line flag 'workdirr'"),
    ([TOY, "stray_argument"], "unexpected argument(s) stray_argument"),
    ([TOY, "--mode=sample"], "does not exist; --mode=sample"),
    ([TOY, "--mode=eval"], "does not exist; --mode=eval"),
    ([TOY, "--mode=likelihood"], "does not exist; --mode=likelihood"),
    ([TOY, "--config.optim.lr=0"], "config optim.lr=0.0 must be > 0"),
    ([TOY, "--config.model.ema_rate=1.0"], "config model.ema_rate=1.0 must be in [0, 1)"),
    ([TOY, "--config.training.keep_checkpoints=0"], "training.keep_checkpoints=0 must be an integer >= 1"),
    ([TOY, "--config.training.snapshot_freq=0"], "training.snapshot_freq=0 must be"),
    ([TOY, "--config.training.log_freq=-1"], "training.log_freq=-1 must be"),
    ([TOY, "--config.training.eval_freq=0"], "training.eval_freq=0 must be"),
    ([TOY, "--config.training.n_iters=0"], "training.n_iters=0 must be an integer >= 1 for --mode=train"),
    (["--config=configs/toy.py:two_moons,vesde", "--config.sde.sigma_min=50", "--config.sde.sigma_max=1"],
     "config sde.sigma_min=50.0 must be < sde.sigma_max=1.0"),
    ([TOY, "--config.sde.beta_min=30"], "config sde.beta_min=30.0 must be <= sde.beta_max=20.0"),
    ([TOY, "--config.sde.N=1"], "config sde.N=1 must be an integer >= 2"),
    ([TOY, "--config.sampling.num_samples=0"], "sampling.num_samples=0 must be"),
    ([TOY, "--config.training.batch_size=0"], "training.batch_size=0 must be"),
    ([TOY, "--config.optim.warmup=-1"], "optim.warmup=-1 must be"),
    ([TOY, "--config.sampling.snr=0"], "sampling.snr=0.0 must be > 0"),
    ([TOY, "--config.optim.lr=nan"], "optim.lr=nan must be > 0"),
    (["--config=configs/default.py", "--config.sampling.label=10"], "sampling.label=10 must be < data.num_classes=10"),
    ([TOY, "--config.sampling.eta=0.5"], "config sampling.eta applies to method(s) ddim, not pc"),
    ([TOY, "--config.sampling.method=ode", "--config.sampling.n_steps=3"], "sampling.n_steps applies to method(s)"),
    ([TOY, "--config.sampling.method=foo"], "config sampling.method='foo' must be one of"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[1][:40] for c in CASES])
def test_user_error_is_one_line_and_writes_nothing(tmp_path, args, message):
    cfg = config_files(tmp_path)
    workdir = tmp_path / "run"
    out = run_main(*[a.format(**cfg) for a in args], f"--workdir={workdir}")
    lines = stderr_lines(out)
    assert out.returncode != 0
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not workdir.exists()


def test_refused_config_leaves_an_existing_workdir_unchanged(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    before = sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    for mode in ("train", "sample", "eval"):
        out = run_main(TOY, f"--workdir={workdir}", f"--mode={mode}", "--config.optim.lr=-1")
        assert out.returncode == 2 and len(stderr_lines(out)) == 1, out.stderr
    assert sorted((p.relative_to(workdir), p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before


def test_sample_on_a_workdir_without_checkpoints_writes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for mode in ("sample", "eval", "likelihood"):
        out = run_main(TOY, f"--workdir={tmp_path}", f"--mode={mode}")
        assert out.returncode == 2 and stderr_lines(out) == [f"error: workdir {tmp_path} has no checkpoints/; "
                                                             f"--mode={mode} reads a trained workdir (make one with "
                                                             f"--mode=train or --mode=convert)"], out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_score_debug_shows_the_traceback(tmp_path):
    out = run_main(TOY, f"--workdir={tmp_path / 'run'}", "--config.optim.lr=0", env_extra={"SCORE_DEBUG": "1"})
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError: config optim.lr=0.0 must be > 0" in out.stderr


def run_main_in_process(*args) -> subprocess.CompletedProcess:
    """``python main.py args`` that prints, on its last stderr line, its exit code and whether JAX got imported."""
    code = (f"import runpy, sys\nsys.argv = ['main.py', *{list(args)!r}]\ntry:\n"
            "    runpy.run_path('main.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'jax' in sys.modules, file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_errors_come_before_jax_is_imported(tmp_path):
    """A refused command line never imports JAX (it fails in well under a second)."""
    out = run_main_in_process(TOY, "--config.optim.lr=0", f"--workdir={tmp_path}/run")
    assert out.stderr.splitlines()[-1] == "exit 2 False", out.stderr


def test_help_does_not_import_jax():
    out = run_main_in_process("--help")
    assert "--workdir" in out.stdout and out.stderr.split()[-1] == "False", out.stderr


def test_describe_lists_fields_help_ranges_and_sampler_options():
    out = run_main("--mode=describe", TOY, "--config.sampling.method=ddim")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "training.batch_size = 256    # global batch, split over all devices and processes" in text
    assert "model.ema_rate = 0.99    # valid: in [0, 1)" in text
    assert "sampling.method = 'ddim'" in text
    assert "ddim: num_steps, eta, grid, denoise, eps" in text
    assert "data.dim = 2" in text   # a field of the toy config that configs/base.py lacks


def test_unraisable_event_loop_noise_is_dropped_and_other_reports_kept():
    """orbax's "Event loop is closed" from an async writer's finaliser is dropped; any other is still shown."""
    code = ("import gc, main\nmain.quiet_known_noise()\n"
            "class A:\n    def __init__(self, msg): self.msg = msg\n"
            "    def __del__(self): raise RuntimeError(self.msg)\n"
            "A('Event loop is closed'); gc.collect()\nA('another problem'); gc.collect()\n"
            "import threading\nfor m in ('Event loop is closed', 'thread trouble'):\n"
            "    t = threading.Thread(target=lambda: A.__del__(A(m))); t.start(); t.join()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "another problem" in out.stderr and "thread trouble" in out.stderr, out.stderr
    assert "Event loop is closed" not in out.stderr, out.stderr


def test_os_errors_are_one_line_naming_the_file():
    import main

    disk_full = OSError(28, "No space left on device", "/w/checkpoints/40/state")
    assert main.one_line(disk_full) == "[Errno 28] No space left on device: '/w/checkpoints/40/state'"
    assert main.one_line(KeyError("unknown key 'x'")) == "unknown key 'x'"
    assert main.one_line(ValueError("two\nlines")) == "two lines"
