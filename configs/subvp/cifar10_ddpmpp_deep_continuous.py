"""DDPM++ cont. (deep, sub-VP) on CIFAR-10: 8 residual blocks per resolution, 106.63M parameters."""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = paper.ddpmpp(paper.cifar10(), sde="subvpsde")
    config.model.num_res_blocks = 8
    return apply_presets(config, preset)
