"""Image-quality metrics, each on stated units: PSNR/SSIM in a display window, RMSE in the
image's own units (HU for CT), mean bias and noise SD in uniform regions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.metrics import structural_similarity

Array = NDArray[np.float32]

CT_WINDOW = (-160.0, 240.0)  # soft tissue, W400 L40: where low-dose noise hurts reading


def percentile_window(target: Array, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    p_lo, p_hi = np.percentile(target, [lo, hi])
    return float(p_lo), float(p_hi)


def psnr(pred: Array, target: Array, window: tuple[float, float]) -> float:
    lo, hi = window
    mse = float(np.mean((np.clip(pred, lo, hi) - np.clip(target, lo, hi)) ** 2, dtype=np.float64))
    return float("inf") if mse == 0 else 10.0 * np.log10((hi - lo) ** 2 / mse)


def ssim(pred: Array, target: Array, window: tuple[float, float]) -> float:
    lo, hi = window
    return float(structural_similarity(np.clip(pred, lo, hi), np.clip(target, lo, hi), data_range=hi - lo))


def rmse(pred: Array, target: Array) -> float:
    return float(np.sqrt(np.mean((pred.astype(np.float64) - target) ** 2)))


@dataclass(frozen=True)
class Roi:
    top: int
    left: int
    size: int

    def of(self, image: Array) -> Array:
        return image[self.top : self.top + self.size, self.left : self.left + self.size]


ROI_SIDE = 15  # pixels: the uniform-region ROIs whose mean HU and noise SD are measured (~7 mm on a head CT)


def uniform_rois(target: Array, value_range: tuple[float, float], size: int = ROI_SIDE, count: int = 5) -> list[Roi]:
    """Up to `count` non-overlapping size x size squares where the target is flattest, within
    value_range (e.g. soft tissue -50..100 HU): the regions a physicist would put an ROI on."""
    img = target.astype(np.float64)
    mean = ndimage.uniform_filter(img, size)
    sd = np.sqrt(np.clip(ndimage.uniform_filter(img**2, size) - mean**2, 0, None))
    lo_v, hi_v = value_range
    half = size // 2
    valid = (mean >= lo_v) & (mean <= hi_v) & (ndimage.minimum_filter(img, size) >= lo_v)
    valid &= ndimage.maximum_filter(img, size) <= hi_v
    valid[:half, :] = valid[-half:, :] = valid[:, :half] = valid[:, -half:] = False
    score = np.where(valid, sd, np.inf)
    rois: list[Roi] = []
    for flat in np.argsort(score, axis=None):
        if not np.isfinite(score.flat[flat]) or len(rois) == count:
            break
        cy, cx = np.unravel_index(flat, score.shape)
        top, left = int(cy) - half, int(cx) - half
        if all(abs(top - r.top) >= size or abs(left - r.left) >= size for r in rois):
            rois.append(Roi(top, left, size))
    return rois


def roi_bias_and_sd(pred: Array, target: Array, rois: list[Roi]) -> tuple[float, float]:
    """Largest |mean(pred) - mean(target)| over the ROIs, and the mean SD of pred inside them."""
    if not rois:
        return float("nan"), float("nan")
    bias = max(abs(float(r.of(pred).mean()) - float(r.of(target).mean())) for r in rois)
    sd = float(np.mean([r.of(pred).std() for r in rois]))
    return bias, sd
