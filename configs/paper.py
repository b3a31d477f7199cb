"""Shared settings of the score SDE paper's experiments (Song et al. 2021; score_sde's default configs).

Experiment files in ``configs/vp``, ``configs/subvp`` and ``configs/ve`` start from ``cifar10()`` or
``high_res(size)`` and set the architecture with ``ddpmpp(...)`` / ``ncsnpp(...)`` / the DDPM U-Net.
Conventions: VP/sub-VP networks predict ε from labels 999·t (score = −output/σ(t)); continuous VE NCSN++ networks
take σ(t), divide their output by σ themselves and return the score; the DDPM U-Net predicts ε from the step index.
"""
from configs.base import get_base_config


def _common(config):
    training = config.training
    training.batch_size = 128
    training.n_iters = 1_300_001
    training.snapshot_freq = 50_000
    training.log_freq = 50
    training.eval_freq = 100
    training.loss = "dsm"
    training.continuous = True
    training.reduce_mean = False
    training.likelihood_weighting = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.n_steps = 1
    sampling.snr = 0.16
    sampling.denoise = True

    optim = config.optim
    optim.optimizer = "adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.sde.N = 1000
    config.sde.beta_min = 0.1
    config.sde.beta_max = 20.0
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.model.dropout = 0.1
    config.model.dtype = "float32"  # compute dtype ("bfloat16" halves activation memory; params stay float32)
    return config


def cifar10():
    """CIFAR-10 32×32 from TensorFlow Datasets, random horizontal flips."""
    config = _common(get_base_config())
    data = config.data
    data.source = "tfds"
    data.dataset = "cifar10"
    data.image_size = 32
    data.num_channels = 3
    data.num_classes = 10
    data.random_flip = True
    data.uniform_dequantization = False
    config.eval.batch_size = 1024
    config.eval.num_samples = 50_000
    return config


def high_res(size: int):
    """CelebA-HQ / FFHQ style settings: images from a folder, batch 64, 2000 noise scales, no dropout."""
    config = _common(get_base_config())
    data = config.data
    data.source = "image_folder"
    data.dataset = "image_folder"
    data.image_size = size
    data.num_channels = 3
    data.num_classes = 1
    data.random_flip = True
    data.centered = False
    config.training.batch_size = 64
    config.training.n_iters = 2_400_001
    config.sde.N = 2000
    config.sampling.snr = 0.075
    config.model.dropout = 0.0
    config.eval.batch_size = 64
    return config


def ncsnpp_family(config, *, fir: bool, embedding_type: str, progressive: str = "none",
                  progressive_input: str = "none", scale_by_sigma: bool = False):
    """The NCSN++/DDPM++ architecture (CIFAR-10 size by default: nf 128, ch_mult (1,2,2,2), 4 blocks)."""
    model = config.model
    model.name = "ncsnpp"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = fir
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = progressive
    model.progressive_input = progressive_input
    model.progressive_combine = "sum"
    model.embedding_type = embedding_type
    model.fourier_scale = 16.0
    model.init_scale = 0.0
    model.scale_by_sigma = scale_by_sigma
    model.nonlinearity = "swish"
    # σ ladder of the model itself (only used by scale_by_sigma with positional embeddings, i.e. discrete VE)
    model.sigma_min = config.sde.sigma_min
    model.sigma_max = config.sde.sigma_max
    model.num_scales = config.sde.N
    return config


def ddpmpp(config, sde: str = "vpsde"):
    """DDPM++ (continuous VP / sub-VP): BigGAN blocks, no FIR, sinusoidal embedding of 999·t, ε prediction."""
    config = ncsnpp_family(config, fir=False, embedding_type="positional")
    config.sde.name = sde
    config.data.centered = True
    config.training.reduce_mean = True
    config.model.ema_rate = 0.9999
    config.model.prediction = "eps"
    config.model.time_input = "t999"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    return config


def ncsnpp(config):
    """NCSN++ (continuous VE): FIR, Fourier features of log σ, residual input pyramid, output divided by σ."""
    config = ncsnpp_family(config, fir=True, embedding_type="fourier", progressive_input="residual",
                           scale_by_sigma=True)
    config.sde.name = "vesde"
    config.data.centered = False  # the model maps [0, 1] to [-1, 1] itself
    config.model.ema_rate = 0.999
    config.model.prediction = "score"
    config.model.time_input = "sigma"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    return config
