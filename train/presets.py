"""The four shipped models, each as a preset: task, net, normalisation and degradation.

`enhance-node train --preset ct-denoise` reproduces a shipped model; every field can be
overridden on the command line, and the result records what was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from engines.manifest import AppliesTo
from engines.netspec import NetSpec
from engines.normalization import Normalization

T = TypeVar("T")


# skimage's FBP filters, sharp (ramp) to smooth (Hann), and MR k-space windows (train.degrade)
RECON_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
APODISATIONS = ("none", "hamming", "hann", "tukey")
SHARPEN_SIGMA_PX = 1.0  # Degradation.sharpen's unsharp mask


@dataclass(frozen=True)
class Degradation:
    """What turns a clean slab into a model's input. Ranges are drawn once per training pair:
    dose and noise levels log-uniformly (they span a decade), the rest uniformly, and one of
    each tuple of names. The defaults are one fixed condition (what `evaluate` uses); the
    presets widen them to the conditions a hospital produces (docs/training.md, Ranges)."""

    kind: str  # "lowdose-ct" | "rician" | "ct-sr" | "mr-kspace"
    dose: tuple[float, float] = (0.25, 0.25)  # lowdose-ct: dose fraction of full
    sigma_percent: tuple[float, float] = (2.0, 8.0)  # rician: noise SD, % of the 99.5th percentile
    scale: int = 2  # ct-sr / mr-kspace
    # mr-kspace: Rician noise (% of signal) already in the acquired image, so input and target
    # both carry it and the net learns that noise is not detail to sharpen
    acquired_noise_percent: tuple[float, float] = (0.0, 0.0)
    # lowdose-ct: FBP filters (train.degrade.RECON_FILTERS); empty = the scanner's own filter on
    # the noise only, the target untouched. Given, the target is the clean slice through the
    # drawn filter's window too (a smooth kernel blurs anatomy as well as noise)
    recon_filters: tuple[str, ...] = ()
    post_smooth_px: tuple[float, float] = (0.0, 0.0)  # lowdose-ct: Gaussian sigma after FBP, both images
    flux: tuple[float, float] = (1.0, 1.0)  # lowdose-ct: full-dose photons relative to CTScanner.i0 (patient size)
    electronic_sd: tuple[float, float] = (5.0, 5.0)  # lowdose-ct: counts
    bias_field: float = 0.0  # rician: a smooth multiplicative field up to +- this on target and input
    psf_fwhm: tuple[float, float] = (2.0, 2.0)  # ct-sr: Gaussian PSF FWHM in HR pixels, drawn per axis
    lr_noise: tuple[float, float] = (0.0, 0.0)  # ct-sr: HU; mr-kspace: % of the bright signal, in the LR image
    # lowdose-ct: the SD (HU, over soft tissue) the added noise is scaled to, drawn log-uniformly;
    # (0, 0) = as the physics gives it. Dose, flux, filter and smoothing
    # still shape the noise's texture and how it varies over the slice; this sets its level over
    # the whole range a hospital produces (obese patients at 5% dose on a bone kernel to a head
    # at full dose on a soft kernel), which dose x flux alone covered only from ~4 to ~90 HU
    noise_sd: tuple[float, float] = (0.0, 0.0)
    # denoisers: the scan's own noise and texture, of an SD drawn uniformly (lowdose-ct: HU, the
    # noise of a second full-dose exposure through a filter drawn apart; rician: % of the bright
    # signal), in the target and the input alike: a full-dose image is not noise-free, and the net must take
    # away only the noise it is told of (the noise map), not the texture beneath it
    texture_sd: tuple[float, float] = (0.0, 0.0)
    # lowdose-ct: the share of the added noise's variance that is pixel-independent (white),
    # drawn uniformly. FBP noise reconstructed on the image grid has almost no power beyond the
    # radial Nyquist frequency; a sharp or edge-enhancing kernel, another scanner's
    # interpolation, or noise synthesised on the grid puts power up to its corners, which a net
    # that never saw it leaves in place (issue 17: 2.0.0 left a third of it)
    white_fraction: tuple[float, float] = (0.0, 0.0)
    # lowdose-ct: the colour of that pixel-independent share, drawn uniformly: its noise power
    # rises as |f|^slope over the whole grid (0 = white; 1 = a flat-MTF kernel's ramp carried
    # to the grid's corners, half its power where a frequency is above 0.4 cycles per pixel;
    # above 1, an edge-enhancing kernel's). A net that never saw such noise leaves half of it
    # in place
    white_slope: tuple[float, float] = (0.0, 0.0)
    # lowdose-ct: the amount of edge enhancement after FBP (unsharp masking, Gaussian sigma
    # SHARPEN_SIGMA_PX) on both images, drawn uniformly: bone and lung kernels lift the MTF above
    # 1 at middle and high frequencies, so their noise has more of its power there than any plain
    # FBP filter gives (a gain of 1 + amount at the highest frequencies; the power in the grid's
    # corners, beyond FBP's band, comes from white_fraction)
    sharpen: tuple[float, float] = (0.0, 0.0)
    apodisations: tuple[str, ...] = ("none",)  # mr-kspace: k-space windows (train.degrade.APODISATIONS)
    partial_fourier: tuple[float, float] = (1.0, 1.0)  # mr-kspace: fraction of phase-encoding lines


@dataclass(frozen=True)
class Preset:
    name: str
    task: str  # "denoise" | "sr"
    modality: str  # "CT" | "MR": which phantom renderer, and the manifest's modalities
    net: NetSpec
    normalization: Normalization
    degradation: Degradation
    phantom_size: int
    epochs: int = 16
    steps_per_epoch: int = 250
    batch: int = 12
    patch: int = 96  # target patch side in pixels
    lr: float = 1e-3
    loss: str = "l1"
    phantoms: int = 40  # slabs generated when no data is given
    draws: int = 1  # degraded versions of each clean slab in the bank (different conditions)
    tile: tuple[int, int] = (512, 32)
    modalities: tuple[str, ...] = field(default=())
    restore_mean_px: float = 0.0  # the package's restore_mean_px (engines.pipeline.restore_mean)
    restore_mean_bounds: tuple[float, ...] = ()  # and its restore_mean_bounds (classes, image units)
    natural_sd: tuple[float, float] | None = None  # CT phantoms' photograph texture SD, HU (train.phantoms)
    phantom_blur: tuple[float, float] = (0.3, 1.0)  # CT phantoms: sigma range of the blurred half's PSF, pixels


# What an exported model is for (model.toml's [applies_to], docs/processing.md): the images it
# was trained on. Localizers and derived images (reformats, the node's own output) never.
_CT_APPLIES_TO = AppliesTo(
    exclude_image_types=("LOCALIZER", "DERIVED"),
    min_matrix=64,
    max_matrix=2048,
    plane="axial",
    pixel_spacing_mm=(0.1, 2.0),
    sop_classes=("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"),  # CT, Enhanced CT
)
APPLIES_TO = {
    "CT": _CT_APPLIES_TO,
    "MR": replace(
        _CT_APPLIES_TO,
        plane="any",
        pixel_spacing_mm=(0.1, 5.0),
        sop_classes=("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"),  # MR, Enhanced MR
    ),
}

HU = Normalization("hu", -1024.0, 3071.0)
PERCENTILE = Normalization("percentile", 0.5, 99.5)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "ct-denoise",
            "denoise",
            "CT",
            NetSpec("dncnn", depth=12, width=32, unshuffle=2, offset=0.25, gain=20.0),
            HU,
            Degradation(
                "lowdose-ct",
                dose=(0.05, 1.0),
                recon_filters=RECON_FILTERS,
                post_smooth_px=(0.0, 1.2),
                flux=(0.5, 2.0),
                electronic_sd=(0.0, 10.0),
                noise_sd=(0.7, 300.0),
                texture_sd=(0.0, 10.0),
                white_fraction=(0.0, 1.0),
                white_slope=(0.0, 1.5),
                sharpen=(0.0, 1.5),
            ),
            phantom_size=512,
            phantoms=48,
            draws=2,
            epochs=24,
            # each tissue class (air and lung, fat, soft tissue, bone and contrast) gets the
            # regional mean of what was removed from it back, within 6 px (issue 17, docs/processing.md)
            restore_mean_px=6.0,
            restore_mean_bounds=(-300.0, -30.0, 200.0),
        ),
        Preset(
            "mr-denoise",
            "denoise",
            "MR",
            NetSpec("dncnn", depth=12, width=32, unshuffle=2),
            PERCENTILE,
            Degradation("rician", sigma_percent=(0.5, 15.0), bias_field=0.3, texture_sd=(0.0, 3.0)),
            phantom_size=256,
            phantoms=96,
        ),
        Preset(
            "ct-sr2",
            "sr",
            "CT",
            NetSpec("srnet", depth=6, width=32, unshuffle=1, scale=2),
            HU,
            Degradation("ct-sr", scale=2, psf_fwhm=(0.0, 3.5), lr_noise=(0.0, 12.0)),
            phantom_size=512,
            phantoms=48,
            tile=(256, 16),
        ),
        Preset(
            "mr-sr2",
            "sr",
            "MR",
            NetSpec("srnet", depth=6, width=32, unshuffle=1, scale=2),
            PERCENTILE,
            Degradation(
                "mr-kspace",
                scale=2,
                acquired_noise_percent=(0.5, 3.0),
                apodisations=APODISATIONS,
                partial_fourier=(0.55, 1.0),
                lr_noise=(0.0, 3.0),
            ),
            phantom_size=256,
            phantoms=96,
            tile=(256, 16),
        ),
    )
}


def with_overrides(base: T, **overrides: Any) -> T:
    """`base` with the fields that are not None in `overrides` replaced (command-line options)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[type-var]
