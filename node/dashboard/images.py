"""Before/after views of a job: a source slice and its derived slice at the source's window,
their difference, and the noise SD in a region, for a physicist to judge what an engine did."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom.multival import MultiValue

from core.geometry import frames

Array = NDArray[np.float32]
ROI = 32  # side of the square region whose SD is shown


@dataclass(frozen=True)
class Pair:
    before: Array  # image units (HU for CT), on the derived grid (nearest for super-resolution)
    after: Array
    window: tuple[float, float]  # centre, width


@dataclass(frozen=True)
class Region:
    top: int
    left: int
    size: int
    sd_before: float
    sd_after: float
    mean_before: float
    mean_after: float


@lru_cache(maxsize=8)  # a job page and its three images decode the same two objects
def load_pair(source_path: str, derived_path: str) -> Pair:
    source, derived = pydicom.dcmread(source_path), pydicom.dcmread(derived_path)
    before, after = frames(source)[0].pixels, frames(derived)[0].pixels
    if after.shape != before.shape:  # super-resolution: compare on the finer grid
        factor = after.shape[0] // before.shape[0]
        before = np.kron(before, np.ones((factor, factor), np.float32))[: after.shape[0], : after.shape[1]]
    return Pair(before, after, window_of(source, before))


def window_of(ds: pydicom.Dataset, pixels: Array) -> tuple[float, float]:
    """The source's own window (first value), else its 1st-99th percentile."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        return _first(centre), max(1.0, _first(width))
    lo, hi = np.percentile(pixels, [1, 99])
    return float((lo + hi) / 2), float(max(1.0, hi - lo))


def _first(value: object) -> float:
    """A window value's first number (windowing attributes may hold several)."""
    if isinstance(value, MultiValue):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def png(pixels: Array, window: tuple[float, float]) -> bytes:
    centre, width = window
    grey = np.clip((pixels - (centre - width / 2)) / width, 0, 1) * 255
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def difference_png(pair: Pair) -> bytes:
    """after - before, mid-grey at zero, +-(window width / 4) at black and white."""
    return png(pair.after - pair.before, (0.0, pair.window[1] / 2))


def quiet_region(pair: Pair, size: int = ROI) -> tuple[int, int]:
    """Top-left of the flattest block of the source inside the window (not air or padding),
    where noise shows best; the centre when no block qualifies."""
    centre, width = pair.window
    h, w = pair.before.shape
    best, where = np.inf, ((h - size) // 2, (w - size) // 2)
    for top in range(0, h - size + 1, size // 2):
        for left in range(0, w - size + 1, size // 2):
            block = pair.before[top : top + size, left : left + size]
            if abs(float(block.mean()) - centre) > width / 2:
                continue
            sd = float(block.std())
            if sd < best:
                best, where = sd, (top, left)
    return where


def region(pair: Pair, top: int | None = None, left: int | None = None, size: int = ROI) -> Region:
    h, w = pair.before.shape
    size = max(4, min(size, h, w))
    if top is None or left is None:
        top, left = quiet_region(pair, size)
    top, left = min(max(0, top), h - size), min(max(0, left), w - size)
    b = pair.before[top : top + size, left : left + size]
    a = pair.after[top : top + size, left : left + size]
    return Region(top, left, size, float(b.std()), float(a.std()), float(b.mean()), float(a.mean()))
