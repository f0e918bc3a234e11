"""Tiling with overlap and smooth (raised-cosine) blending, for images larger than a model's tile.

An image that fits the tile runs whole; a larger one is cut into tiles that overlap by the
manifest's `overlap` pixels, each tile's output is weighted by a ramp that rises across the
overlap on every side shared with a neighbour, and the weighted sum is normalised. Tiles of
all slices in a batch share one queue, so the engine always sees full batches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from engines.manifest import Tile

Array = NDArray[np.float32]


def starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride size - overlap, the last tile flush with the end."""
    if length <= size:
        return [0]
    stride = size - overlap
    positions = list(range(0, length - size, stride))
    return [*positions, length - size]


def ramp(length: int, start: int, extent: int, overlap: int) -> Array:
    """1-D blending weight of a tile [start, start + extent) in an axis of `length` pixels."""
    w = np.ones(extent, np.float32)
    if overlap <= 0:
        return w
    rise = (0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)).astype(np.float32)
    if start > 0:
        w[:overlap] = rise
    if start + extent < length:
        w[-overlap:] = np.minimum(w[-overlap:], rise[::-1])
    return w


def run_tiled(infer: Callable[[Array], Array], batch: Array, tile: Tile, scale: int, max_batch: int) -> Array:
    """(N, C, H, W) -> (N, 1, H * scale, W * scale) through `infer`, tiled when H or W > tile.size."""
    n, _, h, w = batch.shape
    if h <= tile.size and w <= tile.size:
        return np.concatenate([infer(batch[i : i + max_batch]) for i in range(0, n, max_batch)])
    th, tw = min(tile.size, h), min(tile.size, w)
    origins = [(y, x) for y in starts(h, th, tile.overlap) for x in starts(w, tw, tile.overlap)]
    # one blending window per tile position, shared by every slice
    windows = {(y, x): _weights(h, w, y, x, th, tw, tile, scale) for y, x in origins}
    weight = np.zeros((h * scale, w * scale), np.float32)
    for (y, x), wt in windows.items():
        weight[y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += wt
    out = np.zeros((n, 1, h * scale, w * scale), np.float32)
    boxes = [(i, y, x) for i in range(n) for y, x in origins]
    for first in range(0, len(boxes), max_batch):
        group = boxes[first : first + max_batch]
        preds = infer(np.stack([batch[i, :, y : y + th, x : x + tw] for i, y, x in group]))
        for (i, y, x), pred in zip(group, preds, strict=True):
            out[i, :, y * scale : (y + th) * scale, x * scale : (x + tw) * scale] += pred * windows[(y, x)]
    return np.asarray(out / weight, np.float32)


def _weights(h: int, w: int, y: int, x: int, th: int, tw: int, tile: Tile, scale: int) -> Array:
    ov = tile.overlap * scale
    rows, cols = ramp(h * scale, y * scale, th * scale, ov), ramp(w * scale, x * scale, tw * scale, ov)
    return np.outer(rows, cols).astype(np.float32)
