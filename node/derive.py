"""Derived series (DESIGN 3.6): every output image, built from its source image and the
enhanced pixels. docs/conformance.md explains each rule.

The output is a copy of the source with what changed said so: new deterministic UIDs (a
re-run or re-send yields the same objects), ImageType DERIVED\\SECONDARY, derivation
description and code, a reference to the source image, an appended Contributing Equipment
item, a new series number and description, processing time, the pixels re-encoded in the
source's own bit depth and rescale (HU kept), and for super-resolution the new matrix,
pixel spacing and first-pixel position. Output is uncompressed Explicit VR Little Endian.
"""

from __future__ import annotations

import copy
import datetime as dt
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from core.errors import EngineFailure, InvalidDataset
from core.geometry import functional_groups, lookup, rescale
from node import __version__

# pydicom's UID root, for UIDs generated with pydicom; the suffix is a hash of the inputs.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
MANUFACTURER = "enhance-node"
PIXEL_DATA = Tag("PixelData")
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
    "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy allowed)
}


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


DERIVATION = {
    "denoise": ("113087", "DCM", "Smoothing"),
    "sr": ("113085", "DCM", "Spatial resampling"),
}
SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")


@dataclass(frozen=True)
class DeriveSettings:
    series_number_offset: int = 1000
    description_suffix: str = " enhanced"


@dataclass(frozen=True)
class Processing:
    """What made the output: the model, its task, the backend, and when."""

    model: str
    version: str
    task: str  # "denoise" | "sr"
    scale: int
    backend: str
    at: dt.datetime  # aware; written in the node's local time zone
    device_uid: str = ""
    strength: str = ""  # denoising: the route's strength (config STRENGTHS), recorded in the description
    qa_warning: str = ""  # what the QA gate found, when the route delivers a series it failed

    @property
    def description(self) -> str:
        text = f"{self.model} {self.version} ({self.backend})"
        if self.strength:
            text += f", strength {self.strength}"
        if self.qa_warning:
            text += f"; QA WARNING: {self.qa_warning}"
        return text


def derived_uid(source_uid: str, model: str, version: str) -> UID:
    """The same source, model and version always give the same UID (idempotent re-runs)."""
    return generate_uid(UID_PREFIX, entropy_srcs=[source_uid, model, version])


def device_uid() -> UID:
    """This node's DeviceUID for Contributing Equipment: stable per host."""
    return generate_uid(UID_PREFIX, entropy_srcs=["enhance-node device", socket.gethostname()])


def derive_image(
    source: Dataset, values: NDArray[np.floating], proc: Processing, settings: DeriveSettings = DeriveSettings()
) -> Dataset:
    """The derived image for one source image object; `values` are in image units (HU for CT
    through the source's rescale, stored values otherwise), shape (rows, cols) x scale, or
    (frames, rows, cols) x scale for a multi-frame object (frames in the object's order)."""
    rows, cols = int(source.Rows), int(source.Columns)
    frames = int(source.get("NumberOfFrames", 1) or 1)
    plane = (rows * proc.scale, cols * proc.scale)
    expected = plane if frames == 1 else (frames, *plane)
    if values.shape != expected:
        raise InvalidDataset(
            0xC000, f"enhanced pixels {values.shape} do not fit {expected} ({rows}x{cols} x{proc.scale})"
        )
    ds = _copy_without_pixels(source)
    _identity(ds, source, proc, settings)
    _derivation(ds, source, proc)
    if proc.scale > 1:
        _resample_geometry(ds, proc.scale)
    _encode_pixels(ds, values.reshape(frames, *plane))
    return ds


def _copy_without_pixels(source: Dataset) -> Dataset:
    """A deep copy of every element but Pixel Data (replaced anyway), without pydicom's cached
    decoded pixel array: copying both would double the per-image work for nothing."""
    return Dataset({tag: copy.deepcopy(elem) for tag, elem in source.items() if tag != PIXEL_DATA})


def _identity(ds: Dataset, source: Dataset, proc: Processing, settings: DeriveSettings) -> None:
    ds.SeriesInstanceUID = derived_uid(source.SeriesInstanceUID, proc.model, proc.version)
    ds.SOPInstanceUID = derived_uid(source.SOPInstanceUID, proc.model, proc.version)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = source.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"ENHANCE_{__version__}"[:16]
    ds.file_meta = meta
    number = source.get("SeriesNumber")
    ds.SeriesNumber = (int(number) if number not in (None, "") else 0) + settings.series_number_offset
    base = str(source.get("SeriesDescription", "") or source.get("Modality", ""))
    suffix = settings.description_suffix
    ds.SeriesDescription = (base[: 64 - len(suffix)] + suffix)[:64]
    local = proc.at.astimezone()
    ds.InstanceCreationDate = ds.ContentDate = local.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = local.strftime("%H%M%S.%f")
    ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime
    if "TimezoneOffsetFromUTC" in source:
        ds.TimezoneOffsetFromUTC = local.strftime("%z")


