"""NCSN++ cont. (deep, VE) on CIFAR-10: 8 residual blocks per resolution, 107.59M parameters."""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = paper.ncsnpp(paper.cifar10())
    config.model.num_res_blocks = 8
    return apply_presets(config, preset)
