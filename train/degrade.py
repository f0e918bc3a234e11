"""Physics-based degradations that turn a clean image into what a low-dose or fast scan gives.

Low-dose CT follows the acquisition: Hounsfield units -> linear attenuation -> parallel-beam
projections -> photon counts Poisson(I0 * dose * exp(-p)) plus Gaussian electronic noise ->
log -> filtered back-projection. Only the noise is reconstructed and added to the image
(FBP is linear, so clean + FBP(p_noisy - p) equals FBP(p_noisy) up to the reconstruction's
own blur), which keeps the target's resolution and Hounsfield units exactly as they were.
Projections are slow (seconds per slice) and cached per clean slice.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.transform import iradon, radon

from train.presets import APODISATIONS, RECON_FILTERS

Array = NDArray[np.float32]

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy


@dataclass(frozen=True)
class CTScanner:
    """Acquisition model. i0 is photons per detector bin and view at full dose."""

    views: int = 720
    i0: float = 5.0e5  # gives ~20 HU RMSE on a 0.48 mm head slice at 25% dose (DESIGN 5)
    electronic_sd: float = 5.0  # counts
    recon_filter: str = "shepp-logan"


class LowDoseCT:
    """Simulates a CT slice at a fraction of its dose; caches projections in memory and on disk."""

    def __init__(self, scanner: CTScanner = CTScanner(), cache_dir: Path | None = None) -> None:
        self.scanner = scanner
        self.cache_dir = cache_dir
        self._cache: dict[str, NDArray[np.float64]] = {}
        self.theta = np.linspace(0.0, 180.0, scanner.views, endpoint=False)

    def projections(self, hu: Array, spacing_mm: float) -> NDArray[np.float64]:
        """Line integrals of attenuation (dimensionless), one column per view, of a square slice."""
        key = hashlib.sha256(
            hu.astype(np.float32).tobytes() + repr((hu.shape, spacing_mm, self.scanner.views)).encode()
        )
        digest = key.hexdigest()[:24]
        if digest in self._cache:
            return self._cache[digest]
        path = self.cache_dir / f"{digest}.npy" if self.cache_dir else None
        if path is not None and path.exists():
            sino = np.load(path)
        else:
            mu = MU_WATER_PER_MM * np.clip(1.0 + hu.astype(np.float64) / 1000.0, 0.0, None) * spacing_mm
            sino = radon(_inside_circle(mu), self.theta, circle=True)
            if path is not None:  # written whole, then renamed: another worker may read it at any moment
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
                try:
                    np.save(partial, sino)
                    partial.replace(path)
                finally:
                    partial.unlink(missing_ok=True)
        self._cache[digest] = sino
        return sino

    def noise(
        self,
        hu: Array,
        spacing_mm: float,
        dose: float,
        rng: np.random.Generator,
        recon_filter: str | None = None,
        electronic_sd: float | None = None,
    ) -> Array:
        """The reconstructed noise (HU) that scanning `hu` at `dose` (fraction of full) adds, with
        the scanner's reconstruction filter and electronic noise unless others are given."""
        if not 0.0 < dose <= 1.0:
            raise ValueError(f"dose must be in (0, 1], got {dose}")
        rows, cols = hu.shape
        side = max(rows, cols)
        top, left = (side - rows) // 2, (side - cols) // 2
        if rows != cols:  # the reconstruction circle needs a square: pad with air, crop after
            square = np.full((side, side), -1000.0, np.float32)
            square[top : top + rows, left : left + cols] = hu
            hu = square
        sino = self.projections(hu, spacing_mm)
        blank = self.scanner.i0 * dose
        counts = rng.poisson(blank * np.exp(-sino)).astype(np.float64)
        e_sd = self.scanner.electronic_sd if electronic_sd is None else electronic_sd
        counts += rng.normal(0.0, e_sd, counts.shape)
        noisy = -np.log(np.clip(counts, 1.0, None) / blank)
        name = recon_filter or self.scanner.recon_filter
        delta_mu = iradon(noisy - sino, self.theta, circle=True, filter_name=name)
        delta_mu = delta_mu[top : top + rows, left : left + cols]
        return (1000.0 * delta_mu / (MU_WATER_PER_MM * spacing_mm)).astype(np.float32)

    def simulate(self, hu: Array, spacing_mm: float, dose: float, rng: np.random.Generator) -> Array:
        return (hu + self.noise(hu, spacing_mm, dose, rng)).astype(np.float32)


def filter_window(name: str, f: NDArray[np.float64]) -> NDArray[np.float64]:
    """The apodisation window skimage.transform.iradon's filter `name` puts on the ramp, at
    frequency f in cycles per pixel (|f| <= 0.5)."""
    windows = {
        "ramp": lambda: np.ones_like(f),
        "shepp-logan": lambda: np.sinc(f),
        "cosine": lambda: np.cos(np.pi * f),
        "hamming": lambda: 0.54 + 0.46 * np.cos(2 * np.pi * f),
        "hann": lambda: 0.5 + 0.5 * np.cos(2 * np.pi * f),
    }
    if name not in windows:
        raise ValueError(f"unknown reconstruction filter {name!r} (expected one of {', '.join(RECON_FILTERS)})")
    return np.asarray(windows[name](), np.float64)


def kernel_blur(hu: Array, recon_filter: str) -> Array:
    """The slice as FBP with `recon_filter` reconstructs it: in 2-D, a 1-D window W(|f|) on the
    ramp gives the image the radial transfer function W(|f|). Edges are mirrored, not wrapped."""
    if recon_filter == "ramp":
        return hu.astype(np.float32)
    pad = 16
    padded = np.pad(hu.astype(np.float64), [(0, 0)] * (hu.ndim - 2) + [(pad, pad), (pad, pad)], mode="reflect")
    fy = np.fft.fftfreq(padded.shape[-2])[:, None]
    fx = np.fft.fftfreq(padded.shape[-1])[None, :]
    window = filter_window(recon_filter, np.minimum(np.hypot(fy, fx), 0.5))
    out = np.real(np.fft.ifft2(np.fft.fft2(padded) * window))
    return np.asarray(out[..., pad:-pad, pad:-pad], np.float32)


