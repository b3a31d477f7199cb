"""Tests of the input pipeline (datasets.py): sources, transforms, determinism, sharding, finite mode."""
import itertools
import pathlib
import subprocess
import sys

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


def test_digits_read_without_sklearn_match_sklearn(monkeypatch):
    """The CSV read directly (no scikit-learn import) is exactly ``sklearn.datasets.load_digits``; without the
    file, scikit-learn itself is asked."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    assert datasets.sklearn_digits_file() is not None
    images, target = datasets.read_sklearn_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)
    monkeypatch.setattr(datasets, "sklearn_digits_file", lambda: None)
    images, target = datasets.read_sklearn_digits()
    np.testing.assert_array_equal(images, bunch.images)


def test_digits_load_does_not_import_sklearn():
    code = ("import sys, datasets; datasets.read_sklearn_digits(); "
            "print(any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(pathlib.Path(datasets.__file__).parent))
    assert out.stdout.strip() == "False"


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


def test_colored_digits_are_the_digits_tinted_by_one_palette_colour():
    """Same split and labels as the digits; each image is round(gray · c) for one palette colour c, so its channel
    mean is gray/2 (all colours sum to 1.5) up to uint8 rounding; every colour is used in both splits."""
    from evaluation import metrics

    gray_cfg, rgb_cfg = make_config(), make_config(source="colored_digits", num_channels=3)
    np.testing.assert_allclose(datasets.COLOR_PALETTE.sum(1), 1.5)
    for split in ("train", "test"):
        gray, y_gray = datasets.load_digits(gray_cfg, split)
        rgb, y = datasets.SOURCES["colored_digits"](rgb_cfg, split)
        assert rgb.shape == gray.shape[:3] + (3,) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(y, y_gray)
        assert np.abs(rgb.astype(float).mean(-1) - 0.5 * gray[..., 0]).max() <= 0.5
        fit = metrics.palette_fit(rgb, datasets.COLOR_PALETTE)
        assert fit["residual"].max() < 0.01 and set(fit["color"]) == set(range(6))
        np.testing.assert_array_equal(datasets.tint(gray, fit["color"]), rgb)
    gray_rgb = np.repeat(gray, 3, -1)     # a gray image is no palette colour: residual 1/3
    np.testing.assert_allclose(metrics.palette_fit(gray_rgb, datasets.COLOR_PALETTE)["residual"], 1 / 3,
                               atol=1e-9)


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


def test_sources_declare_their_shape_and_stored_splits_come_back_exactly(monkeypatch):
    """Images: (H, W, C) from config.data; toy and any source registered with ``shape=``: what they declare, and
    image-only consumers refuse them with one line. ``uint8_split`` returns the stored uint8 split exactly."""
    assert datasets.data_shape(make_config(source="digits", image_size=8, num_channels=1).data) == (8, 8, 1)
    assert datasets.data_shape(make_config(source="toy", dataset="two_moons").data) == (2,)
    monkeypatch.setitem(datasets.SOURCES, "_vectors", None)
    monkeypatch.setitem(datasets.SHAPES, "_vectors", lambda data: (5,))
    vectors = make_config(source="_vectors")
    assert datasets.data_shape(vectors.data) == (5,) and not datasets.holds_images(vectors.data)
    with pytest.raises(ValueError, match=r"config.data.source='_vectors' holds vectors of shape \(5,\)"):
        next(datasets.uint8_batches(vectors, "train"))
    digits = make_config(source="digits", image_size=8, num_channels=1)
    images, labels = datasets.uint8_split(digits, "test")
    stored, stored_labels = datasets.load_digits(digits, "test")
    np.testing.assert_array_equal(images, stored)
    np.testing.assert_array_equal(labels, stored_labels)
    assert datasets.count_uint8_batches(digits, "test") == -(-len(stored) // 16)
    assert datasets.count_uint8_batches(make_config(source="toy", dataset="two_moons"), "test") is None


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


# ---------------------------------------------------------------------------- IDX (offline Fashion-MNIST)

def test_idx_fashion_mnist_shapes_and_label_counts():
    from conftest import shared_data_path

    directory = shared_data_path("fashion_mnist")
    config = make_config(source="idx", data_dir=str(directory), image_size=28)
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = datasets.load_idx(config, split)
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))


def write_idx(path, array, compress):
    import gzip
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip_raw_and_gz(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 5, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, 10).astype(np.uint8)
    ext = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels, compress)
    config = make_config(source="idx", data_dir=str(tmp_path), image_size=5)
    x, y = datasets.load_idx(config, "test")
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)
    config.eval.batch_size = 4
    x_model, _ = collect(datasets.get_dataset(config, "eval", infinite=False, process_index=0, process_count=1))
    np.testing.assert_array_equal(datasets.get_data_transform(config).inverse(x_model)[..., 0], images)


def test_idx_truncated_file_is_a_clear_error(tmp_path):
    images = np.zeros((4, 5, 5), np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*truncated"):
        datasets.load_idx(make_config(source="idx", data_dir=str(tmp_path), image_size=5), "test")


@pytest.mark.parametrize("case", ["gzip_tail", "huge_claim"])
def test_idx_reads_only_what_the_header_claims_and_the_file_can_hold(tmp_path, case):
    """A 10-image header followed by 256 MiB of gzipped zeros (~250 KB) used to be decompressed whole; a header
    claiming 2**32 x 2**32 bytes from a tiny file is refused before reading."""
    import gzip
    import tracemalloc
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    dims = (10, 5, 5) if case == "gzip_tail" else (1 << 31, 1 << 31, 1)
    header = b"\0\0\x08\x03" + np.array(dims, ">u4").tobytes()
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + b"\0" * 250)
        if case == "gzip_tail":
            for _ in range(256):
                f.write(b"\0" * (1 << 20))
    tracemalloc.start()
    with pytest.raises(ValueError, match="truncated or has the wrong size" if case == "gzip_tail"
                       else r"claims shape \(2147483648, 2147483648, 1\)") as info:
        datasets.read_idx(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(path) in str(info.value) and peak < 4 << 20


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    for source in ("idx", "cifar10_pickle", "image_folder"):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            datasets.get_dataset(make_config(source=source, data_dir=missing), "train", infinite=True,
                                 process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        datasets.load_idx(make_config(source="idx", data_dir=str(tmp_path)), "test")


# ---------------------------------------------------------------------------- CIFAR-10 pickles

def write_cifar(directory, rng, n_per_batch=6):
    import pickle
    directory.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(n_per_batch, -1)  # channel planes R, G, B
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": labels, b"batch_label": name.encode()}, f)
        truth[name] = (images, np.array(labels))
    return truth


def test_cifar10_pickles(tmp_path):
    truth = write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    config = make_config(source="cifar10_pickle", data_dir=str(tmp_path), image_size=32, num_channels=3)
    x, y = datasets.load_cifar10_pickle(config, "train")
    assert x.shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(x[6:12], truth["data_batch_2"][0])
    np.testing.assert_array_equal(y[6:12], truth["data_batch_2"][1])
    x, y = datasets.load_cifar10_pickle(config, "test")
    np.testing.assert_array_equal(x, truth["test_batch"][0])
    batch = take(datasets.get_dataset(config, "train", infinite=True, process_index=0, process_count=1), 1)[0]
    assert batch["x"].shape == (16, 32, 32, 3)


def test_cifar10_corrupt_and_wrong_size(tmp_path):
    import pickle
    write_cifar(tmp_path, np.random.default_rng(0))
    config = make_config(source="cifar10_pickle", data_dir=str(tmp_path), image_size=32, num_channels=3)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="CIFAR-10 pickle .*test_batch: corrupt pickle"):
        datasets.load_cifar10_pickle(config, "test")
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="test_batch.*3072"):
        datasets.load_cifar10_pickle(config, "test")


def test_cifar10_pickle_that_calls_os_system_runs_nothing(tmp_path):
    """A batch whose pickle calls ``os.system("touch <flag>")`` is refused naming the file and the global; the
    command never runs (plain ``pickle.load`` would create the flag file)."""
    write_cifar(tmp_path, np.random.default_rng(0))
    config = make_config(source="cifar10_pickle", data_dir=str(tmp_path), image_size=32, num_channels=3)
    flag = tmp_path / "pwned"
    evil = (b"\x80\x02}(C\x04data" + b"cos\nsystem\n(X" + len(f"touch {flag}").to_bytes(4, "little")
            + f"touch {flag}".encode() + b"tR" + b"C\x06labels]u.")
    (tmp_path / "test_batch").write_bytes(evil)
    with pytest.raises(ValueError) as info:
        datasets.load_cifar10_pickle(config, "test")
    message = str(info.value)
    assert not flag.exists()
    assert len(message.splitlines()) == 1 and str(tmp_path / "test_batch") in message and "os.system" in message


@pytest.mark.parametrize("case,message", [
    ("object_array", "dtype 'object' refused"),
    ("oversized", "MiB is more than the 64 MiB"),
    ("memo_bomb", "memo index"),
    ("huge_bytes_claim", "corrupt pickle"),
    ("nested", "nested more than"),
    ("many_objects", "more than 1048576 pickle opcodes"),
])
def test_cifar10_crafted_pickles_are_refused_before_allocating(tmp_path, case, message):
    import pickle
    write_cifar(tmp_path, np.random.default_rng(0))
    config = make_config(source="cifar10_pickle", data_dir=str(tmp_path), image_size=32, num_channels=3)
    path = tmp_path / "test_batch"
    if case == "object_array":
        path.write_bytes(pickle.dumps({b"data": np.array([None] * 3072, object)[None], b"labels": [0]}, protocol=2))
    elif case == "oversized":  # sparse: 65 MiB on disk claimed, a few bytes written
        with open(path, "wb") as f:
            f.truncate(65 << 20)
    elif case == "memo_bomb":  # LONG_BINPUT 2**31: the C unpickler would zero-fill a 16 GiB memo
        path.write_bytes(b"\x80\x02}r" + (1 << 31).to_bytes(4, "little") + b".")
    elif case == "huge_bytes_claim":  # BINBYTES8 claiming 2**40 bytes
        path.write_bytes(b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc.")
    elif case == "nested":
        path.write_bytes(b"\x80\x02" + b"]" * 500 + b"a" * 499 + b".")
    elif case == "many_objects":  # 4 MiB of "]": 4 million empty lists, ~260 MiB of objects
        path.write_bytes(b"\x80\x02(" + b"]" * (4 << 20) + b"l.")
    with pytest.raises(ValueError, match=message) as info:
        datasets.load_cifar10_pickle(config, "test")
    assert len(str(info.value).splitlines()) == 1 and str(path) in str(info.value)


def test_cifar10_pickles_of_every_protocol_load(tmp_path):
    """The restricted reader rebuilds the arrays numpy writes with protocols 2 to 5 (and Python 2's batches)."""
    import pickle
    rows = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"batch{protocol}"
        path.write_bytes(pickle.dumps({b"data": rows, b"labels": [1, 2, 3], b"batch_label": b"x"}, protocol=protocol))
        images, labels = datasets.read_cifar_batch(str(path))
        np.testing.assert_array_equal(images, rows.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(labels, [1, 2, 3])


# ---------------------------------------------------------------------------- image folders

def write_png(path, array):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_classes_resize_and_crop(tmp_path):
    rng = np.random.default_rng(0)
    small = {}
    for cls in ("cats", "dogs"):
        for i in range(3):
            small[(cls, i)] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            write_png(tmp_path / cls / f"{i}.png", small[(cls, i)])
    # a non-square image: resized to 8 on its short side then centre-cropped; a constant image stays constant
    write_png(tmp_path / "dogs" / "wide.png", np.full((16, 32, 3), 77, np.uint8))
    config = make_config(source="image_folder", data_dir=str(tmp_path), image_size=8, num_channels=3)
    x, y = datasets.load_image_folder(config, "train")
    assert x.shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(x[0], small[("cats", 0)])
    np.testing.assert_array_equal(x[6], np.full((8, 8, 3), 77, np.uint8))
    gray, _ = datasets.load_image_folder(make_config(source="image_folder", data_dir=str(tmp_path),
                                                     image_size=4, num_channels=1), "train")
    assert gray.shape == (7, 4, 4, 1)


def test_image_decompression_bomb_is_refused_from_its_header(tmp_path):
    """A 8192x8192 black PNG is ~70 KB but decodes to 64 MiB (192 MiB as RGB): refused before decoding."""
    import tracemalloc
    from PIL import Image
    path = tmp_path / "bomb.png"
    Image.new("L", (8192, 8192)).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"bomb.png is 8192x8192 pixels, more than the 16777216") as info:
        datasets.read_image(str(path), 8, 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(str(info.value).splitlines()) == 1 and peak < 4 << 20


def test_image_folder_centre_crop_keeps_the_middle(tmp_path):
    image = np.zeros((8, 24, 3), np.uint8)
    image[:, 8:16] = 255  # white middle third
    write_png(tmp_path / "a.png", image)
    x, y = datasets.load_image_folder(make_config(source="image_folder", data_dir=str(tmp_path), image_size=8,
                                                  num_channels=3), "test")
    np.testing.assert_array_equal(x[0], np.full((8, 8, 3), 255, np.uint8))
    np.testing.assert_array_equal(y, [0])


def test_image_folder_split_folders_and_errors(tmp_path):
    write_png(tmp_path / "train" / "a.png", np.zeros((4, 4, 3), np.uint8))
    config = make_config(source="image_folder", data_dir=str(tmp_path), image_size=4, num_channels=3)
    assert datasets.load_image_folder(config, "train")[0].shape == (1, 4, 4, 3)
    with pytest.raises(FileNotFoundError, match="none for split 'test'"):
        datasets.load_image_folder(config, "test")
    (tmp_path / "train" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="corrupt or unreadable image .*broken.png"):
        datasets.load_image_folder(config, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .* images found in .*empty"):
        datasets.load_image_folder(make_config(source="image_folder", data_dir=str(empty)), "train")


# ---------------------------------------------------------------------------- tfds (mocked, no network)

def tfds_config(dataset, size, channels):
    config = make_config(source="tfds", dataset=dataset, image_size=size, num_channels=channels,
                         shuffle_buffer=8)
    config.training.batch_size = 4
    config.eval.batch_size = 4
    return config


@pytest.mark.parametrize("dataset,size,channels", [("mnist", 28, 1), ("cifar10", 32, 3), ("celeb_a", 16, 3),
                                                   ("lsun/bedroom", 16, 3), ("svhn_cropped", 32, 3)])
def test_tfds_sources_mocked(dataset, size, channels):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tfds_config(dataset, size, channels)
    with tfds.testing.mock_data(num_examples=6):
        batches = take(datasets.get_dataset(config, "train", infinite=True, seed=0, process_index=0,
                                            process_count=1), 3)
        again = take(datasets.get_dataset(config, "train", infinite=True, seed=0, process_index=0,
                                          process_count=1), 3)
    for batch, other in zip(batches, again):
        assert batch["x"].shape == (4, size, size, channels) and batch["x"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["x"], other["x"])  # deterministic given the seed


def test_tfds_finite_matches_raw_data_and_shards():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tfds_config("mnist", 28, 1)
    with tfds.testing.mock_data(num_examples=7):
        raw = list(tfds.as_numpy(tfds.load("mnist", split="test")))
        x, y = collect(datasets.get_dataset(config, "eval", infinite=False, process_index=0, process_count=1))
        shards = [list(datasets.get_dataset(config, "eval", infinite=False, process_index=i, process_count=2))
                  for i in range(2)]
    transform = datasets.get_data_transform(config)
    np.testing.assert_array_equal(transform.inverse(x), np.stack([r["image"] for r in raw]))
    np.testing.assert_array_equal(y, [r["label"] for r in raw])
    assert len(shards[0]) == len(shards[1]) == 2  # ceil(ceil(7 / 2) / 2)
    parts = [np.concatenate([b["label"][b["mask"]] for b in s]) for s in shards]
    np.testing.assert_array_equal(parts[0], y[0::2])
    np.testing.assert_array_equal(parts[1], y[1::2])


def test_tfds_unknown_dataset_is_a_clear_error():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_dataset'"):
        datasets.tfds_builder(tfds_config("no_such_dataset", 8, 1))


def test_dropped_prefetcher_stops_its_thread():
    import gc
    import time

    it = datasets.get_dataset(make_config(source="toy", dataset="two_moons"), "train", infinite=True,
                              process_index=0, process_count=1)
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=2.0)
    assert not thread.is_alive()


# ---------------------------------------------------------------------------- augmentation, config, benchmark

def test_random_flip_mirrors_about_half():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1000, 4, 5, 2), dtype=np.uint8)
    out = datasets.random_flip(images, np.random.default_rng(1))
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 430 < mirrored.sum() < 570  # Binomial(1000, ½): ±4.4σ


