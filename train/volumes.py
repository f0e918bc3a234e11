"""Read DICOM series from any folder layout into volumes with their geometry.

CT comes out in Hounsfield units (Rescale Slope/Intercept, per frame for enhanced
multi-frame objects), MR and others in stored values. Slices are ordered by their position
along the slice normal, InstanceNumber when there is no geometry.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Volume:
    series_uid: str
    modality: str
    pixels: NDArray[np.float32]  # (slices, rows, columns): HU for CT, stored values otherwise
    spacing: tuple[float, float]  # (row, column) in mm
    positions: tuple[tuple[float, float, float], ...]  # ImagePositionPatient per slice, when known
    description: str = ""

    @property
    def slices(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class _Frame:
    pixels: NDArray[np.float32]
    position: tuple[float, float, float] | None
    normal: NDArray[np.float64] | None
    instance: int
    spacing: tuple[float, float]


def read_series(paths: Iterable[Path]) -> list[Volume]:
    """Every image series found under the given files or folders (recursively), one Volume each.

    Files that are not DICOM images are skipped with a debug log line; nothing is written.
    """
    previous = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE  # tolerant on what we read
    try:
        return _read(paths)
    finally:
        pydicom.config.settings.reading_validation_mode = previous


def _read(paths: Iterable[Path]) -> list[Volume]:
    frames: dict[str, list[_Frame]] = defaultdict(list)
    meta: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    for path in _files(paths):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            log.debug("skipping %s: %s", path, exc)
            continue
        if "PixelData" not in ds or ds.get("SamplesPerPixel", 1) != 1:
            continue
        sop = str(ds.get("SOPInstanceUID", path))
        if sop in seen:  # the same instance twice (another copy or transfer syntax of it)
            continue
        seen.add(sop)
        uid = str(ds.get("SeriesInstanceUID", path.parent))
        meta.setdefault(uid, (str(ds.get("Modality", "OT")), str(ds.get("SeriesDescription", ""))))
        frames[uid].extend(_frames(ds))
    volumes = []
    for uid, items in frames.items():
        modality, description = meta[uid]
        shapes = {f.pixels.shape for f in items}
        if len(shapes) != 1:
            log.warning("series %s mixes image sizes %s; skipped", uid, sorted(shapes))
            continue
        items = _ordered(items)
        volumes.append(
            Volume(
                series_uid=uid,
                modality=modality,
                pixels=np.stack([f.pixels for f in items]),
                spacing=items[0].spacing,
                positions=tuple(f.position for f in items if f.position is not None),
                description=description,
            )
        )
    return volumes


def _files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def _frames(ds: Dataset) -> list[_Frame]:
    pixels = ds.pixel_array.astype(np.float32)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if count == 1:
        pixels = pixels[None]
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    out = []
    for i in range(count):
        groups = [g for g in (per_frame[i] if i < len(per_frame) else None, shared) if g is not None]
        slope, intercept = _rescale(ds, groups)
        position = _lookup(ds, groups, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _lookup(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _lookup(ds, groups, "PixelMeasuresSequence", "PixelSpacing") or [1.0, 1.0]
        normal = None
        if orientation is not None:
            row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
            normal = np.cross(row, col)
        out.append(
            _Frame(
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


def _lookup(ds: Dataset, groups: list[Dataset], sequence: str, keyword: str) -> Any:
    for group in groups:
        item = _first(group.get(sequence))
        if item is not None and keyword in item:
            return item[keyword].value
    return ds.get(keyword)


def _rescale(ds: Dataset, groups: list[Dataset]) -> tuple[float, float]:
    for group in groups:
        item = _first(group.get("PixelValueTransformationSequence"))
        if item is not None and "RescaleSlope" in item:
            return float(item.RescaleSlope), float(item.RescaleIntercept)
    return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)


def _ordered(frames: list[_Frame]) -> list[_Frame]:
    """By position along the slice normal when every frame has geometry, else InstanceNumber."""
    normal = frames[0].normal
    if normal is not None and all(f.position is not None for f in frames):
        return sorted(frames, key=lambda f: float(np.dot(normal, f.position)))  # type: ignore[arg-type]
    return sorted(frames, key=lambda f: f.instance)
