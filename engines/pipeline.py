"""A series through an engine: normalise (DESIGN 3.4), stack context slices, batch, tile, infer,
de-normalise. Pixels go in and come out in image units (HU for CT, stored values for MR);
rounding and clipping to the stored range belong to node.derive.

CT denoising: values below the normalisation's lo are clipped to lo before inference, so the
net never sees values it was not trained on; pixel padding (below -1500 HU, e.g. -2000 or
-3024 outside the reconstruction circle) is restored unchanged afterwards, while noisy air
that dipped below lo gets the model's output like any other pixel. Only the bounding box of
what is not air (above -900 HU in any slice: body, table, anything the scanner saw) plus a
margin wider than the shipped nets' receptive field is run, so pixels inside it come out
exactly as if the whole slice had been processed; air outside is passed through, clipped at
lo (a wide body FOV spends a third of its pixels on it).

Super-resolution runs on the whole slice as it is: the nets learn a residual over bilinear
upsampling, so padding and air are interpolated smoothly (restoring padding by pixel
repetition measured 0.85 dB worse on held-out CT).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from engines.base import Engine
from engines.normalization import Normalization
from engines.qa import NOISE_SLICES, input_range, noise_level, spread
from engines.tiling import run_tiled

Array = NDArray[np.float32]

AIR_HU = -900.0  # CT: below this, air (and the padding below it)
PADDING_HU = -1500.0  # CT: below this, pixel padding (-2000, -3024, ...), never noise around air
MARGIN = 32  # pixels kept around the content; the shipped nets see 25 pixels each way
ALIGN = 8  # crop origins on this grid (covers pixel-unshuffle factors 2, 4 and 8)


def content_box(values: NDArray[np.floating], norm: Normalization, margin: int = MARGIN) -> tuple[slice, slice]:
    """Rows and columns holding everything that is not air in any slice, plus `margin`
    (the whole slice for MR, whose background has no fixed level; empty when all is air)."""
    _, h, w = values.shape
    if norm.kind != "hu":
        return slice(0, h), slice(0, w)
    mask = np.any(values > AIR_HU, axis=0)
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    # starts on a multiple of ALIGN: nets that pixel-unshuffle see the same cells as on the whole slice
    return (
        slice(max(0, int(rows[0]) - margin) // ALIGN * ALIGN, min(h, int(rows[-1]) + 1 + margin)),
        slice(max(0, int(cols[0]) - margin) // ALIGN * ALIGN, min(w, int(cols[-1]) + 1 + margin)),
    )


def context_indices(z: int, slices: int, context: int) -> NDArray[np.intp]:
    """Neighbours of slice z, edge slices repeated (DESIGN 3.4)."""
    half = context // 2
    return np.clip(np.arange(z - half, z + half + 1), 0, slices - 1)


def enhance_volume(
    engine: Engine,
    pixels: NDArray[np.floating],
    max_batch: int = 8,
    noise_scale: float = 1.0,
    noise_sd: float | None = None,
) -> Array:
    """(Z, H, W) image units -> (Z, H * scale, W * scale) image units, float32. A model with a
    noise map gets the series' noise level times `noise_scale` (the route's strength): `noise_sd`
    in image units when the caller knows it (a benchmark giving the model what it gives NLM),
    otherwise estimated from the series itself (engines.qa.noise_level), as the node does.

    What is the series' (the normalisation window, the noise level, the content box) is taken
    first; then every step runs on `max_batch` slices at a time, so that the only whole-series
    array made is the result (a 300-slice series is held once, not six times)."""
    m = engine.manifest
    norm, scale = m.normalization, m.scale
    values = np.asarray(pixels, np.float32)
    ct_denoise = norm.kind == "hu" and m.task == "denoise"
    window = norm.window(values)  # per series for percentile normalisation
    lo = np.float32(norm.lo)

    def clipped(a: Array) -> Array:
        """The input the net is given, in image units: noisy air that dips below lo is lo."""
        return np.asarray(np.maximum(a, lo), np.float32) if ct_denoise else a

    def before(zs: Any) -> Array:
        return clipped(values[zs])

    level = None
    if m.noise_map and noise_sd is not None:
        level = noise_sd / window[1] * noise_scale
    elif m.noise_map:
        picked = spread(len(values), NOISE_SLICES)  # the slices noise_level reads, normalised alone
        level = noise_level(Normalization.forward(before(picked), window), norm) * noise_scale
    z_count, (h, w) = values.shape[0], values.shape[1:]
    if m.task == "denoise" and not (ct_denoise and lo > AIR_HU):  # clipped at such a lo, all would be content
        rows, cols = content_box(values, norm)
    else:
        rows, cols = slice(0, h), slice(0, w)
    box = (slice(rows.start * scale, rows.stop * scale), slice(cols.start * scale, cols.stop * scale))
    result = np.empty((z_count, h * scale, w * scale), np.float32)
    for first in range(0, z_count, max_batch):
        zs = slice(first, min(z_count, first + max_batch))
        low = before(zs)
        x = Normalization.forward(low, window)
        out = x if scale == 1 else _upscale(x, scale)  # what air outside the content box becomes (x is read first)
        if rows.stop > rows.start and cols.stop > cols.start:
            crop = x[:, rows, cols]
            if m.context_slices > 1:  # the neighbours, normalised with the series' window
                near = np.stack([context_indices(z, z_count, m.context_slices) for z in range(zs.start, zs.stop)])
                stack = Normalization.forward(clipped(values[:, rows, cols][near]), window)
            else:
                stack = crop[:, None]
            if level is not None:
                stack = np.concatenate([stack, np.full_like(stack[:, :1], level)], axis=1)
            out[:, box[0], box[1]] = run_tiled(engine.infer, stack, m.tile, scale, max_batch)[:, 0]
        done = Normalization.inverse(out, window)
        if m.task == "denoise" and m.restore_mean_px > 0:
            inside = low > AIR_HU if norm.kind == "hu" else np.ones(low.shape, bool)
            done = restore_mean(low, done, inside, m.restore_mean_px, m.restore_mean_bounds)
        if m.task == "sr":
            done = _safe_sr(low, done, scale, m.clamp_to_input, m.consistency, m.classical_share)
        if ct_denoise:  # (a denoiser's scale is 1: the output has the input's grid)
            padding = values[zs] < PADDING_HU  # pixel padding comes back as it was
            np.copyto(done, values[zs], where=padding)
        result[zs] = done
    return result


def _safe_sr(low: Array, high: Array, scale: int, clamp: bool, consistency: float, classical_share: float) -> Array:
    """An sr model's own safety steps on its output (model.toml): the clamp to the input's 3x3
    range, the consistency with the input, the share of the classical estimate mixed in."""
    bounds = input_range(low, scale) if clamp else None  # taken once for the net's output and the classical one
    if bounds is not None:
        high = clamp_to_input(low, high, scale, bounds)
    if consistency > 0:
        high = enforce_consistency(low, high, scale, consistency)
    if classical_share > 0:
        share = np.float32(classical_share)
        high = (1 - share) * high + share * classical_sr(low, scale, clamp, consistency, bounds)
    return high


def resize(image: Array, scale: int, method: Image.Resampling = Image.Resampling.LANCZOS) -> Array:
    """One (h, w) image scaled by `scale` with Pillow's filter (Lanczos-3 by default), float32."""
    h, w = image.shape
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize((w * scale, h * scale), method), np.float32)


