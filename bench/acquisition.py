"""A second acquisition simulator, written apart from train/ so that an evaluation never reuses
the physics a model was trained with (DESIGN 5, issue 17). Nothing in train/ or the node
imports it.

Where train/degrade.py projects a slice (skimage radon), draws Poisson counts and reconstructs
the noise by filtered back-projection with skimage's filters, this module:

- **CT dose and kernel**: shapes white Gaussian noise in the Fourier domain by a 2-D FBP noise
  power spectrum, NPS(f) = |f| MTF(f)^2, for a reconstruction kernel described by its MTF
  (Gaussian and Butterworth shapes, not skimage's windows), and makes it non-stationary with
  the variance map of back-projected photon noise, sum over views of exp(line integral), the
  line integrals taken by rotating the attenuation image (scipy.ndimage.rotate) rather than by
  a Radon transform. The target is the clean image seen through the same kernel: a smooth
  kernel blurs the anatomy too, and a denoiser must not be asked to undo it.
- **Super-resolution**: the point-spread function is applied as a Fourier-domain Gaussian
  (per axis, so anisotropic PSFs are possible), the detector integrates over each low
  resolution pixel (skimage.transform.downscale_local_mean), and noise may be added to the
  low-resolution image.
- **MR**: k-space truncation with an optional apodisation (Hamming, Tukey) and partial Fourier
  (zero-filled), Rician noise as a fraction of the bright signal, and an optional smooth
  receive-coil bias field.

Every function takes a numpy Generator; nothing is cached.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, signal
from skimage.transform import downscale_local_mean

Array = NDArray[np.float32]
F64 = NDArray[np.float64]

MU_WATER = 0.0195  # 1/mm, ~70 keV (the other simulator uses 0.0192: a different beam)


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel by its modulation transfer function over radial frequency f in
    cycles per pixel (Nyquist 0.5): 'gauss' MTF = exp(-(f/f50)^2 ln 2), 'butterworth'
    1 / sqrt(1 + (f/f50)^(2 order)), each at 0.5 where f = f50; 'flat' passes everything."""

    name: str
    shape: str
    f50: float = 0.5
    order: int = 4

    def mtf(self, f: F64) -> F64:
        if self.shape == "flat":
            return np.ones_like(f)
        if self.shape == "gauss":
            return np.asarray(np.exp(-np.log(2.0) * (f / self.f50) ** 2), np.float64)
        if self.shape == "butterworth":
            return np.asarray(1.0 / np.sqrt(1.0 + (f / self.f50) ** (2 * self.order)), np.float64)
        raise ValueError(f"unknown kernel shape {self.shape!r}")


# From sharp (bone, lung: pure ramp to Nyquist) to very smooth (soft-tissue, paediatric)
KERNELS = {
    k.name: k
    for k in (
        Kernel("sharp", "flat"),
        Kernel("standard", "butterworth", f50=0.30, order=4),
        Kernel("smooth", "gauss", f50=0.20),
        Kernel("very-smooth", "gauss", f50=0.12),
    )
}
REFERENCE_KERNEL = "standard"
REFERENCE_SD = 10.0  # HU at full dose, standard kernel, through 180 mm of water (a head)
REFERENCE_PATH_MM = 180.0
PADDING_HU = -1500.0


def radial_frequency(shape: tuple[int, int]) -> F64:
    fy, fx = np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1])
    return np.asarray(np.hypot(fy[:, None], fx[None, :]), np.float64)


def _filter(image: NDArray[np.floating], gain: F64, pad: int = 32) -> Array:
    """image filtered by a Fourier-domain gain, reflect-padded so edges do not wrap round."""
    padded = np.pad(np.asarray(image, np.float64), pad, mode="reflect")
    spectrum = np.fft.fft2(padded) * gain
    return np.asarray(np.real(np.fft.ifft2(spectrum))[pad:-pad, pad:-pad], np.float32)


def kernel_target(clean: Array, kernel: Kernel) -> Array:
    """The clean slice as reconstructed with `kernel` (the target a denoiser should reach)."""
    if kernel.shape == "flat":
        return clean.astype(np.float32)
    pad = 32
    f = radial_frequency((clean.shape[0] + 2 * pad, clean.shape[1] + 2 * pad))
    return _filter(clean, kernel.mtf(f), pad)


