"""A domain classifier (Flax MLP or CNN) for small grayscale datasets, with its training loop and files: features
for a domain FID, logits for the classifier score."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

import safe_pickle
import utils
from evaluation.features import array_batches, extract_features


class DomainClassifier(nn.Module):
    """Classifier uint8 (N, H, W, C) -> (penultimate ReLU features (N, feature_dim), logits (N, num_classes)).

    arch "mlp": pixels -> Dense 256 -> ReLU -> Dense feature_dim -> ReLU -> Dense num_classes (fast on CPU).
    arch "cnn": stride-2 conv3×3 + ReLU stages until the map is at most 7×7, then the same two dense layers
    (about 25× slower to train on CPU: XLA's conv gradients are slow there).
    """
    num_classes: int
    arch: str = "mlp"
    feature_dim: int = 128

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        if self.arch == "cnn":
            for i in range(max(1, int(np.ceil(np.log2(images.shape[1] / 7.0))))):
                x = nn.relu(nn.Conv(32 * 2 ** i, (3, 3), strides=2)(x))
        else:
            x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        h = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return h, nn.Dense(self.num_classes)(h)


DOMAIN_ARCHS = ("mlp", "cnn")


def _domain_module(num_classes: int, arch: str = "mlp") -> DomainClassifier:
    if arch not in DOMAIN_ARCHS:
        raise ValueError(f"unknown domain classifier arch {arch!r}; valid: {list(DOMAIN_ARCHS)}")
    return DomainClassifier(num_classes, arch)


def train_domain_classifier(images_uint8, labels, key, num_steps: int = 1500, batch_size: int = 128,
                            learning_rate: float = 1e-3, arch: str = "mlp"):
    """Adam on cross-entropy over random minibatches (indices from ``fold_in(key, step)``); returns params."""
    import optax

    images, labels = jnp.asarray(images_uint8), jnp.asarray(labels, jnp.int32)
    module = _domain_module(int(labels.max()) + 1, arch)
    params = module.init(jax.random.fold_in(key, -1 & 0x7FFFFFFF), images[:1])["params"]
    opt = optax.adam(learning_rate)

    def loss_fn(p, x, y):
        _, logits = module.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit  # the data are arguments, not closed-over constants (XLA would fold them into the program)
    def train(p, images, labels):
        def step(carry, i):
            p, s = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, images.shape[0])
            grads = jax.grad(loss_fn)(p, images[idx], labels[idx])
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (p, opt.init(p)), jnp.arange(num_steps))[0][0]

    return jax.device_get(train(params, images, labels))


class DomainExtractor:
    """A trained domain classifier: uint8 images -> (features (N, 128), logits (N, K)), jitted once per shape."""

    name = "domain"
    dim = 128

    def __init__(self, params, num_classes: int, arch: str = "mlp", meta: Optional[Dict[str, Any]] = None):
        self.module = _domain_module(num_classes, arch)
        self.params = jax.device_put(params)
        self.meta = dict(meta or {})
        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def __call__(self, images_uint8):
        return self._apply(self.params, images_uint8)


DOMAIN_STEPS = 3000
DOMAIN_ARCH = "mlp"


def domain_classifier_path(cache_dir, dataset: str, image_size: int, num_channels: int) -> pathlib.Path:
    """``<cache_dir>/domain_<arch>_<dataset>_<H>x<W>x<C>.npz``."""
    return pathlib.Path(cache_dir) / f"domain_{DOMAIN_ARCH}_{dataset}_{image_size}x{image_size}x{num_channels}.npz"


def save_domain_classifier(path, params, meta: Dict[str, Any]) -> None:
    """Flattened params ('a/b/kernel') and a JSON ``meta`` record, written atomically."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    utils.atomic_savez(path, __meta__=np.array(json.dumps(meta)), **flat)


def load_domain_classifier(path) -> DomainExtractor:
    """A ``DomainExtractor`` from a file written by ``save_domain_classifier``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"domain classifier {path} does not exist; train it with "
                                f"`python tools/train_domain_classifier.py --config <config> --cache_dir {path.parent}`")
    arrays = safe_pickle.load_npz(path, "domain classifier")
    if "__meta__" not in arrays:
        raise ValueError(f"domain classifier {path} has no __meta__ entry; not written by save_domain_classifier")
    meta = json.loads(str(arrays.pop("__meta__")))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
    return DomainExtractor(params, int(meta["num_classes"]), meta["arch"], meta)


def get_domain_classifier(path, load_split: Callable[[str], Tuple[np.ndarray, np.ndarray]], key,
                          num_steps: int = DOMAIN_STEPS, data: Optional[Dict[str, Any]] = None) -> DomainExtractor:
    """Load the domain classifier at ``path``, or train it on ``load_split("train")`` (uint8 images (N, H, W, C),
    labels (N,)), measure its accuracy on ``load_split("test")`` and save it there; ``data`` (dataset, image_size,
    num_channels) is kept in its meta record."""
    path = pathlib.Path(path)
    if path.is_file():
        return load_domain_classifier(path)
    data = dict(data or {})
    images, labels = load_split("train")
    print(f"training the {data.get('dataset', '')} domain classifier ({num_steps} steps on {len(images)} images, "
          f"one compiled loop) into {path}", flush=True)
    params = train_domain_classifier(images, labels, key, num_steps=num_steps, arch=DOMAIN_ARCH)
    num_classes = int(labels.max()) + 1
    test_images, test_labels = load_split("test")
    extractor = DomainExtractor(params, num_classes, DOMAIN_ARCH)
    _, logits = extract_features(extractor, array_batches(test_images, 500), 500)
    meta = {"num_classes": num_classes, "arch": DOMAIN_ARCH, **data, "num_train": len(images),
            "num_steps": num_steps, "test_accuracy": float((logits.argmax(1) == test_labels).mean())}
    save_domain_classifier(path, params, meta)
    extractor.meta = meta
    return extractor
