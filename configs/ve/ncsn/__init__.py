"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020) configs: discrete VE noise ladders, the SMLD loss and
annealed Langevin dynamics, with the hyper-parameters of the papers (ermongroup/ncsn, ermongroup/ncsnv2).

The networks take the integer index of σ on the descending ladder σ_max = σ_0 > ... > σ_{L-1} = σ_min
(``time_input="sigma_index"``) and return the score. The model's ladder is a reference to the SDE's
(``model.num_scales`` follows ``sde.N`` etc.), so ``--config.sde.N=...`` changes both.
"""
import ml_collections

from configs import paper


def add_convert_section(config):
    """``--mode=convert`` reads ``config.convert.checkpoint`` (a score_sde_pytorch ``.pth``)."""
    if "convert" not in config:
        config.convert = ml_collections.ConfigDict()
    config.convert.checkpoint = ""
    return config


def ncsn_family(config, *, image_size: int, sigma_max: float, num_scales: int, sigma_min: float = 0.01,
                step_size: float, n_steps: int):
    """VE ladder, SMLD loss, annealed Langevin sampling with step ε (``ald_step_size``) and ``n_steps`` per σ."""
    config.data.image_size = image_size
    config.data.centered = False  # the network maps [0, 1] to [-1, 1] itself
    sde = config.sde
    sde.name, sde.sigma_min, sde.sigma_max, sde.N = "vesde", sigma_min, sigma_max, num_scales

    training = config.training
    training.loss = "smld"
    training.continuous = False
    training.reduce_mean = False
    training.snapshot_freq = 5000

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "none"
    sampling.corrector = "ald"
    sampling.n_steps = n_steps
    sampling.ald_step_size = step_size
    sampling.denoise = True

    optim = config.optim
    optim.lr, optim.warmup, optim.grad_clip, optim.beta1, optim.eps, optim.weight_decay = 1e-4, 0, -1.0, 0.9, 1e-8, 0.0

    model = config.model
    model.prediction = "score"
    model.time_input = "sigma_index"
    model.nf = 128
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.dropout = 0.0
    model.ema_rate = 0.999
    model.sigma_min = sde.get_ref("sigma_min")
    model.sigma_max = sde.get_ref("sigma_max")
    model.num_scales = sde.get_ref("N")
    return add_convert_section(config)


def ncsnv2(image_size: int, sigma_max: float, num_scales: int, step_size: float, n_steps: int, n_iters: int,
           base=None):
    """NCSNv2 at ``image_size`` (4, 5 or 6 RefineNet stages chosen by the model from the size)."""
    config = base if base is not None else (paper.cifar10() if image_size == 32 else paper.high_res(image_size))
    config = ncsn_family(config, image_size=image_size, sigma_max=sigma_max, num_scales=num_scales,
                         step_size=step_size, n_steps=n_steps)
    config.model.name = "ncsnv2"
    config.training.n_iters = n_iters
    config.training.batch_size = 128
    return config