def classical_sr(
    low: Array, scale: int, clamp: bool, consistency: float, bounds: tuple[Array, Array] | None = None
) -> Array:
    """(Z, h, w) -> (Z, h * scale, w * scale): Lanczos, then the model's own safety steps (the clamp
    to the 3x3 input range, the consistency with the input), with no net: the classical estimate
    an sr model's `classical_share` mixes in. `bounds`: that range when the caller has it."""
    out = np.stack([resize(z, scale) for z in np.asarray(low, np.float32)])
    if clamp:
        out = clamp_to_input(low, out, scale, bounds)
    return enforce_consistency(low, out, scale, consistency) if consistency > 0 else out


def clamp_to_input(low: Array, high: Array, scale: int, bounds: tuple[Array, Array] | None = None) -> Array:
    """Each output pixel within [min, max] of the 3x3 input pixels round the one it lies in:
    the anti-ringing guard of image scalers. What the net adds cannot overshoot an edge (halos)
    or push noise beyond the input's local range; real detail inside the range is kept.
    `bounds`: qa.input_range(low, scale) when the caller has it."""
    lo, hi = input_range(low, scale) if bounds is None else bounds
    return np.clip(high, lo, hi).astype(np.float32)


def enforce_consistency(low: Array, high: Array, scale: int, weight: float) -> Array:
    """One back-projection step towards the input: each scale x scale block of `high` is shifted
    by `weight` times (its input pixel - the block's mean), so that at weight 1 the output,
    averaged back over its blocks (what a detector `scale` times coarser integrates), reproduces
    the input exactly. Whatever the net made of a sharp, blurred or noisy input, the output keeps
    the input's content at its own resolution; the net's detail lives only within the blocks.
    Works on (h, w) or (slices, h, w) in image units."""
    lh, lw = low.shape[-2], low.shape[-1]
    blocks = high[..., : lh * scale, : lw * scale].reshape(*high.shape[:-2], lh, scale, lw, scale).mean(axis=(-3, -1))
    out = np.array(high, np.float32, copy=True)
    out[..., : lh * scale, : lw * scale] += np.float32(weight) * _upscale(np.asarray(low - blocks, np.float32), scale)
    return out


RESTORE_STEP = 4  # the regional mean is taken on a grid this many times coarser (it is smooth)


