"""DDPM++ cont. (sub-VP) on CIFAR-10: the VP architecture trained with the sub-VP SDE."""
from configs import paper


def get_config():
    return paper.ddpmpp(paper.cifar10(), sde="subvpsde")