def _inside_circle(image: NDArray[np.float64]) -> NDArray[np.float64]:
    """radon(circle=True) needs zero outside the inscribed circle (the scanner's field of view)."""
    n = image.shape[0]
    yy, xx = np.mgrid[:n, :n]
    centre = (n - 1) / 2
    out = image.copy()
    out[(yy - centre) ** 2 + (xx - centre) ** 2 > (n / 2 - 1) ** 2] = 0.0
    return out


def rician(image: Array, sigma_percent: float, rng: np.random.Generator, reference: float | None = None) -> Array:
    """Magnitude of the image plus complex Gaussian noise; sigma is a percentage of `reference`
    (default: the 99.5th percentile of the image, the bright end of the signal)."""
    ref = float(np.percentile(image, 99.5)) if reference is None else reference
    sigma = sigma_percent / 100.0 * ref
    real = image + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def ct_downsample(hr: Array, scale: int = 2, psf_fwhm_px: float | tuple[float, float] | None = None) -> Array:
    """Low-resolution CT as a coarser detector sees it: Gaussian PSF blur (FWHM in
    high-resolution pixels, one value or one per axis; 0 = the detector's area only), then the
    mean of each scale x scale block, so low-resolution pixel centres lie at the block centres
    (DESIGN 3.6)."""
    fwhm = float(scale) if psf_fwhm_px is None else psf_fwhm_px
    sigma = tuple(f / 2.355 for f in fwhm) if isinstance(fwhm, tuple) else fwhm / 2.355
    blurred = ndimage.gaussian_filter(hr.astype(np.float32), sigma, axes=(-2, -1))
    return _block_mean(blurred, scale)


def _block_mean(image: Array, scale: int) -> Array:
    h, w = image.shape[-2] // scale * scale, image.shape[-1] // scale * scale
    cropped = image[..., :h, :w]
    shape = (*cropped.shape[:-2], h // scale, scale, w // scale, scale)
    return cropped.reshape(shape).mean(axis=(-3, -1)).astype(np.float32)


def apodisation(n: int, kind: str, alpha: float = 0.5) -> NDArray[np.float64]:
    """A k-space window over n samples (centred); tukey tapers the outer `alpha` of the samples."""
    if kind == "none":
        return np.ones(n)
    if kind == "hamming":
        return np.asarray(np.hamming(n), np.float64)
    if kind == "hann":
        return np.asarray(np.hanning(n), np.float64)
    if kind == "tukey":
        from scipy.signal.windows import tukey

        return np.asarray(tukey(n, alpha), np.float64)
    raise ValueError(f"unknown apodisation {kind!r} (expected one of {', '.join(APODISATIONS)})")


def mr_kspace_truncate(
    hr: Array,
    scale: int = 2,
    window: str = "none",
    partial_fourier: float = 1.0,
    noise_sd: float = 0.0,
    rng: np.random.Generator | None = None,
    tukey_alpha: float = 0.5,
) -> Array:
    """A faster MR acquisition: only the central 1/scale of k-space in each direction, apodised
    by `window`, with the first (1 - partial_fourier) of the phase-encoding lines not acquired
    (zero-filled), complex Gaussian noise of `noise_sd` (image units) added in the image domain,
    as magnitude, sampled at the centres of the high-resolution blocks (a half-pixel shift)."""
    h, w = hr.shape[-2] // scale * scale, hr.shape[-1] // scale * scale
    k = np.fft.fftshift(np.fft.fft2(hr[..., :h, :w]), axes=(-2, -1))
    lh, lw = h // scale, w // scale
    top, left = (h - lh) // 2, (w - lw) // 2
    kc = k[..., top : top + lh, left : left + lw] * np.outer(
        apodisation(lh, window, tukey_alpha), apodisation(lw, window, tukey_alpha)
    )
    if partial_fourier < 1.0:
        kc = kc.copy()
        kc[..., : round(lh * (1.0 - partial_fourier)), :] = 0.0
    # shift by (scale - 1) / 2 high-resolution pixels so sample i sits at the centre of block i
    shift = (scale - 1) / 2
    fy = np.fft.fftshift(np.fft.fftfreq(lh, d=1.0 / lh))
    fx = np.fft.fftshift(np.fft.fftfreq(lw, d=1.0 / lw))
    ramp = np.exp(2j * np.pi * shift * (fy[:, None] / h + fx[None, :] / w))
    low = np.fft.ifft2(np.fft.ifftshift(kc * ramp, axes=(-2, -1))) / scale**2
    if noise_sd > 0:
        if rng is None:
            raise ValueError("noise needs a random generator")
        low = low + rng.normal(0.0, noise_sd, low.shape) + 1j * rng.normal(0.0, noise_sd, low.shape)
    return np.abs(low).astype(np.float32)


def smooth_field(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> Array:
    """A smooth multiplicative field (a receive coil's bias) within 1 +- strength: a random
    sum of low-frequency sinusoids."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    field = np.zeros(shape)
    for _ in range(4):
        fy, fx = rng.uniform(0.2, 1.2, 2) * np.pi / np.array(shape, np.float64)
        field += rng.normal() * np.sin(fy * yy + rng.uniform(0, np.pi)) * np.sin(fx * xx + rng.uniform(0, np.pi))
    peak = float(np.abs(field).max()) or 1.0
    return (1.0 + strength * field / peak).astype(np.float32)
