"""NCSNv2 on CIFAR-10 (Song & Ermon 2020): σ 50 → 0.01 over L = 232 levels, nf 128, ALD with ε = 6.2e-6 and 5
steps per level, EMA 0.999. 29.69M parameters (the architecture of the paper's code; score_sde's JAX port has
33.97M because its third RefineBlock is 2·nf wide, see models/ncsnv2.py)."""
from configs.ve import ncsn
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = ncsn.ncsnv2(32, sigma_max=50.0, num_scales=232, step_size=6.2e-6, n_steps=5, n_iters=300_001)
    return apply_presets(config, preset)
