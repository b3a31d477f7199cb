"""configs/checks.py: every rule refuses what it should and passes every shipped config; its tables match the code
they describe (sampler options, config fields); config files load with one-line errors."""
import inspect
import math
import pathlib
import sys

import pytest

from configs import checks
from configs.base import get_base_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def forget_example_registrations():
    """Loading the example configs registers their components; remove them afterwards (and the modules), so later
    test files see the registries they expect (as tests/test_docs.py does)."""
    import datasets
    import losses
    import models
    import samplers
    import sde_lib

    def ours(module) -> bool:
        return module is not None and (module.startswith("examples") or module == checks.MODULE_NAME)

    registries = (sde_lib.SDES, losses.LOSSES, samplers.SAMPLERS, models.MODELS, datasets.SOURCES)
    before = [set(registry) for registry in registries]
    continuous = set(losses.CONTINUOUS_TIME)
    modules = set(sys.modules)
    yield
    for registry, names in zip(registries, before):
        for name in set(registry) - names:   # only what this module's loading added (collection may have run first)
            if ours(getattr(registry[name], "__module__", None)):
                del registry[name]
                if name not in continuous:
                    losses.CONTINUOUS_TIME.discard(name)
    for m in set(sys.modules) - modules:
        if ours(m):
            sys.modules.pop(m, None)


def shipped_configs():
    """Every config file of configs/ and examples/ that has a get_config(), toy.py with each dataset and SDE."""
    files = sorted(p for d in ("configs", "examples") for p in (REPO / d).rglob("*.py")
                   if "def get_config" in p.read_text() and p.name not in ("base.py", "workdir.py"))
    specs = [str(p) for p in files if p.name != "toy.py"]
    return specs + [f"{REPO / 'configs/toy.py'}:{d},{s}" for d in ("two_moons", "checkerboard")
                    for s in ("vpsde", "subvpsde", "vesde")]


@pytest.mark.parametrize("spec", shipped_configs(), ids=lambda s: s.split("/")[-1])
def test_every_shipped_config_passes(spec):
    config = checks.load_config_file(spec)
    for mode in ("train", "sample", "eval", "likelihood"):
        checks.validate(config, mode)


def numeric_fields(config):
    return [p for p, v in checks.flat_items(config) if isinstance(v, (int, float)) and not isinstance(v, bool)]


NO_RULE = {"sampling.guidance_scale"}   # any finite real (negative guidance is meaningful)


def test_every_numeric_field_of_every_config_has_a_rule():
    """Of configs/ (examples/ add fields of their own components, which only have to pass)."""
    missing = set()
    for spec in [s for s in shipped_configs() if "/examples/" not in s]:
        missing |= {p for p in numeric_fields(checks.load_config_file(spec)) if p not in checks.RULES}
    placeholders = {p for p, v in checks.flat_items(get_base_config()) if v is None}
    assert not (missing - NO_RULE), "add these fields to configs/checks.py RULES"
    assert {p for p in placeholders if "eps" in p or "num" in p or "step" in p or "freq" in p} <= set(checks.RULES)


# (field, a value refused, a value accepted)
CASES = [
    ("optim.lr", 0.0, 1e-4), ("optim.lr", -1e-3, 1.0), ("optim.lr", math.nan, 1e-4), ("optim.lr", math.inf, 1e-4),
    ("model.ema_rate", 1.0, 0.0), ("model.ema_rate", -0.1, 0.9999), ("model.dropout", 1.0, 0.5),
    ("training.keep_checkpoints", 0, 1), ("training.snapshot_freq", 0, 1), ("training.log_freq", -5, 1),
    ("training.eval_freq", 0, 1), ("training.batch_size", 0, 1), ("training.n_iters", -1, 0),
    ("training.sample_freq", 0, 7), ("training.data_shards", 0, 2), ("training.eps", 0.0, 1e-5),
    ("sde.N", 1, 2), ("sde.sigma_min", 0.0, 0.01), ("sde.beta_max", 0.0, 20.0),
    ("sampling.num_samples", 0, 1), ("sampling.batch_size", 0, 1), ("sampling.rtol", 0.0, 1e-3),
    ("sampling.atol", -1e-5, 1e-5), ("sampling.snr", 0.0, 0.16), ("sampling.n_steps", -1, 0),
    ("sampling.eta", 1.5, 1.0), ("sampling.order", 4, 3), ("sampling.num_steps", 0, 1), ("sampling.eps", 0.0, 1e-3),
    ("sampling.label", -1, 0), ("sampling.step_size", 0.0, 1e-3), ("sampling.num_particles", 0, 1),
    ("eval.batch_size", 0, 8), ("eval.num_samples", 0, 8), ("eval.checkpoint", -1, 0),
    ("eval.likelihood.rtol", 0.0, 1e-5), ("eval.likelihood.num_probes", 0, 1), ("eval.likelihood.max_steps", 0, 1),
    ("eval.likelihood.num_examples", 0, 1), ("eval.likelihood.bits", 0, 5), ("eval.likelihood.num_draws", 0, 1),
    ("data.image_size", 0, 1), ("data.num_channels", 0, 3), ("data.prefetch", -1, 0), ("data.num_classes", 0, 1),
    ("model.nf", 0, 8), ("model.ch_mult", (1, 0), (1, 2, 2)), ("model.ch_mult", (), (1,)),
    ("model.num_res_blocks", -1, 0), ("optim.warmup", -1, 0), ("optim.beta1", 1.0, 0.0), ("optim.eps", 0.0, 1e-8),
    ("optim.weight_decay", -1e-4, 0.0), ("optim.grad_clip", math.nan, -1.0), ("seed", -1, 0),
    ("training.batch_size", True, 2),
]


