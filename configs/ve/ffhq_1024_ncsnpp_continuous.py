"""NCSN++ cont. (VE) on FFHQ 1024×1024 (score SDE paper, Fig. 1): 105.79M parameters.

Images come from a folder (``--config.data.data_dir=/path/to/ffhq1024``); σ_max = 1348, 2000 noise scales.
Training at this size needs accelerators with large memory; the batch size of the paper is 8.
"""
from configs import paper
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = paper.high_res(1024)
    config.data.dataset = "ffhq_1024"
    config.sde.sigma_max = 1348.0
    config.training.batch_size = 8
    config = paper.ncsnpp(config)
    model = config.model
    model.nf = 16
    model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    model.num_res_blocks = 1
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    return apply_presets(config, preset)