def _derivation(ds: Dataset, source: Dataset, proc: Processing) -> None:
    # Enhanced (multi-frame) IODs allow only PRIMARY as value 2 of Image Type and Frame Type
    # (PS3.3 C.8.16.1 / C.8.13.1.1.1); single-frame images say SECONDARY, as DESIGN 3.6 asks
    second = "PRIMARY" if "SharedFunctionalGroupsSequence" in source else "SECONDARY"
    image_type = list(source.get("ImageType", []) or [])
    ds.ImageType = ["DERIVED", second, *[str(v) for v in image_type[2:]]]
    for group in _all_groups(ds):  # enhanced objects repeat it per frame as Frame Type
        for element in group:
            if element.keyword.endswith("FrameTypeSequence"):
                for item in element.value:
                    item.FrameType = ["DERIVED", second, *[str(v) for v in list(item.FrameType)[2:]]]
    ds.DerivationDescription = proc.description
    ds.DerivationCodeSequence = Sequence([code(*DERIVATION[proc.task])])
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = Sequence([code(*SOURCE_IMAGE_PURPOSE)])
    ds.SourceImageSequence = Sequence([ref])
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source.SeriesInstanceUID
    instance_ref = Dataset()
    instance_ref.ReferencedSOPClassUID = source.SOPClassUID
    instance_ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series_ref.ReferencedInstanceSequence = Sequence([instance_ref])
    ds.ReferencedSeriesSequence = Sequence([series_ref])
    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = Sequence([code(*PROCESSING_EQUIPMENT)])
    equipment.Manufacturer = MANUFACTURER
    equipment.ManufacturerModelName = proc.model[:64]
    equipment.SoftwareVersions = [f"enhance-node {__version__}", f"{proc.model} {proc.version}"]
    equipment.DeviceUID = proc.device_uid or device_uid()
    equipment.ContributionDateTime = proc.at.astimezone().strftime("%Y%m%d%H%M%S.%f%z")
    equipment.ContributionDescription = proc.description
    existing = list(source.get("ContributingEquipmentSequence", []) or [])
    ds.ContributingEquipmentSequence = Sequence([*copy.deepcopy(existing), equipment])
    syntax = getattr(source, "file_meta", {}).get("TransferSyntaxUID")
    if syntax in LOSSY_SYNTAXES or source.get("LossyImageCompression") == "01":
        ds.LossyImageCompression = "01"  # pixels that passed through lossy compression stay marked so


def _resample_geometry(ds: Dataset, scale: int) -> None:
    """Same field of view on a scale-times finer matrix; the first pixel's centre moves by
    (new - old spacing) / 2 along the row and column directions. Enhanced objects carry the
    spacing in Pixel Measures and the position per frame in Plane Position."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    # each Plane Position item moves once: per frame, or once when it is shared
    owners = [(item, functional_groups(ds, i)) for i, item in enumerate(per_frame)]
    owners += [(item, [item]) for item in shared]
    for item, groups in owners:
        spacing = lookup(ds, groups, "PixelMeasuresSequence", "PixelSpacing")
        orientation = lookup(ds, groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        for position in item.get("PlanePositionSequence", []) if spacing and orientation else []:
            position.ImagePositionPatient = _shifted(position.ImagePositionPatient, orientation, spacing, scale)
    for group in _all_groups(ds):
        for item in group.get("PixelMeasuresSequence", []):
            if "PixelSpacing" in item:
                item.PixelSpacing = [format_number_as_ds(float(v) / scale) for v in item.PixelSpacing]
    if "PixelSpacing" in ds:
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            ds.ImagePositionPatient = _shifted(
                ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, scale
            )
        ds.PixelSpacing = [format_number_as_ds(float(v) / scale) for v in ds.PixelSpacing]
    for tag in [e.tag for e in ds if 0x6000 <= e.tag.group <= 0x601E]:  # overlays are drawn on the old matrix
        del ds[tag]
    if "IconImageSequence" in ds:
        del ds.IconImageSequence


def _shifted(position: Any, orientation: Any, spacing: Any, scale: int) -> list[str]:
    """Image Position (Patient) of the first pixel of the finer grid (row spacing first in
    PixelSpacing; the row direction cosine is the first half of the orientation)."""
    old_row, old_col = (float(v) for v in spacing)
    iop = np.asarray([float(v) for v in orientation])
    along_row, along_col = iop[:3], iop[3:]  # direction of increasing column, of increasing row
    ipp = np.asarray([float(v) for v in position])
    ipp = ipp + along_row * (old_col / scale - old_col) / 2 + along_col * (old_row / scale - old_row) / 2
    return [format_number_as_ds(v) for v in ipp]


def _all_groups(ds: Dataset) -> list[Dataset]:
    return [*(ds.get("SharedFunctionalGroupsSequence") or []), *(ds.get("PerFrameFunctionalGroupsSequence") or [])]


def stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def to_stored(
    ds: Dataset, values: NDArray[np.floating], slope: float = 1.0, intercept: float = 0.0
) -> NDArray[np.integer]:
    """Image units -> stored values through the rescale, rounded and clipped to the stored
    range (DESIGN 3.6: HU fidelity)."""
    stored = np.rint((np.asarray(values, np.float64) - intercept) / slope)
    lo, hi = stored_range(ds)
    dtype = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16}.get(
        (int(ds.BitsAllocated), int(ds.PixelRepresentation))
    )
    if dtype is None:
        raise InvalidDataset(0xC000, f"unsupported pixel format: {ds.BitsAllocated} bits allocated")
    return np.clip(stored, lo, hi).astype(dtype)


def _encode_pixels(ds: Dataset, values: NDArray[np.floating]) -> None:
    """values: (frames, rows, cols) in image units, each frame through its own rescale."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidDataset(0xC000, "only single-sample (grey) images are enhanced")
    if not np.all(np.isfinite(values)):
        raise EngineFailure("the engine returned non-finite pixel values (NaN or infinity)")
    stored = np.stack([to_stored(ds, v, *rescale(ds, functional_groups(ds, i))) for i, v in enumerate(values)])
    ds.Rows, ds.Columns = stored.shape[1:]
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingRangeLimit"):
        if keyword in ds:
            del ds[keyword]
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) == 8 else "OW"
    ds["PixelData"].is_undefined_length = False
