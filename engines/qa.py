"""What an engine did to a series, measured from its own input and output (issue 17): the noise
level of the input, and per slice the figures the worker's QA gate compares with the limits in
config.toml ([qa]). Nothing here knows the truth; every figure is one a physicist could take
from the two series.

Noise level (`noise_sd`), over the object (CT: -300..300 HU after a light smoothing, so soft
tissue; otherwise above a tenth of the bright signal):
- CT: the standard deviation of the input in its flattest places. The local SD is taken in
  9x9 windows, and the estimate is the 25th percentile of those local SDs divided by 0.92:
  structure only raises a window's SD, so the flattest quarter measures the noise, and the
  factor corrects the lower quantile of a window SD of pure noise (calibrated on white and
  correlated Gaussian noise, tests/unit/test_qa.py). CT noise is coloured by the
  reconstruction kernel (a smooth kernel leaves little of it at the finest frequencies), so
  only a measure of the whole SD will do, and soft tissue is flat enough to give one.
- MR (and any other modality): Donoho and Johnstone's estimator, the median absolute finest
  diagonal Haar coefficient ((a - b - c + d) / 2 over each 2x2 block) divided by 0.6745, over
  the blocks inside the object; then again over the blocks whose smoothed signal is at least
  3 times that first estimate, because a magnitude image's Rician noise has SD sigma only
  where the signal is well above sigma (lower in dark tissue: Gudbjartsson and Patz 1995).
  MR images have few flat places (the 9x9 estimator read 2.5-4.7 times the truth at 1-2%
  noise on real MR) but their noise is white in the acquired matrix, and the finest diagonal
  detail of anatomy is sparse, so the median sees the noise.

Denoising, per slice, over the object (residual r = input - output):
- `residual_mean`: the 99th percentile of |local mean of r| in 31x31 windows, in image units
  (HU for CT): a regional shift of the mean, which is what moves Hounsfield units; noise
  averages out over 961 pixels.
- `removed_ratio`: SD of r over SD of the noise estimate: about 1 when the engine removed the
  noise and nothing else; well above 1, it removed anatomy too.
- `edge_ratio`: RMS of r at the output's strongest edges (the top 10% of its gradient magnitude
  within the object) over the noise SD: noise does not know where edges are, so removing noise
  alone leaves this near or below 1, while blurring edges drives it far above (a 2-pixel
  Gaussian blur of real CT: 1.1-28; the shipped denoiser: 0.15-1.9).
- `edge_correlation`: the correlation of |r| with the output's gradient magnitude (reported; at
  low noise it is high even for a good denoiser, since |r| is tiny everywhere).

Super-resolution, per slice:
- `inconsistency`: RMS of (output averaged back over each scale x scale block - input), in
  percent of the input's 0.5-99.5 percentile range: the output must explain the input.
- `overshoot`: the percentage of output pixels outside the range of the 3x3 input pixels around
  them by more than 2% of that range: halos and ringing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from engines.normalization import Normalization

Array = NDArray[np.float32]

LOCAL_SD_WINDOW = 9
LOCAL_SD_QUANTILE = 25.0
LOCAL_SD_CORRECTION = 0.92
MEAN_WINDOW = 31
NOISE_SLICES = 16  # the series' noise level is the median over at most this many slices, evenly spread
QA_SLICES = 64  # the figures are taken on at most this many slices, evenly spread (every slice of a short series)
EDGE_PERCENT = 10.0
MAD_GAUSSIAN = 0.6745  # the median of |N(0, 1)|
RICIAN_SNR = 3.0  # above this signal-to-noise ratio a magnitude image's noise is Gaussian
MIN_BLOCKS = 64  # 2x2 blocks the MR estimate needs
CT_TISSUE = (-300.0, 300.0)
SMOOTH_SIGMA = 2.0  # pixels: the light smoothing the object mask is taken on
SMOOTH_RADIUS = int(4.0 * SMOOTH_SIGMA + 0.5)  # ndimage.gaussian_filter's reach (truncate 4)
EROSIONS = 2  # the mask is eroded this many pixels, off the object's edge


def object_mask(image: NDArray[np.floating], ct: bool) -> NDArray[np.bool_]:
    """Where the figures are taken: soft tissue for CT, the object (not the background) otherwise."""
    return _mask_of(_smooth(image), ct)


def _mask_of(smooth: Array, ct: bool) -> NDArray[np.bool_]:
    """object_mask of the slice `smooth` is the light smoothing of (`_smooth`)."""
    if ct:
        mask = (smooth > CT_TISSUE[0]) & (smooth < CT_TISSUE[1])
    else:
        mask = smooth > 0.1 * float(np.percentile(smooth, 99.5))
    return np.asarray(ndimage.binary_erosion(mask, iterations=EROSIONS), np.bool_)


def _smooth(image: NDArray[np.floating]) -> Array:
    return np.asarray(ndimage.gaussian_filter(np.asarray(image, np.float32), SMOOTH_SIGMA), np.float32)


def _local_sd(image: NDArray[np.floating], size: int) -> NDArray[np.float64]:
    """The SD in size x size windows, in float64: in float32 the mean square of bright tissue
    loses the variance of half-HU noise (+0.4% at 250 HU)."""
    x = np.asarray(image, np.float64)
    mean = ndimage.uniform_filter(x, size)
    return np.asarray(np.sqrt(np.clip(ndimage.uniform_filter(x * x, size) - mean * mean, 0.0, None)), np.float64)


def _tissue_crop(image: NDArray[np.floating]) -> NDArray[np.floating]:
    """The part of a CT slice that noise_sd's figure depends on: the box round the pixels above
    the tissue mask's floor, widened by what the figure reads beyond it. A mask pixel lies within
    the smoothing's reach of the box (a smoothing of pixels at or below the floor stays there);
    the smoothing and erosion it needs read that reach and the erosion further, its local SD half
    a window. The estimate is the same (to float rounding); air, a quarter of a slice and more,
    is not filtered."""
    above = image > CT_TISSUE[0]
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if not rows.size:
        return image[:0, :0]
    margin = SMOOTH_RADIUS + max(SMOOTH_RADIUS + EROSIONS, LOCAL_SD_WINDOW // 2)
    y0, y1 = max(0, int(rows[0]) - margin), int(rows[-1]) + margin + 1
    x0, x1 = max(0, int(cols[0]) - margin), int(cols[-1]) + margin + 1
    return image[y0:y1, x0:x1]


def noise_sd(image: NDArray[np.floating], ct: bool) -> float:
    """The noise SD of one slice in image units (module docstring); 0 when no object is found."""
    if ct:
        image = _tissue_crop(image)
    smooth = _smooth(image)
    mask = _mask_of(smooth, ct)
    if mask.sum() < LOCAL_SD_WINDOW**2:
        return 0.0
    if not ct:
        return _diagonal_detail_sd(np.asarray(image, np.float64), smooth, mask)
    local = _local_sd(image, LOCAL_SD_WINDOW)[mask]
    return float(np.percentile(local, LOCAL_SD_QUANTILE) / LOCAL_SD_CORRECTION)


def _blocks(image: NDArray[Any]) -> NDArray[Any]:
    """(h, w) -> (h // 2, 2, w // 2, 2): the 2x2 blocks, an odd last row or column left out."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2)


def _diagonal_detail_sd(image: NDArray[np.float64], smooth: Array, mask: NDArray[np.bool_]) -> float:
    """MR's noise SD (module docstring): the median |finest diagonal Haar coefficient| / 0.6745
    over the object's 2x2 blocks, then over those where the signal (`smooth`) is RICIAN_SNR
    times that."""
    b = _blocks(image)
    diagonal = np.abs(b[:, 0, :, 0] - b[:, 0, :, 1] - b[:, 1, :, 0] + b[:, 1, :, 1]) / 2.0
    inside = _blocks(mask).all(axis=(1, 3))
    if inside.sum() < MIN_BLOCKS:
        return 0.0
    sd = float(np.median(diagonal[inside])) / MAD_GAUSSIAN
    bright = inside & _blocks(smooth > RICIAN_SNR * sd).all(axis=(1, 3))
    return float(np.median(diagonal[bright])) / MAD_GAUSSIAN if bright.sum() >= MIN_BLOCKS else sd


def spread(count: int, most: int) -> list[int]:
    """At most `most` indices evenly spread over range(count), first and last included."""
    return sorted(set(np.linspace(0, count - 1, min(count, most)).round().astype(int).tolist())) if count else []


def series_noise_sd(volume: NDArray[np.floating], ct: bool) -> float:
    """The median of the slices' estimates (NOISE_SLICES of them at most): one figure for the series."""
    values = [noise_sd(volume[i], ct) for i in spread(len(volume), NOISE_SLICES)]
    return float(np.median(values)) if values else 0.0


def denoise_figures(before: Array, after: Array, sd: float, ct: bool) -> dict[str, float]:
    mask = object_mask(before, ct)
    if mask.sum() < MEAN_WINDOW**2:
        return {}
    r = np.asarray(before, np.float64) - after
    local_mean = ndimage.uniform_filter(r, MEAN_WINDOW)
    gradient = ndimage.gaussian_gradient_magnitude(np.asarray(after, np.float64), 1.0)
    a, g = np.abs(r[mask]), gradient[mask]
    corr = float(np.corrcoef(a, g)[0, 1]) if a.std() > 0 and g.std() > 0 else 0.0
    edges = r[mask][g >= np.percentile(g, 100.0 - EDGE_PERCENT)]
    return {
        "residual_mean": float(np.percentile(np.abs(local_mean[mask]), 99.0)),
        "removed_ratio": float(r[mask].std() / sd) if sd > 0 else 0.0,
        "edge_ratio": float(np.sqrt(np.mean(edges**2)) / sd) if sd > 0 else 0.0,
        "edge_correlation": corr,
    }


def input_range(low: NDArray[np.floating], scale: int) -> tuple[Array, Array]:
    """(min, max) of the 3x3 input pixels round the one each output pixel lies in, on the
    output grid, for (h, w) or (slices, h, w): what SR output may span without overshooting."""
    size = (1,) * (low.ndim - 2) + (3, 3)
    lo = ndimage.minimum_filter(low, size=size, mode="nearest")
    hi = ndimage.maximum_filter(low, size=size, mode="nearest")
    up = (lambda a: np.repeat(np.repeat(a, scale, -2), scale, -1)) if scale > 1 else (lambda a: a)
    return np.asarray(up(lo), np.float32), np.asarray(up(hi), np.float32)


def sr_figures(low: Array, high: Array, scale: int) -> dict[str, float]:
    h, w = low.shape[0] * scale, low.shape[1] * scale
    blocks = np.asarray(high[:h, :w], np.float64).reshape(low.shape[0], scale, low.shape[1], scale).mean(axis=(1, 3))
    p_lo, p_hi = np.percentile(low, [0.5, 99.5])
    span = float(p_hi - p_lo) or 1.0
    lo, hi = input_range(low, scale)
    out = np.asarray(high[:h, :w], np.float64)
    beyond = (out < lo - 0.02 * span) | (out > hi + 0.02 * span)
    return {
        "inconsistency": float(100.0 * np.sqrt(np.mean((blocks - low) ** 2)) / span),
        "overshoot": float(100.0 * beyond.mean()),
    }


def measure(
    before: NDArray[np.floating],
    after: NDArray[np.floating],
    task: str,
    scale: int,
    ct: bool,
    sd: float | None = None,
) -> dict[str, float]:
    """The series' figures: each the worst over its slices (QA_SLICES of them at most, evenly
    spread: a 300-slice series is checked on every fifth), plus `noise_sd` of the input (`sd`
    when the caller has estimated it already). `before` and `after` are (slices, h, w) in image
    units."""
    before = np.asarray(before, np.float32)
    after = np.asarray(after, np.float32)
    sd = series_noise_sd(before, ct) if sd is None else sd
    worst: dict[str, float] = {"noise_sd": sd}
    for i in spread(len(before), QA_SLICES):
        b, a = before[i], after[i]
        figures = denoise_figures(b, a, sd, ct) if task == "denoise" else sr_figures(b, a, scale)
        for k, v in figures.items():
            worst[k] = max(worst.get(k, -np.inf), v)
    return {k: round(v, 4) for k, v in worst.items()}


def noise_level(x: NDArray[np.floating], norm: Normalization) -> float:
    """The noise map's value for a normalised series (slices, h, w): its estimated noise SD
    in normalised units. CT is measured in HU (the soft-tissue mask is in HU)."""
    x = x[spread(len(x), NOISE_SLICES)]  # only the slices series_noise_sd reads go back to HU
    if norm.kind == "hu":
        span = norm.hi - norm.lo
        return series_noise_sd(Normalization.inverse(x, (norm.lo, span)), ct=True) / span
    return series_noise_sd(x, ct=False)


def apply_strength(before: NDArray[np.floating], after: NDArray[np.floating], strength: float) -> Array:
    """A denoiser's output with only `strength` (0..1] of what it removed taken away: 1 is the
    model's full output, less keeps part of the original noise texture."""
    b = np.asarray(before, np.float32)
    return np.asarray(b - np.float32(strength) * (b - np.asarray(after, np.float32)), np.float32)