def kernel_noise_factor(kernel: Kernel, n: int = 256) -> float:
    """Noise SD of `kernel` relative to the reference kernel at equal dose: sqrt of the ratio of
    integrals of |f| MTF^2 over the 2-D frequency plane."""
    f = radial_frequency((n, n))

    def power(k: Kernel) -> float:
        return float(np.sum(f * k.mtf(f) ** 2))

    return float(np.sqrt(power(kernel) / power(KERNELS[REFERENCE_KERNEL])))


_VARIANCE_MAPS: dict[tuple[bytes, float], F64] = {}


def variance_map(hu: Array, spacing_mm: float, views: int = 24) -> F64:
    """Relative variance of back-projected photon noise at each pixel: the mean over views of
    exp(line integral through the pixel), each view's integrals taken by rotating the
    attenuation image and summing along columns, normalised to 1 for a 180 mm water path.
    Kept per slice: it depends on neither dose nor kernel."""
    key = (hashlib.sha1(np.ascontiguousarray(hu, np.float32).tobytes()).digest(), spacing_mm)
    if key in _VARIANCE_MAPS:
        return _VARIANCE_MAPS[key]
    mu = MU_WATER * np.clip(1.0 + hu.astype(np.float64) / 1000.0, 0.0, None) * spacing_mm
    total = np.zeros(hu.shape, np.float64)
    for angle in np.linspace(0.0, 180.0, views, endpoint=False):
        rotated = ndimage.rotate(mu, angle, reshape=False, order=1, mode="constant", cval=0.0)
        integrals = np.broadcast_to(rotated.sum(axis=0, keepdims=True), rotated.shape)
        total += ndimage.rotate(np.exp(integrals), -angle, reshape=False, order=1, mode="nearest")
    result = np.asarray(total / views / np.exp(MU_WATER * REFERENCE_PATH_MM), np.float64)
    if len(_VARIANCE_MAPS) > 64:
        _VARIANCE_MAPS.clear()
    _VARIANCE_MAPS[key] = result
    return result


def ct_noise(
    hu: Array, spacing_mm: float, kernel: Kernel, dose: float, rng: np.random.Generator, patient_factor: float = 1.0
) -> Array:
    """Noise (HU) that scanning `hu` at `dose` (fraction of full) with `kernel` adds: coloured by
    the kernel's FBP noise power spectrum and scaled pixel by pixel by the photon statistics."""
    if not 0.0 < dose <= 1.0:
        raise ValueError(f"dose must be in (0, 1], got {dose}")
    pad = 32
    shape = (hu.shape[0] + 2 * pad, hu.shape[1] + 2 * pad)
    f = radial_frequency(shape)
    white = rng.standard_normal(shape)
    coloured = np.real(np.fft.ifft2(np.fft.fft2(white) * np.sqrt(f) * kernel.mtf(f)))[pad:-pad, pad:-pad]
    coloured /= coloured.std()
    sd = REFERENCE_SD * kernel_noise_factor(kernel) * patient_factor / np.sqrt(dose)
    local = np.sqrt(ndimage.gaussian_filter(variance_map(hu, spacing_mm), 8.0))
    return np.asarray(coloured * local * sd, np.float32)


def low_dose_ct(
    clean: Array, spacing_mm: float, kernel: Kernel, dose: float, rng: np.random.Generator
) -> tuple[Array, Array]:
    """(input, target) for one slice: the kernel's view of the anatomy, with and without noise.
    Pixel padding outside the reconstruction circle (below -1500 HU) is neither blurred nor
    noisy: a scanner writes it as a constant."""
    padding = clean < PADDING_HU
    target = kernel_target(np.where(padding, np.float32(-1000.0), clean), kernel)
    noisy = target + ct_noise(clean, spacing_mm, kernel, dose, rng)
    return np.where(padding, clean, noisy).astype(np.float32), np.where(padding, clean, target).astype(np.float32)


