"""train.phantoms: procedural CT and MR phantoms, reproducible and anatomically plausible."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from train.phantoms import Tissue, anatomy, band_limit, ct_phantom, mr_phantom


def test_ct_phantom_shape_dtype_and_spacing() -> None:
    image, spacing = ct_phantom(np.random.default_rng(0), size=128, region="abdomen")
    assert image.shape == (1, 128, 128)
    assert image.dtype == np.float32
    assert isinstance(spacing, float)
    assert np.isfinite(image).all()


def test_ct_phantom_multi_slice_shape() -> None:
    image, _ = ct_phantom(np.random.default_rng(0), size=64, slices=3, region="head")
    assert image.shape == (3, 64, 64) and image.dtype == np.float32


def test_ct_phantom_is_reproducible_for_a_seed() -> None:
    a, sa = ct_phantom(np.random.default_rng(42), size=96)
    b, sb = ct_phantom(np.random.default_rng(42), size=96)
    c, _ = ct_phantom(np.random.default_rng(43), size=96)
    np.testing.assert_array_equal(a, b)
    assert sa == sb
    assert a.shape != c.shape or not np.allclose(a, c)


def test_mr_phantom_is_reproducible_for_a_seed() -> None:
    a, _ = mr_phantom(np.random.default_rng(5), size=96)
    b, _ = mr_phantom(np.random.default_rng(5), size=96)
    c, _ = mr_phantom(np.random.default_rng(6), size=96)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_explicit_spacing_is_used() -> None:
    _, spacing = ct_phantom(np.random.default_rng(0), size=64, spacing_mm=1.25, region="chest")
    assert spacing == 1.25


@pytest.mark.parametrize("region", ["head", "chest", "abdomen"])
@pytest.mark.parametrize("seed", [0, 1])
def test_field_of_view_is_plausible(region: str, seed: int) -> None:
    image, spacing = ct_phantom(np.random.default_rng(seed), size=128, region=region)
    assert 200.0 <= spacing * 128 <= 450.0
    if region == "head":
        assert 200.0 <= spacing * 128 <= 280.0  # a head is framed tighter than a trunk
    # the anatomy lies inside the field of view: the border is air
    border = np.concatenate([image[0, 0], image[0, -1], image[0, :, 0], image[0, :, -1]])
    np.testing.assert_allclose(border, -1000.0, atol=1e-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_has_bone_brain_and_air(seed: int) -> None:
    image, _ = ct_phantom(np.random.default_rng(seed), size=128, region="head")
    hu = image[0]
    assert int((hu > 700).sum()) > 20  # skull
    assert int(((hu >= 20) & (hu <= 50)).sum()) > 1000  # brain grey and white matter
    assert float(hu[0, 0]) == pytest.approx(-1000.0, abs=1e-2)  # air outside the head
    assert float(hu.min()) >= -1000.5  # nothing darker than air in a head
    # the brain is inside the skull: the centre of the image is soft tissue
    centre = hu[54:74, 54:74]
    assert -20.0 < float(np.median(centre)) < 80.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chest_has_lung_inside_the_body(seed: int) -> None:
    image, _ = ct_phantom(np.random.default_rng(seed), size=128, region="chest")
    hu = image[0]
    body = ndimage.binary_fill_holes(hu > -500)
    lung = body & (hu < -700)
    assert int(lung.sum()) > 200
    # the lungs are not the air around the patient: they do not touch the image border
    labelled, _ = ndimage.label(hu < -700)
    outside = set(np.unique(np.concatenate([labelled[0], labelled[-1], labelled[:, 0], labelled[:, -1]])))
    assert not outside & set(np.unique(labelled[lung]))
    assert int((body & (hu > 0) & (hu < 100)).sum()) > 500  # soft tissue too


def test_abdomen_has_no_lung() -> None:
    labels = anatomy(np.random.default_rng(0), size=128, spacing_mm=3.0, region="abdomen")
    assert not (labels == Tissue.LUNG).any()
    assert (labels == Tissue.LIVER).any()
    assert labels.dtype == np.uint8 and labels.shape == (1, 128, 128)


def test_unknown_region_is_refused() -> None:
    with pytest.raises(ValueError, match="region"):
        ct_phantom(np.random.default_rng(0), size=32, region="knee")


@pytest.mark.parametrize("region", ["head", "abdomen", None])
def test_mr_phantom_is_non_negative_with_dark_background(region: str | None) -> None:
    image, spacing = mr_phantom(np.random.default_rng(3), size=128, region=region)
    assert image.shape == (1, 128, 128) and image.dtype == np.float32
    assert 200.0 <= spacing * 128 <= 450.0
    assert float(image.min()) >= 0.0
    peak = float(image.max())
    assert 50.0 < peak < 2000.0
    corners = np.concatenate([image[0, :5, :5].ravel(), image[0, -5:, -5:].ravel()])
    assert float(corners.max()) < 1e-3 * peak
    assert float(np.median(image[0, 54:74, 54:74])) > 0.05 * peak  # signal inside the body


@pytest.mark.parametrize(("make", "region"), [(ct_phantom, "head"), (ct_phantom, "chest"), (mr_phantom, "head")])
def test_neighbouring_slices_are_consistent(make, region: str) -> None:  # type: ignore[no-untyped-def]
    image, _ = make(np.random.default_rng(11), size=96, slices=4, region=region)
    assert image.shape == (4, 96, 96)
    flat = image.reshape(4, -1).astype(np.float64)
    for i in range(3):
        assert np.corrcoef(flat[i], flat[i + 1])[0, 1] > 0.9
        assert not np.array_equal(flat[i], flat[i + 1])  # a slab, not one slice repeated


def test_band_limit_keeps_low_frequencies_and_removes_high_ones() -> None:
    n = 64
    x = np.arange(n)
    low = np.cos(2 * np.pi * 4 * x / n)  # 4 cycles: 1/16 of the sampling rate
    high = np.cos(2 * np.pi * 24 * x / n)  # 24 cycles: beyond a 0.5 band limit (16 cycles)
    image = np.tile(low + high, (n, 1)).astype(np.float32)
    out = band_limit(image, 0.5)
    np.testing.assert_allclose(out, np.tile(low, (n, 1)), atol=1e-5)
    np.testing.assert_allclose(band_limit(image, 1.0), image, atol=1e-5)


def test_head_phantoms_have_millimetre_air_pockets_and_sulci() -> None:
    """Sharp, small high-contrast detail inside the brain that a denoiser must not smooth away.
    Without the sulci, thin CSF inside the brain is only the ventricles' tips (50-190 pixels)."""
    found_gas = False
    for seed in range(6):
        labels = anatomy(np.random.default_rng(seed), size=256, spacing_mm=0.9, region="head")[0]
        brain = ndimage.binary_erosion(labels >= Tissue.GREY_MATTER, iterations=6)
        found_gas |= bool(((labels == Tissue.GAS) & brain).any())
        csf = (labels == Tissue.CSF) & brain
        thin = csf & ~ndimage.binary_opening(csf, iterations=2)  # CSF bands a few pixels wide
        assert int(thin.sum()) > 300
    assert found_gas


