"""Presets: named edits applied on top of any config, chosen after a colon in ``--config``.

    python main.py --config=configs/fashion_mnist.py:quick --workdir=/tmp/fm
    python main.py --config=configs/toy.py:two_moons,vesde,quick --workdir=/tmp/moons

A config file's ``get_config(spec)`` receives the text after the colon (ml_collections' config string); preset
names may appear anywhere in its comma list. Command-line overrides (``--config.eval.num_samples=1000``) apply
after the preset. ``PRESETS`` lists them:

``quick`` — sized for a laptop CPU instead of an accelerator. Training is unchanged (so a quick workdir can be
evaluated at full size later); what it shrinks is the work after training:

| setting | default | quick |
|---|---|---|
| ``sampling.num_samples`` (image data) | config's (64) | at most 16 |
| ``sampling.num_steps`` (method ``pc`` with Euler–Maruyama) | ``sde.N`` (1000) | 100 |
| ``sampling.rtol`` / ``atol`` (method ``ode``) | 1e-5 | 1e-3 |
| ``eval.num_samples`` (FID/KID, quality figures) | 1000 | 64 |
| ``eval.likelihood.num_examples`` | every test image | 64 |
| ``eval.likelihood.rtol`` / ``atol`` | 1e-5 | 1e-3 |
| ``eval.fid_num_images`` (reference statistics, ``--mode=fid_stats``) | every image of the split | 5000 |

Figures from a quick run are noisy and biased (FID of 64 samples is far above the 50k-sample figure): compare
them only with figures of the same preset. Chain predictors (``reverse_diffusion``, ``ancestral_sampling``) need
``sde.N`` steps, so ``quick`` leaves their step count alone.
"""

CHAIN_PREDICTORS = ("reverse_diffusion", "ancestral_sampling")


def quick(config):
    """The ``quick`` preset (see the module docstring), in place."""
    sampling, ev = config.sampling, config.eval
    if config.data.source != "toy":
        sampling.num_samples = min(int(sampling.num_samples), 16)
        sampling.batch_size = min(int(sampling.batch_size), sampling.num_samples)
    if sampling.method == "pc" and sampling.predictor not in CHAIN_PREDICTORS and sampling.num_steps is None:
        sampling.num_steps = 100
    sampling.rtol = sampling.atol = 1e-3
    ev.num_samples = 64
    ev.likelihood.num_examples = 64
    ev.likelihood.rtol = ev.likelihood.atol = 1e-3
    ev.fid_num_images = 5000
    return config


PRESETS = {"quick": quick}


def split_presets(spec: str):
    """A config string -> (the rest, comma-joined; the preset names in it, in order)."""
    parts = [p.strip() for p in (spec or "").split(",") if p.strip()]
    return ",".join(p for p in parts if p not in PRESETS), [p for p in parts if p in PRESETS]


def apply_presets(config, spec: str = ""):
    """Apply the presets named in ``spec`` (a config string that holds nothing else); returns the config."""
    rest, names = split_presets(spec)
    if rest:
        raise ValueError(f"unknown preset {rest!r} after ':' in --config; presets: {sorted(PRESETS)}")
    for name in names:
        PRESETS[name](config)
    return config
