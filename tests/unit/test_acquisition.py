"""bench/acquisition.py: the second simulator the robustness benchmark degrades with; it must
do what it says (noise level, kernel, PSF, apodisation), since the benchmark's verdicts rest on it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from bench import acquisition as acq

REPO = Path(__file__).resolve().parents[2]


def _water(n: int = 128, diameter_mm: float = 180.0, spacing: float = 2.0) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return np.where(np.hypot(yy, xx) * spacing < diameter_mm / 2, 0.0, -1000.0).astype(np.float32)


def test_written_apart_from_train() -> None:
    tree = ast.parse((REPO / "bench" / "acquisition.py").read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.split(".")[0] in {"train", "engines", "node", "storage"} for m in imported)


def test_noise_sd_scales_with_dose_and_kernel() -> None:
    hu = _water()
    centre = (slice(54, 74), slice(54, 74))
    std = acq.KERNELS["standard"]

    def sd(kernel: acq.Kernel, dose: float) -> float:
        return float(
            np.mean([acq.ct_noise(hu, 2.0, kernel, dose, np.random.default_rng(i))[centre].std() for i in range(6)])
        )

    full = sd(std, 1.0)
    assert full == pytest.approx(acq.REFERENCE_SD, rel=0.3)  # a 180 mm water path at the centre
    assert sd(std, 0.25) == pytest.approx(2 * full, rel=0.15)
    assert sd(acq.KERNELS["sharp"], 1.0) > 1.8 * full > 3.6 * sd(acq.KERNELS["very-smooth"], 1.0)
    with pytest.raises(ValueError, match="dose"):
        acq.ct_noise(hu, 2.0, std, 0.0, np.random.default_rng(0))


def test_noise_is_larger_where_the_path_is_longer() -> None:
    n = 128
    hu = np.full((n, n), -1000.0, np.float32)
    hu[40:88, 4:124] = 0.0  # a wide ellipse-like slab: long horizontal paths
    var = acq.variance_map(hu, 2.0)
    assert var[64, 64] > var[42, 64]  # centre sees more attenuation than the edge


def test_kernel_target_blurs_smooth_kernels_only() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, (96, 96)).astype(np.float32)
    assert np.array_equal(acq.kernel_target(image, acq.KERNELS["sharp"]), image)
    smooth = acq.kernel_target(image, acq.KERNELS["very-smooth"])
    assert smooth.std() < 0.5 * image.std()


def test_low_dose_keeps_pixel_padding() -> None:
    hu = _water(64)
    hu[:4] = -3024.0
    noisy, target = acq.low_dose_ct(hu, 2.0, acq.KERNELS["smooth"], 0.1, np.random.default_rng(0))
    assert np.all(noisy[:4] == -3024.0) and np.all(target[:4] == -3024.0)
    assert noisy[30:34, 30:34].std() > 0


def test_psf_and_area_sampling() -> None:
    rng = np.random.default_rng(0)
    hr = np.zeros((64, 64), np.float32)
    hr[:, 32:] = 100.0
    low = acq.low_resolution(hr, 2, (0.0, 0.0), 0.0, rng)
    assert low.shape == (32, 32) and low[0, 15] == 0.0 and low[0, 16] == 100.0
    blurred = acq.low_resolution(hr, 2, (0.0, 4.0), 0.0, rng)
    assert 0.0 < blurred[0, 15] < 50.0
    noisy = acq.low_resolution(hr, 2, (0.0, 0.0), 8.0, rng)
    assert float(np.std(noisy - low)) == pytest.approx(8.0, rel=0.15)


@pytest.mark.parametrize("apod", acq.APODISATIONS)
def test_mr_low_resolution(apod: str) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    hr = (100 + 50 * np.sin(xx / 3.0) * (np.hypot(yy - 32, xx - 32) < 25)).astype(np.float32)
    low = acq.mr_low_resolution(hr, 2, apod, 1.0, 0.0, rng)
    assert low.shape == (32, 32) and float(low.mean()) == pytest.approx(float(hr.mean()), rel=0.15)
    partial = acq.mr_low_resolution(hr, 2, apod, 0.625, 0.0, rng)
    assert not np.allclose(partial, low)


def test_rician_and_bias_field() -> None:
    rng = np.random.default_rng(0)
    image = np.full((64, 64), 100.0, np.float32)
    noisy = acq.rician_noise(image, 5.0, rng)
    assert float(np.std(noisy - image)) == pytest.approx(5.0, rel=0.1)
    field = acq.bias_field((64, 64), 0.3, rng)
    assert float(np.abs(field - 1).max()) == pytest.approx(0.3, rel=1e-5)
