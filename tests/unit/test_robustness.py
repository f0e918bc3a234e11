"""bench/robustness.py and bench/robustness_node.py: the matrices cover issue 17's conditions,
a cell scores the model against its baseline on held-out real images, and a series written for
the node round-trips its pixels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import apply_rescale

from bench import acquisition as acq
from bench import robustness
from bench.robustness_node import write_series
from engines.manifest import load
from engines.registry import EngineOptions, open_engine
from tests.helpers import REPO
from train import metrics


def test_matrices_cover_the_conditions() -> None:
    names = {m: [c.name for c in robustness.cells_for(load(REPO / "models" / m))] for m in robustness.HELD_OUT_MODELS}
    assert len(names["ct-denoise"]) == 16 and {"sharp 5%", "very-smooth 100%"} <= set(names["ct-denoise"])
    assert any("bias" in n for n in names["mr-denoise"]) and any("1%" in n for n in names["mr-denoise"])
    assert "area only, noise 0 HU" in names["ct-sr2"] and any("1x3" in n for n in names["ct-sr2"])
    assert any("pf 5/8" in n for n in names["mr-sr2"]) and any("tukey" in n for n in names["mr-sr2"])


@pytest.mark.parametrize("model", ["ct-denoise", "ct-sr2"])
def test_a_cell_scores_the_model_and_its_baseline(model: str) -> None:
    engine = open_engine(REPO / "models" / model, EngineOptions(backend="onnxruntime", device="cpu", threads=1))
    manifest = engine.manifest
    held = robustness.held_out_slices("CT", 1)
    cell = robustness.cells_for(manifest)[5]
    result = robustness.run_cell(engine, manifest, cell, held, realisations=1, seed=0)
    base = robustness.baseline_name(manifest, result)
    row = result.summary(base, len(held))
    # each of the three figures is rounded to 3 decimals, so they agree to 1.5e-3, not 1e-3
    assert math.isfinite(row["gain"]) and row["gain"] == pytest.approx(
        row["model_psnr"] - row[f"{base}_psnr"], abs=1.5e-3 + 1e-9
    )
    if manifest.task == "denoise":
        assert row["input_psnr"] < row["nlm_psnr"] and "model_bias" in row
        # the oracle's h is the best of a grid that holds the fixed h = 0.8 SD
        assert row["nlm_fixed_psnr"] <= row["nlm_psnr"]
        assert row["gain_fixed"] == pytest.approx(row["model_psnr"] - row["nlm_fixed_psnr"], abs=1.5e-3 + 1e-9)
        # NLM's own bias over the same draws, one figure per slice (a few HU at this cell's dose)
        assert len(result.nlm_bias) == len(held) and 0.0 <= row["nlm_bias"] < 50.0
        assert 0.0 <= row["bias_se"] < 5.0
        # told the true SD (the verdict's figure) and, beside it, the level the node estimates
        assert (
            row["gain_estimated"] == pytest.approx(row["estimated_psnr"] - row["nlm_psnr"], abs=1.5e-3 + 1e-9)
            and row["estimated_psnr"] != row["model_psnr"]
        )
    else:
        assert base in ("lanczos", "bicubic") and "model_bias" not in row and "gain_estimated" not in row


def test_the_worst_slice_is_the_one_whose_draws_average_lowest() -> None:
    """Two slices, two draws each (the order run_cell adds them in): the cell's gain is the mean
    over all, the worst slice's its own draws' mean, which the cell's mean can hide."""
    result = robustness.CellResult()
    for model, nlm in ((40.0, 39.0), (42.0, 39.0), (30.0, 33.0), (31.0, 32.0)):  # slice 0: +1, +3; slice 1: -3, -1
        result.add("model", model)
        result.add("nlm", nlm)
    row = result.summary("nlm", 2)
    assert row["gain"] == 0.0 and (row["worst_slice"], row["worst_slice_gain"]) == (1, -2.0)


def test_models_scored_in_one_run_share_nlms_figures() -> None:
    """The first model's cell fills the cache with NLM's PSNR per draw and its bias; a second
    model's cell takes them from it (a planted entry shows it computes none of its own)."""
    engine = open_engine(REPO / "models" / "ct-denoise", EngineOptions(backend="onnxruntime", device="cpu", threads=1))
    held = robustness.held_out_slices("CT", 1)
    cell = robustness.ct_denoise_cells()[3]
    cache: robustness.NlmCache = {}
    first = robustness.run_cell(
        engine, engine.manifest, cell, held, realisations=1, seed=0, bias_draws=2, nlm_cache=cache
    )
    assert list(cache) == [(cell.name, held[0].name)] and cache[(cell.name, held[0].name)][1] == first.nlm_bias[0]
    assert cache[(cell.name, held[0].name)][0] == [(first.psnr["nlm"][0], first.psnr["nlm_fixed"][0])]
    planted: robustness.NlmCache = {(cell.name, held[0].name): ([(99.0, 98.0)], 7.0)}
    second = robustness.run_cell(engine, engine.manifest, cell, held, 1, 0, bias_draws=2, nlm_cache=planted)
    assert second.psnr["nlm"] == [99.0] and second.psnr["nlm_fixed"] == [98.0] and second.nlm_bias == [7.0]
    assert second.psnr["model"] == first.psnr["model"] and second.bias == first.bias


