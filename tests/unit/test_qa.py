"""engines/qa.py: the noise estimate and the QA figures the worker's gate compares with its
limits; each figure must tell a good engine output from a failed one (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engines import qa
from node.config import QALimits


def _phantom(n: int = 192) -> np.ndarray:
    """A soft-tissue disc (40 HU) with a brighter insert (90 HU) and a bone ring in air."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(yy, xx)
    image = np.full((n, n), -1000.0)
    image[r < 0.45 * n] = 1000.0
    image[r < 0.42 * n] = 40.0
    image[np.hypot(yy - 20, xx + 25) < 18] = 90.0
    return image.astype(np.float32)


@pytest.mark.parametrize(("correlation", "tolerance"), [(0.0, 0.1), (1.0, 0.2)])
def test_noise_sd_recovers_known_noise(correlation: float, tolerance: float) -> None:
    rng = np.random.default_rng(0)
    for sd in (5.0, 20.0, 60.0):
        noise = rng.normal(0.0, 1.0, (192, 192))
        if correlation:
            noise = ndimage.gaussian_filter(noise, correlation)
        image = _phantom() + (noise / noise.std() * sd).astype(np.float32)
        assert qa.noise_sd(image, ct=True) == pytest.approx(sd, rel=tolerance)


def test_noise_sd_of_mr_and_of_an_empty_slice() -> None:
    rng = np.random.default_rng(1)
    mr = (_phantom() + 1000.0).clip(0, None) + rng.normal(0, 15.0, (192, 192)).astype(np.float32)
    assert qa.noise_sd(mr, ct=False) == pytest.approx(15.0, rel=0.15)
    assert qa.noise_sd(np.full((64, 64), -1000.0, np.float32), ct=True) == 0.0


def test_the_ct_estimate_reads_only_the_box_round_the_tissue_and_gives_what_the_whole_slice_gives() -> None:
    """noise_sd filters a CT slice only in the box round its pixels above -300 HU, widened by
    the reach of the smoothing, the erosion and the local SD: the figure must be the one the
    whole slice gives, with fat just below that floor round the tissue (smoothed next to it, fat
    is tissue: mask pixels outside the box), bone along the box's edge, and the box in the
    middle of the image or near its edges (the crop then stops at the image's own edge)."""

    def whole(image: np.ndarray) -> float:  # the figure with no crop, in float64, as the module docstring defines it
        mask = qa._mask_of(qa._smooth(image), ct=True)
        x = image.astype(np.float64)
        mean = ndimage.uniform_filter(x, qa.LOCAL_SD_WINDOW)
        local = np.sqrt(np.clip(ndimage.uniform_filter(x * x, qa.LOCAL_SD_WINDOW) - mean * mean, 0.0, None))
        return float(np.percentile(local[mask], qa.LOCAL_SD_QUANTILE) / qa.LOCAL_SD_CORRECTION)

    rng = np.random.default_rng(4)
    tissue = np.full((96, 96), -250.0, np.float32) + rng.normal(0, 10.0, (96, 96)).astype(np.float32)
    tissue[:, -3:] = 1500.0  # bone along the box's edge
    body = np.pad(tissue, 14, constant_values=-300.01)
    for pad in (((200, 30), (150, 60)), ((0, 300), (0, 5)), ((3, 3), (300, 0))):
        image = np.pad(body, pad, constant_values=-1000.0)
        assert qa._tissue_crop(image).size < image.size
        assert qa.noise_sd(image, ct=True) == pytest.approx(whole(image), rel=1e-6)


