"""NCSNv2 on CelebA 64×64 (Song & Ermon 2020): σ 90 → 0.01 over L = 500, ALD ε = 3.3e-6, 5 steps per level;
the same 4-stage network as CIFAR-10 (29.69M parameters)."""
from configs.ve import ncsn
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = ncsn.ncsnv2(64, sigma_max=90.0, num_scales=500, step_size=3.3e-6, n_steps=5, n_iters=210_001)
    return apply_presets(config, preset)
