"""DDPM++ cont. (sub-VP) on CIFAR-10: the VP architecture trained with the sub-VP SDE."""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    return apply_presets(paper.ddpmpp(paper.cifar10(), sde="subvpsde"), preset)
