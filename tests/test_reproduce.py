"""benchmarks/reproduce: NFE bookkeeping of the table-1 grid, resumable cells, and (slow) each table's pipeline
end to end on the ``minimal`` setting (20 training steps, N=40, 16 samples)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samplers
import sde_lib
from benchmarks.reproduce import common, table1, table_likelihood, table_objectives


def _gaussian_score(sde):
    """Exact score of p_t when the data are N(0, I): x(t) ~ N(0, (α² + σ²) I)."""
    def score(x, t):
        a, s = sde.alpha_sigma(t)
        return -x / (a**2 + s**2).reshape((-1,) + (1,) * (x.ndim - 1))
    return score


def test_grid_nfe_matches_samplers():
    """Every row's expected NFE (written from the formulas, not from the samplers) is what the sampler reports."""
    sde = sde_lib.VPSDE(N=24)  # the NFE formulas do not depend on the SDE; a short chain (N > β_max) keeps it fast
    rows = table1.sampler_grid(sde.N, low=3)
    assert len({r["label"] for r in rows}) == len(rows) == 15
    for row in rows:
        s = sde if row["N"] is None else dataclasses.replace(sde, N=row["N"])  # as common.draw does
        opts = dict(row["options"])
        if row["N"] is not None:
            assert s.N == row["N"] == 2 * sde.N
            opts.pop("num_steps")
        _, nfe = samplers.sample(jax.random.key(0), s, _gaussian_score(s), (2, 3), row["method"], mesh=None, **opts)
        if row["expected_nfe"] is None:  # adaptive ODE: 6 stages per step + 1 (FSAL start) + 1 denoising
            assert nfe > 0 and (nfe - 2) % 6 == 0, (row["label"], nfe)
        else:
            assert nfe == row["expected_nfe"], (row["label"], nfe, row["expected_nfe"])


def test_cell_store_resumes_and_records_na(tmp_path, capsys):
    calls = []

    def compute():
        calls.append(1)
        return {"fid": 1.5, "nfe": 10}

    def broken():
        raise NotImplementedError("no chain")

    store = common.CellStore(tmp_path, "t", 2)
    assert store.run("a", compute) == {"fid": 1.5, "nfe": 10, "cell_seconds": pytest.approx(0, abs=1)}
    assert store.run("b", broken)["error"].startswith("NotImplementedError")
    store2 = common.CellStore(tmp_path, "t", 2)
    store2.run("a", compute)
    store2.run("b", compute)
    assert len(calls) == 1 and store2.computed == 0
    assert "[t 2/2] b: NotImplementedError" in capsys.readouterr().out
    images = np.zeros((3, 8, 8, 1), np.uint8)       # samples of a cell: a PNG beside the JSON, not in it
    assert "images" not in store2.run("c", lambda: {"fid": 2.0, "images": images})
    assert (tmp_path / "cells" / "c.png").exists()
    assert "images" not in json.loads((tmp_path / "cells" / "c.json").read_text())


