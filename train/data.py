"""Training pairs: clean slabs (phantoms or a site's DICOM series) degraded by physics, normalised
per the model's manifest, kept in memory as full slices and cut into random patches.

CT degradation costs seconds per slice, so the bank is built once (in parallel) and saved next
to the checkpoints; --resume reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from engines.normalization import Normalization
from engines.pipeline import context_indices
from engines.qa import noise_level, object_mask
from train.degrade import LowDoseCT, ct_downsample, kernel_blur, mr_kspace_truncate, rician, smooth_field
from train.phantoms import ct_phantom, mr_phantom
from train.presets import SHARPEN_SIGMA_PX, Degradation, Preset
from train.volumes import Volume, read_series

log = logging.getLogger(__name__)
Array = NDArray[np.float32]


@dataclass(frozen=True)
class Slab:
    """Clean neighbouring slices (context, H, W) around a target slice, with pixel spacing."""

    pixels: Array
    spacing: float


def _draw(rng: np.random.Generator, bounds: tuple[float, float], log: bool = False) -> float:
    """One value in `bounds` from exactly one random draw (so fixed bounds keep the sequence of
    the draws that follow), log-uniform for levels that span a decade."""
    lo, hi = bounds
    u = float(rng.uniform())
    if log and lo > 0 and hi > lo:
        return float(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))
    return lo + u * (hi - lo)


def _maybe(rng: np.random.Generator, bounds: tuple[float, float], log: bool = False) -> float:
    """A value in `bounds`, drawing only when they are a range (defaults consume no draw)."""
    return _draw(rng, bounds, log) if bounds[1] > bounds[0] else bounds[0]


def _pick(rng: np.random.Generator, names: tuple[str, ...]) -> str | None:
    if not names:
        return None
    return names[0] if len(names) == 1 else str(rng.choice(names))


def degrade(slab: Slab, deg: Degradation, rng: np.random.Generator, ct: LowDoseCT | None = None) -> tuple[Array, Array]:
    """(degraded input (context, h, w), target (H, W)) for a clean slab: one acquisition
    condition drawn from `deg`'s ranges (docs/training.md, Ranges), applied to every slice of
    the slab alike. The target is the centre slice, as the scanner would show it without the
    degradation (through the same reconstruction filter and smoothing for CT)."""
    centre = slab.pixels[slab.pixels.shape[0] // 2]
    if deg.kind == "lowdose-ct":
        sim = ct or LowDoseCT()
        dose = _draw(rng, deg.dose, log=True)
        recon = _pick(rng, deg.recon_filters)
        flux = _maybe(rng, deg.flux, log=True)  # photons at every dose alike: dose * flux
        e_sd = _maybe(rng, deg.electronic_sd)
        smooth = _maybe(rng, deg.post_smooth_px)

        def exposure(fraction: float, recon_filter: str | None) -> Array:
            return np.stack([sim.noise(s, slab.spacing, fraction, rng, recon_filter, e_sd) for s in slab.pixels])

        noise = exposure(min(1.0, dose * flux), recon)
        white = _maybe(rng, deg.white_fraction)
        if white > 0:  # same SD, that share of its variance pixel-independent
            sd = float(np.std(noise)) or 1.0
            fresh = _coloured(rng.normal(0.0, 1.0, noise.shape), _maybe(rng, deg.white_slope), sd)
            noise = (np.sqrt(1.0 - white) * noise + np.sqrt(white) * fresh).astype(np.float32)
        clean = kernel_blur(slab.pixels, recon) if recon else slab.pixels
        texture_sd = _maybe(rng, deg.texture_sd)
        # the scan's own texture need not share the added noise's spectrum: its filter is drawn
        # apart (a sharp added noise over a smooth texture is what the net must tell apart)
        texture = exposure(1.0, _pick(rng, deg.recon_filters) or recon) if texture_sd > 0 else None
        if smooth > 0:
            blur = lambda a: ndimage.gaussian_filter(a, smooth, axes=(-2, -1))  # noqa: E731
            clean, noise = blur(clean), blur(noise)
            texture = blur(texture) if texture is not None else None
        amount = _maybe(rng, deg.sharpen)
        if amount > 0:
            clean, noise = _sharpened(clean, amount), _sharpened(noise, amount)
            texture = _sharpened(texture, amount) if texture is not None else None
        centre_index = clean.shape[0] // 2
        tissue = object_mask(clean[centre_index], ct=True)
        if texture is not None:
            clean = clean + _scaled(texture, texture_sd, tissue)
        level = _maybe(rng, deg.noise_sd, log=True)
        if level > 0:
            noise = _scaled(noise, level, tissue)
        return (clean + noise).astype(np.float32), clean[centre_index].astype(np.float32)
    if deg.kind == "rician":
        sigma = _draw(rng, deg.sigma_percent, log=True)
        pixels = slab.pixels
        if deg.bias_field > 0:
            pixels = pixels * smooth_field(pixels.shape[-2:], _draw(rng, (0.0, deg.bias_field)), rng)
        ref = float(np.percentile(pixels, 99.5))
        texture_sd = _maybe(rng, deg.texture_sd)
        if texture_sd > 0:  # the acquisition's own noise, in the target too
            pixels = np.stack([rician(s, texture_sd, rng, reference=ref) for s in pixels])
        low = np.stack([rician(s, sigma, rng, reference=ref) for s in pixels])
        return low, pixels[pixels.shape[0] // 2].astype(np.float32)
    if deg.kind == "ct-sr":
        fwhm = (_maybe(rng, deg.psf_fwhm), _maybe(rng, deg.psf_fwhm))
        low = ct_downsample(slab.pixels, deg.scale, fwhm)
        lr_sd = _maybe(rng, deg.lr_noise)
        if lr_sd > 0:
            low = (low + rng.normal(0.0, lr_sd, low.shape)).astype(np.float32)
        return low, centre
    if deg.kind == "mr-kspace":
        window = _pick(rng, deg.apodisations) or "none"
        alpha = _draw(rng, (0.2, 0.8)) if window == "tukey" else 0.5
        fraction = _maybe(rng, deg.partial_fourier)
        lr_sd = _maybe(rng, deg.lr_noise, log=True) / 100.0 * float(np.percentile(slab.pixels, 99.5))
        return mr_kspace_truncate(slab.pixels, deg.scale, window, fraction, lr_sd, rng, alpha), centre
    raise ValueError(f"unknown degradation {deg.kind!r}")


def _coloured(white: NDArray[np.float64], slope: float, sd: float) -> Array:
    """White noise (context, h, w) coloured so that its power rises as |f|^slope over each
    slice's frequency grid, scaled to SD `sd` (Degradation.white_slope)."""
    if slope > 0:
        fy, fx = np.fft.fftfreq(white.shape[-2]), np.fft.fftfreq(white.shape[-1])
        amplitude = np.hypot(fy[:, None], fx[None, :]) ** (slope / 2.0)
        white = np.real(np.fft.ifft2(np.fft.fft2(white, axes=(-2, -1)) * amplitude, axes=(-2, -1)))
    return (white * (sd / (float(np.std(white)) or 1.0))).astype(np.float32)


