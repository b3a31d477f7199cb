"""NCSNv2 on LSUN bedroom 128×128 (Song & Ermon 2020): σ 190 → 0.01 over L = 1086, ALD ε = 1.8e-6, 3 steps per
level; the 5-stage network (83.45M parameters)."""
from configs.ve import ncsn
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = ncsn.ncsnv2(128, sigma_max=190.0, num_scales=1086, step_size=1.8e-6, n_steps=3, n_iters=150_001)
    return apply_presets(config, preset)