def test_roi_bias_takes_out_the_draws_noise_whatever_the_method_does_with_it() -> None:
    """Four draws whose low-frequency noise moves the ROI by +4, 0, +2, +2 HU (mean +2, not the
    0 of many draws). A method that shifts by 1.5 HU reads 1.5 exactly whether it passes that
    noise through (the outputs' mean alone would read 3.5) or removes it (their mean minus the
    inputs' would read -0.5)."""
    target = np.full((64, 64), 40.0, np.float32)
    rois = metrics.uniform_rois(target, robustness.SOFT_TISSUE)
    inputs = [target + offset for offset in (4.0, 0.0, 2.0, 2.0)]
    passed = [x + 1.5 for x in inputs]
    removed = [target + 1.5 for _ in inputs]
    assert metrics.roi_bias_and_sd(np.mean(passed, axis=0), target, rois)[0] == pytest.approx(3.5)
    assert robustness.roi_bias(passed, inputs, target, rois) == pytest.approx((1.5, 0.0))
    assert robustness.roi_bias(removed, inputs, target, rois) == pytest.approx((1.5, 0.0))
    # a shift that varies apart from the noise: its mean, and a standard error above zero
    varied = [x + d for x, d in zip(inputs, (1.0, 1.0, 2.0, 2.0), strict=True)]
    bias, se = robustness.roi_bias(varied, inputs, target, rois)
    assert bias == pytest.approx(1.5) and se == pytest.approx(np.std([1, 1, 2, 2], ddof=2) / 2.0)
    assert all(math.isnan(v) for v in robustness.roi_bias(passed, inputs, target, []))


def test_the_simulators_ct_noise_is_zero_mean() -> None:
    """roi_bias rests on E[input] = target: the mean of many draws' ROI means is within four
    standard errors of zero."""
    rng = np.random.default_rng(7)
    clean = np.full((96, 96), 40.0, np.float32)
    kernel = next(iter(acq.KERNELS.values()))
    means = [float(acq.ct_noise(clean, 0.7, kernel, 0.05, rng)[40:56, 40:56].mean()) for _ in range(64)]
    assert abs(np.mean(means)) < 4.0 * np.std(means, ddof=1) / np.sqrt(len(means))
    assert np.std(means) > 0.1  # the ROI means do vary: the estimator has something to cancel


def test_verdict_needs_worst_cell_mean_and_bias() -> None:
    good = {"worst_gain": 0.1, "mean_gain": 1.2, "max_bias": 1.5}
    assert robustness.verdict(good) == "PASS"
    assert robustness.verdict({**good, "worst_gain": -0.1}) == "FAIL"
    assert robustness.verdict({**good, "mean_gain": 0.9}) == "FAIL"
    assert robustness.verdict({**good, "max_bias": 2.5}) == "FAIL"


def test_series_for_the_node_keep_their_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ct = [rng.normal(0, 300, (32, 32)).astype(np.float32) - 200, np.full((32, 32), -3024.0, np.float32)]
    paths = write_series(tmp_path / "ct", "CT", ct, 0.5, "ct-denoise sharp 5%")
    for path, image in zip(paths, ct, strict=True):
        ds = dcmread(path)
        assert np.array_equal(apply_rescale(ds.pixel_array, ds), np.round(image + 1024) - 1024)
        assert ds.SeriesDescription == "ct-denoise sharp 5%" and float(ds.PixelSpacing[0]) == 0.5
    mr = [rng.uniform(0, 3000, (16, 16)).astype(np.float32)]
    ds = dcmread(write_series(tmp_path / "mr", "MR", mr, 1.0, "mr-denoise")[0])
    assert np.array_equal(ds.pixel_array, np.round(mr[0]).astype(np.uint16))


def test_the_nlm_oracle_is_the_best_psnr_of_its_grid() -> None:
    """`_best_nlm` (which bench/robustness_node.py adds up as PSNR figures) is one number: the
    best of the grid that run_cell also takes NLM's images from."""
    rng = np.random.default_rng(0)
    clean = np.zeros((64, 64), np.float32)
    clean[16:48, 16:48] = 100.0
    noisy = (clean + rng.normal(0.0, 20.0, clean.shape)).astype(np.float32)
    window = (-100.0, 200.0)
    grid = robustness._nlm_grid(noisy, clean, 20.0, window)
    assert set(grid) == set(robustness.NLM_H)
    best = robustness._best_nlm(noisy, clean, 20.0, window)
    assert isinstance(best, float) and best == max(score for score, _ in grid.values())
    assert best > float(robustness.metrics.psnr(noisy, clean, window))  # NLM does remove noise
