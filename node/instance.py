"""A received instance as bytes: its Part 10 file form and the few header fields the node needs.

The SCP keeps the dataset exactly as the sender encoded it; it only prepends a File Meta
Information header (PS3.10 7.1) and reads identifiers from the header, never pixel data.
"""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag

import node
from core import status
from core.errors import InvalidDataset
from core.images import ImageFacts, image_facts

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1533.1.1"
UID_SYNTAX = re.compile(r"[0-9]+(\.[0-9]+)*")  # digits and dots, no empty component (PS3.5 9.1)
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
    facts: ImageFacts = field(default_factory=lambda: ImageFacts(""))  # what routing decides on (core/images.py)
    warning: str = ""  # a defect the node stores the data set with (docs/receiving.md, "Malformed data")


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
        instance_number = _ledger_integer(number)
        ts = str(meta.TransferSyntaxUID)
        facts = image_facts(ds)
    except Exception as exc:  # pydicom raises many kinds on corrupt input; all mean "cannot parse"
        raise InvalidDataset(status.CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}") from None
    for name, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if not value:
            raise InvalidDataset(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{name} missing")
    for name, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop_instance)):
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


# -- what a peer may not put in a data set (docs/receiving.md, "Malformed data") -----------------

PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
DEFER_BYTES = 1024  # values longer than this are skipped, not read, when the structure is walked
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
INFLATE_CHUNK = 1 << 20


def inflated_size(dataset: bytes, limit: int) -> int:
    """The size of a deflated data set once inflated, inflating it 1 MiB at a time without
    keeping it; InvalidDataset as soon as it passes `limit` bytes (a deflate bomb) or when it
    is not a deflate stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    data = dataset
    try:
        while data:
            total += len(inflater.decompress(data, INFLATE_CHUNK))
            if total > limit:
                raise InvalidDataset(
                    status.CANNOT_UNDERSTAND,
                    f"deflated data set inflates beyond {limit >> 20} MiB (node.max_inflated_mb)",
                )
            data = inflater.unconsumed_tail
        total += len(inflater.flush())
    except zlib.error as exc:
        raise InvalidDataset(status.CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {exc}") from None
    if total > limit:
        raise InvalidDataset(
            status.CANNOT_UNDERSTAND, f"deflated data set inflates beyond {limit >> 20} MiB (node.max_inflated_mb)"
        )
    return total


def strip_file_meta(dataset: bytes, transfer_syntax: str) -> tuple[bytes, int]:
    """The data set without File Meta Information elements (group 0002) at its start, and how
    many were dropped. A peer may not send them in a C-STORE data set (PS3.7 6.3.1): read back
    from the stored file they would be taken for the node's own file meta (its calling AE,
    its transfer syntax). Deflated data sets are left as they are (their elements are behind
    the compression and are never read as file meta)."""
    if transfer_syntax in DEFLATED_SYNTAXES:
        return dataset, 0
    little = transfer_syntax != EXPLICIT_BIG
    explicit = transfer_syntax != IMPLICIT_LITTLE
    order = "<" if little else ">"
    offset = dropped = 0
    while offset + 8 <= len(dataset):
        group = struct.unpack_from(f"{order}H", dataset, offset)[0]
        if group != 0x0002:
            break
        if not explicit:
            length = struct.unpack_from(f"{order}L", dataset, offset + 4)[0]
            header = 8
        elif dataset[offset + 4 : offset + 6] in _LONG_VRS:
            if offset + 12 > len(dataset):
                break
            length = struct.unpack_from(f"{order}L", dataset, offset + 8)[0]
            header = 12
        else:
            length = struct.unpack_from(f"{order}H", dataset, offset + 6)[0]
            header = 8
        if length == 0xFFFFFFFF or offset + header + length > len(dataset):
            raise InvalidDataset(status.CANNOT_UNDERSTAND, "a group 0002 element in the data set has a bad length")
        offset += header + length
        dropped += 1
    return dataset[offset:], dropped


def meta_source_ae(part10: bytes) -> str:
    """Source Application Entity Title from the file meta group as its group length delimits it
    (the node's own, written by file_meta): never from elements that follow it."""
    start = len(_PREAMBLE)
    if part10[:start] != _PREAMBLE or part10[start : start + 6] != b"\x02\x00\x00\x00UL":
        return ""
    (length,) = struct.unpack_from("<L", part10, start + 8)
    offset, end = start + 12, min(start + 12 + length, len(part10))
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", part10, offset)
        vr = part10[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
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
    start = len(_PREAMBLE)
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
    if transfer_syntax in DEFLATED_SYNTAXES or len(part10) < len(_PREAMBLE) + 12:
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
    except (AttributeError, TypeError, ValueError):
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


J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
J2K_CODESTREAM = b"\xff\x4f\xff\x51"  # SOC then SIZ


def j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) a JPEG 2000 codestream's SIZ marker declares, or None."""
    at = frame.find(J2K_CODESTREAM, 0, 4096)
    if at < 0 or len(frame) < at + 42:
        return None
    x, y, x0, y0 = struct.unpack_from(">LLLL", frame, at + 8)
    (components,) = struct.unpack_from(">H", frame, at + 40)
    return x - x0, y - y0, components


def decode_problem(ds: Dataset, max_bytes: int) -> str:
    """Why the worker must not decode this image's Pixel Data ("" when it may): the decoded
    float32 frames would pass `max_bytes`, or a JPEG 2000 frame declares a size other than the
    image's (a codestream claiming 64k x 64k inside a 512 x 512 image decodes to 8 GB before
    anything could compare it)."""
    size = image_size(ds)
    if size is None:
        return "no usable Rows, Columns or Number of Frames"
    rows, cols, samples = size.rows, size.cols, size.samples
    decoded = rows * cols * size.frames * samples * 4
    if decoded > max_bytes:
        return f"decoding would take {decoded >> 20} MiB, more than worker.max_decoded_mb ({max_bytes >> 20})"
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    if syntax not in J2K_SYNTAXES and syntax not in JPEG_SYNTAXES:
        return ""
    kind = "JPEG 2000" if syntax in J2K_SYNTAXES else "JPEG"
    for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=size.frames)):
        declared = j2k_size(frame) if syntax in J2K_SYNTAXES else jpeg_size(frame)
        if declared is None:
            return f"{kind} frame {i} declares no size"
        if declared != (cols, rows, samples):
            width, height, components = declared
            return (
                f"{kind} frame {i} declares {width}x{height} with {components} component(s), "
                f"the image is {cols}x{rows} with {samples}"
            )
    return ""


# JPEG baseline, extended, lossless (process 14 and SV1), JPEG-LS lossless and near-lossless
JPEG_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    }
)


def jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) a JPEG or JPEG-LS frame's SOF marker declares, or None."""
    from pydicom.pixels.utils import _get_jpg_parameters

    try:
        found = _get_jpg_parameters(frame)
    except Exception:  # any failure means no readable SOF
        return None
    if not {"width", "height", "components"} <= set(found):
        return None
    return int(found["width"]), int(found["height"]), int(found["components"])
