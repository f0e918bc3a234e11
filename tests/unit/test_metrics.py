"""train.metrics: PSNR/SSIM in a window, RMSE, and flat-region ROIs for bias and noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.metrics import CT_WINDOW, Roi, percentile_window, psnr, rmse, roi_bias_and_sd, ssim, uniform_rois


def _image(seed: int = 0, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-100, 200, shape).astype(np.float32)


def test_psnr_of_identical_images_is_infinite() -> None:
    img = _image()
    assert psnr(img, img.copy(), CT_WINDOW) == math.inf


@pytest.mark.parametrize("offset", [1.0, 4.0, 25.0])
def test_psnr_of_a_constant_offset(offset: float) -> None:
    target = np.full((32, 32), 40.0, dtype=np.float32)
    pred = target + np.float32(offset)
    lo, hi = CT_WINDOW
    assert psnr(pred, target, CT_WINDOW) == pytest.approx(20 * math.log10((hi - lo) / offset), abs=1e-4)


def test_psnr_uses_the_window_span() -> None:
    target = np.zeros((16, 16), dtype=np.float32)
    pred = target + 10.0
    assert psnr(pred, target, (-50.0, 50.0)) == pytest.approx(20.0, abs=1e-4)
    assert psnr(pred, target, (-500.0, 500.0)) == pytest.approx(40.0, abs=1e-4)


def test_psnr_clips_to_the_window() -> None:
    lo, hi = CT_WINDOW
    target = np.full((32, 32), 200.0, dtype=np.float32)
    pred = np.full((32, 32), 1200.0, dtype=np.float32)  # clipped to 240: an error of 40, not 1000
    assert psnr(pred, target, CT_WINDOW) == pytest.approx(20 * math.log10((hi - lo) / 40.0), abs=1e-4)
    # differences wholly outside the window do not count at all
    below_t = np.full((8, 8), -1000.0, dtype=np.float32)
    below_p = np.full((8, 8), -600.0, dtype=np.float32)
    assert psnr(below_p, below_t, CT_WINDOW) == math.inf
    assert ssim(below_p, below_t, CT_WINDOW) == pytest.approx(1.0)


def test_psnr_decreases_with_noise() -> None:
    target = _image()
    rng = np.random.default_rng(1)
    small = target + rng.normal(0, 2, target.shape).astype(np.float32)
    large = target + rng.normal(0, 20, target.shape).astype(np.float32)
    assert psnr(small, target, CT_WINDOW) > psnr(large, target, CT_WINDOW) + 15


def test_ssim_identical_is_one_and_lower_when_noisy() -> None:
    target = _image()
    assert ssim(target, target.copy(), CT_WINDOW) == pytest.approx(1.0)
    noisy = target + np.random.default_rng(2).normal(0, 30, target.shape).astype(np.float32)
    noisier = target + np.random.default_rng(3).normal(0, 80, target.shape).astype(np.float32)
    s_noisy, s_noisier = ssim(noisy, target, CT_WINDOW), ssim(noisier, target, CT_WINDOW)
    assert s_noisy < 0.99
    assert s_noisier < s_noisy


def test_rmse_known_values() -> None:
    target = np.zeros((4, 4), dtype=np.float32)
    pred = target.copy()
    pred[0, :] = 4.0  # 4 of 16 pixels off by 4: sqrt(4 * 16 / 16) = 2
    assert rmse(pred, target) == pytest.approx(2.0)
    assert rmse(target, target) == 0.0
    # not clipped to any window: HU errors count in full
    assert rmse(np.full((3, 3), 1000.0, np.float32), np.full((3, 3), -1000.0, np.float32)) == pytest.approx(2000.0)


def test_rmse_does_not_overflow_in_float16() -> None:
    pred = np.full((8, 8), 3000.0, dtype=np.float16)
    target = np.full((8, 8), -3000.0, dtype=np.float16)
    assert rmse(pred, target) == pytest.approx(6000.0)


def test_percentile_window() -> None:
    values = np.arange(1001, dtype=np.float32)
    lo, hi = percentile_window(values)
    assert lo == pytest.approx(5.0) and hi == pytest.approx(995.0)
    assert percentile_window(values, 10, 90) == pytest.approx((100.0, 900.0))


def _flat_and_textured() -> np.ndarray:
    """Left half: 40 HU with faint noise; right half: a strong texture in the same range."""
    rng = np.random.default_rng(0)
    img = np.empty((96, 128), dtype=np.float32)
    img[:, :64] = 40.0 + rng.normal(0, 1.0, (96, 64))
    img[:, 64:] = 40.0 + rng.uniform(-45, 45, (96, 64))
    return img


def _overlap(a: Roi, b: Roi) -> bool:
    return abs(a.top - b.top) < a.size and abs(a.left - b.left) < a.size


def test_uniform_rois_lie_in_the_flat_region_and_do_not_overlap() -> None:
    img = _flat_and_textured()
    rois = uniform_rois(img, (-50.0, 100.0), size=15, count=5)
    assert len(rois) == 5
    for roi in rois:
        assert roi.size == 15
        assert roi.top >= 0 and roi.left >= 0
        assert roi.top + roi.size <= img.shape[0]
        assert roi.left + roi.size <= 64  # entirely inside the flat half
        assert roi.of(img).shape == (15, 15)
        assert float(roi.of(img).std()) < 2.0
    for i, a in enumerate(rois):
        for b in rois[i + 1 :]:
            assert not _overlap(a, b)


def test_uniform_rois_respect_the_value_range() -> None:
    img = _flat_and_textured()
    img[:, :64] = 500.0  # the flat half is now out of range (bone), the textured one in range
    rois = uniform_rois(img, (-50.0, 100.0), size=15, count=3)
    assert rois, "the textured region still has in-range squares"
    for roi in rois:
        assert roi.left >= 64
        patch = roi.of(img)
        assert float(patch.min()) >= -50.0 and float(patch.max()) <= 100.0
    assert uniform_rois(np.full((64, 64), 1000.0, np.float32), (-50.0, 100.0)) == []


def test_uniform_rois_count_limited_by_space() -> None:
    img = np.full((40, 40), 40.0, dtype=np.float32)
    rois = uniform_rois(img, (0.0, 100.0), size=15, count=50)
    assert 1 <= len(rois) <= 4  # at most 2x2 non-overlapping 15-pixel squares fit in 40x40
    for i, a in enumerate(rois):
        assert a.top + a.size <= 40 and a.left + a.size <= 40
        for b in rois[i + 1 :]:
            assert not _overlap(a, b)


def test_roi_bias_and_sd_with_a_known_offset() -> None:
    target = _flat_and_textured()
    rois = uniform_rois(target, (-50.0, 100.0), size=15, count=4)
    assert rois
    pred = target + np.float32(7.5)
    bias, sd = roi_bias_and_sd(pred, target, rois)
    assert bias == pytest.approx(7.5, abs=1e-3)
    expected_sd = float(np.mean([r.of(target).std() for r in rois]))
    assert sd == pytest.approx(expected_sd, rel=1e-4)

    # a negative offset is a bias of the same size; the largest over the ROIs is reported
    pred = target - np.float32(3.0)
    first = rois[0]
    pred[first.top : first.top + first.size, first.left : first.left + first.size] -= 9.0
    bias, _ = roi_bias_and_sd(pred, target, rois)
    assert bias == pytest.approx(12.0, abs=1e-3)


def test_roi_bias_and_sd_without_rois_is_nan() -> None:
    img = _image()
    bias, sd = roi_bias_and_sd(img, img, [])
    assert math.isnan(bias) and math.isnan(sd)