def _sharpened(stack: Array, amount: float) -> Array:
    """Unsharp masking of each slice: an edge-enhancing kernel's gain, 1 + amount at the highest
    frequencies, falling to 1 at the lowest (Degradation.sharpen)."""
    detail = stack - ndimage.gaussian_filter(stack, SHARPEN_SIGMA_PX, axes=(-2, -1))
    return (stack + np.float32(amount) * detail).astype(np.float32)


def _scaled(noise: Array, sd: float, where: NDArray[np.bool_]) -> Array:
    """`noise` (context, h, w) scaled so that its centre slice has SD `sd` where `where` holds
    (everywhere when that is too small a region to measure)."""
    centre = noise[noise.shape[0] // 2]
    region = centre[where] if where.sum() >= 256 else centre
    current = float(np.std(region))
    return noise * np.float32(sd / current) if current > 0 else noise


def with_acquired_noise(slab: Slab, deg: Degradation, rng: np.random.Generator) -> Slab:
    """The slab as the scanner would have acquired it at full resolution (noise included)."""
    lo, hi = deg.acquired_noise_percent
    if hi <= 0:
        return slab
    sigma, ref = float(rng.uniform(lo, hi)), float(np.percentile(slab.pixels, 99.5))
    return Slab(np.stack([rician(s, sigma, rng, reference=ref) for s in slab.pixels]), slab.spacing)


def phantom_slabs(preset: Preset, count: int, seed: int) -> Iterator[Slab]:
    context = preset.net.context_slices
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        if preset.modality == "CT":
            pixels, spacing = ct_phantom(
                rng,
                size=preset.phantom_size,
                slices=context,
                natural_sd=preset.natural_sd,
                blur_px=preset.phantom_blur,
            )
        else:
            pixels, spacing = mr_phantom(rng, size=preset.phantom_size, slices=context)
        yield Slab(pixels, spacing)


def volume_slabs(volumes: list[Volume], context: int) -> Iterator[Slab]:
    """Every slice of every volume with its neighbours (edge slices repeated, DESIGN 3.4), as
    the node's pipeline stacks them."""
    for vol in volumes:
        for z in range(vol.slices):
            yield Slab(vol.pixels[context_indices(z, vol.slices, context)], vol.spacing[0])


@dataclass
class Bank:
    """Normalised full slices: inputs (N, context, h, w) and targets (N, 1, H, W); targets are
    empty in self-supervised mode. levels (N,): for nets with a noise map, each input's noise SD
    in normalised units (added_noise_level; self-supervised, the node's estimate)."""

    inputs: Array
    targets: Array
    levels: Array = field(default_factory=lambda: np.zeros(0, np.float32))

    def save(self, path: Path) -> None:
        np.savez(path, inputs=self.inputs, targets=self.targets, levels=self.levels)

    @classmethod
    def load(cls, path: Path) -> Bank:
        with np.load(path) as data:
            levels = data["levels"] if "levels" in data else np.zeros(0, np.float32)
            return cls(data["inputs"], data["targets"], levels)

    def with_levels(self, norm: Normalization) -> Bank:
        """The bank with a noise-map level for each input (kept when it has them already)."""
        if len(self.levels) == len(self):
            return self
        if len(self.targets) == 0 or self.targets.shape[-1] != self.inputs.shape[-1]:
            # self-supervised, or super-resolution (the target is another grid): what the node
            # will estimate from the input
            levels = [noise_level(x, norm) for x in self.inputs]
        else:
            levels = [added_noise_level(x, y, norm) for x, y in zip(self.inputs, self.targets, strict=True)]
        return Bank(self.inputs, self.targets, np.array(levels, np.float32))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def merged(self, others: list[Bank]) -> Bank:
        """This bank and `others` in one: each other slice centred in this bank's size, cropped
        or padded with 0 (the normalisation's lowest value: air). The levels are kept when every
        bank has them (with_levels computes them otherwise)."""
        h, w = self.inputs.shape[-2:]
        scale = self.targets.shape[-1] // w if len(self.targets) else 1
        for other in others:
            other_scale = other.targets.shape[-1] // other.inputs.shape[-1] if len(other.targets) else 1
            if other.inputs.shape[1] != self.inputs.shape[1] or other_scale != scale:
                raise ValueError(
                    f"a bank of {other.inputs.shape[1]}-slice inputs at x{other_scale} cannot join one of "
                    f"{self.inputs.shape[1]}-slice inputs at x{scale} (another preset's bank?)"
                )
        parts = [self, *(Bank(_centred(o.inputs, h, w, 1), _centred(o.targets, h, w, scale), o.levels) for o in others)]
        levelled = all(len(b.levels) == len(b) for b in parts)
        return Bank(
            np.concatenate([b.inputs for b in parts]),
            np.concatenate([b.targets for b in parts]),
            np.concatenate([b.levels for b in parts]) if levelled else np.zeros(0, np.float32),
        )


def _centred(a: Array, h: int, w: int, scale: int) -> Array:
    """`a` (..., scale x h', scale x w') centred in (..., scale x h, scale x w): cropped or padded
    with 0, in whole input pixels (an SR target stays aligned with its input)."""
    if a.size == 0:
        return a
    ah, aw = a.shape[-2] // scale, a.shape[-1] // scale
    ch, cw = min(h, ah), min(w, aw)
    out = np.zeros((*a.shape[:-2], h * scale, w * scale), a.dtype)
    top, left, src_top, src_left = (h - ch) // 2, (w - cw) // 2, (ah - ch) // 2, (aw - cw) // 2
    out[..., top * scale : (top + ch) * scale, left * scale : (left + cw) * scale] = a[
        ..., src_top * scale : (src_top + ch) * scale, src_left * scale : (src_left + cw) * scale
    ]
    return out


def added_noise_level(x: Array, y: Array, norm: Normalization) -> float:
    """What the noise map is told in training (normalised units): the SD of the noise the
    degradation added, input - target over the object (soft tissue for CT), as the robustness
    benchmark tells it and as the node's estimate from a series measures it. A texture the target
    keeps is not counted: the net is to remove the noise it is told of and keep the rest."""
    target = y[0]
    ct = norm.kind == "hu"
    image = Normalization.inverse(target, (norm.lo, norm.hi - norm.lo)) if ct else target
    mask = object_mask(image, ct)
    diff = x[x.shape[0] // 2] - target
    return float(np.std(diff[mask] if mask.sum() >= 256 else diff))


def _pair(args: tuple[Slab, Preset, int, Path | None]) -> tuple[Array, Array]:
    slab, preset, seed, cache = args
    rng = np.random.default_rng(seed)
    slab = with_acquired_noise(slab, preset.degradation, rng)
    low, target = degrade(slab, preset.degradation, rng, LowDoseCT(cache_dir=cache))
    # the window comes from what the node will see at inference: the degraded series
    window = preset.normalization.window(low)
    return Normalization.forward(low, window), Normalization.forward(target[None], window)


def build_bank(preset: Preset, slabs: list[Slab], seed: int, workers: int = 2, cache: Path | None = None) -> Bank:
    """preset.draws degraded pairs per slab, each drawn with its own seed (its own condition)."""
    jobs = [
        (slab, preset, seed * 100003 + i + d * 1_000_003, cache)
        for i, slab in enumerate(slabs)
        for d in range(preset.draws)
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            pairs = list(pool.map(_pair, jobs))
    else:
        pairs = [_pair(job) for job in jobs]
    return _stack(pairs)


def noisy_bank(preset: Preset, volumes: list[Volume]) -> Bank:
    """Self-supervised mode: the site's own (noisy) series, no clean targets."""
    inputs = []
    for vol in volumes:
        window = preset.normalization.window(vol.pixels)  # per series, as at inference (DESIGN 3.4)
        inputs += [Normalization.forward(s.pixels, window) for s in volume_slabs([vol], preset.net.context_slices)]
    _check_sizes(inputs)
    return Bank(np.stack(inputs), np.zeros((0, 1, 1, 1), np.float32))


def _stack(pairs: list[tuple[Array, Array]]) -> Bank:
    _check_sizes([p[0] for p in pairs])
    return Bank(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def _check_sizes(arrays: list[Array]) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"training slices must share one size; found {sorted(shapes)} (resample or split the data)")


def load_volumes(paths: list[Path], modality: str) -> list[Volume]:
    volumes = [v for v in read_series(paths) if v.modality == modality]
    if not volumes:
        raise ValueError(f"no {modality} series found under {', '.join(map(str, paths))}")
    return volumes


def sample(
    bank: Bank, rng: np.random.Generator, batch: int, patch: int, scale: int, noise_map: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of aligned random patches with random flips and 90-degree rotations; patches that
    are mostly background (air is near 0 in both normalisations) are redrawn a few times. With
    `noise_map`, each input gets its slice's noise level as one more, constant channel."""
    lo = patch // scale
    xs, ys = [], []
    supervised = bank.targets.shape[0] > 0
    h, w = bank.inputs.shape[-2:]
    for _ in range(batch):
        for _attempt in range(8):
            n = int(rng.integers(len(bank)))
            top, left = int(rng.integers(0, h - lo + 1)), int(rng.integers(0, w - lo + 1))
            x = bank.inputs[n, :, top : top + lo, left : left + lo]
            if float(x.mean()) > 0.05:
                break
        y = (
            bank.targets[n, :, top * scale : (top + lo) * scale, left * scale : (left + lo) * scale]
            if supervised
            else x
        )
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        if noise_map:
            x = np.concatenate([x, np.full_like(x[:1], bank.levels[n])])
        xs.append(_augment(x, k, flip))
        ys.append(_augment(y, k, flip))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _augment(a: Array, k: int, flip: bool) -> Array:
    a = np.rot90(a, k, axes=(-2, -1))
    return np.ascontiguousarray(a[..., ::-1] if flip else a)
