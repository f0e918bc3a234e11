"""Procedural CT-like and MR-like phantoms, for sites (and for us) with no clean training data.

One anatomy generator draws a tissue label map (a head or a trunk, with skull, brain
grey/white matter and CSF, fat, muscle, organs, vessels, lungs, spine, lesions); two
renderers turn it into Hounsfield units or MR signal, each tissue with its own smooth
texture. Everything is drawn from a seeded numpy Generator, so a phantom is reproducible.
Shapes are 3-D (ellipsoids and smooth fields correlated along z), so neighbouring slices
are consistent and 2.5-D models can be trained on them.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

Array = NDArray[np.float32]


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2
    CORTICAL_BONE = 3
    MARROW = 4
    GREY_MATTER = 5
    WHITE_MATTER = 6
    CSF = 7
    LIVER = 8
    KIDNEY = 9
    VESSEL = 10
    LUNG = 11
    LESION = 12
    GAS = 13


# (mean HU, texture SD in HU) per tissue; randomised by a few HU per phantom.
CT_HU: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, 0.0),
    Tissue.FAT: (-100.0, 8.0),
    Tissue.MUSCLE: (50.0, 8.0),
    Tissue.CORTICAL_BONE: (1200.0, 150.0),
    Tissue.MARROW: (300.0, 80.0),
    Tissue.GREY_MATTER: (40.0, 3.0),
    Tissue.WHITE_MATTER: (28.0, 3.0),
    Tissue.CSF: (8.0, 2.0),
    Tissue.LIVER: (60.0, 6.0),
    Tissue.KIDNEY: (150.0, 15.0),
    Tissue.VESSEL: (200.0, 10.0),
    Tissue.LUNG: (-850.0, 40.0),
    Tissue.LESION: (20.0, 10.0),
    Tissue.GAS: (-950.0, 20.0),
}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> Array:
    """Zero-mean, unit-SD Gaussian random field with correlation length sigma_px in-plane."""
    sigma = (min(1.5, sigma_px),) + (sigma_px,) * (len(shape) - 1) if len(shape) == 3 else sigma_px
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    sd = float(field.std())
    return (field - field.mean()) / (sd if sd > 0 else 1.0)


class _Canvas:
    """Coordinates in mm of a (Z, N, N) slab, centred on the isocentre."""

    def __init__(self, size: int, spacing_mm: float, slices: int, slice_mm: float) -> None:
        axis = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * spacing_mm
        zaxis = (np.arange(slices, dtype=np.float32) - (slices - 1) / 2) * slice_mm
        self.z, self.y, self.x = np.meshgrid(zaxis, axis, axis, indexing="ij")
        self.labels = np.zeros((slices, size, size), dtype=np.uint8)
        self.spacing = spacing_mm

    def ellipsoid(
        self, cx: float, cy: float, a: float, b: float, angle: float = 0.0, c: float = 400.0
    ) -> NDArray[np.bool_]:
        cos, sin = np.cos(angle), np.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        return np.asarray((u / a) ** 2 + (v / b) ** 2 + (self.z / c) ** 2 <= 1.0)

    def paint(self, mask: NDArray[np.bool_], tissue: Tissue) -> None:
        self.labels[mask] = tissue


def _head(cv: _Canvas, rng: np.random.Generator) -> None:
    a, b = rng.uniform(68, 82), rng.uniform(82, 98)
    angle = rng.uniform(-0.15, 0.15)
    scalp = rng.uniform(3, 6)
    skull = rng.uniform(5, 9)
    cv.paint(cv.ellipsoid(0, 0, a, b, angle), Tissue.MUSCLE)
    cv.paint(cv.ellipsoid(0, 0, a - 1.5, b - 1.5, angle), Tissue.FAT)
    cv.paint(cv.ellipsoid(0, 0, a - scalp, b - scalp, angle), Tissue.CORTICAL_BONE)
    cv.paint(cv.ellipsoid(0, 0, a - scalp - 1.8, b - scalp - 1.8, angle), Tissue.MARROW)
    cv.paint(cv.ellipsoid(0, 0, a - scalp - skull + 1.8, b - scalp - skull + 1.8, angle), Tissue.CORTICAL_BONE)
    brain = cv.ellipsoid(0, 0, a - scalp - skull, b - scalp - skull, angle)
    cv.paint(brain, Tissue.CSF)
    inner = cv.ellipsoid(0, 0, a - scalp - skull - 2, b - scalp - skull - 2, angle)
    folds = _smooth_field(rng, cv.labels.shape, 6.0 / cv.spacing)
    cv.paint(inner & (folds > -1.2), Tissue.GREY_MATTER)
    deep = cv.ellipsoid(0, 0, a - scalp - skull - 10, b - scalp - skull - 10, angle)
    cv.paint(deep & (folds > -0.2), Tissue.WHITE_MATTER)
    # sulci: thin CSF bands along the zero crossings of a band-limited field
    sulci = np.abs(_smooth_field(rng, cv.labels.shape, 3.0 / cv.spacing)) < rng.uniform(0.04, 0.12)
    cv.paint(inner & sulci & (cv.labels == Tissue.GREY_MATTER), Tissue.CSF)
    for side in (-1, 1):  # lateral ventricles
        cv.paint(
            cv.ellipsoid(
                side * rng.uniform(5, 10),
                rng.uniform(-10, 5),
                rng.uniform(3, 7),
                rng.uniform(15, 25),
                side * rng.uniform(0.1, 0.4),
            ),
            Tissue.CSF,
        )
    for _ in range(rng.integers(0, 4)):  # lesions, haemorrhage-like or hypodense
        r = rng.uniform(2, 9)
        cv.paint(
            cv.ellipsoid(rng.uniform(-35, 35), rng.uniform(-45, 45), r, r * rng.uniform(0.6, 1.4)) & inner,
            Tissue.LESION,
        )
    _small_structures(cv, rng, inner, min(a, b) - scalp - skull)


def _small_structures(cv: _Canvas, rng: np.random.Generator, inside: NDArray[np.bool_], extent: float) -> None:
    """Millimetre air pockets and calcifications: high-contrast detail a denoiser must keep sharp."""
    for _ in range(rng.integers(0, 25)):
        r = rng.uniform(0.5, 4.0)
        cx, cy = rng.uniform(-extent, extent, 2)
        blob = cv.ellipsoid(float(cx), float(cy), r, r * rng.uniform(0.4, 1.6), rng.uniform(0, 3))
        cv.paint(blob & inside, Tissue.GAS if rng.random() < 0.6 else Tissue.CORTICAL_BONE)


def _trunk(cv: _Canvas, rng: np.random.Generator, chest: bool) -> None:
    a, b = rng.uniform(120, 170), rng.uniform(85, 120)
    fat = rng.uniform(6, 25)
    cv.paint(cv.ellipsoid(0, 0, a, b), Tissue.FAT)
    shape = _smooth_field(rng, cv.labels.shape, 15.0 / cv.spacing)
    cv.paint(cv.ellipsoid(0, 0, a - fat, b - fat) & (shape > -1.5), Tissue.MUSCLE)
    body = cv.ellipsoid(0, 0, a - fat - rng.uniform(8, 15), b - fat - rng.uniform(8, 15))
    cv.paint(body & (shape > -0.8), Tissue.FAT)
    if chest:
        for side in (-1, 1):
            lung = cv.ellipsoid(side * a * 0.38, -b * 0.05, a * rng.uniform(0.25, 0.33), b * rng.uniform(0.55, 0.7))
            cv.paint(lung & body, Tissue.LUNG)
        vessels = _smooth_field(rng, cv.labels.shape, 1.2 / cv.spacing)
        cv.paint((cv.labels == Tissue.LUNG) & (vessels > 2.3), Tissue.VESSEL)
        cv.paint(
            cv.ellipsoid(rng.uniform(-15, 15), rng.uniform(-30, -10), rng.uniform(35, 50), rng.uniform(30, 45)),
            Tissue.MUSCLE,
        )  # heart
    else:
        cv.paint(
            cv.ellipsoid(
                -a * 0.3, -b * 0.15, a * rng.uniform(0.3, 0.45), b * rng.uniform(0.4, 0.6), rng.uniform(-0.5, 0.5)
            )
            & body,
            Tissue.LIVER,
        )
        for side in (-1, 1):
            cv.paint(
                cv.ellipsoid(side * a * 0.32, b * 0.35, rng.uniform(18, 28), rng.uniform(25, 35), side * 0.4),
                Tissue.KIDNEY,
            )
        for _ in range(rng.integers(2, 6)):
            cv.paint(
                cv.ellipsoid(
                    rng.uniform(-a / 2, a / 2), rng.uniform(-b / 2, b / 4), rng.uniform(4, 15), rng.uniform(4, 15)
                )
                & body,
                Tissue.GAS,
            )
    for _ in range(rng.integers(1, 4)):  # aorta, vena cava and other contrast-filled vessels
        r = rng.uniform(5, 13)
        cv.paint(cv.ellipsoid(rng.uniform(-30, 30), rng.uniform(10, 45), r, r), Tissue.VESSEL)
    for _ in range(rng.integers(0, 4)):
        r = rng.uniform(3, 12)
        cv.paint(
            cv.ellipsoid(rng.uniform(-a / 2, a / 2), rng.uniform(-b / 2, b / 2), r, r)
            & body
            & (cv.labels != Tissue.LUNG),
            Tissue.LESION,
        )
    _small_structures(cv, rng, body, min(a, b) - fat)
    spine_y = b - fat - rng.uniform(25, 40)
    cv.paint(cv.ellipsoid(0, spine_y, rng.uniform(16, 22), rng.uniform(14, 19)), Tissue.CORTICAL_BONE)
    cv.paint(cv.ellipsoid(0, spine_y, rng.uniform(13, 15), rng.uniform(11, 13)), Tissue.MARROW)


def anatomy(
    rng: np.random.Generator,
    size: int = 512,
    spacing_mm: float = 0.7,
    slices: int = 1,
    slice_mm: float = 2.0,
    region: str | None = None,
) -> NDArray[np.uint8]:
    """Label map (slices, size, size) of a head, chest or abdomen, drawn at random."""
    region = region or str(rng.choice(["head", "chest", "abdomen"]))
    cv = _Canvas(size, spacing_mm, slices, slice_mm)
    if region == "head":
        _head(cv, rng)
    elif region in ("chest", "abdomen"):
        _trunk(cv, rng, chest=region == "chest")
    else:
        raise ValueError(f"unknown region {region!r}")
    return cv.labels


def _render(
    labels: NDArray[np.uint8],
    rng: np.random.Generator,
    means: dict[Tissue, float],
    texture: dict[Tissue, float],
    spacing_mm: float,
    blur_px: float,
) -> Array:
    out = np.zeros(labels.shape, dtype=np.float32)
    fine = _smooth_field(rng, labels.shape, 0.6 / spacing_mm)
    coarse = _smooth_field(rng, labels.shape, 4.0 / spacing_mm)
    for tissue in Tissue:
        mask = labels == tissue
        if not mask.any():
            continue
        mix = 0.6 * coarse[mask] + 0.4 * fine[mask]
        out[mask] = means[tissue] + texture[tissue] * mix
    # the scanner's point-spread function; blur_px 0 gives one-pixel-sharp edges, as in
    # segmented or sharp-kernel images
    sigma = (0, blur_px, blur_px) if labels.ndim == 3 else blur_px
    return ndimage.gaussian_filter(out, sigma)


# Photographs bundled in scikit-image's wheel (public domain or no known copyright
# restrictions, per its documentation): a source of natural texture and edges that procedural
# tissue lacks. Used only as texture, modulating the phantom's soft tissue or signal.
TEXTURE_IMAGES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "moon", "retina", "rocket",
)  # fmt: skip


def natural_texture(rng: np.random.Generator, shape: tuple[int, int]) -> Array:
    """A random crop of a bundled photograph, grey, rescaled, rotated and flipped at random,
    zero mean and unit SD, of `shape`."""
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    image = getattr(data, str(rng.choice(TEXTURE_IMAGES)))()
    grey = rgb2gray(image[..., :3]) if image.ndim == 3 else image.astype(np.float64)
    zoom = rng.uniform(0.7, 2.0)
    side = (min(grey.shape[0], int(shape[0] / zoom)), min(grey.shape[1], int(shape[1] / zoom)))
    top, left = (int(rng.integers(0, grey.shape[i] - side[i] + 1)) for i in (0, 1))
    crop = np.rot90(grey[top : top + side[0], left : left + side[1]], int(rng.integers(4)))
    crop = resize(crop, shape, order=1, anti_aliasing=True)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    sd = float(crop.std())
    return ((crop - crop.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32)


def _fov_spacing(rng: np.random.Generator, region: str, size: int) -> float:
    """Pixel spacing that frames the region as a scanner's reconstruction field of view would."""
    fov = rng.uniform(220, 260) if region == "head" else rng.uniform(340, 420)
    return float(fov / size)


