"""DDPM (Ho et al. 2020) on CIFAR-10 as in score_sde: discrete VP chain with 1000 steps, L_simple, ancestral
sampling. The U-Net has 35.22M parameters (nf 128, ch_mult (1, 2, 2, 2), 2 blocks, attention at 16×16,
dropout 0.1) and predicts ε from the step index.
"""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = paper.cifar10()
    training = config.training
    training.loss = "ddpm"
    training.continuous = False
    training.reduce_mean = True

    config.sde.name = "vpsde"
    config.data.centered = True
    config.sampling.predictor = "ancestral_sampling"
    config.sampling.corrector = "none"

    model = config.model
    model.name = "ddpm"
    model.prediction = "eps"
    model.time_input = "index"
    model.ema_rate = 0.9999
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.conditional = True
    model.scale_by_sigma = False
    model.nonlinearity = "swish"
    return apply_presets(config, preset)
