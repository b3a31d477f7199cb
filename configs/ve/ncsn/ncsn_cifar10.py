"""NCSN (Song & Ermon 2019) on CIFAR-10: σ 1 → 0.01 over L = 10 levels, RefineNet with conditional
InstanceNorm++ (nf 128), annealed Langevin dynamics with ε = 2e-5 and 100 steps per level, Adam lr 1e-3,
200k iterations, no EMA (evaluation uses the raw weights)."""
from configs import paper
from configs.ve import ncsn
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = ncsn.ncsn_family(paper.cifar10(), image_size=32, sigma_max=1.0, num_scales=10, step_size=2e-5,
                              n_steps=100)
    config.model.name = "ncsn"
    config.training.n_iters = 200_001
    config.optim.lr = 1e-3
    config.eval.use_ema = False
    return apply_presets(config, preset)
