"""2-D toy experiments: ``configs/toy.py:<dataset>[,<sde>][,<preset>]``, dataset one of swiss_roll, two_moons,
8gaussians, checkerboard; sde one of vpsde (default), subvpsde, vesde; preset from ``configs/presets.py``. Example:

    python main.py --config=configs/toy.py:two_moons,vesde --workdir=/tmp/moons
"""
from configs.base import get_base_config
from configs.presets import apply_presets, split_presets

TOY_DATASETS = ("swiss_roll", "two_moons", "8gaussians", "checkerboard")


def get_config(spec: str = "swiss_roll"):
    spec, presets = split_presets(spec)
    dataset, _, sde = (spec or "swiss_roll").partition(",")
    if dataset not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {dataset!r} in configs/toy.py:<dataset>; choose from {TOY_DATASETS}")
    config = get_base_config()
    config.data.source = "toy"
    config.data.dataset = dataset
    config.data.dim = 2
    config.data.centered = False
    config.data.num_classes = 1

    training = config.training
    training.batch_size = 256
    training.n_iters = 3000
    training.snapshot_freq = 1000
    training.log_freq = 250
    training.reduce_mean = True

    config.optim.lr = 2e-3
    config.optim.warmup = 100

    config.model.name = "mlp"
    config.model.hidden = 128
    config.model.num_layers = 3
    config.model.embed_dim = 32
    config.model.ema_rate = 0.99

    config.sde.name = sde or "vpsde"
    config.sde.N = 500
    config.sde.sigma_max = 10.0
    if config.sde.name == "vesde":
        config.model.prediction = "eps"
        config.model.time_input = "sigma"
    config.sampling.num_samples = 1000
    config.sampling.corrector = "none"
    return apply_presets(config, ",".join(presets))
