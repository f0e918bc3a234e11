"""Training over the conditions a hospital produces (issue 17): each range of a preset's
degradation is drawn, reaches the images, and keeps fixed conditions reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from engines.normalization import Normalization
from engines.qa import object_mask
from train.data import Bank, Slab, added_noise_level, degrade
from train.degrade import LowDoseCT, ct_downsample, filter_window, kernel_blur, mr_kspace_truncate, smooth_field
from train.phantoms import ct_phantom, mr_phantom
from train.presets import APODISATIONS, PRESETS, RECON_FILTERS, Degradation


@pytest.fixture(scope="module")
def ct_slab() -> Slab:
    pixels, spacing = ct_phantom(np.random.default_rng(1), size=128, slices=1)
    return Slab(pixels, spacing)


@pytest.fixture(scope="module")
def mr_slab() -> Slab:
    pixels, spacing = mr_phantom(np.random.default_rng(1), size=128, slices=1)
    return Slab(pixels, spacing)


def _highpass_power(image: np.ndarray) -> float:
    return float(np.mean((image - ndimage.gaussian_filter(image, 1.0)) ** 2))


def test_filter_windows_run_from_sharp_to_smooth() -> None:
    f = np.linspace(0.0, 0.5, 501)
    # the FBP noise power each passes, the integral of |f| W(f)^2: ramp the most, Hann the least
    noise = [float(np.sum(f * filter_window(name, f) ** 2)) for name in RECON_FILTERS]
    assert all(float(filter_window(name, f)[0]) == pytest.approx(1.0) for name in RECON_FILTERS)
    assert noise == sorted(noise, reverse=True) and noise[0] > 5 * noise[-1]
    assert float(filter_window("hann", f)[-1]) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="unknown reconstruction filter"):
        filter_window("bone", f)


def test_kernel_blur_keeps_the_mean_and_smooths_by_filter(ct_slab: Slab) -> None:
    hu = ct_slab.pixels[0]
    powers = [_highpass_power(kernel_blur(hu, name)) for name in RECON_FILTERS]
    assert powers == sorted(powers, reverse=True)  # smoother filter, less fine detail
    assert np.array_equal(kernel_blur(hu, "ramp"), hu)
    assert float(kernel_blur(hu, "hann").mean()) == pytest.approx(float(hu.mean()), abs=0.5)


def test_ct_noise_follows_the_filter_and_the_target_is_blurred_alike(ct_slab: Slab) -> None:
    sim = LowDoseCT()
    sds, targets = {}, {}
    for name in ("ramp", "hann"):
        deg = Degradation("lowdose-ct", dose=(0.25, 0.25), recon_filters=(name,))
        low, target = degrade(ct_slab, deg, np.random.default_rng(3), sim)
        sds[name], targets[name] = float(np.std(low[0] - target)), target
    assert sds["ramp"] > 1.5 * sds["hann"]  # a sharp kernel passes more noise
    assert np.array_equal(targets["ramp"], ct_slab.pixels[0])
    assert np.allclose(targets["hann"], kernel_blur(ct_slab.pixels[0], "hann"), atol=1e-3)


def test_dose_range_is_drawn_log_uniformly_and_fixed_bounds_reproduce(ct_slab: Slab) -> None:
    sim = LowDoseCT()
    wide = Degradation("lowdose-ct", dose=(0.05, 1.0))
    sds = [float(np.std(np.subtract(*degrade(ct_slab, wide, np.random.default_rng(s), sim)))) for s in range(8)]
    assert max(sds) > 2.5 * min(sds)  # a decade of dose is ~3x in noise SD
    fixed = Degradation("lowdose-ct")
    a = degrade(ct_slab, fixed, np.random.default_rng(5), sim)[0]
    b = degrade(ct_slab, fixed, np.random.default_rng(5), sim)[0]
    assert np.array_equal(a, b)


def test_post_smoothing_applies_to_input_and_target(ct_slab: Slab) -> None:
    deg = Degradation("lowdose-ct", recon_filters=("ramp",), post_smooth_px=(1.0, 1.0 + 1e-9))
    low, target = degrade(ct_slab, deg, np.random.default_rng(0), LowDoseCT())
    assert _highpass_power(target) < 0.5 * _highpass_power(ct_slab.pixels[0])
    sharp = degrade(ct_slab, Degradation("lowdose-ct", recon_filters=("ramp",)), np.random.default_rng(0))
    assert np.std(low[0] - target) < 0.6 * np.std(sharp[0][0] - sharp[1])


def test_noise_sd_sets_the_added_noise_level_over_soft_tissue(ct_slab: Slab) -> None:
    sim = LowDoseCT()
    tissue = object_mask(kernel_blur(ct_slab.pixels[0], "hann"), ct=True)  # the target's soft tissue
    for sd in (1.0, 40.0, 250.0):
        deg = Degradation("lowdose-ct", recon_filters=("hann",), noise_sd=(sd, sd))
        low, target = degrade(ct_slab, deg, np.random.default_rng(4), sim)
        assert float(np.std((low[0] - target)[tissue])) == pytest.approx(sd, rel=1e-3)
    wide = Degradation("lowdose-ct", noise_sd=(0.7, 300.0))
    sds = [
        float(np.std((np.subtract(*degrade(ct_slab, wide, np.random.default_rng(s), sim)))[0][tissue]))
        for s in range(12)
    ]
    assert min(sds) >= 0.69 and max(sds) <= 301 and max(sds) > 20 * min(sds)  # log-uniform over the decades


def test_texture_is_in_the_target_and_the_input_alike(ct_slab: Slab, mr_slab: Slab) -> None:
    sim = LowDoseCT()
    tissue = object_mask(ct_slab.pixels[0], ct=True)
    deg = Degradation("lowdose-ct", recon_filters=("ramp",), noise_sd=(5.0, 5.0), texture_sd=(12.0, 12.0))
    low, target = degrade(ct_slab, deg, np.random.default_rng(6), sim)
    assert float(np.std((target - ct_slab.pixels[0])[tissue])) == pytest.approx(12.0, rel=1e-3)
    assert float(np.std((low[0] - target)[tissue])) == pytest.approx(5.0, rel=1e-3)  # the added noise alone
    # the two exposures are independent: their noise is uncorrelated
    corr = np.corrcoef((low[0] - target)[tissue], (target - ct_slab.pixels[0])[tissue])[0, 1]
    assert abs(corr) < 0.1
    rician_deg = Degradation("rician", sigma_percent=(0.001, 0.001), texture_sd=(3.0, 3.0))
    low, target = degrade(mr_slab, rician_deg, np.random.default_rng(2), None)
    bright = float(np.percentile(mr_slab.pixels[0], 99.5))
    inside = mr_slab.pixels[0] > 0.3 * bright
    assert float(np.std((target - mr_slab.pixels[0])[inside])) == pytest.approx(0.03 * bright, rel=0.15)
    assert np.allclose(low[0], target, atol=0.001 * bright)


def test_white_fraction_puts_noise_power_beyond_the_reconstructions_band(ct_slab: Slab) -> None:
    sim = LowDoseCT()
    fy, fx = np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij")
    corners = np.hypot(fy, fx) > 0.5  # beyond the radial Nyquist frequency FBP reconstructs to

    def corner_share(white: float) -> float:
        deg = Degradation("lowdose-ct", recon_filters=("ramp",), noise_sd=(30.0, 30.0), white_fraction=(white, white))
        low, target = degrade(ct_slab, deg, np.random.default_rng(8), sim)
        power = np.abs(np.fft.fft2(low[0] - target)) ** 2
        return float(power[corners].sum() / power.sum())

    physics, mixed = corner_share(0.0), corner_share(0.8)
    assert physics < 0.12 and mixed > physics + 0.08  # white noise has ~21% of its power there
    tissue = object_mask(ct_slab.pixels[0], ct=True)
    deg = Degradation("lowdose-ct", recon_filters=("ramp",), noise_sd=(30.0, 30.0), white_fraction=(0.8, 0.8))
    low, target = degrade(ct_slab, deg, np.random.default_rng(8), sim)
    assert float(np.std((low[0] - target)[tissue])) == pytest.approx(30.0, rel=1e-3)  # the level is kept


def test_white_slope_moves_the_pixel_independent_noise_to_the_grids_corners(ct_slab: Slab) -> None:
    """White noise has 4% of its power where both frequencies are above 0.4 cycles per pixel
    (the corners' share of the grid); coloured as |f|^1.5, as a sharp or edge-enhancing
    kernel's noise is, more than twice that. The level drawn is kept either way."""
    sim = LowDoseCT()
    fy, fx = np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij")
    corners = np.minimum(np.abs(fy), np.abs(fx)) > 0.4

    def run(slope: float) -> tuple[float, float]:
        deg = Degradation(
            "lowdose-ct",
            recon_filters=("ramp",),
            noise_sd=(30.0, 30.0),
            white_fraction=(1.0, 1.0),
            white_slope=(slope, slope),
        )
        low, target = degrade(ct_slab, deg, np.random.default_rng(8), sim)
        power = np.abs(np.fft.fft2(low[0] - target)) ** 2
        tissue = object_mask(target, ct=True)
        return float(power[corners].sum() / power.sum()), float(np.std((low[0] - target)[tissue]))

    (white, white_sd), (steep, steep_sd) = run(0.0), run(1.5)
    assert white == pytest.approx(float(corners.mean()), rel=0.25)
    assert steep > 2.0 * white
    assert white_sd == pytest.approx(30.0, rel=1e-3) and steep_sd == pytest.approx(30.0, rel=1e-3)


def test_sharpen_lifts_the_high_frequencies_of_noise_and_anatomy_alike(ct_slab: Slab) -> None:
    """An edge-enhancing kernel: more of the noise's power near the grid's corners than the ramp
    gives, the same enhancement in the target (the scanner shows the anatomy through it too),
    the noise level still the one drawn, and the mean HU of the target unchanged."""
    sim = LowDoseCT()
    fy, fx = np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij")
    high = np.hypot(fy, fx) > 0.35

    def run(amount: float) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        deg = Degradation("lowdose-ct", recon_filters=("ramp",), noise_sd=(30.0, 30.0), sharpen=(amount, amount))
        low, target = degrade(ct_slab, deg, np.random.default_rng(8), sim)
        return low[0], target

    def high_share(image: NDArray[np.float32]) -> float:
        power = np.abs(np.fft.fft2(image)) ** 2
        return float(power[high].sum() / power.sum())

    (low0, target0), (low1, target1) = run(0.0), run(1.5)
    assert high_share(low1 - target1) > high_share(low0 - target0) + 0.05  # ramp alone: 0.54, amount 1.5: 0.63
    assert high_share(target1 - target1.mean()) > high_share(target0 - target0.mean())
    tissue = object_mask(target1, ct=True)  # the level is set over soft tissue of what the scanner shows
    assert float(np.std((low1 - target1)[tissue])) == pytest.approx(30.0, rel=1e-3)
    assert float(target1.mean()) == pytest.approx(float(target0.mean()), abs=0.5)


def test_noise_map_levels_are_the_added_noise_not_the_texture(ct_slab: Slab) -> None:
    sim, norm = LowDoseCT(), Normalization("hu", -1024.0, 3071.0)
    deg = Degradation("lowdose-ct", noise_sd=(20.0, 20.0), texture_sd=(15.0, 15.0))
    low, target = degrade(ct_slab, deg, np.random.default_rng(1), sim)
    window = norm.window(low)
    x, y = Normalization.forward(low, window), Normalization.forward(target[None], window)
    assert added_noise_level(x, y, norm) * 4095.0 == pytest.approx(20.0, rel=1e-3)
    bank = Bank(x[None], y[None]).with_levels(norm)
    assert bank.levels[0] * 4095.0 == pytest.approx(20.0, rel=1e-3)
    assert bank.with_levels(norm) is bank  # levels once measured are kept


def test_bias_field_multiplies_input_and_target(mr_slab: Slab) -> None:
    deg = Degradation("rician", sigma_percent=(0.001, 0.001), bias_field=0.3)
    low, target = degrade(mr_slab, deg, np.random.default_rng(2), None)
    ratio = target[mr_slab.pixels[0] > 50] / mr_slab.pixels[0][mr_slab.pixels[0] > 50]
    assert ratio.max() - ratio.min() > 0.02 and ratio.min() > 0.69 and ratio.max() < 1.31  # strength in [0, 0.3]
    assert np.allclose(low[0], target, atol=0.01 * float(np.percentile(target, 99.5)))
    field = smooth_field((64, 64), 0.2, np.random.default_rng(0))
    assert float(np.abs(field - 1).max()) == pytest.approx(0.2, rel=1e-5)


def test_anisotropic_psf_blurs_one_axis_more() -> None:
    hr = np.random.default_rng(0).normal(0.0, 100.0, (128, 128)).astype(np.float32)
    low = ct_downsample(hr, 2, (0.0, 4.0))
    rows_detail = float(np.mean(np.diff(low, axis=0) ** 2))
    cols_detail = float(np.mean(np.diff(low, axis=1) ** 2))
    assert cols_detail < 0.7 * rows_detail


def test_sr_noise_is_added_to_the_low_resolution_input(ct_slab: Slab) -> None:
    deg = Degradation("ct-sr", psf_fwhm=(2.0, 2.0), lr_noise=(10.0, 10.0 + 1e-9))
    low, target = degrade(ct_slab, deg, np.random.default_rng(0))
    clean = ct_downsample(ct_slab.pixels, 2, (2.0, 2.0))
    assert float(np.std(low - clean)) == pytest.approx(10.0, rel=0.1)
    assert np.array_equal(target, ct_slab.pixels[0])


@pytest.mark.parametrize("window", APODISATIONS)
def test_apodisation_keeps_the_mean_and_smooths(mr_slab: Slab, window: str) -> None:
    hr = mr_slab.pixels[0]
    plain = mr_kspace_truncate(hr, 2)
    low = mr_kspace_truncate(hr, 2, window)
    assert low.shape == plain.shape
    if window != "none":
        assert _highpass_power(low) < _highpass_power(plain)
        assert float(low.mean()) == pytest.approx(float(plain.mean()), rel=0.1)


def test_partial_fourier_and_noise(mr_slab: Slab) -> None:
    hr = mr_slab.pixels[0]
    full = mr_kspace_truncate(hr, 2)
    partial = mr_kspace_truncate(hr, 2, partial_fourier=0.6)
    assert not np.allclose(full, partial) and np.corrcoef(full.ravel(), partial.ravel())[0, 1] > 0.9
    with pytest.raises(ValueError, match="random generator"):
        mr_kspace_truncate(hr, 2, noise_sd=1.0)
    noisy = mr_kspace_truncate(hr, 2, noise_sd=5.0, rng=np.random.default_rng(0))
    background = full < 1.0
    assert float(noisy[background].mean()) > 3.0  # Rician: the noise floor of a magnitude image


def test_presets_cover_the_ranges_of_issue_17() -> None:
    ct = PRESETS["ct-denoise"].degradation
    assert ct.dose[0] <= 0.05 and ct.dose[1] == 1.0 and set(ct.recon_filters) == set(RECON_FILTERS)
    assert ct.post_smooth_px[1] > 0 and ct.flux[1] / ct.flux[0] >= 4 and ct.electronic_sd[1] > 0
    assert ct.noise_sd[0] <= 1.0 and ct.noise_sd[1] >= 250.0 and ct.texture_sd[1] >= 10.0
    assert ct.white_fraction[0] == 0.0 and ct.white_fraction[1] >= 0.5
    assert ct.white_slope[0] == 0.0 and ct.white_slope[1] >= 1.0  # white to a sharp kernel's ramp and beyond
    assert ct.sharpen[0] == 0.0 and ct.sharpen[1] >= 1.0
    mr = PRESETS["mr-denoise"].degradation
    assert mr.sigma_percent[1] / mr.sigma_percent[0] >= 10 and mr.bias_field > 0 and mr.texture_sd[1] > 0
    sr = PRESETS["ct-sr2"].degradation
    assert sr.psf_fwhm[0] == 0.0 and sr.psf_fwhm[1] >= 3.0 and sr.lr_noise[1] > 0
    msr = PRESETS["mr-sr2"].degradation
    assert set(msr.apodisations) == set(APODISATIONS) and msr.partial_fourier[0] < 0.6 and msr.lr_noise[1] > 0
