"""The docs stay true: every code link in docs/ resolves, every example file builds, trains for a few steps and
samples, each example matches a closed form, and the one-file SDE of docs/extending.md runs through main.py."""
import importlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datasets
import losses
import experiment
import models
import run_lib
import samplers
import sde_lib
from analytic import GaussianMixture, sliced_wasserstein
from evaluation import quality

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
CODE_LINK = re.compile(r"\[`([^`\]]+)`\]\(([^)\s]+)\)")   # [`name`](target)
ANY_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")       # [text](target) and ![alt](image)
EXAMPLES = sorted(p.stem for p in (REPO / "examples").glob("*.py") if p.stem != "__init__")


REGISTRIES = (sde_lib.SDES, losses.LOSSES, samplers.SAMPLERS, models.MODELS, datasets.SOURCES, datasets.SHAPES,
              quality.QUALITY_FIGURES)
DOCS_SDE_MODULE = "docs_my_sde"  # module name of the docs' one-file SDE when executed in this process


@pytest.fixture(autouse=True, scope="module")
def forget_example_registrations():
    """The examples register into the global registries. Afterwards remove what they added and forget the example
    modules (a later import registers them again), so later test files see the registries they expect, e.g. the
    exact list of losses usable with an SDE in tests/test_losses.py."""
    before = set(sys.modules)
    yield
    new = {m for m in set(sys.modules) - before if m.startswith("examples.")} | {DOCS_SDE_MODULE}
    for registry in REGISTRIES:
        for name in [n for n, obj in registry.items() if getattr(obj, "__module__", None) in new]:
            del registry[name]
            losses.CONTINUOUS_TIME.discard(name)
    for m in new:
        sys.modules.pop(m, None)
        package, _, child = m.rpartition(".")
        if package in sys.modules and hasattr(sys.modules[package], child):
            delattr(sys.modules[package], child)  # else `from examples import x` returns the old module


# ---- links -------------------------------------------------------------------------------------------------
def code_links():
    return [(doc, name, target) for doc in DOCS for name, target in CODE_LINK.findall(doc.read_text())]


