"""A series through an engine: normalise (DESIGN 3.4), stack context slices, batch, tile, infer,
de-normalise. Pixels go in and come out in image units (HU for CT, stored values for MR);
rounding and clipping to the stored range belong to node.derive.

CT pixel padding (values below the normalisation's lo, e.g. -2000 or -3024 outside the
reconstruction circle) is clipped to lo before inference, so the net never sees values it
was not trained on, and restored unchanged afterwards.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from engines.base import Engine
from engines.normalization import Normalization
from engines.tiling import run_tiled

Array = NDArray[np.float32]


def context_indices(z: int, slices: int, context: int) -> NDArray[np.intp]:
    """Neighbours of slice z, edge slices repeated (DESIGN 3.4)."""
    half = context // 2
    return np.clip(np.arange(z - half, z + half + 1), 0, slices - 1)


def enhance_volume(engine: Engine, pixels: NDArray[np.floating], max_batch: int = 8) -> Array:
    """(Z, H, W) image units -> (Z, H * scale, W * scale) image units, float32."""
    m = engine.manifest
    norm, scale = m.normalization, m.scale
    values = np.asarray(pixels, np.float32)
    padding = values < norm.lo if norm.kind == "hu" else None
    if padding is not None and padding.any():
        values = np.maximum(values, np.float32(norm.lo))
    else:
        padding = None
    window = norm.window(values)  # per series for percentile normalisation
    x = Normalization.forward(values, window)
    z_count, h, w = x.shape
    out = np.empty((z_count, h * scale, w * scale), np.float32)
    for first in range(0, z_count, max_batch):
        zs = range(first, min(z_count, first + max_batch))
        stack = np.stack([x[context_indices(z, z_count, m.context_slices)] for z in zs])
        out[first : first + len(zs)] = run_tiled(engine.infer, stack, m.tile, scale, max_batch)[:, 0]
    result = Normalization.inverse(out, window)
    if padding is not None:
        big = np.repeat(np.repeat(padding, scale, axis=1), scale, axis=2) if scale > 1 else padding
        source = np.asarray(pixels, np.float32)
        original = np.repeat(np.repeat(source, scale, axis=1), scale, axis=2) if scale > 1 else source
        result = np.where(big, original, result)
    return result
