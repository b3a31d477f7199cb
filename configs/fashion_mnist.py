"""Fashion-MNIST (28×28×1) from local IDX files, VP SDE, small U-Net; runs offline.

    python main.py --config=configs/fashion_mnist.py --workdir=/tmp/fm
    python main.py --config=configs/fashion_mnist.py --workdir=/tmp/fm --config.data.data_dir=/path/to/files

``config.data.data_dir`` must hold ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``. The default is the first existing one of

1. ``../shared/data/fashion_mnist`` beside this repository (the offline copy used by tests),
2. ``/usr/share/datasets/fashion-mnist`` — where Debian/Ubuntu's package installs them:
   ``sudo apt-get install dataset-fashion-mnist``,

and otherwise (1), so that the error names it. On a connected machine the same data also comes from
TensorFlow Datasets: ``--config.data.source=tfds --config.data.dataset=fashion_mnist --config.data.data_dir=``.
"""
import os

from configs.base import get_base_config
from configs.presets import apply_presets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIRS = (
    os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "fashion_mnist")),
    "/usr/share/datasets/fashion-mnist",
)


def default_data_dir() -> str:
    """The first of ``FASHION_MNIST_DIRS`` that exists (else the first, so a missing-directory error names it)."""
    return next((d for d in FASHION_MNIST_DIRS if os.path.isdir(d)), FASHION_MNIST_DIRS[0])


def get_config(preset: str = ""):
    config = get_base_config()
    data = config.data
    data.source = "idx"
    data.dataset = "fashion_mnist"
    data.data_dir = default_data_dir()
    data.image_size = 28
    data.num_channels = 1
    data.num_classes = 10
    data.centered = True
    data.random_flip = False  # clothes are roughly symmetric, but keep the data as published

    training = config.training
    training.batch_size = 128
    training.n_iters = 50_000
    training.snapshot_freq = 5_000
    training.log_freq = 100
    training.eval_freq = 1_000
    training.reduce_mean = True

    config.optim.lr = 1e-3
    config.optim.warmup = 500

    model = config.model
    model.name = "small_unet"
    model.nf = 32
    model.ch_mult = (1, 2, 2)  # 28 -> 14 -> 7
    model.num_res_blocks = 2
    model.dropout = 0.1
    model.ema_rate = 0.999

    config.sde.name = "vpsde"
    config.sde.N = 1000
    config.sampling.num_samples = 64
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"  # predictor-only, as the SDE paper's VP configs
    config.eval.batch_size = 256
    return apply_presets(config, preset)
