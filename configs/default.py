"""Default experiment: the 8×8 scikit-learn digits (embedded, no download), VP SDE, small U-Net.

Finishes in a few minutes on 2 CPU cores and writes a checkpoint, a PNG grid of samples and a quality figure.
"""
from configs.base import get_base_config
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = get_base_config()
    training = config.training
    training.batch_size = 128
    training.n_iters = 1000
    training.snapshot_freq = 1000
    training.log_freq = 100
    training.reduce_mean = True

    config.optim.lr = 2e-3
    config.optim.warmup = 100

    config.model.name = "small_unet"
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.ema_rate = 0.995

    config.sampling.num_samples = 64
    config.sampling.snr = 0.16
    config.sde.N = 500
    return apply_presets(config, preset)
