"""Input-pipeline throughput of every local source (images/s, or points/s for toy data), as the training loop
sees it: ``get_dataset(config, "train", infinite=True)`` at the training batch size, through the prefetch thread.

    python benchmarks/data.py [--batch_size 128] [--batches 200] [--augment] [--sources digits,toy,...]

Sources: digits (embedded), toy (two_moons), idx (Fashion-MNIST from ../shared/data, skipped when missing),
cifar10_pickle (synthetic 32×32×3 pickles written to a temporary folder), image_folder (synthetic 64×64 PNGs
resized to 32). ``--augment`` turns on random flips and uniform dequantization (the heaviest transforms).
"Load" is the time to the first batch (reading, decoding and resizing the whole split); "images/s" is measured
over the following ``--batches`` batches. Compare with the model's training step time: input never limits a step
when batch_size / step_time is well below images/s.
"""
from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
from configs.base import get_base_config  # noqa: E402

SHARED_FASHION_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"


def write_cifar_pickles(directory: pathlib.Path, per_batch: int, rng: np.random.Generator) -> None:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": rng.integers(0, 10, per_batch).tolist()}, f)


def write_pngs(directory: pathlib.Path, n: int, rng: np.random.Generator) -> None:
    from PIL import Image

    for i in range(n):
        cls = directory / f"class_{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(cls / f"{i}.png")


def source_configs(tmp: pathlib.Path, n_png: int, cifar_per_batch: int) -> dict:
    """name -> config.data overrides; writes the synthetic files it needs into ``tmp``."""
    rng = np.random.default_rng(0)
    (tmp / "cifar").mkdir()
    write_cifar_pickles(tmp / "cifar", cifar_per_batch, rng)
    write_pngs(tmp / "png", n_png, rng)
    specs = {
        "digits": dict(source="digits", image_size=8, num_channels=1),
        "toy": dict(source="toy", dataset="two_moons"),
        "cifar10_pickle": dict(source="cifar10_pickle", data_dir=str(tmp / "cifar"), image_size=32,
                               num_channels=3),
        "image_folder": dict(source="image_folder", data_dir=str(tmp / "png"), image_size=32, num_channels=3),
    }
    if SHARED_FASHION_MNIST.is_dir():
        specs["idx"] = dict(source="idx", data_dir=str(SHARED_FASHION_MNIST), image_size=28, num_channels=1)
    return specs


def measure(overrides: dict, batch_size: int, batches: int, augment: bool):
    """(seconds to the first batch, examples per second over ``batches`` more batches, batch shape)."""
    config = get_base_config()
    config.training.batch_size = batch_size
    for key, value in overrides.items():
        setattr(config.data, key, value)
    config.data.random_flip = config.data.uniform_dequantization = augment
    t0 = time.perf_counter()
    iterator = datasets.get_dataset(config, "train", infinite=True, seed=0, process_index=0, process_count=1)
    shape = next(iterator)["x"].shape
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch_size / (time.perf_counter() - t0)
    iterator.close()
    return load, rate, shape


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--augment", action="store_true", help="random flip + uniform dequantization")
    parser.add_argument("--sources", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--n_png", type=int, default=2000, help="synthetic PNGs for image_folder")
    parser.add_argument("--cifar_per_batch", type=int, default=10_000, help="rows per synthetic CIFAR pickle")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        specs = source_configs(pathlib.Path(tmp), args.n_png, args.cifar_per_batch)
        wanted = [s for s in args.sources.split(",") if s] or list(specs)
        print(f"batch_size={args.batch_size} batches={args.batches} augment={args.augment}")
        print(f"{'source':<16}{'batch shape':<22}{'load s':>8}{'images/s':>14}")
        for name in wanted:
            if name not in specs:
                raise SystemExit(f"unknown source {name!r} in --sources; valid: {sorted(specs)}")
            load, rate, shape = measure(specs[name], args.batch_size, args.batches, args.augment)
            print(f"{name:<16}{str(shape):<22}{load:>8.2f}{rate:>14,.0f}")


if __name__ == "__main__":
    main()