def ct_phantom(
    rng: np.random.Generator,
    size: int = 512,
    spacing_mm: float | None = None,
    slices: int = 1,
    region: str | None = None,
    natural: float = 0.5,
    natural_sd: tuple[float, float] | None = None,
    blur_px: tuple[float, float] = (0.3, 1.0),
) -> tuple[Array, float]:
    """A CT slab in Hounsfield units, shape (slices, size, size), and its pixel spacing in mm.
    With probability `natural` its soft tissue carries the texture of a bundled photograph, of an
    SD drawn uniformly from 5-40 HU, or log-uniformly from `natural_sd` (HU) when given: real
    soft tissue ranges from nearly flat (brain parenchyma, a few HU) to coarse, and a log-uniform
    draw gives the flat end its share (the default keeps the phantoms of earlier runs). Half the
    phantoms keep one-pixel-sharp edges, half are blurred by a Gaussian PSF whose sigma (pixels)
    is drawn uniformly from `blur_px`."""
    region = region or str(rng.choice(["head", "chest", "abdomen"]))
    spacing_mm = spacing_mm or _fov_spacing(rng, region, size)
    labels = anatomy(rng, size, spacing_mm, slices, region=region)
    means = {t: m + rng.normal(0, 0.05 * abs(m) + 2) for t, (m, _) in CT_HU.items()}
    means[Tissue.AIR] = -1000.0
    means[Tissue.LESION] = rng.uniform(-30, 90)
    texture = {t: s * rng.uniform(0.6, 1.5) for t, (_, s) in CT_HU.items()}
    image = _render(labels, rng, means, texture, spacing_mm, rng.choice([0.0, rng.uniform(*blur_px)]))
    if rng.random() < natural:
        soft = (labels > Tissue.AIR) & (labels != Tissue.CORTICAL_BONE) & (labels != Tissue.LUNG)
        if natural_sd is None:
            amplitude = float(rng.uniform(5.0, 40.0))
        else:
            amplitude = float(np.exp(rng.uniform(np.log(natural_sd[0]), np.log(natural_sd[1]))))
        image = image + soft * amplitude * natural_texture(rng, (size, size))
    return np.clip(image, -1000.0, None).astype(np.float32), spacing_mm  # nothing attenuates less than air


