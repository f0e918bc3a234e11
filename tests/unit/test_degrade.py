"""train.degrade: low-dose CT noise physics, Rician MR noise, CT and MR downsampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from train.degrade import CTScanner, LowDoseCT, ct_downsample, mr_kspace_truncate, rician
from train.phantoms import ct_phantom

REALISATIONS = 4


@pytest.fixture(scope="module")
def abdomen() -> tuple[np.ndarray, float, np.ndarray]:
    """A 128x128 abdomen slice in HU, its spacing, and a mask of the body (eroded off its edge)."""
    image, spacing = ct_phantom(np.random.default_rng(0), size=128, region="abdomen")
    hu = image[0]
    body = ndimage.binary_erosion(ndimage.binary_fill_holes(hu > -500), iterations=3)
    assert body.sum() > 2000  # the phantom fills a good part of the field of view
    return hu, spacing, body


def _noise_sd(ct: LowDoseCT, hu: np.ndarray, spacing: float, body: np.ndarray, dose: float) -> float:
    sds = [float(ct.noise(hu, spacing, dose, np.random.default_rng(100 + i))[body].std()) for i in range(REALISATIONS)]
    return float(np.mean(sds))


def test_quantum_noise_scales_as_inverse_sqrt_dose(abdomen: tuple[np.ndarray, float, np.ndarray]) -> None:
    hu, spacing, body = abdomen
    ct = LowDoseCT(CTScanner(views=180, electronic_sd=0.0))
    full = _noise_sd(ct, hu, spacing, body, 1.0)
    half = _noise_sd(ct, hu, spacing, body, 0.5)
    quarter = _noise_sd(ct, hu, spacing, body, 0.25)
    assert full > 1.0  # there is noise at all
    assert quarter / full == pytest.approx(2.0, rel=0.10)
    assert half / full == pytest.approx(np.sqrt(2.0), rel=0.10)


def test_noise_is_zero_mean_and_simulate_adds_it(abdomen: tuple[np.ndarray, float, np.ndarray]) -> None:
    hu, spacing, body = abdomen
    ct = LowDoseCT(CTScanner(views=180, electronic_sd=0.0))
    noise = ct.noise(hu, spacing, 0.25, np.random.default_rng(1))
    assert noise.shape == hu.shape and noise.dtype == np.float32
    sd = float(noise[body].std())
    assert abs(float(noise[body].mean())) < 0.1 * sd

    low = ct.simulate(hu, spacing, 0.25, np.random.default_rng(1))
    assert low.shape == hu.shape and low.dtype == np.float32
    np.testing.assert_allclose(low, hu + noise, atol=1e-3)
    # the mean HU over the body is what the clean image had
    assert abs(float(low[body].mean()) - float(hu[body].mean())) < 0.1 * sd


def test_noise_is_reproducible_for_a_seed(abdomen: tuple[np.ndarray, float, np.ndarray]) -> None:
    hu, spacing, _ = abdomen
    ct = LowDoseCT(CTScanner(views=180))
    a = ct.noise(hu, spacing, 0.5, np.random.default_rng(7))
    b = ct.noise(hu, spacing, 0.5, np.random.default_rng(7))
    c = ct.noise(hu, spacing, 0.5, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_electronic_noise_adds_to_quantum_noise_at_low_dose(abdomen: tuple[np.ndarray, float, np.ndarray]) -> None:
    hu, spacing, body = abdomen
    quantum = _noise_sd(LowDoseCT(CTScanner(views=180, electronic_sd=0.0)), hu, spacing, body, 0.25)
    electronic = _noise_sd(LowDoseCT(CTScanner(views=180, electronic_sd=200.0)), hu, spacing, body, 0.25)
    assert electronic > 1.5 * quantum


def test_projections_are_cached_in_memory(abdomen: tuple[np.ndarray, float, np.ndarray]) -> None:
    hu, spacing, _ = abdomen
    ct = LowDoseCT(CTScanner(views=180))
    first = ct.projections(hu, spacing)
    assert first.shape == (hu.shape[0], 180)  # one column per view
    assert ct.projections(hu, spacing) is first
    # another slice (or spacing) is another entry
    assert ct.projections(hu, spacing * 1.1) is not first
    assert not np.allclose(ct.projections(hu, spacing * 1.1), first)


def test_projections_are_cached_on_disk(abdomen: tuple[np.ndarray, float, np.ndarray], tmp_path: Path) -> None:
    hu, spacing, _ = abdomen
    cache = tmp_path / "cache" / "sino"
    first = LowDoseCT(CTScanner(views=180), cache_dir=cache).projections(hu, spacing)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), first)

    # a fresh simulator loads the file instead of recomputing: prove it by tampering with the file
    np.save(files[0], first + 1.0)
    again = LowDoseCT(CTScanner(views=180), cache_dir=cache).projections(hu, spacing)
    np.testing.assert_array_equal(again, first + 1.0)
    assert len(list(cache.glob("*.npy"))) == 1


def test_a_cache_file_appears_only_whole(
    abdomen: tuple[np.ndarray, float, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training's workers simulate draws of one slice at once and share the cache: one read a
    file another was still writing ("Failed to read all data for array", a crashed bank build).
    A write that dies half-way (injected: a full disk or a kill cannot be timed to a write)
    must leave no file under the name readers look for."""
    hu, spacing, _ = abdomen
    cache = tmp_path / "cache"

    def half_written(path: Path, array: np.ndarray) -> None:
        Path(path).write_bytes(b"\x93NUMPY" + b"\0" * 16)  # a header and no data, then the failure
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", half_written)
    with pytest.raises(OSError, match="No space"):
        LowDoseCT(CTScanner(views=180), cache_dir=cache).projections(hu, spacing)
    monkeypatch.undo()
    assert not list(cache.glob("*.npy"))  # nor the partial file
    fresh = LowDoseCT(CTScanner(views=180), cache_dir=cache).projections(hu, spacing)  # recomputed, not read
    assert fresh.shape[1] == 180


