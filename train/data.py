"""Training pairs: clean slabs (phantoms or a site's DICOM series) degraded by physics, normalised
per the model's manifest, kept in memory as full slices and cut into random patches.

CT degradation costs seconds per slice, so the bank is built once (in parallel) and saved next
to the checkpoints; --resume reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from engines.normalization import Normalization
from engines.pipeline import context_indices
from train.degrade import LowDoseCT, ct_downsample, mr_kspace_truncate, rician
from train.phantoms import ct_phantom, mr_phantom
from train.presets import Degradation, Preset
from train.volumes import Volume, read_series

log = logging.getLogger(__name__)
Array = NDArray[np.float32]


@dataclass(frozen=True)
class Slab:
    """Clean neighbouring slices (context, H, W) around a target slice, with pixel spacing."""

    pixels: Array
    spacing: float


def degrade(slab: Slab, deg: Degradation, rng: np.random.Generator, ct: LowDoseCT | None = None) -> Array:
    """The degraded input (context, h, w) for a clean slab, one slice at a time."""
    if deg.kind == "lowdose-ct":
        sim = ct or LowDoseCT()
        dose = float(rng.uniform(*deg.dose))
        return np.stack([sim.simulate(s, slab.spacing, dose, rng) for s in slab.pixels])
    if deg.kind == "rician":
        sigma = float(rng.uniform(*deg.sigma_percent))
        ref = float(np.percentile(slab.pixels, 99.5))
        return np.stack([rician(s, sigma, rng, reference=ref) for s in slab.pixels])
    if deg.kind == "ct-sr":
        return ct_downsample(slab.pixels, deg.scale)
    if deg.kind == "mr-kspace":
        return mr_kspace_truncate(slab.pixels, deg.scale)
    raise ValueError(f"unknown degradation {deg.kind!r}")


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
        make = ct_phantom if preset.modality == "CT" else mr_phantom
        pixels, spacing = make(rng, size=preset.phantom_size, slices=context)
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
    empty in self-supervised mode."""

    inputs: Array
    targets: Array

    def save(self, path: Path) -> None:
        np.savez(path, inputs=self.inputs, targets=self.targets)

    @classmethod
    def load(cls, path: Path) -> Bank:
        with np.load(path) as data:
            return cls(data["inputs"], data["targets"])

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _pair(args: tuple[Slab, Preset, int, Path | None]) -> tuple[Array, Array]:
    slab, preset, seed, cache = args
    rng = np.random.default_rng(seed)
    slab = with_acquired_noise(slab, preset.degradation, rng)
    low = degrade(slab, preset.degradation, rng, LowDoseCT(cache_dir=cache))
    # the window comes from what the node will see at inference: the degraded series
    window = preset.normalization.window(low)
    centre = slab.pixels[slab.pixels.shape[0] // 2][None]
    return Normalization.forward(low, window), Normalization.forward(centre, window)


def build_bank(preset: Preset, slabs: list[Slab], seed: int, workers: int = 2, cache: Path | None = None) -> Bank:
    jobs = [(slab, preset, seed * 100003 + i, cache) for i, slab in enumerate(slabs)]
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
    bank: Bank, rng: np.random.Generator, batch: int, patch: int, scale: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of aligned random patches with random flips and 90-degree rotations; patches that
    are mostly background (air is near 0 in both normalisations) are redrawn a few times."""
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
        xs.append(_augment(x, k, flip))
        ys.append(_augment(y, k, flip))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _augment(a: Array, k: int, flip: bool) -> Array:
    a = np.rot90(a, k, axes=(-2, -1))
    return np.ascontiguousarray(a[..., ::-1] if flip else a)
