"""NCSNv2 on CelebA 64×64 (Song & Ermon 2020): σ 90 → 0.01 over L = 500, ALD ε = 3.3e-6, 5 steps per level;
the same 4-stage network as CIFAR-10 (29.69M parameters)."""
from configs.ve import ncsn


def get_config():
    return ncsn.ncsnv2(64, sigma_max=90.0, num_scales=500, step_size=3.3e-6, n_steps=5, n_iters=210_001)
