"""NCSNv2 on FFHQ 256×256 (Song & Ermon 2020): σ 348 → 0.01 over L = 2311, ALD ε = 9e-7, 3 steps per level,
batch 32, Adam eps 1e-3; the 6-stage network (94.13M parameters)."""
from configs.ve import ncsn
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = ncsn.ncsnv2(256, sigma_max=348.0, num_scales=2311, step_size=9e-7, n_steps=3, n_iters=80_001)
    config.training.batch_size = 32
    config.optim.eps = 1e-3
    return apply_presets(config, preset)