def gaussian_psf(image: Array, fwhm_px: tuple[float, float]) -> Array:
    """A Gaussian point-spread function of the given FWHM (rows, columns) in pixels, applied as
    its Fourier transform; (0, 0) leaves the image as it is."""
    if max(fwhm_px) <= 0:
        return image.astype(np.float32)
    pad = 32
    shape = (image.shape[0] + 2 * pad, image.shape[1] + 2 * pad)
    fy, fx = np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :]
    sy, sx = (w / (2.0 * np.sqrt(2.0 * np.log(2.0))) for w in fwhm_px)
    gain = np.exp(-2.0 * np.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2))
    return _filter(image, np.asarray(gain, np.float64), pad)


def low_resolution(
    hr: Array, scale: int, fwhm_px: tuple[float, float], noise_sd: float, rng: np.random.Generator
) -> Array:
    """What a detector `scale` times coarser records: the PSF, integration over each
    low-resolution pixel, and Gaussian noise of `noise_sd` (image units)."""
    h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
    low = downscale_local_mean(gaussian_psf(hr[:h, :w], fwhm_px), (scale, scale))
    if noise_sd > 0:
        low = low + rng.normal(0.0, noise_sd, low.shape)
    return np.asarray(low, np.float32)


APODISATIONS = ("none", "hamming", "tukey")


def _window(n: int, kind: str) -> F64:
    if kind == "none":
        return np.ones(n)
    if kind == "hamming":
        return np.asarray(np.hamming(n), np.float64)
    if kind == "tukey":  # flat over the central half, cosine tapers over the outer quarters
        return np.asarray(signal.windows.tukey(n, alpha=0.5), np.float64)
    raise ValueError(f"unknown apodisation {kind!r} (expected one of {', '.join(APODISATIONS)})")


def mr_low_resolution(
    hr: Array,
    scale: int,
    apodisation: str,
    partial_fourier: float,
    noise_percent: float,
    rng: np.random.Generator,
) -> Array:
    """A faster MR acquisition: the central 1/scale of k-space in each direction, apodised,
    with only `partial_fourier` (0.5-1] of the phase-encoding lines acquired (the rest zero-filled),
    complex Gaussian noise of `noise_percent` of the bright signal, magnitude image, sampled at
    the centres of the high-resolution blocks."""
    h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
    k = np.fft.fftshift(np.fft.fft2(hr[:h, :w].astype(np.float64)))
    lh, lw = h // scale, w // scale
    top, left = (h - lh) // 2, (w - lw) // 2
    kc = k[top : top + lh, left : left + lw] * np.outer(_window(lh, apodisation), _window(lw, apodisation))
    if partial_fourier < 1.0:
        kc[round(lh * partial_fourier) :, :] = 0.0
    fy = np.fft.fftshift(np.fft.fftfreq(lh, d=1.0 / lh))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(lw, d=1.0 / lw))[None, :]
    shift = (scale - 1) / 2  # sample i at the centre of high-resolution block i
    kc = kc * np.exp(2j * np.pi * shift * (fy / h + fx / w))
    low = np.fft.ifft2(np.fft.ifftshift(kc)) / scale**2
    if noise_percent > 0:
        sd = noise_percent / 100.0 * float(np.percentile(hr, 99.5))
        low = low + rng.normal(0.0, sd, low.shape) + 1j * rng.normal(0.0, sd, low.shape)
    return np.asarray(np.abs(low), np.float32)


def rician_noise(image: Array, noise_percent: float, rng: np.random.Generator) -> Array:
    """Magnitude of the image plus complex Gaussian noise of `noise_percent` of its bright
    signal (the 99th percentile)."""
    sd = noise_percent / 100.0 * float(np.percentile(image, 99.0))
    real = image.astype(np.float64) + rng.normal(0.0, sd, image.shape)
    return np.asarray(np.hypot(real, rng.normal(0.0, sd, image.shape)), np.float32)


def bias_field(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> Array:
    """A smooth multiplicative receive-coil field between about 1 - strength and 1 + strength:
    a random low-order 2-D cosine series."""
    y = np.linspace(0.0, np.pi, shape[0])[:, None]
    x = np.linspace(0.0, np.pi, shape[1])[None, :]
    field = np.zeros(shape)
    for i in range(3):
        for j in range(3):
            if i or j:
                field += rng.normal() * np.cos(i * y) * np.cos(j * x)
    field /= np.abs(field).max()
    return np.asarray(1.0 + strength * field, np.float32)
