"""Shared base config. Experiment configs call ``get_base_config()`` and edit the sections they change.

Sections: ``training`` (objective and loop), ``sampling``, ``eval``, ``data``, ``model`` (architecture and its
conventions), ``sde``, ``optim``. Every field can be overridden on the command line
(``--config.training.n_iters=200``); unknown keys are errors.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_base_config():
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.training = _training_section()
    config.sampling = _sampling_section()
    config.eval = _eval_section()
    config.data = _data_section()
    config.model = _model_section()
    config.sde = _sde_section()
    config.optim = _optim_section()
    config.convert = _convert_section()
    return config


def _training_section():
    training = ml_collections.ConfigDict()
    training.batch_size = 128              # global batch, split over all devices and processes
    training.n_iters = 1_300_001
    training.loss = "dsm"                  # key of losses.LOSSES
    training.reduce_mean = False           # mean (True) or sum (False) over data dimensions
    training.likelihood_weighting = False  # λ(t) = g(t)² (score-flow bound) instead of σ(t)²
    training.importance_sampling = False   # sample t ∝ λ(t)/σ(t)² to reduce variance of the weighted loss
    training.continuous = True             # continuous t ~ U[eps, T] or integer steps of the discrete chain
    training.log_freq = 50
    training.eval_freq = 500               # held-out loss (raw and EMA) every this many steps (> n_iters: never)
    training.eval_batches = 4              # ... on this many test batches of config.eval.batch_size; 0: all
    training.eval_quality = False          # ... and the quality figures of eval.num_samples EMA samples
    training.snapshot_freq = 10_000        # checkpoint every this many steps
    training.keep_checkpoints = 3
    training.snapshot_sampling = True      # write sample grids (PNG, also to TensorBoard) while training
    training.sample_freq = placeholder(int)  # sample grid every this many steps; None: at each checkpoint
    training.data_shards = placeholder(int)  # global batch read as this many data streams; None: one per
                                           # process (fix it to get the same batches on any process count)
    training.eps = placeholder(float)      # smallest training time; None: the SDE's eps
    training.single_sigma = 0.1            # noise std of loss "dsm_single" (Vincent's single-level DSM)
    training.ism_trace = "exact"           # loss "ism": exact (low dimension) | hutchinson
    training.projection = "rademacher"     # hutchinson / ssm / ssm_vr directions: gaussian | rademacher
    training.n_projections = 1             # directions per example for hutchinson / ssm / ssm_vr
    training.vlb_variance = "beta"         # loss "ddpm_vlb": σ_i² of p_θ(x_{i-1}|x_i), beta | posterior
    return training


def _sampling_section():
    sampling = ml_collections.ConfigDict()
    sampling.method = "pc"                 # key of samplers.SAMPLERS
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "langevin"
    sampling.snr = 0.16
    sampling.n_steps = 1                   # corrector steps per noise level
    sampling.denoise = True                # final Tweedie denoising step
    sampling.eps = placeholder(float)      # smallest sampling time; None: the SDE's eps
    sampling.num_samples = 64
    sampling.batch_size = 64
    sampling.outdir = placeholder(str)     # --mode=sample output folder; None: samples/<task>_<sampler>_seed<s>_...
    sampling.save_pngs = False             # also one PNG per image in <outdir>/images/
    # options of the other methods (samplers.SAMPLERS); a None placeholder keeps the method's own default
    sampling.num_steps = placeholder(int)  # noise levels / time nodes (pc: sde.N, ddim 100, dpm_solver++ 20, heun 18)
    sampling.grid = placeholder(str)       # time grid: uniform | log_snr | karras (EDM ρ=7)
    sampling.solver = "tsit5"              # ode: tsit5 | dopri5 = rk45 (adaptive, rtol/atol) | euler | heun (num_steps)
    sampling.rtol = 1e-5
    sampling.atol = 1e-5
    sampling.eta = 0.0                     # ddim: 0 deterministic, 1 DDPM-like
    sampling.order = 2                     # dpm_solver++: 2 (2M) or 3 (3M)
    sampling.ancestral_variance = placeholder(str)  # ancestral_sampling: beta | beta_tilde; None: the chain's usual
    sampling.ald_step_size = placeholder(float)     # ald / annealed_langevin ε; None: 2 snr² σ_min²
    sampling.step_rule = "ncsn"            # annealed_langevin: ncsn (fixed ε) | ncsnv2 (ε from NCSNv2's rule)
    sampling.step_size = placeholder(float)  # plain langevin ε; None: 0.1 σ(eps)²
    # controllable generation (controllable_generation.py), --mode=sample
    sampling.task = "unconditional"        # unconditional | inpaint | colorize | class_conditional | cfg
    sampling.mask = placeholder(str)       # inpaint: image file (white = known) or left|right|top|bottom|center|checkerboard
    sampling.num_particles = 16            # inpaint/colorize with method "smc" (SMCDiff particles per image)
    sampling.label = placeholder(int)      # class_conditional / cfg: the class; None: 0, 1, ..., K-1 cyclically
    sampling.guidance_scale = 1.0          # classifier scale w in s + w ∇log p_t(y|x); cfg: w in (1+w) s_y - w s_∅
    sampling.classifier_workdir = placeholder(str)  # class_conditional: workdir of a --mode=train classifier
    return sampling


def _eval_section():
    evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 128
    evaluate.num_samples = 1000
    evaluate.checkpoint = placeholder(int)  # None: every checkpoint in the workdir
    evaluate.use_ema = True
    evaluate.enable_loss = True            # --mode=eval: loss on the test split
    evaluate.enable_bpd = False            # --mode=eval: bits/dim via likelihood.py (config.eval.likelihood)
    evaluate.enable_sampling = True        # --mode=eval: eval.num_samples samples and their quality figures
    evaluate.fid_extractors = placeholder(str)     # comma list of run_lib.FEATURE_EXTRACTORS; None: by dataset
    evaluate.fid_split = "train"                   # reference split of the dataset statistics
    evaluate.fid_num_images = placeholder(int)     # reference statistics over the first n images; None: all
    evaluate.fid_stats_dir = placeholder(str)      # None: <workdir>/fid_stats
    evaluate.classifier_dir = placeholder(str)     # None: <workdir>/classifiers (domain classifiers)
    evaluate.inception_weights = placeholder(str)  # None: $SCORE_INCEPTION_WEIGHTS, cache, ../shared/data
    evaluate.samples = placeholder(str)    # --mode=eval_samples: a samples.npz or a folder of PNG images
    evaluate.likelihood = lik = ml_collections.ConfigDict()  # --mode=likelihood (likelihood.py)
    lik.method = "ode"                     # ode (probability-flow ODE) | ddpm_bound (DDPM variational bound)
    lik.split = "test"                     # batches of config.eval.batch_size
    lik.num_examples = placeholder(int)    # None: the whole split
    lik.divergence = "gaussian"            # exact | gaussian | rademacher (Hutchinson probes, fixed per solve)
    lik.num_probes = 1                     # Hutchinson probes per example, averaged
    lik.rtol = 1e-5
    lik.atol = 1e-5
    lik.solver = "tsit5"                   # key of likelihood.SOLVERS; "rk45": score_sde's NFE at equal rtol/atol
    lik.max_steps = 16384
    lik.eps = placeholder(float)           # start time of the ODE; None: the SDE's eps
    lik.bits = 8                           # bits of the data (ignored for continuous toy data)
    lik.dequantization = "uniform"         # uniform | none
    lik.num_draws = 1                      # K dequantization draws averaged per example
    lik.ddpm_variance = "beta"             # DDPM decoder variance: beta | posterior
    lik.ddpm_num_steps = placeholder(int)  # None: all N terms of the bound (exact); else a random subset
    return evaluate


def _data_section():
    data = ml_collections.ConfigDict()
    data.source = "digits"                 # digits | toy | idx | tfds | cifar10_pickle | image_folder
    data.dataset = "digits"
    data.data_dir = ""
    data.image_size = 8
    data.num_channels = 1
    data.num_classes = 10
    data.centered = True                   # model space [-1, 1] (True) or [0, 1] (False)
    data.random_flip = False
    data.uniform_dequantization = False
    data.prefetch = 2                      # batches prepared ahead by the background thread
    data.toy_eval_size = 10_000            # toy source: points in the fixed finite (evaluation) set
    data.shuffle_buffer = 10_000           # tfds source: shuffle buffer of the training stream
    data.manual_dir = ""                   # tfds source: manual_dir for datasets that need manual download
    return data


def _model_section():
    model = ml_collections.ConfigDict()
    model.name = "small_unet"              # key of models.MODELS
    model.prediction = "eps"               # eps | score | x0
    model.time_input = "t999"              # t | t999 | sigma | index | sigma_index
    model.ema_rate = 0.999
    model.dropout = 0.0
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    return model


def _sde_section():
    sde = ml_collections.ConfigDict()
    sde.name = "vpsde"                     # key of sde_lib.SDES
    sde.N = 1000
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01
    sde.sigma_max = 50.0
    return sde


def _optim_section():
    optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0
    return optim


def _convert_section():
    convert = ml_collections.ConfigDict()
    convert.checkpoint = ""                # --mode=convert: score_sde_pytorch .pth converted into workdir/checkpoints
    return convert
