"""Frames of DICOM images in image units with their geometry, and their order in a series.

Shared by the worker (node/worker.py, which splits a series into stacks with node/series.py),
the derived-object writer (node/derive.py) and the trainer (train/volumes.py): CT comes out in
Hounsfield units (Rescale Slope/Intercept, per frame for enhanced multi-frame objects), MR
and others in stored values; slices are ordered by their position along the slice normal,
InstanceNumber when there is no geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Frame:
    dataset: Dataset  # the object the frame came from
    index: int  # frame number within it (0 for single-frame images)
    pixels: NDArray[np.float32]
    position: tuple[float, float, float] | None
    normal: NDArray[np.float64] | None
    instance: int
    spacing: tuple[float, float]


def frames(ds: Dataset) -> list[Frame]:
    """Every frame of an image object, in image units, with its position and spacing."""
    pixels = ds.pixel_array.astype(np.float32)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if count == 1:
        pixels = pixels[None]
    out = []
    for i in range(count):
        groups = functional_groups(ds, i)
        slope, intercept = rescale(ds, groups)
        position = lookup(ds, groups, "PlanePositionSequence", "ImagePositionPatient")
        orientation = lookup(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = lookup(ds, groups, "PixelMeasuresSequence", "PixelSpacing") or [1.0, 1.0]
        normal = None
        if orientation is not None:
            row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
            normal = np.cross(row, col)
        out.append(
            Frame(
                dataset=ds,
                index=i,
                pixels=pixels[i] * slope + intercept,
                position=tuple(float(v) for v in position) if position is not None else None,  # type: ignore[arg-type]
                normal=normal,
                instance=int(ds.get("InstanceNumber", 0) or 0) * 10000 + i,
                spacing=(float(spacing[0]), float(spacing[1])),
            )
        )
    return out


def _first(seq: Any) -> Dataset | None:
    return seq[0] if seq else None


def functional_groups(ds: Dataset, frame: int) -> list[Dataset]:
    """The functional group items that apply to `frame`: its per-frame item, then the shared
    one (empty for single-frame images, whose attributes are at the top level)."""
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    return [g for g in (per_frame[frame] if frame < len(per_frame) else None, shared) if g is not None]


def lookup(ds: Dataset, groups: list[Dataset], sequence: str, keyword: str) -> Any:
    """`keyword` from the first functional group holding `sequence`, else from the top level."""
    for group in groups:
        item = _first(group.get(sequence))
        if item is not None and keyword in item:
            return item[keyword].value
    return ds.get(keyword)


def rescale(ds: Dataset, groups: list[Dataset]) -> tuple[float, float]:
    """(slope, intercept) of the modality LUT for a frame."""
    for group in groups:
        item = _first(group.get("PixelValueTransformationSequence"))
        if item is not None and "RescaleSlope" in item:
            return float(item.RescaleSlope), float(item.RescaleIntercept)
    return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)


def ordered(items: list[Frame]) -> list[Frame]:
    """By position along the slice normal when every frame has geometry, else InstanceNumber."""
    normal = items[0].normal
    if normal is not None and all(f.position is not None for f in items):
        return sorted(items, key=lambda f: float(np.dot(normal, f.position)))  # type: ignore[arg-type]
    return sorted(items, key=lambda f: f.instance)