def test_uniform_dequantization_fills_each_bin():
    transform = datasets.ImageTransform(centered=False, uniform_dequantization=True)
    u = np.repeat(np.arange(256, dtype=np.uint8), 400)
    x = transform.forward(u, np.random.default_rng(0))
    offset = 256.0 * x - u  # should be U[0, 1)
    assert offset.min() >= 0.0 and offset.max() < 1.0
    assert abs(offset.mean() - 0.5) < 0.005 and abs(offset.var() - 1 / 12) < 0.002


def test_eval_batches_are_not_flipped():
    config = make_config(random_flip=True)
    config.eval.batch_size = 297
    images, _ = datasets.load_digits(config, "test")
    batch = next(iter(datasets.get_dataset(config, "test", infinite=False, process_index=0, process_count=1)))
    np.testing.assert_array_equal(datasets.get_data_transform(config).inverse(batch["x"]), images)


def test_relative_data_dir_resolves_from_repo_root(tmp_path, monkeypatch):
    from conftest import shared_data_path

    shared_data_path("fashion_mnist")
    monkeypatch.chdir(tmp_path)  # "../shared/..." is now only meaningful relative to the repository
    config = make_config(source="idx", data_dir="../shared/data/fashion_mnist", image_size=28)
    import os
    assert datasets.resolve_data_dir(config) == os.path.join(datasets.REPO_ROOT, "../shared/data/fashion_mnist")


