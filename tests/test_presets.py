"""The quick preset (configs/presets.py) and the work a long job announces before it starts."""
import importlib
import pathlib

import numpy as np
import pytest

from configs import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
NOT_EXPERIMENTS = ("__init__", "base", "paper", "presets", "workdir")   # workdir.py takes a workdir, not a preset
CONFIGS = sorted(str(p.relative_to(REPO).with_suffix("")).replace("/", ".") for p in (REPO / "configs").rglob("*.py")
                 if p.stem not in NOT_EXPERIMENTS and "def get_config" in p.read_text())


@pytest.mark.parametrize("module", CONFIGS)
def test_every_config_takes_the_quick_preset(module):
    get_config = importlib.import_module(module).get_config
    full, quick = get_config(), get_config("quick")
    assert quick.eval.num_samples == 64 and quick.eval.likelihood.num_examples == 64
    assert quick.eval.likelihood.rtol == 1e-3 and quick.eval.fid_num_images == 5000
    assert full.eval.fid_num_images is None and full.eval.num_samples >= 1000
    assert quick.training.to_dict() == full.training.to_dict() and quick.model.to_dict() == full.model.to_dict()
    if quick.sampling.method == "pc" and quick.sampling.predictor not in presets.CHAIN_PREDICTORS:
        assert quick.sampling.num_steps == 100
    with pytest.raises(ValueError, match="unknown (preset|toy dataset) 'huge'"):
        get_config("huge")


def test_toy_config_string_combines_dataset_sde_and_preset():
    from configs import toy

    config = toy.get_config("two_moons,vesde,quick")
    assert (config.data.dataset, config.sde.name, config.eval.num_samples) == ("two_moons", "vesde", 64)
    assert toy.get_config("quick").data.dataset == "swiss_roll"
    assert toy.get_config("two_moons").eval.num_samples == 1000


def test_fashion_quick_sampling_and_likelihood_announce_their_work():
    """Before: 64 images × 1000 steps (64000k network evaluations); quick: 16 × 100."""
    import experiment
    import run_lib
    import sde_lib
    from configs import fashion_mnist

    full = experiment.Experiment.from_config(fashion_mnist.get_config())
    quick = experiment.Experiment.from_config(fashion_mnist.get_config("quick"))
    assert experiment.sampling_work(full, 64) == (
        "sampling 64 images with pc: 1000 NFE each = 0.064M network evaluations in 1 batch of 64")
    assert experiment.sampling_work(quick, 16) == (
        "sampling 16 images with pc: 100 NFE each = 0.0016M network evaluations in 1 batch of 16")
    cfg = fashion_mnist.get_config("quick")
    line = run_lib.likelihood_work(run_lib.likelihood_settings(cfg, sde_lib.get_sde(cfg.sde)), 64)
    assert line.startswith("likelihood on the first 64 test examples (tsit5, rtol 0.001, gaussian divergence")


def test_fid_stats_over_the_first_n_images(tmp_path, monkeypatch, capsys):
    import experiment
    import run_lib
    from evaluation import digits, reference
    from configs.default import get_config

    class Pixels:
        def __call__(self, images):
            return np.asarray(images).reshape(len(images), -1).astype(np.float32), None

    monkeypatch.setitem(run_lib.FEATURE_EXTRACTORS, "pixels", lambda config, workdir: Pixels())
    config = get_config("quick")
    config.eval.fid_extractors, config.eval.fid_num_images = "pixels", 300
    run_lib.fid_stats(experiment.Experiment.from_config(config), str(tmp_path))
    assert "FID reference statistics over the first 300 images of digits/train" in capsys.readouterr().out
    path = run_lib.fid_stats_path(config, tmp_path, "pixels")
    assert path.name == "digits_train300_8px_pixels.npz"
    stats = reference.load_stats(path)
    images, _ = digits.digits_uint8("train")
    assert stats["num_images"] == 300
    np.testing.assert_allclose(stats["mu"], images[:300].reshape(300, -1).mean(0), atol=1e-9)
