"""A received instance as bytes: its Part 10 file form and the few header fields the node needs.

The SCP keeps the dataset exactly as the sender encoded it; it only prepends a File Meta
Information header (PS3.10 7.1) and reads identifiers from the header, never pixel data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import dcmread

import node
from core.images import ImageFacts, image_facts
from node import status
from node.errors import InvalidDataset

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1533.1.1"
IMPLEMENTATION_VERSION_NAME = f"ENHANCE_{node.__version__}"[:16]
_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    series_description: str
    instance_number: int | None
    source_ae: str = ""  # from the File Meta Information, when present
    facts: ImageFacts = field(default_factory=lambda: ImageFacts(""))  # what routing decides on (core/images.py)


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, group_elem)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str) -> bytes:
    """Preamble and File Meta Information in Explicit VR Little Endian.

    Written by hand because this runs once per received instance and pydicom's general
    writer (element objects, value validation) costs more than the rest of the hot path;
    tests compare it with pydicom's reading of the result.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid(sop_class_uid)),
            _element(0x0003, b"UI", _uid(sop_instance_uid)),
            _element(0x0010, b"UI", _uid(transfer_syntax_uid)),
            _element(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
            _element(0x0016, b"AE", _text(source_ae)),
        )
    )
    return _PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def parse_header(part10: bytes) -> InstanceHeader:
    """Identifiers of a Part 10 instance; InvalidDataset with the status to answer otherwise."""
    try:
        ds = dcmread(BytesIO(part10), stop_before_pixels=True)
        meta = ds.file_meta
        sop_class = str(ds.SOPClassUID)
        sop_instance = str(ds.SOPInstanceUID)
        study = str(ds.get("StudyInstanceUID", "") or "")
        series = str(ds.get("SeriesInstanceUID", "") or "")
        modality = str(ds.get("Modality", "") or "")
        description = str(ds.get("SeriesDescription", "") or "")
        number = ds.get("InstanceNumber")
        instance_number = int(number) if number not in (None, "") else None
        ts = str(meta.TransferSyntaxUID)
        source_ae = str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
        facts = image_facts(ds)
    except Exception as exc:  # pydicom raises many kinds on corrupt input; all mean "cannot parse"
        raise InvalidDataset(status.CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}") from None
    for name, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if not value:
            raise InvalidDataset(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} missing")
        if len(value) > 64:
            raise InvalidDataset(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} longer than 64")
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=ts,
        modality=modality[:16],
        series_description=description[:64],
        instance_number=instance_number,
        source_ae=source_ae,
        facts=facts,
    )


def check_matches_request(header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str) -> None:
    """The dataset must be what the C-STORE request says it is (PS3.4 B.2.3, status A900)."""
    if header.sop_class_uid != sop_class_uid:
        raise InvalidDataset(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOP Class {header.sop_class_uid} is not the requested {sop_class_uid}",
        )
    if header.sop_instance_uid != sop_instance_uid:
        raise InvalidDataset(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "dataset SOP Instance UID differs from the request's Affected SOP Instance UID",
        )