def test_projections_of_water_match_the_attenuation() -> None:
    """A water disc of radius r: the central ray's line integral is mu_water * 2r."""
    n, spacing = 128, 2.0
    yy, xx = np.mgrid[:n, :n]
    radius_px = 40
    disc = np.where(np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) < radius_px, 0.0, -1000.0).astype(np.float32)
    sino = LowDoseCT(CTScanner(views=180)).projections(disc, spacing)
    expected = 0.0192 * 2 * radius_px * spacing
    assert float(sino.max()) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("dose", [0.0, -0.1, 1.5])
def test_invalid_dose_is_refused(abdomen: tuple[np.ndarray, float, np.ndarray], dose: float) -> None:
    hu, spacing, _ = abdomen
    ct = LowDoseCT(CTScanner(views=180))
    with pytest.raises(ValueError, match="dose"):
        ct.noise(hu, spacing, dose, np.random.default_rng(0))
    with pytest.raises(ValueError, match="dose"):
        ct.simulate(hu, spacing, dose, np.random.default_rng(0))


def test_rician_statistics_in_dark_and_bright_regions() -> None:
    reference, sigma_percent = 1000.0, 4.0
    sigma = sigma_percent / 100 * reference
    bright = 5 * sigma
    image = np.zeros((400, 400), dtype=np.float32)
    image[:, 200:] = bright
    out = rician(image, sigma_percent, np.random.default_rng(0), reference=reference)
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0.0

    dark = out[:, :200]
    assert float(dark.mean()) == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02)
    lit = out[:, 200:]
    assert float(lit.mean()) == pytest.approx(np.sqrt(bright**2 + sigma**2), abs=0.03 * sigma)
    assert float(lit.std()) == pytest.approx(sigma, rel=0.03)