def module_of(path: pathlib.Path) -> str:
    """sde_lib.py -> sde_lib, models/__init__.py -> models, examples/film_mlp.py -> examples.film_mlp."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def check_link(doc: pathlib.Path, name: str, target: str):
    """None if ``[`name`](target)`` resolves, else the reason."""
    if "#" in target:
        return "code links carry no anchors (line numbers drift); link the file and name the object"
    path = (doc.parent / target).resolve()
    if not path.is_file():
        return f"{target} is not a file"
    if "::" in name:  # a test node: tests/test_x.py::test_name
        file, test = name.split("::", 1)
        if REPO / file != path:
            return f"test file {file} is not the link target {target}"
        if not re.search(rf"^\s*def {re.escape(test)}\(", path.read_text(), re.M):
            return f"no `def {test}(` in {file}"
        return None
    if "/" in name or name.endswith((".py", ".md")):  # a file named by its path
        return None if REPO / name == path else f"{name} is not the link target {target}"
    module = module_of(path)
    if name != module and not name.startswith(module + "."):
        return f"{name} does not live in {target} (module {module})"
    obj = importlib.import_module(module)
    for attr in name[len(module):].split(".")[1:]:
        if not hasattr(obj, attr):
            return f"{module} has no {name[len(module) + 1:]}"
        obj = getattr(obj, attr)
    return None


def test_code_links_resolve():
    links = code_links()
    assert len(links) > 100, f"only {len(links)} code links in {[d.name for d in DOCS]}"
    bad = [f"{doc.name}: [`{name}`]({target}): {why}" for doc, name, target in links
           if (why := check_link(doc, name, target))]
    assert not bad, "\n".join(bad)


def test_file_links_and_figures_exist():
    bad = [f"{doc.name}: {t}" for doc in DOCS for t in ANY_LINK.findall(doc.read_text())
           if not t.startswith(("http://", "https://")) and not (doc.parent / t.split("#")[0]).exists()]
    assert not bad, bad


def test_every_theory_section_names_code_and_a_test():
    """Each equation section of theory.md links at least one implementation and one test."""
    text = (REPO / "docs" / "theory.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(sections) >= 8
    for section in sections:
        names = [n for n, _ in CODE_LINK.findall(section)]
        title = section.splitlines()[0]
        assert any("::" in n for n in names), f"theory.md section {title!r} links no test"
        assert any("::" not in n and "/" not in n for n in names), f"theory.md section {title!r} links no code"


def test_snippets_are_copied_from_the_examples():
    """A fenced block starting `# from examples/x.py` must appear verbatim in that file."""
    text = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n# from (\S+)\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    for path, code in blocks:
        assert code.strip() in (REPO / path).read_text(), f"the excerpt of {path} in extending.md has drifted"


def test_every_example_is_documented():
    text = (REPO / "docs" / "extending.md").read_text()
    missing = [e for e in EXAMPLES if f"examples/{e}.py" not in text]
    assert not missing, f"examples not described in docs/extending.md: {missing}"


# ---- each example against a closed form ---------------------------------------------------------------------
def example(name):
    return importlib.import_module(f"examples.{name}")


class ExactScore:
    """Stand-in for models.ScoreModel with the exact perturbed score of a Gaussian mixture."""

    prediction, time_input = "score", "t"

    def __init__(self, mixture):
        self.mixture = mixture

    def score(self, params, sde, x, t, train=False, key=None):
        return self.mixture.score_t(sde, x, t)


def test_lognormal_loss_draws_its_noise_levels():
    """ln(σ/α) ~ N(p_mean, p_std²), and at the exact score of N(μ, s² I) data the per-example loss has mean
    m²s²/(m²s² + σ²) per dimension (m = α(t)), the DSM closed form."""
    config = example("lognormal_dsm").get_config()
    sde = sde_lib.get_sde(config.sde)
    mu, s, n = np.array([0.5, -1.0]), 0.8, 20000
    gauss = GaussianMixture([1.0], mu[None], [s])
    loss_fn = losses.get_loss_fn(config, sde, ExactScore(gauss))
    loss, metrics = jax.jit(loss_fn)({}, jax.random.key(0), {"x": gauss.sample(jax.random.key(1), n)})
    alpha, sigma = (np.asarray(a, np.float64) for a in sde.alpha_sigma(metrics["t"]))
    log_sigma = np.log(sigma / alpha)
    assert abs(log_sigma.mean() - config.training.p_mean) < 0.04, log_sigma.mean()
    assert abs(log_sigma.std() - config.training.p_std) < 0.04, log_sigma.std()
    exact = (alpha * s) ** 2 / ((alpha * s) ** 2 + sigma**2)
    diff = np.asarray(loss, np.float64) - exact
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(n), (diff.mean(), diff.std())


def gaussian_flow(sde, mu, s, x, t0, t1):
    """Exact probability-flow map of N(μ, s² I) data from t0 to t1: standardised coordinates are preserved."""
    (a0, s0), (a1, s1) = (sde.alpha_sigma(jnp.array([t], jnp.float32)) for t in (t0, t1))
    v0, v1 = jnp.sqrt(a0**2 * s**2 + s0**2), jnp.sqrt(a1**2 * s**2 + s1**2)
    return a1 * mu + v1 / v0 * (x - a0 * mu)


def test_midpoint_sampler_is_second_order():
    example("midpoint_sampler")
    sde, mu, s = sde_lib.VPSDE(), jnp.array([1.0, -0.5]), 0.7
    gauss = GaussianMixture([1.0], np.asarray(mu)[None], [s])
    key = jax.random.key(0)
    x_T = sde.prior_sampling(key, (256, 2))
    exact = gaussian_flow(sde, mu, s, x_T, sde.T, sde.eps)
    errors = []
    for n in (10, 20, 40):
        x, nfe = samplers.sample(key, sde, gauss.score_fn(sde), (256, 2), "midpoint", num_steps=n, denoise=False,
                                 x_init=x_T)
        assert nfe == 2 * (n - 1)
        errors.append(float(jnp.max(jnp.abs(x - exact))))
    print("midpoint max error at 10/20/40 steps:", errors)  # measured 0.036 / 0.0077 / 0.0017
    assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0 and errors[2] < 3e-3, errors


def test_film_mlp_contract():
    config = example("film_mlp").get_config()
    model = models.create_model(config)
    assert model.module.width == config.model.width
    x = jax.random.normal(jax.random.key(0), (5, 2))
    params = jax.jit(model.init)(jax.random.key(1), x)
    labels = jnp.linspace(0.0, 999.0, 5)
    apply = jax.jit(lambda p, lab: model.module.apply({"params": p}, x, lab))
    np.testing.assert_array_equal(apply(params, labels), 0.0)  # zero-initialised output layer
    wiggle = lambda p: np.asarray(p) + 0.1 * np.cos(0.7 * np.arange(p.size) + 1.0).reshape(p.shape)
    noisy = jax.tree.map(lambda p: wiggle(p).astype(np.float32), params)  # host-side: nothing to compile
    out = apply(noisy, labels)
    assert out.shape == x.shape and float(jnp.abs(out).min()) > 0
    assert float(jnp.max(jnp.abs(out - apply(noisy, labels[::-1])))) > 1e-3  # the label conditions the output
    with pytest.raises(ValueError, match="film_mlp expects vectors"):
        model.module.apply({"params": params}, jnp.zeros((2, 4, 4, 1)), jnp.zeros(2))


def test_bars_source_through_the_pipeline():
    bars = example("bars_dataset")
    config = bars.get_config()
    batch = next(iter(datasets.get_dataset(config, "train", infinite=True)))
    assert batch["x"].shape == (config.training.batch_size, 8, 8, 1)
    assert set(np.unique(batch["x"])) == {-1.0, 1.0} and set(np.unique(batch["label"])) == {0, 1}
    images = datasets.get_data_transform(config).inverse(batch["x"])
    assert bars.is_bars(images).all()
    train, test = bars.load_bars(config, "train")[0], bars.load_bars(config, "eval")[0]
    assert len(test) == bars.BARS_SIZES["test"] and not np.array_equal(train[:len(test)], test)
    noise = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1)).astype(np.uint8)
    assert not bars.is_bars(noise).any()
    assert datasets.data_shape(config.data) == (8, 8, 1)   # an image source declares no shape
    assert quality.quality_figures(config, test[:64]) == {"fraction_valid": 1.0, "num_samples": 64}
    assert quality.quality_figures(config, noise)["fraction_valid"] == 0.0


# ---- every example trains and samples -----------------------------------------------------------------------
def tiny_run(config, steps: int, n: int, num_steps: int):
    """Train ``steps`` steps with the train step of ``experiment`` on the config's own data, then sample n points."""
    config.optim.warmup = 0
    config.sampling.num_steps = num_steps
    exp = experiment.Experiment.from_config(config)
    state = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    step = jax.jit(experiment.make_train_step(exp.loss_fn(), exp.optimizer, 0.9, config.seed))
    data = datasets.get_dataset(config, "train", infinite=True)
    loss_values = []
    try:
        for _ in range(steps):
            state, metrics = step(state, next(data))
            loss_values.append(float(metrics["loss"]))
    finally:
        data.close()
    x, nfe = exp.sample(jax.random.key(0), state.ema_params, n)
    return exp, np.asarray(x), loss_values, nfe