def test_natural_sd_scales_only_the_photograph_texture() -> None:
    """--natural-sd draws the texture's SD from its own range with the same random draws: the
    phantom differs from the default one only by the amplitude of that texture, in soft tissue."""
    rng = lambda: np.random.default_rng([8, 3])  # noqa: E731 - at 96 pixels, seed [8, 3] draws the photograph
    fixed = {sd: ct_phantom(rng(), size=96, natural_sd=(sd, sd))[0] for sd in (2.0, 10.0, 20.0)}
    default, _ = ct_phantom(rng(), size=96)
    texture = fixed[10.0] - fixed[2.0]
    assert float(texture.std()) > 0.5
    np.testing.assert_allclose(fixed[20.0] - fixed[2.0], texture * (18.0 / 8.0), atol=1e-3)
    # the default amplitude (5-40 HU) is another multiple of the same texture
    amplitude = float((default - fixed[2.0]).ravel() @ texture.ravel() / (texture.ravel() @ texture.ravel()))
    np.testing.assert_allclose(default - fixed[2.0], texture * amplitude, atol=1e-3)
    assert 3.0 / 8.0 <= amplitude <= 38.0 / 8.0


def test_phantom_blur_sets_the_blurred_halfs_psf() -> None:
    """--phantom-blur changes only the sigma of the blurred half's Gaussian PSF (same draws)."""
    sharp = ct_phantom(np.random.default_rng([8, 1]), size=96, blur_px=(0.0, 0.0))[0]
    wide = ct_phantom(np.random.default_rng([8, 1]), size=96, blur_px=(2.0, 2.0))[0]
    np.testing.assert_allclose(wide, ndimage.gaussian_filter(sharp, (0, 2.0, 2.0)), atol=1e-3)
    # a phantom of the sharp half is the same whatever the range
    kept = [ct_phantom(np.random.default_rng([8, 4]), size=96, blur_px=b)[0] for b in ((0.3, 1.0), (2.0, 2.0))]
    np.testing.assert_array_equal(*kept)