def restore_mean(
    before: Array, after: Array, inside: NDArray[np.bool_], sigma_px: float, bounds: tuple[float, ...] = ()
) -> Array:
    """`after` with the regional mean of what it removed put back: the Gaussian-weighted mean
    (sigma in pixels, within each slice) of before - after over the pixels `inside` (the body).
    A denoiser may remove noise, whose regional mean is near zero, but not shift mean HU. Taken
    on a 4x coarser grid and interpolated back linearly (the mean is smooth; ~5 ms a 512x512 slice).

    With `bounds` (increasing, in the image's units: HU for CT) the pixels inside are split into
    classes by their denoised value (below the first bound, between two, above the last) and
    each class gets the regional mean of its own pixels: what the net took from a soft-tissue
    region next to bone or air is not spread into it, and what it smoothed across such an edge
    is given back to each side."""
    z, h, w = before.shape
    step, classes = RESTORE_STEP, len(bounds) + 1
    ch, cw = -(-h // step), -(-w // step)
    bins, size = _block_bins(h, w, step, classes + 1), ch * cw * (classes + 1)
    sigmas = (0, sigma_px / step, sigma_px / step, 0)
    top, bottom, down = _linear(ch, step, h, 1)
    left, right, across = _linear(cw, step, w, classes + 1)
    # each pixel's left coarse column (class 0) in the (h, cw, classes + 1) rows, and the right one's offset from it
    left_index, to_right = np.arange(h)[:, None] * (cw * (classes + 1)) + left, right - left
    floor = 1e-3 * step * step
    out = np.empty(after.shape, np.float32)
    # slice by slice, so that what one slice needs stays in the CPU's cache; no BLAS (its threads
    # would compete with the engine's for the cores)
    for s in range(z):
        labels = np.zeros((h, w), np.int8)
        for b in bounds:  # comparisons, not np.digitize: 10x faster
            labels += after[s] > b
        labels[~inside[s]] = classes  # outside the body: a class of its own, given nothing back
        # the sum of before - after and the pixel count per (block, class): block * (classes + 1) + class
        flat = (bins + labels).ravel()
        sums = np.bincount(flat, weights=(before[s] - after[s]).ravel(), minlength=size)
        counts = np.bincount(flat, minlength=size).astype(np.float64)
        stats = ndimage.gaussian_filter(np.stack([sums, counts]).reshape(2, ch, cw, -1), sigmas, mode="constant")
        mean = (stats[0] / np.maximum(stats[1], floor)).astype(np.float32)  # (ch, cw, classes + 1)
        mean[..., classes] = 0.0
        # back to full resolution, linearly: the rows, then for each pixel the two coarse columns
        # it lies between, in its own class
        mean = mean.reshape(ch, -1)
        fine = mean[top] + down[:, None] * (mean[bottom] - mean[top])  # (h, cw * (classes + 1))
        index = left_index + labels
        fine = fine.ravel()
        at_left, at_right = fine[index], fine[index + to_right]
        at_right -= at_left
        at_right *= across
        at_right += at_left
        np.add(after[s], at_right, out=out[s])
    return out


@lru_cache(maxsize=16)
def _block_bins(h: int, w: int, step: int, classes: int) -> NDArray[np.intp]:
    """(h, w): the first bin of the step x step block each pixel lies in, `classes` bins a block."""
    columns = -(-w // step)
    return np.asarray(((np.arange(h)[:, None] // step) * columns + np.arange(w)[None, :] // step) * classes, np.intp)


@lru_cache(maxsize=16)
def _upsampler(coarse: int, step: int, fine: int) -> Array:
    """(fine, coarse) matrix of linear interpolation `step` times finer along one axis, exactly
    ndimage.zoom(order=1, mode="nearest", grid_mode=True) (linear, hence separable: the 2-D
    zoom is U_rows @ a @ U_cols.T)."""
    eye = np.eye(coarse, dtype=np.float32)
    return np.ascontiguousarray(ndimage.zoom(eye, (step, 1), order=1, mode="nearest", grid_mode=True)[:fine])


@lru_cache(maxsize=16)
def _linear(coarse: int, step: int, fine: int, width: int) -> tuple[NDArray[np.intp], NDArray[np.intp], Array]:
    """_upsampler's matrix as a gather: for each fine sample, the offsets of the first and the
    last coarse sample it is made of, in rows of `width` values a coarse sample, and the last
    one's weight."""
    u = _upsampler(coarse, step, fine)
    nonzero = u > 0
    first = np.argmax(nonzero, axis=1)
    last = coarse - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    weight = np.where(last > first, u[np.arange(fine), last], 0.0).astype(np.float32)
    return first * width, last * width, weight


def _upscale(a: NDArray[Any], scale: int) -> NDArray[Any]:
    """Each pixel repeated scale x scale times (a copy, also for scale 1)."""
    return np.repeat(np.repeat(a, scale, axis=-2), scale, axis=-1) if scale > 1 else a.copy()
