"""NCSN++ cont. (VE) on CelebA-HQ 256×256 (score SDE paper, Fig. 1/12): 65.57M parameters.

Images come from a folder of PNG/JPEG files (``--config.data.data_dir=/path/to/celebahq256``); σ_max = 348
(the largest pairwise distance of the data, Technique 1 of Song & Ermon 2020), 2000 noise scales.
"""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = paper.high_res(256)
    config.data.dataset = "celebahq_256"
    config.sde.sigma_max = 348.0
    config = paper.ncsnpp(config)
    model = config.model
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.num_res_blocks = 2
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    return apply_presets(config, preset)
