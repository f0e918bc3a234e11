"""What the node reads of a Part 10 instance without decoding its pixels: the identifiers and
header facts the ledger and routing keep (InstanceHeader), whether the data set's structure
holds together, and the Source AE the node wrote into its own file meta.

The SCP parses every received instance with it (node/handlers.py), and start-up recovery
parses the files it adopts (storage/recovery.py) with the same function. It answers with the
status to send (core.status) when it refuses a data set; the node's File Meta writer is
node/instance.py.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag
from pydicom.valuerep import VR

from core import status
from core.errors import InvalidDataset
from core.images import ImageFacts, Values, image_facts

UID_SYNTAX = re.compile(r"[0-9]+(\.[0-9]+)*")  # digits and dots, no empty component (PS3.5 9.1)
Buffer = bytes | bytearray  # a stored file, or the SCP's receive buffer taking its File Meta in place
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


def parse_header(part10: Buffer) -> InstanceHeader:
    """Identifiers of a Part 10 instance; InvalidDataset with the status to answer otherwise.

    The SCP runs this once per received instance. Most data sets are read by `_read_values`,
    which walks the top-level elements and keeps only what the node needs (about a tenth of
    pydicom's time for a CT slice); whatever it does not read plainly (another encoding or
    character set, a value pydicom would convert by its own rules, an enhanced object's
    functional groups) is read by pydicom, whose reading defines the result."""
    values: Values
    read = _read_values(part10)
    if read is not None:
        values, ts = read
    else:
        try:
            with _reader(part10) as fp:
                ds = dcmread(fp, stop_before_pixels=True)
            values, ts = ds, str(ds.file_meta.TransferSyntaxUID)
        except Exception as exc:  # pydicom raises many kinds on corrupt input; all mean "cannot parse"
            raise InvalidDataset(status.CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}") from None
    try:
        sop_class = _text(values, "SOPClassUID", required=True)
        sop_instance = _text(values, "SOPInstanceUID", required=True)
        study = _text(values, "StudyInstanceUID")
        series = _text(values, "SeriesInstanceUID")
        modality = _text(values, "Modality")
        description = _text(values, "SeriesDescription")
        instance_number = _ledger_integer(values.get("InstanceNumber"))
        facts = image_facts(values)
    except Exception as exc:  # a value pydicom cannot convert
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
    warning = check_structure(part10, ts, values)
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


def _text(values: Values, keyword: str, required: bool = False) -> str:
    value = values.get(keyword)
    if value is None and required:
        raise KeyError(keyword)
    return str(value or "")


# -- the fast reader ------------------------------------------------------------------------------

EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
MAX_NESTING = 8  # deeper sequences are left to pydicom
# What parse_header (with core.images.image_facts and image_size) reads, by tag: the keyword,
# the VR, and whether several values are expected
_WANTED: dict[tuple[int, int], tuple[str, bytes, bool]] = {
    (0x0008, 0x0008): ("ImageType", b"CS", True),
    (0x0008, 0x0016): ("SOPClassUID", b"UI", False),
    (0x0008, 0x0018): ("SOPInstanceUID", b"UI", False),
    (0x0008, 0x0060): ("Modality", b"CS", False),
    (0x0008, 0x103E): ("SeriesDescription", b"LO", False),
    (0x0018, 0x0050): ("SliceThickness", b"DS", False),
    (0x0020, 0x000D): ("StudyInstanceUID", b"UI", False),
    (0x0020, 0x000E): ("SeriesInstanceUID", b"UI", False),
    (0x0020, 0x0013): ("InstanceNumber", b"IS", False),
    (0x0020, 0x0037): ("ImageOrientationPatient", b"DS", True),
    (0x0028, 0x0002): ("SamplesPerPixel", b"US", False),
    (0x0028, 0x0004): ("PhotometricInterpretation", b"CS", False),
    (0x0028, 0x0008): ("NumberOfFrames", b"IS", False),
    (0x0028, 0x0010): ("Rows", b"US", False),
    (0x0028, 0x0011): ("Columns", b"US", False),
    (0x0028, 0x0030): ("PixelSpacing", b"DS", True),
    (0x0028, 0x0100): ("BitsAllocated", b"US", False),
}
# sequences image_facts looks into (Contributing Equipment, an enhanced object's functional groups)
_PYDICOM_ONLY = frozenset({(0x0018, 0xA001), (0x5200, 0x9229), (0x5200, 0x9230)})
_VRS = frozenset(v.value.encode() for v in VR if len(v.value) == 2)
_INTEGER = re.compile(rb" *[+-]?[0-9]{1,12} *")
_PLAIN_TEXT = re.compile(rb"[ -\[\]-~\x00]*")  # printable ASCII (no backslash) and NUL padding


class _NotPlain(Exception):
    """Something the fast reader leaves to pydicom."""


def _read_values(part10: Buffer) -> tuple[dict[str, Any], str] | None:
    """The values parse_header needs, from a Part 10 file (as the node writes them) whose data
    set is little endian and not deflated; None when pydicom must read it."""
    try:
        meta = _meta_elements(part10)
        ts = meta[(0x0002, 0x0010)].rstrip(b"\x00 ").decode("ascii")
        if ts in DEFLATED_SYNTAXES or ts == EXPLICIT_BIG:
            return None
        implicit = ts == IMPLICIT_LITTLE
        start = _dataset_offset(part10)
        vr = part10[start + 4 : start + 6]  # pydicom goes by what the first element looks like
        if len(vr) == 2 and implicit == (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
            return None
        values: dict[str, Any] = {}
        _walk(part10, start, len(part10), implicit, values, 0)
    except (_NotPlain, KeyError, UnicodeDecodeError, struct.error):
        return None
    if "SOPClassUID" not in values or "SOPInstanceUID" not in values:
        return None  # pydicom's reading words the refusal
    return values, ts


def _walk(buf: Buffer, offset: int, end: int, implicit: bool, values: dict[str, Any] | None, depth: int) -> int:
    """Step over data elements from `offset` to `end`, keeping the wanted ones in `values` (the
    top level; None inside an item). The top level stops at Pixel Data or `end`; an item of
    undefined length (end < 0, bounded by -end) after its delimiter. Sequences are walked item
    by item, as pydicom reads them; whatever pydicom might read otherwise is _NotPlain.
    Returns where it stopped."""
    delimited = end < 0
    end = -end if delimited else end
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", buf, offset)
        if delimited and (group, element) == ITEM_END:
            return offset + 8
        if values is not None and group == 0x7FE0 and element in (0x0008, 0x0009, 0x0010):
            return offset  # pixel data, as pydicom's stop_before_pixels
        if group in (0x0000, 0x0002, 0xFFFE) or (values is not None and (group, element) in _PYDICOM_ONLY):
            raise _NotPlain  # command or file meta elements, a stray delimiter, functional groups
        if implicit:
            vr, (length,), start = b"", struct.unpack_from("<L", buf, offset + 4), offset + 8
        else:
            vr = bytes(buf[offset + 4 : offset + 6])  # the upper layer hands over a bytearray
            if vr not in _VRS:
                raise _NotPlain  # an implicit item in an explicit data set, or garbage
            if vr in LONG_VRS:
                if offset + 12 > end:
                    raise _NotPlain
                (length,), start = struct.unpack_from("<L", buf, offset + 8), offset + 12
            else:
                (length,), start = struct.unpack_from("<H", buf, offset + 6), offset + 8
        wanted = _WANTED.get((group, element)) if values is not None else None
        if length == UNDEFINED_LENGTH or vr == b"SQ":
            # a sequence: pydicom reads an implicit undefined length as one only when the
            # dictionary says SQ (else as raw bytes up to the first delimiter, wherever it is)
            sequence = vr == b"SQ" or (not vr and _is_sequence(group, element))
            if wanted or depth >= MAX_NESTING or not sequence:
                raise _NotPlain
            offset = _items(buf, start, end, length, implicit, depth + 1)
            continue
        if start + length > end:
            raise _NotPlain  # pydicom's structure check words the refusal
        if wanted and values is not None:
            keyword, wanted_vr, multiple = wanted
            if vr not in (b"", wanted_vr):
                raise _NotPlain
            values[keyword] = _value(buf[start : start + length], wanted_vr, multiple)
        offset = start + length
    if delimited or (values is None and offset != end):
        raise _NotPlain  # an item never closed, or one whose elements overrun it
    return offset


def _is_sequence(group: int, element: int) -> bool:
    """Whether the data dictionary makes this tag a sequence (private and unknown tags: no)."""
    try:
        return bool(dictionary_VR((group << 16) | element) == "SQ")
    except KeyError:
        return False


def _items(buf: Buffer, offset: int, end: int, length: int, implicit: bool, depth: int) -> int:
    """Step over a sequence's items (`length` bytes of them, or up to its delimiter when the
    length is undefined); returns the offset after the sequence."""
    undefined = length == UNDEFINED_LENGTH
    stop = end if undefined else offset + length
    if stop > end:
        raise _NotPlain
    while offset + 8 <= stop:
        group, element, size = struct.unpack_from("<HHL", buf, offset)
        offset += 8
        if undefined and (group, element) == SEQUENCE_END:
            return offset
        if (group, element) != ITEM:
            raise _NotPlain
        if size == UNDEFINED_LENGTH:
            offset = _walk(buf, offset, -stop, implicit, None, depth)
        elif offset + size > stop:
            raise _NotPlain
        else:
            offset = _walk(buf, offset, offset + size, implicit, None, depth)
    if undefined or offset != stop:
        raise _NotPlain  # a sequence never closed, or items that do not fill its length
    return offset


def _value(raw: Buffer, vr: bytes, multiple: bool) -> Any:
    """A wanted element's value as pydicom gives it, for values plain enough to be sure."""
    if vr == b"US":
        if len(raw) == 2:
            return struct.unpack("<H", raw)[0]
        if raw:
            raise _NotPlain
        return None
    if not _PLAIN_TEXT.fullmatch(raw.replace(b"\\", b"")) or (b"\\" in raw and not multiple):
        raise _NotPlain
    text = raw.decode("ascii")
    if vr == b"IS":
        if not raw.strip(b" "):
            return None
        if not _INTEGER.fullmatch(raw):
            raise _NotPlain
        return int(text)
    if vr == b"DS":
        items = text.strip().split("\\")
        if items == [""]:
            return None
        try:
            numbers = [float(item) for item in items]
        except ValueError:
            raise _NotPlain from None
        return numbers[0] if len(numbers) == 1 else numbers
    if vr == b"LO":
        return text.rstrip("\x00 ")
    items = text.rstrip(" \x00").split("\\")  # UI, CS (pydicom's multi_string)
    if vr == b"UI" and any(item.startswith(" ") for item in items):
        raise _NotPlain  # pydicom's UID strips leading spaces too
    return items[0] if len(items) == 1 else items


