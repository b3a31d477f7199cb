"""Train and save the domain classifier (Flax MLP) of a config's dataset, for the domain FID and IS.

    python tools/train_domain_classifier.py --config configs/default.py --cache_dir /tmp/classifiers [--steps 1500]

Trains on every image of the config's training split (uint8 as stored), reports the test accuracy and writes
``<cache_dir>/domain_mlp_<dataset>_<H>x<W>x<C>.npz``, where ``run_lib.domain_classifier`` looks for it
(``config.eval.classifier_dir``, default ``<workdir>/classifiers``). An existing file is replaced.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: classifiers.DOMAIN_STEPS)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()   # --help and bad arguments answer before JAX is imported

import run_lib  # noqa: E402
import utils  # noqa: E402
from evaluation import classifiers  # noqa: E402


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.steps = classifiers.DOMAIN_STEPS if args.steps is None else args.steps
    config = utils.load_config_file(args.config)
    d = config.data
    path = classifiers.domain_classifier_path(args.cache_dir, d.dataset, d.image_size, d.num_channels)
    if path.exists():
        path.unlink()
    t0 = time.time()
    extractor = run_lib.domain_classifier(config, args.cache_dir, num_steps=args.steps)
    print(f"trained in {time.time() - t0:.0f} s, test accuracy {extractor.meta['test_accuracy']:.4f}: {path}")


if __name__ == "__main__":
    main()