@pytest.mark.parametrize("path, bad, good", CASES)
def test_rule_refuses_bad_values_with_one_line_naming_the_field(path, bad, good):
    config = get_base_config()
    section, _, key = path.rpartition(".")
    node = checks.get(config, section) if section else config
    node[key] = good
    checks.validate(config, "sample")
    node[key] = bad
    with pytest.raises(checks.ConfigError) as e:
        checks.validate(config, "sample")
    message = str(e.value)
    assert message.startswith(f"config {path}=") and "must be" in message and "\n" not in message


def test_mode_rule_only_in_its_mode():
    config = get_base_config()
    config.training.n_iters = 0
    checks.validate(config, "sample")
    with pytest.raises(checks.ConfigError, match=r"training.n_iters=0 must be an integer >= 1 for --mode=train"):
        checks.validate(config, "train")


@pytest.mark.parametrize("a, b, va, vb, op", [("sde.sigma_min", "sde.sigma_max", 50.0, 1.0, "<"),
                                              ("sde.sigma_min", "sde.sigma_max", 1.0, 1.0, "<"),
                                              ("sde.beta_min", "sde.beta_max", 30.0, 20.0, "<="),
                                              ("sampling.label", "data.num_classes", 10, 10, "<")])
def test_pair_rules(a, b, va, vb, op):
    config = get_base_config()
    for path, v in ((a, va), (b, vb)):
        section, key = path.split(".")
        config[section][key] = v
    with pytest.raises(checks.ConfigError) as e:
        checks.validate(config)
    assert str(e.value) == f"config {a}={va} must be {op} {b}={vb}"
    config.sde.beta_min = config.sde.beta_max = 20.0   # equal betas are a constant-rate VP: fine
    config.sde.sigma_min, config.sampling.label = 0.01, None
    checks.validate(config)


def test_all_broken_rules_are_named_on_one_line():
    config = get_base_config()
    config.optim.lr, config.sde.N = 0.0, 1
    message = str(pytest.raises(checks.ConfigError, checks.validate, config).value)
    assert "optim.lr" in message and "sde.N" in message and "\n" not in message


def test_method_options_match_the_samplers_registry():
    """``METHOD_OPTIONS`` is a copy (read without importing JAX) of each builder's parameters that are
    config.sampling keys; "smc" of controllable_generation.smc_impute."""
    import controllable_generation
    import samplers

    keys = set(get_base_config().sampling.keys())

    def options(fn):
        return tuple(n for n, p in inspect.signature(fn).parameters.items() if n in keys and p.default is not p.empty)

    derived = {name: options(b) for name, b in samplers.SAMPLERS.items() if b.__module__ == "samplers"}
    derived["smc"] = options(controllable_generation.smc_impute)
    assert {m: set(o) for m, o in checks.METHOD_OPTIONS.items()} == {m: set(o) for m, o in derived.items()}
    assert set(controllable_generation.imputation_methods()) <= set(checks.method_options())


def test_explicit_option_of_another_method_is_refused():
    config = get_base_config()
    checks.validate(config, "sample", explicit=["sampling.snr", "sampling.num_samples", "training.n_iters"])
    with pytest.raises(checks.ConfigError, match=r"^config sampling.eta applies to method\(s\) ddim, not pc$"):
        checks.validate(config, "sample", explicit=["sampling.eta"])
    config.sampling.method = "dpm_solver++"
    checks.validate(config, "sample", explicit=["sampling.order", "sampling.num_steps"])
    with pytest.raises(checks.ConfigError, match=r"sampling.solver applies to method\(s\) ode, not dpm_solver\+\+"):
        checks.validate(config, "sample", explicit=["sampling.solver"])


