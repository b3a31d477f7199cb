"""NCSN++ cont. (VE) on CIFAR-10 (score SDE paper, Table 3): 62.76M parameters; the network returns the score."""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    return apply_presets(paper.ncsnpp(paper.cifar10()), preset)