def mr_phantom(
    rng: np.random.Generator,
    size: int = 256,
    spacing_mm: float | None = None,
    slices: int = 1,
    region: str | None = None,
    natural: float = 0.5,
) -> tuple[Array, float]:
    """An MR slab in arbitrary stored units (0..~1000), random contrast, with a bias field;
    with probability `natural` its signal is modulated by the texture of a bundled photograph."""
    region = region or str(rng.choice(["head", "head", "abdomen"]))
    spacing_mm = spacing_mm or _fov_spacing(rng, region, size)
    labels = anatomy(rng, size, spacing_mm, slices, region=region)
    means = {t: float(rng.uniform(80, 1000)) for t in Tissue}
    means[Tissue.AIR] = 0.0
    means[Tissue.GAS] = 0.0
    means[Tissue.CORTICAL_BONE] = rng.uniform(0, 40)
    texture = {t: 0.04 * m for t, m in means.items()}
    image = _render(labels, rng, means, texture, spacing_mm, rng.uniform(0.4, 0.8))
    bias = 1.0 + 0.15 * _smooth_field(rng, labels.shape, size / 4)
    image = image * bias
    if rng.random() < natural:
        image = image * np.clip(1.0 + float(rng.uniform(0.05, 0.3)) * natural_texture(rng, (size, size)), 0.2, None)
    if rng.random() < 0.5:
        # many MR series are reconstructed on a finer matrix than they were acquired on
        # (zero-filled k-space, reformats): their detail stops below the pixel Nyquist
        image = band_limit(image, float(rng.uniform(0.45, 0.9)))
    return np.clip(image, 0, None).astype(np.float32), spacing_mm


def band_limit(image: Array, fraction: float) -> Array:
    """Keeps the central `fraction` of k-space in each in-plane direction (a smaller acquired
    matrix reconstructed on this one), zeroing the rest."""
    h, w = image.shape[-2:]
    fy = np.abs(np.fft.fftfreq(h))[:, None] <= fraction / 2
    fx = np.abs(np.fft.fftfreq(w))[None, :] <= fraction / 2
    k = np.fft.fft2(image, axes=(-2, -1)) * (fy & fx)
    return np.real(np.fft.ifft2(k, axes=(-2, -1))).astype(np.float32)
