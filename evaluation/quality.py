"""What each data source reports about samples: its quality figure next to real held-out data, and the facts the
controllable-generation tasks check (a classifier of its labels, the palette its colours come from).

A new source registers here (``@register_quality_figure("name")``); the runners call ``quality_figures`` and look
the others up by ``config.data.source``, so they need no edit.
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import numpy as np

import datasets
from analytic import sliced_wasserstein
from evaluation import digits

QUALITY_FIGURES: Dict[str, Callable] = {}     # source -> figure(config, samples) -> dict of figures
LABEL_CLASSIFIERS: Dict[str, Callable] = {}   # source -> classify(uint8 images (N, H, W, C)) -> logits (N, K)
PALETTES: Dict[str, np.ndarray] = {}          # source -> (K, 3) colours its RGB images are tinted with


def register_quality_figure(source: str):
    """Function decorator adding ``figure(config, samples) -> dict`` to ``QUALITY_FIGURES`` under ``source``;
    ``samples`` are what ``--mode=sample`` writes (uint8 images, or float vectors)."""

    def wrap(fn):
        QUALITY_FIGURES[source] = fn
        return fn

    return wrap


def quality_figures(config, samples: np.ndarray) -> dict:
    """The quality figure of ``config.data.source`` for ``samples`` ({} when the source registers none)."""
    figure = QUALITY_FIGURES.get(config.data.source)
    return {} if figure is None else figure(config, samples)


@register_quality_figure("digits")
def digits_figure(config, samples: np.ndarray) -> dict:
    """A classifier trained on the real digits: confidence, entropy, domain FID (``digits.digits_quality``)."""
    return digits.digits_quality(samples)


@register_quality_figure("colored_digits")
def colored_digits_figure(config, samples: np.ndarray) -> dict:
    """``digits_figure`` of the gray versions, and the fraction of samples that are one palette colour."""
    return digits.colored_digits_quality(samples, datasets.COLOR_PALETTE)


@register_quality_figure("toy")
def toy_figure(config, samples: np.ndarray) -> dict:
    """Sliced Wasserstein distance to held-out data, and between two held-out sets as the floor."""
    real = datasets.draw_examples(config, "test", 2 * len(samples), seed=config.seed + 7)
    key = jax.random.key(0)
    return {"sliced_wasserstein_samples": float(sliced_wasserstein(key, samples, real[:len(samples)])),
            "sliced_wasserstein_real": float(sliced_wasserstein(key, real[len(samples):], real[:len(samples)])),
            "num_samples": int(len(samples))}


def digits_logits(images_uint8) -> np.ndarray:
    """Logits (N, 10) of the digits classifier (``digits.load_digits_classifier``)."""
    return digits.digits_features_logits(digits.load_digits_classifier(), images_uint8)[1]


LABEL_CLASSIFIERS["digits"] = digits_logits
PALETTES["colored_digits"] = datasets.COLOR_PALETTE
