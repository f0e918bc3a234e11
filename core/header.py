"""What the node reads of a Part 10 instance without decoding its pixels: the identifiers and
header facts the ledger and routing keep (InstanceHeader), whether the data set's structure
holds together, and the Source AE the node wrote into its own file meta.

The SCP parses every received instance with it (node/handlers.py), and start-up recovery
parses the files it adopts (storage/recovery.py) with the same function. It answers with the
status to send (core.status) when it refuses a data set; the node's File Meta writer is
node/instance.py.
"""

from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag

from core import status
from core.errors import InvalidDataset
from core.images import ImageFacts, image_facts

UID_SYNTAX = re.compile(r"[0-9]+(\.[0-9]+)*")  # digits and dots, no empty component (PS3.5 9.1)
PREAMBLE = b"\x00" * 128 + b"DICM"  # what precedes the File Meta Information (PS3.10 7.1)
PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
DEFER_BYTES = 1024  # values longer than this are skipped, not read, when the structure is walked
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
# VRs whose explicit-VR elements have a 4-byte length after two reserved bytes (PS3.5 7.1.2)
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


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
    facts: ImageFacts = field(default_factory=lambda: ImageFacts(""))  # what routing decides on (core/images.py)
    warning: str = ""  # a defect the node stores the data set with (docs/receiving.md, "Malformed data")


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
        instance_number = _ledger_integer(number)
        ts = str(meta.TransferSyntaxUID)
        facts = image_facts(ds)
    except Exception as exc:  # pydicom raises many kinds on corrupt input; all mean "cannot parse"
        raise InvalidDataset(status.CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}") from None
    for name, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if not value:
            raise InvalidDataset(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} missing")
    # the SOP Class too: the ledger keeps it, and a private one (node.accept_unknown_sop_classes)
    # is whatever the peer negotiated (one holding a NUL was answered 0xA700 on PostgreSQL)
    uids = ("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop_instance)
    for name, value in (*uids, ("SOPClassUID", sop_class)):
        if len(value) > 64:
            raise InvalidDataset(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} longer than 64")
        if not UID_SYNTAX.fullmatch(value):
            raise InvalidDataset(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} holds characters a UID may not")
    warning = check_structure(part10, ts, ds)
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=ts,
        modality=modality[:16],
        series_description=description[:64],
        instance_number=instance_number,
        facts=facts,
        warning=warning,
    )