def test_a_sampler_registered_at_run_time_is_known(monkeypatch):
    import samplers

    def build_mine(sde, score_fn, shape, num_steps=3, eta=0.0, mesh=None):
        raise NotImplementedError

    monkeypatch.setitem(samplers.SAMPLERS, "mine", build_mine)
    assert checks.method_options()["mine"] == ("num_steps", "eta")
    config = get_base_config()
    config.sampling.method = "mine"
    checks.validate(config, "sample", explicit=["sampling.eta"])


def test_help_table_has_every_base_field():
    helps = checks.help_table()
    fields = [p for p, _ in checks.flat_items(get_base_config())]
    assert set(fields) <= set(helps)
    assert helps["training.data_shards"].startswith("global batch read as this many data streams; None: one per "
                                                    "process (fix it")
    assert helps["sampling.method"] == "key of samplers.SAMPLERS"
    assert helps["eval.likelihood.rtol"] == "" and helps["seed"] == ""


@pytest.mark.parametrize("path, message", [
    ("training.foo", "unknown config key training.foo (training has: batch_size, "),
    ("sampling.steps", "unknown config key sampling.steps (did you mean num_steps or n_steps?)"),
    ("sampling.num_step", "unknown config key sampling.num_step (did you mean num_steps"),
    ("optim.learning_rate", "unknown config key optim.learning_rate (did you mean lr?)"),
    ("training.lr", "unknown config key training.lr (did you mean optim.lr?)"),
    ("sampler.method", "unknown config key sampler.method (did you mean sampling?)"),
    ("sde.N.x", "unknown config key sde.N.x: sde.N is a value, not a section"),
])
def test_unknown_override_key(path, message):
    with pytest.raises(checks.ConfigError) as e:
        checks.check_override_keys(get_base_config(), ["training.n_iters", path])
    assert str(e.value).startswith(message)


def test_override_paths():
    argv = ["--config=x.py", "--config.a.b=1", "--noconfig.c.d", "-config.e", "2", "--configx.f=3", "--workdir=w"]
    assert checks.override_paths(argv) == ["a.b", "c.d", "e"]


def test_config_file_errors_are_one_line(tmp_path):
    cases = {"def get_config(:\n": "line 1: invalid syntax", "x = 1\n": "defines no get_config()",
             "def get_config():\n    return None\n": "returned None",
             "import os\n\ndef get_config():\n    return {}['k']\n": "--config=",
             "\n\nraise ValueError('bad')\n": "line 3: ValueError: bad"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.py"
        path.write_text(text)
        with pytest.raises(checks.ConfigError) as e:
            checks.load_config_file(str(path))
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(checks.ConfigError, match="does not exist"):
        checks.load_config_file(str(tmp_path / "missing.py"))
    with pytest.raises(checks.ConfigError, match=r"configs/toy.py:nope: unknown toy dataset 'nope'"):
        checks.load_config_file("configs/toy.py:nope")


def test_describe_mentions_every_field_and_method():
    text = checks.describe(get_base_config())
    for path, _ in checks.flat_items(get_base_config()):
        assert f"  {path} = " in text
    for method in checks.METHOD_OPTIONS:
        assert f"  {method}: " in text


def test_likelihood_options_per_method():
    import likelihood

    assert set(checks.LIKELIHOOD_OPTIONS) == set(likelihood.METHODS)
    lik_keys = set(get_base_config().eval.likelihood.keys())
    assert {o for opts in checks.LIKELIHOOD_OPTIONS.values() for o in opts} <= lik_keys
    config = get_base_config()
    config.eval.likelihood.method = "ddpm_bound"
    checks.validate(config, "likelihood", explicit=["eval.likelihood.ddpm_num_steps", "eval.likelihood.split"])
    with pytest.raises(checks.ConfigError, match=r"eval.likelihood.rtol applies to method\(s\) ode, not ddpm_bound"):
        checks.validate(config, "likelihood", explicit=["eval.likelihood.rtol"])


def test_pc_parts_match_the_predictor_and_corrector_registries():
    import samplers

    keys = set(get_base_config().sampling.keys())
    for part, registry in (("predictor", samplers.PREDICTORS), ("corrector", samplers.CORRECTORS)):
        derived = {name: {p for p in inspect.signature(f).parameters if p in keys} for name, f in registry.items()}
        assert {n: set(o) for n, o in checks.PC_PARTS[part].items()} == derived
    config = get_base_config()
    config.sampling.corrector = "none"
    checks.validate(config, "sample", explicit=["sampling.predictor"])
    with pytest.raises(checks.ConfigError, match=r"^config sampling.snr applies to corrector\(s\) langevin, ald, "
                                                 r"not none$"):
        checks.validate(config, "sample", explicit=["sampling.snr"])
    config.sampling.method = "annealed_langevin"   # reads snr itself
    checks.validate(config, "sample", explicit=["sampling.snr"])
