"""DDPM++ cont. (VP) on CIFAR-10 (score SDE paper, Table 3): 61.80M parameters, ε prediction from 999·t."""
from configs import paper


def get_config():
    return paper.ddpmpp(paper.cifar10(), sde="vpsde")
