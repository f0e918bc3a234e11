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

import numpy as np
import pydicom
import pydicom.config
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError

from core.geometry import Frame, frames, ordered

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
    frames_by_series: dict[str, list[Frame]] = defaultdict(list)
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
        frames_by_series[uid].extend(frames(ds))
    volumes = []
    for uid, items in frames_by_series.items():
        modality, description = meta[uid]
        shapes = {f.pixels.shape for f in items}
        if len(shapes) != 1:
            log.warning("series %s mixes image sizes %s; skipped", uid, sorted(shapes))
            continue
        items = ordered(items)
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