def test_concurrent_ensure_model_trains_once(tmp_path, monkeypatch):
    """Two table commands sharing a workdir: the lock makes the second wait and read the first's training."""
    import threading
    import time

    import experiment
    import run_lib

    calls = []

    def fake_train(exp, workdir):
        calls.append(workdir)
        time.sleep(0.3)
        return experiment.TrainState(step=exp.config.training.n_iters, params={}, ema_params={}, opt_state=())

    monkeypatch.setattr(run_lib, "train", fake_train)
    setting = common.get_setting("minimal")
    records = []
    threads = [threading.Thread(target=lambda: records.append(common.ensure_model(tmp_path, setting, "vp_dsm")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(records) == 2 and records[0] == records[1]
    assert records[0]["model"] == "vp_dsm" and records[0]["n_iters"] == setting.n_iters


def test_interrupted_training_is_not_recorded_as_done(tmp_path, monkeypatch):
    import experiment
    import run_lib

    monkeypatch.setattr(run_lib, "train", lambda exp, workdir: experiment.TrainState(
        step=exp.config.training.n_iters - 1, params={}, ema_params={}, opt_state=()))
    with pytest.raises(SystemExit, match="stopped at step 19 of 20; rerun"):
        common.ensure_model(tmp_path, common.get_setting("minimal"), "vp_dsm")
    assert not (common.model_dir(tmp_path, common.get_setting("minimal"), "vp_dsm") / "done.json").exists()


def test_unknown_setting_names_the_valid_ones():
    with pytest.raises(ValueError, match="minimal"):
        common.get_setting("huge")


def _check_rerun_is_noop(module, workdir, stem):
    before = {p: p.stat().st_mtime_ns for p in (workdir / stem / "cells").glob("*.json")}
    again = module.run(str(workdir), "minimal")
    assert again["computed_cells"] == 0
    assert {p: p.stat().st_mtime_ns for p in (workdir / stem / "cells").glob("*.json")} == before


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("repro")


@pytest.mark.slow
def test_table1_pipeline(workdir):
    res = table1.run(str(workdir), "minimal")
    setting = common.SETTINGS["minimal"]
    md = (workdir / "table1_minimal" / "table1_minimal.md").read_text()
    assert (workdir / "table1_minimal" / "table1_minimal.png").stat().st_size > 0
    for row in res["rows"]:
        assert f"| {row['label']} |" in md
        for sde in table1.SDES:
            cell = res["cells"][row["label"]][sde]
            if "error" in cell:  # only the sub-VP ancestral rows have no chain
                assert sde == "sub-VP" and "ancestral" in row["label"]
                continue
            assert cell["nfe"] == row["expected_nfe"] or row["expected_nfe"] is None
            assert f"/ {cell['nfe']} /" in md
    assert res["cells"][f"PC{setting.N} reverse diffusion"]["VP"]["nfe"] == 2 * setting.N
    _check_rerun_is_noop(table1, workdir, "table1_minimal")

    from benchmarks.reproduce import seeds  # seed spread of the PC vs P pair, on the same models

    spread = seeds.run(str(workdir), "minimal", seeds=2, sdes=["VP"])
    p_label, pc_label = spread["rows"]
    assert (p_label, pc_label) == (f"P{2 * setting.N} Euler-Maruyama", f"PC{setting.N} Euler-Maruyama")
    for label in (p_label, pc_label):
        vp = spread["cells"]["VP"][label]
        assert vp["values"][0] == res["cells"][label]["VP"]["fid"]  # seed 0 is Table 1's cell, reproduced
        assert vp["values"][1] != vp["values"][0] and vp["std"] == pytest.approx(np.std(vp["values"], ddof=1))
        assert spread["cells"]["VE"][label] == {"pending": True}
    md = (workdir / "table1_seeds_minimal" / "table1_seeds_minimal.md").read_text()
    assert "| VP |" in md and "| VE | pending |" in md


@pytest.mark.slow
def test_objectives_and_likelihood_pipelines(workdir):
    res = table_objectives.run(str(workdir), "minimal")
    md = (workdir / "table_objectives_minimal" / "table_objectives_minimal.md").read_text()
    for label, model in table_objectives.OBJECTIVES.items():
        assert f"| {label} |" in md
        c = res["cells"][label]
        assert c["quality"]["nfe"] == 2 * common.SETTINGS["minimal"].N
        assert ("error" in c["ddpm_bound"]) == (model not in table_objectives.VP_CHAIN)
        assert c["ode_bpd"]["num_examples"] == common.SETTINGS["minimal"].lik_examples
    _check_rerun_is_noop(table_objectives, workdir, "table_objectives_minimal")

    res = table_likelihood.run(str(workdir), "minimal")
    stored = json.loads((workdir / "table_likelihood_minimal" / "table_likelihood_minimal.json").read_text())
    assert stored["cells"].keys() == res["cells"].keys() == table_likelihood.MODELS.keys()
    for label, model in table_likelihood.MODELS.items():
        assert ("error" in res["cells"][label]["DDPM bound"]) == (not model.startswith("vp"))
        if model.startswith("vp"):  # the exact bound evaluates every one of the N terms
            assert res["cells"][label]["DDPM bound"]["nfe"] == common.SETTINGS["minimal"].N
    _check_rerun_is_noop(table_likelihood, workdir, "table_likelihood_minimal")


# ---- accelerator smoke run -------------------------------------------------------------------------------------
def _smoke_entry(steps_per_s: float, note: bool = False) -> dict:
    entry = {"config": "c.py", "published": "FID 1", "steps_per_s": steps_per_s, "batch": 128, "first_loss": 1.0,
             "last_loss": 0.9, "peak_memory_gb": 9.5, "s_per_noise_level": 0.01, "sample_batch": 128, "nfe": 100,
             "full_train_h": 1.0, "full_sampling_h": 1.0}
    return {**entry, "note": "pass 1: all recipes sharing the device"} if note else entry


def test_accelerator_smoke_merge_prefers_timed_figures(tmp_path):
    from benchmarks.reproduce import accelerator_smoke as smoke

    run1 = {"device": "NVIDIA H200", "results": {"vp": _smoke_entry(7.0, note=True), "ve": _smoke_entry(8.0, True)}}
    run2 = {"device": "NVIDIA H200", "results": {"vp": _smoke_entry(13.0), "ve": {"recipe": "ve", "error": "x"}}}
    paths = []
    for i, run in enumerate((run1, run2)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    merged = smoke.merge_runs([str(p) for p in paths], tmp_path)
    assert merged["vp"]["steps_per_s"] == 13.0 and "note" not in merged["vp"]  # the alone-on-the-device figure
    assert merged["ve"]["steps_per_s"] == 8.0 and "note" in merged["ve"]       # run 2 failed: run 1's, marked
    text = (tmp_path / "accelerator_smoke_h200.md").read_text()
    assert "13.00 (128)" in text and "sharing the device" in text
    run2["device"] = "NVIDIA H100"
    paths[1].write_text(json.dumps(run2))
    with pytest.raises(ValueError, match="different devices"):
        smoke.merge_runs([str(p) for p in paths], tmp_path)


@pytest.mark.slow
def test_accelerator_smoke_tiny_end_to_end(tmp_path):
    """The smoke script on shrunk recipes (CPU): main.py trains, the recipe's sampler runs, the NLL recipe gets
    bits/dim, and the projections follow from the measured rates."""
    from benchmarks.reproduce import accelerator_smoke as smoke

    results = smoke.main([f"--out={tmp_path}", "--recipes=ve,subvp_deep", "--tiny", "--steps=3", "--passes=1",
                          "--sample_steps=3", "--sample_batch=8", "--lik_examples=8"])
    ve, subvp = results["ve"], results["subvp_deep"]
    assert ve["nfe"] == 2 * 3 and subvp["nfe"] == 3  # reverse diffusion + Langevin vs Euler–Maruyama alone
    assert ve["sampler"] == "pc reverse_diffusion+langevin" and ve["finite"] and subvp["finite"]
    assert np.isfinite(subvp["bpd"]) and subvp["lik_examples"] == 8 and "bpd" not in ve
    for r in (ve, subvp):
        assert r["steps_per_s"] > 0 and r["batch"] == 8
        assert r["full_train_h"] == pytest.approx(1_300_001 / r["steps_per_s"] / 3600)
    text = (tmp_path / "accelerator_smoke.md").read_text()
    assert "configs/ve/cifar10_ncsnpp_continuous.py" in text and "NLL 2.99 bits/dim" in text


def test_real_reference_is_the_mean_and_spread_over_disjoint_sets(tmp_path, monkeypatch):
    """The real-data floor of a Fashion table: one figure per disjoint block of num_samples test images."""
    import datasets

    setting = dataclasses.replace(common.get_setting("cpu"), num_samples=3)
    images = np.arange(10)[:, None, None, None].astype(np.uint8) * np.ones((1, 2, 2, 1), np.uint8)
    seen = []
    monkeypatch.setattr(datasets, "uint8_split", lambda cfg, split: (images, None))
    monkeypatch.setattr(common, "quality", lambda cfg, wd, part: seen.append(part[:, 0, 0, 0].tolist()) or
                        {"fid": float(part.mean())})
    real = common.real_reference(setting, tmp_path)
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # disjoint, only as many full sets as the split holds
    assert real["fid_subsets"] == [1.0, 4.0, 7.0] and real["fid"] == 4.0 and real["size"] == 3
    assert real["fid_std"] == pytest.approx(3.0)
    assert common.real_reference(setting, tmp_path) == real and len(seen) == 3  # cached
    assert "4.00 ± 3.00 (mean ± std over 3 disjoint sets of 3" in common.real_note(real)


def test_seed_spread_difference_and_its_standard_error():
    from benchmarks.reproduce import seeds

    p, pc = seeds.summarize([1.0, 3.0]), seeds.summarize([0.0, 2.0])
    assert p["mean"] == 2.0 and p["std"] == pytest.approx(np.sqrt(2.0))
    d = seeds.difference(p, pc)
    assert d["mean"] == -1.0 and d["stderr"] == pytest.approx(np.sqrt(2.0 / 2 + 2.0 / 2))
    assert d["paired_stderr"] == 0.0  # both moved together: the difference is exactly -1 for each seed
    d = seeds.difference(seeds.summarize([1.0, 3.0, 2.0]), seeds.summarize([0.0, 3.0, 0.0]))
    assert d["paired_stderr"] == pytest.approx(np.std([-1.0, 0.0, -2.0], ddof=1) / np.sqrt(3))
    assert seeds.difference(seeds.summarize([1.0]), pc)["stderr"] is None  # one set: no spread to speak of


@pytest.mark.parametrize("script", ["table1", "table_objectives", "table_likelihood", "seeds"])
def test_report_only_computes_nothing(script, tmp_path, monkeypatch):
    """--report_only on a new workdir renders pending tables without training, sampling, classifier statistics
    or likelihoods: every expensive entry point is made to raise."""
    import importlib

    import datasets
    import run_lib

    def forbidden(*args, **kwargs):
        raise AssertionError("--report_only computed something")

    for module, name in ((common, "quality"), (common, "ensure_model"), (common, "draw"), (common, "bits_per_dim"),
                         (datasets, "uint8_split"), (run_lib, "fid_stats"), (run_lib, "train"),
                         (run_lib, "likelihood")):
        monkeypatch.setattr(module, name, forbidden)
    module = importlib.import_module(f"benchmarks.reproduce.{script}")
    args = dict(seeds=2) if script == "seeds" else {}
    res = module.run(str(tmp_path), "cpu", report_only=True, **args)
    assert res.get("fid_real_heldout") is None
    assert not list(tmp_path.rglob("cells/*.json"))