def _ledger_integer(value: object) -> int | None:
    """InstanceNumber as the ledger keeps it (listing and ordering only; the file keeps what
    was sent): None when absent, not an integer, or beyond a 32-bit column (PostgreSQL's
    INTEGER refuses 999999999999, which the standard allows)."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def meta_source_ae(part10: bytes) -> str:
    """Source Application Entity Title from the file meta group as its group length delimits it
    (the node's own, written by file_meta): never from elements that follow it."""
    start = len(PREAMBLE)
    if part10[:start] != PREAMBLE or part10[start : start + 6] != b"\x02\x00\x00\x00UL":
        return ""
    (length,) = struct.unpack_from("<L", part10, start + 8)
    offset, end = start + 12, min(start + 12 + length, len(part10))
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", part10, offset)
        vr = part10[offset + 4 : offset + 6]
        if vr in LONG_VRS:
            (size,) = struct.unpack_from("<L", part10, offset + 8)
            header = 12
        else:
            (size,) = struct.unpack_from("<H", part10, offset + 6)
            header = 8
        if (group, element) == (0x0002, 0x0016):
            return part10[offset + header : offset + header + size].decode("ascii", "replace").strip(" \x00")
        offset += header + size
    return ""


def _dataset_offset(part10: bytes) -> int:
    """Where the data set starts: after the file meta group as its group length says."""
    start = len(PREAMBLE)
    (length,) = struct.unpack_from("<L", part10, start + 8)
    return start + 12 + int(length)


def check_structure(part10: bytes, transfer_syntax: str, header: Dataset) -> str:
    """The defects of a data set's structure that its header does not show (issue 19), by
    walking its top-level elements without reading large values:

    - an element whose value runs past the end of the data set (cut in transit, or a lying
      length): InvalidDataset 0xC000, nothing is stored;
    - encapsulated Pixel Data without its sequence delimiter (cut): the same;
    - native Pixel Data whose length is not Rows x Columns x frames x samples x bits: stored,
      answered with a warning; the returned text says why (the worker refuses the series).

    Deflated data sets are checked after pydicom has inflated them, by parse_header."""
    if transfer_syntax in DEFLATED_SYNTAXES or len(part10) < len(PREAMBLE) + 12:
        return ""
    if _native_pixels_end_it(part10, transfer_syntax, header):
        return ""  # the common case, in O(1): what follows walks every element
    offset = _dataset_offset(part10)
    fp = BytesIO(part10)
    fp.seek(offset)
    implicit, little = transfer_syntax == IMPLICIT_LITTLE, transfer_syntax != EXPLICIT_BIG
    pixel_length: int | None = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for element in data_element_generator(fp, implicit, little, defer_size=DEFER_BYTES):
                if not isinstance(element, RawDataElement):  # a sequence, read whole: no length to check
                    continue
                if element.length != UNDEFINED_LENGTH and element.value_tell + element.length > len(part10):
                    present = len(part10) - element.value_tell
                    raise InvalidDataset(
                        status.CANNOT_UNDERSTAND,
                        f"data set ends inside element {element.tag}: {element.length} bytes said, {present} there",
                    )
                if element.tag == PIXEL_DATA_TAG:
                    pixel_length = element.length
    except InvalidDataset:
        raise
    except Exception as exc:  # the generator's view of a broken structure
        why = f"data set structure cannot be read: {type(exc).__name__}"
        raise InvalidDataset(status.CANNOT_UNDERSTAND, why) from None
    if any("before delimiter" in str(w.message) for w in caught):  # an undefined length never closed
        raise InvalidDataset(status.CANNOT_UNDERSTAND, "data set ends inside an item or encapsulated Pixel Data")
    if pixel_length is None or pixel_length == UNDEFINED_LENGTH:
        return ""
    return pixel_length_problem(header, pixel_length)


@dataclass(frozen=True)
class ImageSize:
    rows: int
    cols: int
    frames: int
    samples: int
    bits: int  # Bits Allocated; 0 when absent

    @property
    def native_bytes(self) -> int:
        """Uncompressed Pixel Data length, before padding to an even length."""
        return (self.rows * self.cols * self.frames * self.samples * self.bits + 7) // 8


def image_size(ds: Dataset) -> ImageSize | None:
    """An image's matrix, frames, samples and bits from its header; None when unusable."""
    try:
        return ImageSize(
            int(ds.Rows),
            int(ds.Columns),
            int(ds.get("NumberOfFrames", 1) or 1),
            int(ds.get("SamplesPerPixel", 1) or 1),
            int(ds.get("BitsAllocated", 0) or 0),
        )
    except Exception:  # absent, not a number, or a value pydicom cannot convert (an odd-length US)
        return None


def _native_pixels_end_it(part10: bytes, transfer_syntax: str, header: Dataset) -> bool:
    """Whether the data set ends with a top-level Pixel Data element of exactly the length the
    image needs, in a little-endian syntax: then no element before it can run past the end."""
    size = image_size(header) if transfer_syntax in (IMPLICIT_LITTLE, "1.2.840.10008.1.2.1") else None
    if size is None or not size.bits:
        return False
    length = size.native_bytes + size.native_bytes % 2
    tag = b"\xe0\x7f\x10\x00"
    if transfer_syntax == IMPLICIT_LITTLE:
        at = len(part10) - length - 8
        return at > 0 and part10[at : at + 4] == tag and struct.unpack_from("<L", part10, at + 4)[0] == length
    at = len(part10) - length - 12
    return (
        at > 0
        and part10[at : at + 4] == tag
        and part10[at + 4 : at + 6] in (b"OW", b"OB")
        and struct.unpack_from("<L", part10, at + 8)[0] == length
    )


def pixel_length_problem(ds: Dataset, length: int) -> str:
    """Why native Pixel Data of `length` bytes does not fit the image it claims ("" when it
    does; one byte of padding to an even length allowed)."""
    size = image_size(ds)
    if size is None or not size.bits:
        return "Pixel Data without a usable Rows, Columns or Bits Allocated"
    expected = size.native_bytes
    if length not in (expected, expected + expected % 2):
        return f"Pixel Data holds {length} bytes, Rows x Columns x frames x samples x bits say {expected}"
    return ""