def test_toy_examples_train_and_sample_together():
    """The new loss, model and sampler in one run (one compilation instead of three): film_mlp trained with
    dsm_lognormal on two moons, sampled with midpoint. Each example's own get_config is built in
    test_every_example_config_builds and trained to quality in test_example_reaches_quality (slow)."""
    config = example("film_mlp").get_config()
    loss_cfg, sampler_cfg = example("lognormal_dsm").get_config(), example("midpoint_sampler").get_config()
    config.training.update({k: loss_cfg.training[k] for k in ("loss", "p_mean", "p_std")})
    config.sampling.update(sampler_cfg.sampling.to_dict())
    config.training.batch_size = 64
    exp, x, loss_values, nfe = tiny_run(config, steps=8, n=16, num_steps=6)
    assert (config.model.name, config.training.loss, config.sampling.method) == (
        "film_mlp", "dsm_lognormal", "midpoint")
    assert x.shape == (16, 2) and np.isfinite(x).all() and np.isfinite(loss_values).all()
    assert int(nfe) == 2 * (6 - 1) + 1


def test_bars_example_trains_and_samples():
    config = example("bars_dataset").get_config()
    config.model.update({"nf": 8, "ch_mult": (1,), "num_res_blocks": 1})  # a tiny U-Net: compiles faster
    config.training.batch_size = 16
    exp, x, loss_values, _ = tiny_run(config, steps=3, n=4, num_steps=4)
    assert x.shape == (4, 8, 8, 1) and np.isfinite(x).all() and np.isfinite(loss_values).all()


def test_every_example_config_builds():
    for name in EXAMPLES:
        module = example(name)
        if hasattr(module, "get_config"):
            exp = experiment.Experiment.from_config(module.get_config())
            assert exp.loss_fn() is not None


# ---- the new-user path: docs/extending.md's one-file SDE through main.py -------------------------------------
def one_file_sde_source() -> str:
    text = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n# file: my_sde.py\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/extending.md must hold exactly one `# file: my_sde.py` block"
    return blocks[0]


def test_one_file_sde_from_the_docs_runs_through_main(tmp_path):
    (tmp_path / "my_sde.py").write_text(one_file_sde_source())
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "main.py"), f"--config={tmp_path / 'my_sde.py'}", f"--workdir={workdir}",
           "--config.training.n_iters=20", "--config.training.snapshot_freq=20", "--config.training.log_freq=10",
           "--config.sampling.num_samples=64", "--config.sampling.num_steps=20"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (workdir / "checkpoints" / "20").is_dir()
    samples = np.load(workdir / "samples" / "step_20" / "samples.npz")["samples"]
    assert samples.shape == (64, 2) and np.isfinite(samples).all()
    assert "linear_ve" in (workdir / "config.json").read_text()


