"""Noise-conditional classifier p_t(y | x_t) on the 8×8 digits for classifier guidance (VP SDE, as
configs/default.py). Train it, then sample class-conditionally with a score model of the same SDE:

    python main.py --mode=train --config=configs/digits_classifier.py --workdir=/tmp/digits_clf
    python main.py --mode=sample --config=configs/default.py --workdir=/tmp/digits \\
        --config.sampling.task=class_conditional --config.sampling.classifier_workdir=/tmp/digits_clf \\
        --config.sampling.label=3 --config.sampling.guidance_scale=2.0
"""
from configs.default import get_config as get_default_config
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = get_default_config()
    config.training.loss = "classifier"        # losses.get_classifier_loss
    config.training.n_iters = 2000
    config.training.snapshot_sampling = False  # a classifier has no samples
    config.eval.enable_sampling = False
    config.model.name = "classifier"           # models/classifier.py
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.embed_dim = 32
    config.model.ema_rate = 0.99
    return apply_presets(config, preset)