def test_rician_default_reference_is_the_995th_percentile() -> None:
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 800, (64, 64)).astype(np.float32)
    ref = float(np.percentile(image, 99.5))
    a = rician(image, 5.0, np.random.default_rng(1))
    b = rician(image, 5.0, np.random.default_rng(1), reference=ref)
    c = rician(image, 5.0, np.random.default_rng(1), reference=2 * ref)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def _smooth_field(shape: tuple[int, ...], sigma: float = 4.0, seed: int = 0) -> np.ndarray:
    """A smooth, periodic, positive image (mean 100, SD 20)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma, mode="wrap")
    return (100 + 20 * field / field.std()).astype(np.float32)


def _block_mean(image: np.ndarray, scale: int = 2) -> np.ndarray:
    h, w = image.shape[-2] // scale, image.shape[-1] // scale
    return image[..., : h * scale, : w * scale].reshape(*image.shape[:-2], h, scale, w, scale).mean(axis=(-3, -1))


@pytest.mark.parametrize(
    ("shape", "scale", "expected"),
    [
        ((128, 128), 2, (64, 64)),
        ((3, 64, 96), 2, (3, 32, 48)),
        ((90, 90), 3, (30, 30)),
        ((65, 67), 2, (32, 33)),
    ],
)
def test_ct_downsample_shape(shape: tuple[int, ...], scale: int, expected: tuple[int, ...]) -> None:
    out = ct_downsample(np.zeros(shape, dtype=np.float32), scale)
    assert out.shape == expected and out.dtype == np.float32


def test_ct_downsample_preserves_mean_and_constants() -> None:
    smooth = _smooth_field((128, 128))
    low = ct_downsample(smooth, 2)
    assert float(low.mean()) == pytest.approx(float(smooth.mean()), abs=0.05)
    # low-resolution pixels are the (blurred) means of the 2x2 blocks they cover
    assert float(np.abs(low - _block_mean(smooth)).mean()) < 0.05 * float(smooth.std())

    flat = np.full((2, 64, 64), 37.5, dtype=np.float32)
    out = ct_downsample(flat, 2)
    np.testing.assert_allclose(out, 37.5, atol=1e-4)


def test_ct_downsample_blurs_within_a_slice_only() -> None:
    """The PSF is in-plane: slices of a stack are downsampled independently."""
    stack = np.stack([_smooth_field((64, 64), seed=1), np.zeros((64, 64), np.float32)])
    out = ct_downsample(stack, 2)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[0], ct_downsample(stack[0], 2), atol=1e-4)


def test_mr_kspace_truncate_shape() -> None:
    assert mr_kspace_truncate(np.ones((128, 128), np.float32)).shape == (64, 64)
    assert mr_kspace_truncate(np.ones((2, 64, 96), np.float32)).shape == (2, 32, 48)
    assert mr_kspace_truncate(np.ones((64, 121), np.float32)).shape == (32, 60)


def test_mr_kspace_truncate_samples_at_block_centres() -> None:
    smooth = _smooth_field((128, 128))
    low = mr_kspace_truncate(smooth, 2)
    assert low.dtype == np.float32
    block = _block_mean(smooth)
    err = float(np.sqrt(np.mean((low - block) ** 2)))
    # sampling at the block corners instead (no half-pixel shift, or a shift the wrong way)
    # would be off by a large fraction of the image's SD; the block centres are right
    corner = float(np.sqrt(np.mean((smooth[::2, ::2] - block) ** 2)))
    assert err < 0.02 * float(smooth.std())
    assert err < 0.1 * corner
    assert float(low.mean()) == pytest.approx(float(smooth.mean()), rel=1e-3)


def test_mr_kspace_truncate_removes_high_frequencies() -> None:
    n = np.arange(128)
    checker = (100 + 50 * (-1.0) ** np.add.outer(n, n)).astype(np.float32)  # all at Nyquist
    low = mr_kspace_truncate(checker, 2)
    np.testing.assert_allclose(low, 100.0, atol=1e-2)

    def stripes(cycles: int) -> np.ndarray:
        return (100 + 50 * np.cos(2 * np.pi * cycles * n / 128))[None, :].repeat(128, 0).astype(np.float32)

    np.testing.assert_allclose(mr_kspace_truncate(stripes(48), 2), 100.0, atol=1e-2)  # above the new Nyquist
    kept = mr_kspace_truncate(stripes(10), 2)  # well below it: kept at full amplitude
    assert float(kept.std()) == pytest.approx(50 / np.sqrt(2), rel=0.01)


def test_mr_kspace_truncate_scale_three_samples_the_block_centre_pixel() -> None:
    """With an odd scale the block centre is a high-resolution pixel: a band-limited image is
    sampled there (almost) exactly."""
    smooth = _smooth_field((99, 102))
    low = mr_kspace_truncate(smooth, 3)
    assert low.shape == (33, 34)
    np.testing.assert_allclose(low, smooth[1::3, 1::3], atol=0.02 * float(smooth.std()))


def test_low_dose_noise_of_a_non_square_slice_has_its_shape() -> None:
    """Slices need not be square (reformats, some scanners' matrices): the noise must cover
    the whole slice, so that simulate can add it."""
    hu = np.full((64, 96), -1000.0, dtype=np.float32)
    hu[12:52, 16:80] = 0.0  # a water block
    ct = LowDoseCT(CTScanner(views=90))
    noise = ct.noise(hu, 1.0, 0.5, np.random.default_rng(0))
    assert noise.shape == hu.shape
    assert ct.simulate(hu, 1.0, 0.5, np.random.default_rng(0)).shape == hu.shape


def test_acquired_noise_is_in_both_input_and_target_of_mr_sr_pairs() -> None:
    from train.data import Slab, with_acquired_noise
    from train.presets import Degradation

    rng = np.random.default_rng(0)
    clean = np.full((1, 64, 64), 500.0, np.float32)
    deg = Degradation("mr-kspace", acquired_noise_percent=(2.0, 2.0))
    noisy = with_acquired_noise(Slab(clean, 1.0), deg, rng)
    assert noisy.pixels.shape == clean.shape
    assert abs(float(noisy.pixels.std()) - 10.0) < 1.5  # 2% of the 99.5th percentile (500)
    untouched = with_acquired_noise(Slab(clean, 1.0), Degradation("mr-kspace"), rng)
    assert untouched.pixels is clean
