"""NCSN / NCSNv2 RefineNets: parameter counts (against the 2021 figures and an independent layer-by-layer count),
closed-form checks of the layers, and forward/gradient behaviour on tiny variants."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import ncsnv2 as nm


def n_params(module, size, channels=3):
    shapes = jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32)),
                            jax.random.key(0))
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(shapes)))


# ---- an independent count from the paper's layer list ----------------------------------------------------------


def _conv(cin, cout, k=3, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _norm(c, classes):
    return 3 * c * (classes or 1)  # α, γ, β per channel (per class for the conditional norm)


def _residual(cin, cout, resample, dilation, classes):
    mid = cin if resample == "down" else cout
    n = _norm(cin, classes) + _conv(cin, mid) + _norm(mid, classes) + _conv(mid, cout)
    if resample == "down":
        n += _conv(cin, cout, 1 if dilation == 1 else 3)
    elif cin != cout:
        n += _conv(cin, cout, 1 if dilation == 1 else 3)
    return n


def _rcu(c, blocks, classes):
    return blocks * 2 * (_conv(c, c, bias=False) + (_norm(c, classes) if classes else 0))


def _refine(cins, c, end, classes):
    n = sum(_rcu(ci, 2, classes) for ci in cins)
    if len(cins) > 1:
        n += sum(_conv(ci, c) + (_norm(ci, classes) if classes else 0) for ci in cins)
    n += 2 * (_conv(c, c, bias=False) + (_norm(c, classes) if classes else 0))  # CRP
    return n + _rcu(c, 3 if end else 1, classes)


def independent_count(arch, nf, channels=3, classes=None, refine_mults=None):
    spec = nm.ARCHITECTURES[arch]
    n = _conv(channels, nf) + _conv(nf, channels) + _norm(nf, classes)
    c, outs = nf, []
    for _, mult, resample, dilation in spec["stages"]:
        n += _residual(c, mult * nf, resample, dilation, classes) + _residual(mult * nf, mult * nf, None, dilation,
                                                                              classes)
        c = mult * nf
        outs.append(c)
    prev = None
    mults = refine_mults or [m for _, m in spec["refine"]]
    for j, mult in enumerate(mults):
        cins = [outs[-1 - j]] + ([] if prev is None else [prev])
        n += _refine(cins, mult * nf, j == len(mults) - 1, classes)
        prev = mult * nf
    return n


@pytest.mark.parametrize("arch,size", [("ncsnv2_64", 32), ("ncsnv2_128", 128), ("ncsnv2_256", 256)])
def test_parameter_count_matches_independent_count(arch, size):
    assert n_params(nm.RefineNet(nf=128, arch=arch), size) == independent_count(arch, 128)


def test_ncsn_conditional_count_matches_independent_count():
    module = nm.RefineNet(nf=128, num_scales=10, conditional=True, scale_by_sigma=False)
    assert n_params(module, 32) == independent_count("ncsnv2_64", 128, classes=10)


def test_ncsnv2_cifar10_counts_against_2021_figures():
    """The paper's network (ermongroup/ncsnv2, refine widths 2nf, 2nf, nf, nf) has 29.69M parameters, the figure of
    score_sde_pytorch, whose layers have the same shapes. score_sde's JAX NCSNv2 gives its third RefineBlock 2·nf
    channels; with that one change we get its 33.97M exactly."""
    config = importlib.import_module("configs.ve.ncsn.ncsnv2_cifar10").get_config()
    model = models.create_model(config)
    assert model.module.arch == "ncsnv2_64" and model.prediction == "score" and model.time_input == "sigma_index"
    paper = n_params(model.module, 32)
    assert paper == 29_694_083 and round(paper / 1e6, 2) == 29.69
    jax_2021 = n_params(model.module.clone(refine_mults=(2, 2, 2, 1)), 32)
    assert round(jax_2021 / 1e6, 2) == 33.97 and jax_2021 == independent_count("ncsnv2_64", 128,
                                                                                refine_mults=(2, 2, 2, 1))


@pytest.mark.parametrize("name,arch,count", [
    ("ncsnv2_celeba64", "ncsnv2_64", 29_694_083), ("ncsnv2_bedroom128", "ncsnv2_128", 83_445_379),
    ("ncsnv2_ffhq256", "ncsnv2_256", 94_132_611), ("ncsn_cifar10", "ncsnv2_64", 30_117_635)])
def test_config_variants(name, arch, count):
    config = importlib.import_module(f"configs.ve.ncsn.{name}").get_config()
    model = models.create_model(config)
    assert model.module.arch == arch
    assert n_params(model.module, config.data.image_size) == count
    assert config.model.num_scales == config.sde.N  # the model's ladder follows the SDE's


# ---- layers against closed forms ----------------------------------------------------------------------------------


def test_resize_align_corners_is_exact_on_bilinear_functions():
    """Bilinear interpolation reproduces f(i, j) = a i + b j + c i j exactly at src = dst (in-1)/(out-1)."""
    i, j = np.meshgrid(np.arange(5.0), np.arange(3.0), indexing="ij")
    f = lambda u, v: 0.3 * u - 1.7 * v + 0.25 * u * v + 2.0
    x = jnp.asarray(f(i, j))[None, :, :, None]
    out = np.asarray(nm.resize_align_corners(x, (9, 7)))[0, :, :, 0]
    u, v = np.meshgrid(np.arange(9) * 4 / 8, np.arange(7) * 2 / 6, indexing="ij")
    np.testing.assert_allclose(out, f(u, v), atol=1e-5)
    assert nm.resize_align_corners(x, (5, 3)) is x


def test_instance_norm_plus_closed_form():
    x = jax.random.normal(jax.random.key(0), (2, 4, 5, 6)) * 3 + 1
    module = nm.InstanceNormPlus()
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    xn = np.asarray(x, np.float64)
    m = xn.mean(axis=(1, 2))
    h = (xn - m[:, None, None]) / np.sqrt(xn.var(axis=(1, 2))[:, None, None] + 1e-5)
    mt = (m - m.mean(-1, keepdims=True)) / np.sqrt(m.var(-1, ddof=1, keepdims=True) + 1e-5)
    a, g, b = (np.asarray(params[k]) for k in ("alpha", "gamma", "beta"))
    np.testing.assert_allclose(module.apply({"params": params}, x), g * (h + mt[:, None, None] * a) + b, atol=1e-5)


def test_conditional_norm_picks_the_label_row():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    module = nm.CondInstanceNormPlus(num_classes=5)
    init = jax.eval_shape(module.init, jax.random.key(1), x, jnp.zeros(3, jnp.int32))["params"]
    assert init["embed"].shape == (5, 6)
    params = {"embed": jax.random.normal(jax.random.key(2), (5, 6))}
    y = jnp.array([4, 0, 2])
    out = module.apply({"params": params}, x, y)
    for b in range(3):
        e = params["embed"][y[b]]
        plain = nm.InstanceNormPlus().apply({"params": {"gamma": e[:2], "alpha": e[2:4], "beta": e[4:]}}, x[b:b + 1])
        np.testing.assert_allclose(out[b:b + 1], plain, atol=1e-6)


def test_dilated_conv_keeps_resolution_and_mean_pool():
    x = jnp.ones((1, 8, 8, 2))
    conv = nm.conv3x3(3, dilation=4)
    assert jax.eval_shape(lambda: conv.apply(conv.init(jax.random.key(0), x), x)).shape == (1, 8, 8, 3)
    y = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_allclose(nm.mean_pool2(y)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])


# ---- forward / gradient on tiny variants ---------------------------------------------------------------------------


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves XLA CPU compile time of these deep nets


@pytest.fixture(scope="module", params=["ncsnv2", "ncsn"])
def tiny(request):
    """Outputs at labels (0, 0), (5, 5), (0, 0) with train=True, and the gradient of mean(out²) at (1, 3), from
    ONE compiled function (compiling the RefineNet dominates the cost on CPU)."""
    cls = models.get_model(request.param)
    module = cls(nf=4, num_scales=6, sigma_max=10.0, sigma_min=0.1, arch="ncsnv2_64",
                 conditional=request.param == "ncsn", scale_by_sigma=request.param == "ncsnv2")
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    shapes = jax.eval_shape(module.init, jax.random.key(1), x, jnp.zeros(2, jnp.int32))["params"]
    rng = np.random.default_rng(0)
    draw = lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) == 4  # kernels
                      else 1.0 + 0.1 * rng.normal(size=s.shape))  # norms' γ, α, β and biases
    params = jax.tree.map(lambda s: jnp.asarray(draw(s), jnp.float32), shapes)

    def run(params, x):
        apply = lambda labels, train=False: module.apply({"params": params}, x, jnp.array(labels), train=train)
        loss = lambda p: jnp.mean(module.apply({"params": p}, x, jnp.array([1, 3])) ** 2)
        return apply([0, 0]), apply([5, 5]), apply([0, 0], True), jax.grad(loss)(params)

    return module, x, jax.jit(run, compiler_options=FAST_COMPILE)(params, x)


def test_forward_shapes_labels_and_determinism(tiny):
    module, x, (out0, out5, out0_train, _) = tiny
    assert out0.shape == x.shape and np.isfinite(out0).all()
    assert not np.allclose(out0, out5)  # the σ label changes the output
    np.testing.assert_array_equal(out0, out0_train)  # no dropout: train mode changes nothing
    if module.scale_by_sigma:  # NCSNv2: f(x) / σ_i exactly
        np.testing.assert_allclose(out5 * 0.1, out0 * 10.0, rtol=1e-4, atol=1e-5)


def test_gradient_is_finite_and_nonzero(tiny):
    leaves = jax.tree.leaves(tiny[2][3])
    assert all(np.isfinite(g).all() for g in leaves)
    assert all(float(jnp.abs(g).sum()) > 0 for g in leaves)  # every parameter is used


def test_config_errors():
    config = importlib.import_module("configs.ve.ncsn.ncsnv2_cifar10").get_config()
    config.data.image_size = 512
    with pytest.raises(ValueError, match="image_size=512"):
        models.create_model(config)
    config.data.image_size = 30
    config.model.name = "ncsnv2_128"
    with pytest.raises(ValueError, match="not divisible by 4"):
        models.create_model(config)
    config.data.image_size, config.model.name = 32, "ncsnv2"
    config.model.normalization = "GroupNorm"
    with pytest.raises(ValueError, match="InstanceNorm"):
        models.create_model(config)
    config.model.normalization, config.model.dtype = "InstanceNorm++", "float16"
    with pytest.raises(ValueError, match="config.model.dtype='float16'"):
        models.create_model(config)
    with pytest.raises(ValueError, match="nonlinearity"):
        nm.get_activation("gelu")
