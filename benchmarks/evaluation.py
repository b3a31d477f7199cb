"""Throughput of the FID Inception-v3 feature extractor (images/s) on the default JAX backend.

    python benchmarks/evaluation.py [--batch 16] [--size 32] [--repeats 3] [--weights PATH]

Inputs are random uint8 images of ``size``×``size``×3 (resized to 299 inside, as for CIFAR-10 samples); the
first call (compilation) is timed separately. Also times the digits domain classifier for comparison.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default=None, help="inception npz (default: evaluation.inception's search path)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()   # --help and bad arguments answer before JAX is imported

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from evaluation import digits, inception  # noqa: E402


def throughput(extractor, images: np.ndarray, repeats: int):
    """(compile+first-call seconds, images per second over ``repeats`` further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(extractor(images)[0])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(extractor(images)[0])
    return first, repeats * len(images) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = jax.devices()[0]
    print(f"backend {jax.default_backend()} ({device.device_kind}), {jax.device_count()} device(s)")
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    first, rate = throughput(inception.InceptionExtractor(args.weights), images, args.repeats)
    print(f"inception features, batch {args.batch} of {args.size}x{args.size}: first call {first:.1f} s, "
          f"{rate:.1f} images/s")
    params = digits.load_digits_classifier(None)
    digits = images[:, :8, :8, :1]
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        digits.digits_features_logits(params, digits)
    print(f"digits classifier (numpy MLP): {args.repeats * len(digits) / (time.perf_counter() - t0):.0f} images/s")


if __name__ == "__main__":
    main()
