"""DDPM++ cont. (VP) on CIFAR-10 (score SDE paper, Table 3): 61.80M parameters, ε prediction from 999·t."""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    return apply_presets(paper.ddpmpp(paper.cifar10(), sde="vpsde"), preset)
