"""What the node knows about a received object without decoding its pixels: the header facts
that decide whether a model applies to it (modality, image type, photometric interpretation,
matrix, plane, pixel spacing, SOP class) and whether an enhance-node made it.

Read once, by the SCP, from the header it parses anyway (core/header.py); kept in the ledger
as JSON beside the instance, so routing never re-reads files; read again by the worker from
the full dataset, with the same function.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from pydicom.dataset import Dataset

# Contributing Equipment items that enhance-node writes (node/derive.py) carry this Manufacturer.
PRODUCER_MANUFACTURER = "enhance-node"


@dataclass(frozen=True)
class Producer:
    """An enhance-node that made an object: the model (Contributing Equipment's
    ManufacturerModelName) and the node's DeviceUID."""

    model: str
    device_uid: str


@dataclass(frozen=True)
class ImageFacts:
    sop_class_uid: str
    modality: str = ""
    image_type: tuple[str, ...] = ()
    photometric: str = ""
    rows: int = 0  # 0: not an image (SR, PDF, waveform, ...)
    columns: int = 0
    frames: int = 1
    orientation: tuple[float, ...] | None = None  # Image Orientation (Patient), six cosines
    pixel_spacing: tuple[float, float] | None = None  # mm, (row, column)
    slice_thickness: float | None = None
    producers: tuple[Producer, ...] = field(default=())

    @property
    def is_image(self) -> bool:
        return self.rows > 0 and self.columns > 0

    @property
    def normal(self) -> tuple[float, float, float] | None:
        """The slice normal (row x column direction), or None without an orientation."""
        if self.orientation is None or len(self.orientation) != 6:
            return None
        r, c = self.orientation[:3], self.orientation[3:]
        n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        size = math.sqrt(sum(v * v for v in n))
        return (n[0] / size, n[1] / size, n[2] / size) if size > 0 else None

    def to_json(self) -> str:
        """The facts as the ledger keeps them (once per received instance: dataclasses.asdict's
        deep copy took a fifth of the ledger's time)."""
        data = {name: getattr(self, name) for name in _FACT_FIELDS}
        data["producers"] = [asdict(p) for p in self.producers]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ImageFacts:
        data: dict[str, Any] = json.loads(text)
        return cls(
            sop_class_uid=str(data["sop_class_uid"]),
            modality=str(data.get("modality", "")),
            image_type=tuple(data.get("image_type", ())),
            photometric=str(data.get("photometric", "")),
            rows=int(data.get("rows", 0)),
            columns=int(data.get("columns", 0)),
            frames=int(data.get("frames", 1)),
            orientation=tuple(data["orientation"]) if data.get("orientation") else None,
            pixel_spacing=tuple(data["pixel_spacing"]) if data.get("pixel_spacing") else None,
            slice_thickness=data.get("slice_thickness"),
            producers=tuple(Producer(**p) for p in data.get("producers", ())),
        )


_FACT_FIELDS = tuple(f.name for f in fields(ImageFacts))


class Values(Protocol):
    """A header's values by keyword: a pydicom Dataset, or the dict core.header's fast reader
    makes of the same elements."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def __contains__(self, key: str) -> bool: ...


def _first(seq: Any) -> Dataset | None:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _shared(ds: Values, sequence: str, keyword: str) -> Any:
    """`keyword` at the top level, else in the shared functional groups of an enhanced object
    (the first per-frame item when it is not shared)."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _first(ds.get(groups))
        item = _first(group.get(sequence)) if group is not None else None
        if item is not None and keyword in item:
            return item[keyword].value
    return None


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(v) for v in numbers) else None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def producers(ds: Values) -> tuple[Producer, ...]:
    """The enhance-nodes named in Contributing Equipment (what made this object, in order)."""
    found = []
    for item in ds.get("ContributingEquipmentSequence") or []:
        if str(item.get("Manufacturer", "") or "").strip() == PRODUCER_MANUFACTURER:
            found.append(
                Producer(str(item.get("ManufacturerModelName", "") or ""), str(item.get("DeviceUID", "") or ""))
            )
    return tuple(found)


def image_facts(ds: Values) -> ImageFacts:
    """The facts of a dataset read with or without its pixels. Malformed values give None
    (the fact is unknown), never an exception: whether a model applies is decided later."""
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    spacing = _numbers(_shared(ds, "PixelMeasuresSequence", "PixelSpacing"), 2)
    return ImageFacts(
        sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
        modality=str(ds.get("Modality", "") or "").strip(),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip(),
        rows=_integer(ds.get("Rows"), 0),
        columns=_integer(ds.get("Columns"), 0),
        frames=_integer(ds.get("NumberOfFrames", 1) or 1, 1),
        orientation=_numbers(_shared(ds, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
        pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
        slice_thickness=_number(_shared(ds, "PixelMeasuresSequence", "SliceThickness")),
        producers=producers(ds),
    )