def _meta_elements(part10: Buffer) -> dict[tuple[int, int], Buffer]:
    """The File Meta elements as their group length delimits them (in the node's files, its own,
    written by node/instance.py file_meta); empty when the file does not start that way."""
    start = len(PREAMBLE)
    if part10[:start] != PREAMBLE or part10[start : start + 6] != b"\x02\x00\x00\x00UL":
        return {}
    (length,) = struct.unpack_from("<L", part10, start + 8)
    offset, end = start + 12, min(start + 12 + length, len(part10))
    found = {}
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", part10, offset)
        if bytes(part10[offset + 4 : offset + 6]) in LONG_VRS:
            (size,) = struct.unpack_from("<L", part10, offset + 8)
            header = 12
        else:
            (size,) = struct.unpack_from("<H", part10, offset + 6)
            header = 8
        found[(group, element)] = part10[offset + header : offset + header + size]
        offset += header + size
    return found


def _ledger_integer(value: object) -> int | None:
    """InstanceNumber as the ledger keeps it (listing and ordering only; the file keeps what
    was sent): None when absent, not an integer, or beyond a 32-bit column (PostgreSQL's
    INTEGER refuses 999999999999, which the standard allows)."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def meta_source_ae(part10: Buffer) -> str:
    """Source Application Entity Title from the file meta group as its group length delimits it
    (the node's own, written by file_meta): never from elements that follow it."""
    value = _meta_elements(part10).get((0x0002, 0x0016), b"")
    return value.decode("ascii", "replace").strip(" \x00")


def _dataset_offset(part10: Buffer) -> int:
    """Where the data set starts: after the file meta group as its group length says."""
    start = len(PREAMBLE)
    (length,) = struct.unpack_from("<L", part10, start + 8)
    return start + 12 + int(length)


class _View(io.RawIOBase):
    """A read-only file over a buffer without copying it (io.BytesIO copies a bytearray)."""

    name = "<received data set>"  # pydicom's FileDataset names its source

    def __init__(self, buf: Buffer) -> None:
        self._view = memoryview(buf).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._view.release()  # the SCP's buffer may be resized again once it is read
        super().close()


def _reader(part10: Buffer) -> BinaryIO:
    """A file to read `part10` through: bytes are shared by io.BytesIO, a bytearray (the SCP's
    receive buffer, as large as the data set) is read in place rather than copied."""
    if isinstance(part10, bytes):
        return io.BytesIO(part10)
    return io.BufferedReader(_View(part10))


def check_structure(part10: Buffer, transfer_syntax: str, header: Values) -> str:
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
    with _reader(part10) as fp:
        fp.seek(offset)
        return _walk_structure(fp, part10, transfer_syntax, header)


def _walk_structure(fp: BinaryIO, part10: Buffer, transfer_syntax: str, header: Values) -> str:
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


def image_size(ds: Values) -> ImageSize | None:
    """An image's matrix, frames, samples and bits from its header; None when unusable."""
    try:
        return ImageSize(
            int(ds.get("Rows")),
            int(ds.get("Columns")),
            int(ds.get("NumberOfFrames", 1) or 1),
            int(ds.get("SamplesPerPixel", 1) or 1),
            int(ds.get("BitsAllocated", 0) or 0),
        )
    except Exception:  # absent, not a number, or a value pydicom cannot convert (an odd-length US)
        return None


def _native_pixels_end_it(part10: Buffer, transfer_syntax: str, header: Values) -> bool:
    """Whether the data set ends with a top-level Pixel Data element of exactly the length the
    image needs, in a little-endian syntax: then no element before it can run past the end."""
    size = image_size(header) if transfer_syntax in (IMPLICIT_LITTLE, EXPLICIT_LITTLE) else None
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


def pixel_length_problem(ds: Values, length: int) -> str:
    """Why native Pixel Data of `length` bytes does not fit the image it claims ("" when it
    does; one byte of padding to an even length allowed)."""
    size = image_size(ds)
    if size is None or not size.bits:
        return "Pixel Data without a usable Rows, Columns or Bits Allocated"
    expected = size.native_bytes
    if length not in (expected, expected + expected % 2):
        return f"Pixel Data holds {length} bytes, Rows x Columns x frames x samples x bits say {expected}"
    return ""
