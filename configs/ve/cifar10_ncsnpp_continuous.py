"""NCSN++ cont. (VE) on CIFAR-10 (score SDE paper, Table 3): 62.76M parameters; the network returns the score."""
from configs import paper


def get_config():
    return paper.ncsnpp(paper.cifar10())
