"""A received instance as bytes: its Part 10 file form, the checks of a C-STORE data set
against its request, and what the worker must not decode.

The SCP keeps the dataset exactly as the sender encoded it; it only prepends a File Meta
Information header (PS3.10 7.1) and reads identifiers from the header, never pixel data
(core/header.py reads them, for the SCP and for start-up recovery alike).
"""

from __future__ import annotations

import struct
import zlib

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

import node
from core import status
from core.errors import InvalidDataset
from core.header import DEFLATED_SYNTAXES, EXPLICIT_BIG, IMPLICIT_LITTLE, LONG_VRS, PREAMBLE, InstanceHeader, image_size

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1533.1.1"
IMPLEMENTATION_VERSION_NAME = f"ENHANCE_{node.__version__}"[:16]


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
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


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

INFLATE_CHUNK = 1 << 20


def inflated_size(dataset: bytes | bytearray, limit: int) -> int:
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


def strip_file_meta(dataset: bytes | bytearray, transfer_syntax: str) -> tuple[bytes | bytearray, int]:
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
        elif bytes(dataset[offset + 4 : offset + 6]) in LONG_VRS:  # a bytearray slice is no set key
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
    return (dataset[offset:] if dropped else dataset), dropped  # no copy when nothing is dropped


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