def test_one_file_sde_matches_its_forward_simulation():
    """The docs' linear VE SDE: g² = dσ²/dt, checked by simulating dx = g dw from x(0) = 1."""
    namespace = {"__name__": DOCS_SDE_MODULE}
    exec(compile(one_file_sde_source().replace('register_sde("linear_ve")', 'register_sde("linear_ve_check")'),
                 "my_sde.py", "exec"), namespace)
    sde = namespace["LinearVESDE"](sigma_max=3.0)
    n, steps, t_end = 20000, 400, 0.8
    x, dt = jnp.ones((n, 1)), t_end / steps
    for i in range(steps):
        _, g = sde.sde(x, jnp.full((n,), (i + 0.5) * dt))
        x = x + g[:, None] * jnp.sqrt(dt) * jax.random.normal(jax.random.fold_in(jax.random.key(0), i), x.shape)
    mean, std = sde.marginal_prob(jnp.ones((1, 1)), jnp.array([t_end]))
    assert abs(float(x.mean()) - float(mean[0, 0])) < 0.05
    assert abs(float(x.std()) / float(std[0]) - 1.0) < 0.02


# ---- slow: each example reaches a quality bound ---------------------------------------------------------------
QUALITY = {  # example -> (training steps, bound); measured after 1500 steps: sliced W1 0.063 (lognormal_dsm),
    # 0.062 (midpoint_sampler), 0.052 (film_mlp), two held-out sets ≈ 0.05-0.07 apart; bars 100% valid images
    "lognormal_dsm": (1500, 0.12), "midpoint_sampler": (1500, 0.12), "film_mlp": (1500, 0.12),
    "bars_dataset": (1500, 0.8),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUALITY))
def test_example_reaches_quality(name, tmp_path):
    """Toys: sliced W1 of 1000 samples to held-out data below the bound; bars: the fraction of valid bars images
    (constant along every row or every column) above the bound."""
    steps, bound = QUALITY[name]
    module = example(name)
    config = module.get_config()
    config.training.n_iters = steps
    config.training.snapshot_freq = steps
    config.training.snapshot_sampling = False
    exp = experiment.Experiment.from_config(config)
    state = run_lib.train(exp, str(tmp_path))
    x = np.asarray(exp.sample(jax.random.key(1), state.ema_params, 1000 if name != "bars_dataset" else 256)[0])
    if name == "bars_dataset":
        valid = float(module.is_bars(experiment.to_output(exp, x)).mean())
        print(f"bars: {valid:.3f} of samples are valid bars images")
        assert valid > bound
    else:
        real = datasets.draw_examples(config, "test", len(x), seed=config.seed + 7)
        distance = float(sliced_wasserstein(jax.random.key(0), x, real))
        print(f"{name}: sliced W1 {distance:.3f}")
        assert distance < bound


# ---- docs/api.md: the Python API guide runs as written ------------------------------------------------------------
def api_guide_blocks() -> list:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 7, "docs/api.md lost its code blocks"
    return blocks


def api_workdir(workdir: pathlib.Path):
    """A digits workdir as training leaves it (config.json, checkpoint) holding a tiny U-Net at its initial
    parameters: the guide's calls, not the model, are under test, and no train step needs compiling."""
    import utils
    from configs.default import get_config

    config = get_config("quick")
    config.model.update({"nf": 8, "ch_mult": (1,), "num_res_blocks": 1})
    exp = experiment.Experiment.from_config(config)
    state = experiment.init_train_state(config, exp.model, exp.optimizer, exp.data_shape)
    utils.write_config(workdir, config)
    ckpt = utils.CheckpointManager(workdir / "checkpoints", config)
    ckpt.save(1, state)
    ckpt.close()


def test_api_guide_runs(tmp_path, capsys):
    """Every python block of docs/api.md, in order, in one namespace, on a digits workdir."""
    api_workdir(tmp_path)
    namespace = {"__name__": "docs_api"}
    for i, block in enumerate(api_guide_blocks()):
        code = block.replace('"/tmp/digits"', repr(str(tmp_path)))
        exec(compile(code, f"docs/api.md block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "needs log_det=" in out and "bits_per_dim_of_data" in out
    assert namespace["images"].shape == (24, 8, 8, 1) and namespace["images"].dtype == np.uint8
    assert namespace["traj"]["x"].shape == (10, 8, 8, 8, 1) and namespace["edited"].shape == (8, 8, 8, 1)
    bpd = np.asarray(namespace["out"]["bpd"])
    assert bpd.shape == (8,) and np.all(bpd > 0) and np.all(np.isfinite(bpd))