def test_fashion_mnist_config_loads_offline():
    from conftest import shared_data_path

    shared_data_path("fashion_mnist")
    from configs import fashion_mnist

    config = fashion_mnist.get_config()
    config.training.batch_size = 8
    batch = take(datasets.get_dataset(config, "train", infinite=True, process_index=0, process_count=1), 1)[0]
    assert batch["x"].shape == (8, 28, 28, 1) and config.model.name == "small_unet"
    assert config.sde.name == "vpsde"


def test_benchmark_runs(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--batches", "2", "--batch_size", "4", "--n_png", "4", "--cifar_per_batch", "4",
                 "--sources", "toy,cifar10_pickle,image_folder"])
    out = capsys.readouterr().out
    assert "cifar10_pickle" in out and "image_folder" in out and "images/s" in out


def test_process_defaults_from_jax():
    config = make_config()
    batch = take(datasets.get_dataset(config, "train", infinite=True), 1)[0]  # jax: process 0 of 1
    assert batch["x"].shape == (16, 8, 8, 1)
    with pytest.raises(ValueError, match="training.batch_size=16 must be a positive multiple"):
        datasets.get_dataset(config, "train", infinite=True, process_index=0, process_count=3)


CHILD = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[4])
import jax
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[1]}", num_processes=2,
                           process_id=int(sys.argv[2]))
