"""Class-conditional score model on the 8×8 digits for classifier-free guidance: the small U-Net of
configs/default.py wrapped by ``class_conditional`` (label embedding as input channels), trained with label
dropout (loss ``dsm_cfg``). Sample with guidance w:

    python main.py --mode=train --config=configs/digits_cfg.py --workdir=/tmp/digits_cfg
    python main.py --mode=sample --config=configs/digits_cfg.py --workdir=/tmp/digits_cfg \\
        --config.sampling.task=cfg --config.sampling.guidance_scale=1.0
"""
from configs.default import get_config as get_default_config
from configs.presets import apply_presets


def get_config(preset: str = ""):
    config = get_default_config()
    config.training.loss = "dsm_cfg"           # losses.get_cfg_dsm_loss
    config.training.label_dropout = 0.1        # p(y -> ∅), ∅ = config.data.num_classes
    config.model.name = "class_conditional"    # models/classifier.py
    config.model.base = "small_unet"
    config.model.cond_channels = 4
    config.sampling.task = "cfg"
    config.sampling.guidance_scale = 1.0
    return apply_presets(config, preset)
