"""Tests of the input pipeline (datasets.py): sources, transforms, determinism, sharding, finite mode."""
import itertools

import numpy as np
import pytest

import datasets
from configs.base import get_base_config


def make_config(**data):
    config = get_base_config()
    config.training.batch_size = 16
    config.eval.batch_size = 16
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def take(iterator, n):
    batches = list(itertools.islice(iterator, n))
    iterator.close()
    return batches


def collect(iterator):
    """All real (mask True) rows of a finite iterator: (x, label)."""
    xs, labels = [], []
    for batch in iterator:
        xs.append(batch["x"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(xs), np.concatenate(labels)


# ---------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("dequant", [True, False])
def test_forward_inverse_round_trip(centered, dequant):
    transform = datasets.get_data_transform(make_config(centered=centered, uniform_dequantization=dequant))
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    rng = np.random.default_rng(0)
    for noise_rng in (None, rng):
        x = transform.forward(u, noise_rng)
        assert x.dtype == np.float32
        lo, hi = (-1.0, 1.0) if centered else (0.0, 1.0)
        assert x.min() >= lo and x.max() <= hi
        np.testing.assert_array_equal(transform.inverse(x), u)


def test_forward_closed_form():
    u = np.array([0, 1, 128, 255], np.uint8)
    f = u.astype(np.float64)
    np.testing.assert_allclose(datasets.ImageTransform(centered=False).forward(u), f / 255.0, rtol=1e-6)
    np.testing.assert_allclose(datasets.ImageTransform(centered=True).forward(u), 2 * f / 255.0 - 1, atol=1e-6)
    mid = datasets.ImageTransform(centered=False, uniform_dequantization=True).forward(u)
    np.testing.assert_allclose(mid, (f + 0.5) / 256.0, rtol=1e-6)
    assert datasets.ImageTransform(centered=True).bpd_offset == 7.0
    assert datasets.ImageTransform(centered=False).bpd_offset == 8.0


def test_inverse_clips_and_rounds():
    inverse = datasets.ImageTransform(centered=True).inverse
    np.testing.assert_array_equal(inverse(np.array([-3.0, 3.0, 0.0])), [0, 255, 128])


def test_inverse_accepts_jax_arrays():
    import jax
    import jax.numpy as jnp

    transform = datasets.ImageTransform(centered=True)
    u = np.arange(256, dtype=np.uint8)
    out = jax.jit(transform.inverse)(jnp.asarray(transform.forward(u)))
    np.testing.assert_array_equal(np.asarray(out), u)


# ---------------------------------------------------------------------------- digits

def test_digits_uint8_mapping():
    u = datasets.digits_to_uint8(np.arange(17))
    assert u[0] == 0 and u[16] == 255 and u[8] == 128
    assert np.all(np.diff(u.astype(int)) > 0)
    np.testing.assert_array_equal(u, np.floor(255 * np.arange(17) / 16 + 0.5))


def test_digits_splits_fixed_and_disjoint():
    config = make_config()
    train_x, train_y = datasets.load_digits(config, "train")
    test_x, test_y = datasets.load_digits(config, "test")
    assert train_x.shape == (1500, 8, 8, 1) and test_x.shape == (297, 8, 8, 1)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
    assert set(np.unique(train_y)) == set(range(10))
    from sklearn.datasets import load_digits
    full = datasets.digits_to_uint8(load_digits().images)
    assert len({im.tobytes() for im in full}) == len({im.tobytes() for im in np.concatenate([train_x, test_x])})


def test_digits_batches_shapes_and_range():
    config = make_config()
    batch = take(datasets.get_dataset(config, "train", infinite=True, process_index=0, process_count=1), 1)[0]
    assert batch["x"].shape == (16, 8, 8, 1) and batch["x"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0


# ---------------------------------------------------------------------------- toy

@pytest.mark.parametrize("name", sorted(datasets.TOY_SAMPLERS))
def test_toy_batches(name):
    config = make_config(source="toy", dataset=name)
    batches = take(datasets.get_dataset(config, "train", infinite=True, seed=3, process_index=0,
                                        process_count=1), 3)
    for batch in batches:
        assert batch["x"].shape == (16, 2) and batch["x"].dtype == np.float32
        assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
        assert np.all(np.isfinite(batch["x"]))
    assert not np.allclose(batches[0]["x"], batches[1]["x"])


def test_toy_mixture_moments():
    """Sample mean/covariance of the mixtures match the closed forms."""
    rng = np.random.default_rng(0)
    for mixture in datasets.TOY_MIXTURES.values():
        x, k = mixture.sample(200_000, rng)
        mean = mixture.weights @ mixture.means
        second = sum(w * (np.outer(m, m) + s**2 * np.eye(2))
                     for w, m, s in zip(mixture.weights, mixture.means, mixture.stds))
        np.testing.assert_allclose(x.mean(0), mean, atol=0.02)
        np.testing.assert_allclose(np.cov(x.T), second - np.outer(mean, mean), atol=0.03)
        np.testing.assert_allclose(np.bincount(k) / len(k), mixture.weights, atol=0.01)


def test_checkerboard_support():
    x, _ = datasets.checkerboard(10_000, np.random.default_rng(0))
    cell = np.floor(x / 2).astype(int) + 2
    assert np.all((cell >= 0) & (cell < 4)) and np.all(cell.sum(1) % 2 == 0)


def test_toy_finite_mode_complete():
    config = make_config(source="toy", dataset="two_moons", toy_eval_size=50)
    x, labels = collect(datasets.get_dataset(config, "test", infinite=False, process_index=0, process_count=1))
    assert x.shape == (50, 2)


# ---------------------------------------------------------------------------- pipeline properties

def test_determinism_given_seed():
    config = make_config(random_flip=True, uniform_dequantization=True)
    def run(seed):
        it = datasets.get_dataset(config, "train", infinite=True, seed=seed, process_index=0, process_count=1)
        return take(it, 5)
    a, b, c = run(1), run(1), run(2)
    for ba, bb in zip(a, b):
        np.testing.assert_array_equal(ba["x"], bb["x"])
        np.testing.assert_array_equal(ba["label"], bb["label"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])


def test_infinite_mode_covers_epochs_without_drops():
    """200 batches of 16 over 1500 digits: every image appears 2 or 3 times (epoch-free, no drops)."""
    config = make_config(centered=False)
    batches = take(datasets.get_dataset(config, "train", infinite=True, process_index=0, process_count=1), 200)
    u = datasets.get_data_transform(config).inverse(np.concatenate([b["x"] for b in batches]))
    images, _ = datasets.load_digits(config, "train")
    first_epoch = {im.tobytes() for im in u[:1500]}
    assert len(first_epoch) == len({im.tobytes() for im in images})  # first 1500 rows: one full permutation


@pytest.mark.parametrize("source_kwargs", [dict(), dict(source="toy", dataset="8gaussians", toy_eval_size=37)])
def test_two_process_sharding_disjoint_and_complete(source_kwargs):
    config = make_config(**source_kwargs)
    config.eval.batch_size = 32
    full_x, full_y = collect(datasets.get_dataset(config, "test", infinite=False, process_index=0,
                                                  process_count=1))
    parts = []
    counts = []
    for i in range(2):
        it = datasets.get_dataset(config, "test", infinite=False, process_index=i, process_count=2)
        batches = list(it)
        counts.append(len(batches))
        assert all(b["x"].shape[0] == 16 for b in batches)
        parts.append(np.concatenate([b["x"][b["mask"]] for b in batches]))
    assert counts[0] == counts[1]
    rows = lambda x: [r.tobytes() for r in x.reshape(len(x), -1)]
    assert not set(rows(parts[0])) & set(rows(parts[1]))
    assert sorted(rows(parts[0]) + rows(parts[1])) == sorted(rows(full_x))


def test_finite_mode_pads_last_batch_with_mask():
    config = make_config()
    config.eval.batch_size = 64
    batches = list(datasets.get_dataset(config, "test", infinite=False, process_index=0, process_count=1))
    assert len(batches) == 5  # ceil(297 / 64)
    assert all(b["x"].shape == (64, 8, 8, 1) for b in batches)
    assert [int(b["mask"].sum()) for b in batches] == [64, 64, 64, 64, 41]


def test_prefetcher_propagates_errors_and_keeps_order():
    def gen():
        yield from range(5)
        raise RuntimeError("boom")
    it = datasets.Prefetcher(gen(), size=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="config.data.source"):
        datasets.get_dataset(make_config(source="nope"), "train", infinite=True, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="config.data.dataset"):
        datasets.get_dataset(make_config(source="toy", dataset="nope"), "train", infinite=True,
                             process_index=0, process_count=1)
    with pytest.raises(ValueError, match="unknown split"):
        datasets.load_digits(make_config(), "holdout")