def _textured_mr(n: int = 256) -> np.ndarray:
    """A bright disc (1000) with a dark-tissue half-disc (150), both with 8% of smooth texture:
    anatomy everywhere, no flat place for a window to find."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(yy, xx)
    image = np.where(r < 0.45 * n, 1000.0, 0.0)
    image[(r < 0.3 * n) & (xx < 0)] = 150.0
    texture = ndimage.gaussian_filter(np.random.default_rng(3).normal(0, 1, (n, n)), 1.5)
    return image + texture / texture.std() * 0.08 * image


@pytest.mark.parametrize(("sd", "tolerance"), [(10.0, 0.25), (20.0, 0.15), (50.0, 0.08), (100.0, 0.08)])
def test_noise_sd_of_textured_mr_with_rician_noise(sd: float, tolerance: float) -> None:
    """Real MR has no flat places: the 9x9 estimator read 5.3x and 2.8x the truth at the two
    low levels here; and at 100 the dark tissue's Rician noise is rectified (a plain median over
    the object reads 0.87x): only the blocks bright enough to be Gaussian measure it."""
    rng = np.random.default_rng(1)
    clean = _textured_mr()
    image = np.hypot(clean + rng.normal(0, sd, clean.shape), rng.normal(0, sd, clean.shape))
    assert qa.noise_sd(image.astype(np.float32), ct=False) == pytest.approx(sd, rel=tolerance)


def _noisy(seed: int = 0, sd: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    clean = _phantom()
    return clean, clean + np.random.default_rng(seed).normal(0, sd, clean.shape).astype(np.float32)


def test_a_denoiser_that_removes_only_noise_passes() -> None:
    clean, noisy = _noisy()
    figures = qa.measure(noisy[None], clean[None], "denoise", 1, ct=True)
    assert figures["noise_sd"] == pytest.approx(20.0, rel=0.1)
    assert figures["removed_ratio"] == pytest.approx(1.0, abs=0.15)
    assert figures["edge_ratio"] < 1.5 and figures["residual_mean"] < 3.0
    assert QALimits().failures(figures, ct=True) == []


def test_a_shift_of_mean_hu_is_caught() -> None:
    clean, noisy = _noisy()
    figures = qa.measure(noisy[None], (clean + 15.0)[None], "denoise", 1, ct=True)
    assert figures["residual_mean"] == pytest.approx(15.0, abs=2.0)
    failures = QALimits().failures(figures, ct=True)
    assert len(failures) == 1 and failures[0].startswith("residual_mean")
    assert QALimits().failures(figures, ct=False) == []  # the HU limit is for CT only


def test_a_blur_that_removes_edges_is_caught() -> None:
    _, noisy = _noisy(sd=5.0)
    figures = qa.measure(noisy[None], ndimage.gaussian_filter(noisy, 3.0)[None], "denoise", 1, ct=True)
    assert figures["edge_ratio"] > 3.0 and figures["edge_correlation"] > 0.3
    assert any(f.startswith("edge_ratio") for f in QALimits().failures(figures, ct=True))


def test_figures_are_the_worst_slice() -> None:
    clean, noisy = _noisy()
    before = np.stack([noisy, noisy])
    after = np.stack([clean, clean + 15.0])
    assert qa.measure(before, after, "denoise", 1, ct=True)["residual_mean"] == pytest.approx(15.0, abs=2.0)


def test_super_resolution_consistency_and_overshoot() -> None:
    low = _phantom(96)
    nearest = np.kron(low, np.ones((2, 2), np.float32))
    good = qa.measure(low[None], nearest[None], "sr", 2, ct=True)
    assert good["inconsistency"] == pytest.approx(0.0, abs=1e-6) and good["overshoot"] == 0.0
    # halos: a sharpening that over- and undershoots round every edge
    halo = nearest + 1.5 * (nearest - ndimage.gaussian_filter(nearest, 2.0))
    bad = qa.measure(low[None], halo[None], "sr", 2, ct=True)
    assert bad["overshoot"] > 1.0
    shifted = qa.measure(low[None], (nearest + 200.0)[None], "sr", 2, ct=True)
    assert shifted["inconsistency"] > 3.0
    assert any(f.startswith("inconsistency") for f in QALimits().failures(shifted, ct=True))


def test_strength_keeps_part_of_what_the_model_removed() -> None:
    before = np.array([[10.0, 20.0]], np.float32)
    after = np.array([[0.0, 0.0]], np.float32)
    assert np.array_equal(qa.apply_strength(before, after, 1.0), after)
    assert np.allclose(qa.apply_strength(before, after, 0.5), [[5.0, 10.0]])
