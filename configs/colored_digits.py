"""RGB 8×8 digits for colorization: scikit-learn's digits tinted with one of six equal-brightness colours each
(``datasets.load_colored_digits``, generated offline), VP SDE, the small U-Net of configs/default.py.

    python main.py --config=configs/colored_digits.py --workdir=/tmp/colored
    python main.py --mode=sample --config=configs/colored_digits.py --workdir=/tmp/colored \\
        --config.sampling.task=colorize

Every palette colour has the same channel sum, so a digit's gray image says nothing about its colour:
colorization must pick one of the six colours and paint the whole digit with it.
"""
from configs.default import get_config as get_default_config
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = get_default_config()
    config.data.source = "colored_digits"
    config.data.dataset = "colored_digits"
    config.data.num_channels = 3
    config.training.n_iters = 2000
    config.training.snapshot_freq = 2000
    return apply_presets(config, preset)