import datasets
from configs.base import get_base_config
config = get_base_config()
config.eval.batch_size = 64
batches = list(datasets.get_dataset(config, "test", infinite=False))  # process index/count from jax
train = next(datasets.get_dataset(config, "train", infinite=True))
inverse = datasets.get_data_transform(config).inverse
np.savez(sys.argv[3], n=len(batches), train=train["x"],
         images=np.concatenate([inverse(b["x"])[b["mask"]] for b in batches]))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_jax_processes_shard_disjoint_and_complete(tmp_path):
    """Two real jax.distributed processes: defaults from jax.process_index()/process_count()."""
    import pathlib
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(port), str(i), str(tmp_path / f"{i}.npz"), repo])
             for i in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    out = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    assert int(out[0]["n"]) == int(out[1]["n"]) == 5  # ceil(ceil(297 / 2) / 32)
    assert not np.array_equal(out[0]["train"], out[1]["train"])
    images, _ = datasets.load_digits(make_config(), "test")
    np.testing.assert_array_equal(out[0]["images"], images[0::2])
    np.testing.assert_array_equal(out[1]["images"], images[1::2])


def test_image_folder_reads_jpeg_rgba_and_gray(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((6, 6, 3), 200, np.uint8)).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.full((6, 6, 4), 100, np.uint8)).save(tmp_path / "b.png")  # RGBA
    Image.fromarray(np.full((6, 6), 50, np.uint8)).save(tmp_path / "c.png")  # L
    config = make_config(source="image_folder", data_dir=str(tmp_path), image_size=6, num_channels=3)
    x, _ = datasets.load_image_folder(config, "train")
    assert x.shape == (3, 6, 6, 3)
    np.testing.assert_allclose(x.reshape(3, -1).mean(1), [200, 100, 50], atol=2)


@pytest.mark.parametrize("source_kwargs", [dict(random_flip=True, uniform_dequantization=True),
                                           dict(source="toy", dataset="swiss_roll")])
def test_start_step_resumes_the_stream_exactly(source_kwargs):
    """Batches 150..159 of a fresh stream == the first 10 of a stream started at 150 (crosses epochs of 1500)."""
    config = make_config(**source_kwargs)
    kwargs = dict(infinite=True, seed=5, process_index=0, process_count=1)
    full = take(datasets.get_dataset(config, "train", **kwargs), 160)[150:]
    resumed = take(datasets.get_dataset(config, "train", start_step=150, **kwargs), 10)
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["label"], b["label"])
