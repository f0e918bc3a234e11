"""core.header's fast reader against pydicom's reading: parse_header must give the same answer
whichever reads the data set (the fast reader reads what it can read plainly, pydicom the rest).
The reference is parse_header with the fast reader switched off, so the comparison covers the
whole of what the SCP does with a header."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import core.header
from core.errors import InvalidDataset
from core.header import InstanceHeader, parse_header
from node.instance import file_meta
from tests.dicom_factory import ct_slice, encode_explicit_le
from tests.fuzzing import _implicit, mutate, seeds

Outcome = InstanceHeader | tuple[int, str]


def outcome(part10: bytes) -> Outcome:
    try:
        return parse_header(part10)
    except InvalidDataset as exc:
        return exc.status, str(exc)


def both(part10: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Outcome, Outcome, bool]:
    """(parse_header's outcome, the outcome with pydicom reading everything, whether the fast
    reader read it). The SCP hands parse_header its receive buffer, a bytearray: that reads the
    same as the bytes."""
    fast = core.header._read_values(part10) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd values the corpus holds
        first = outcome(part10)
        assert outcome(bytearray(part10)) == first
        with monkeypatch.context() as m:
            m.setattr(core.header, "_read_values", lambda _: None)
            reference = outcome(part10)
    return first, reference, fast


def with_sequences(implicit: bool) -> bytes:
    """A CT slice with an undefined-length sequence (nested, with an undefined-length item)
    and a defined-length one before the elements the reader wants, as scanners write them."""
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "113040", "DCM", "Lossy"
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, "1.2.3.9"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds.SourceImageSequence = Sequence([item, item])
    ds["SourceImageSequence"].is_undefined_length = True
    ds.DerivationCodeSequence = Sequence([inner])  # defined length
    body = _implicit(ds) if implicit else encode_explicit_le(ds)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return file_meta(CTImageStorage, ds.SOPInstanceUID, syntax, "X") + body


def corpus() -> Iterator[Path]:
    """pydicom's own test files (many syntaxes, sequences, odd values, enhanced objects), read
    from its package folder: get_testdata_files would also look for them on the network."""
    yield from sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))


@pytest.mark.parametrize("implicit", [False, True])
def test_sequences_of_undefined_length_are_stepped_over(implicit: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    part10 = with_sequences(implicit)
    assert part10.count(b"\xfe\xff\xdd\xe0") == 3 and part10.count(b"\xfe\xff\x0d\xe0") == 2  # delimiters
    first, reference, fast = both(part10, monkeypatch)
    assert fast
    assert isinstance(first, InstanceHeader) and first == reference
    assert first.facts.rows == 8 and first.series_instance_uid == "1.2.3.4"


def test_pydicoms_test_files_read_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    read_fast = 0
    files = list(corpus())
    for path in files:
        first, reference, fast = both(path.read_bytes(), monkeypatch)
        assert first == reference, path.name
        read_fast += fast
    assert read_fast >= len(files) // 3  # the fast reader is not always declining


def test_mutated_data_sets_read_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """2000 seeded mutations (flipped bytes, overwritten lengths, cuts, insertions) of CT
    slices in both little-endian syntaxes, with and without sequences."""
    rng = np.random.default_rng(19)
    bases = [
        file_meta(CTImageStorage, uid, ts, "X") + body
        for uid, ts, body in seeds()
        if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    ] + [with_sequences(False), with_sequences(True)]
    read_fast = 0
    for i in range(2000):
        base = bases[i % len(bases)]
        meta_end = base.index(b"DICM") + 4 + 12 + struct.unpack_from("<L", base, base.index(b"DICM") + 12)[0]
        case = base[:meta_end] + mutate(base[meta_end:], rng)  # the node's file meta is its own
        first, reference, fast = both(case, monkeypatch)
        assert first == reference, (i, case[meta_end : meta_end + 64])
        read_fast += fast
    assert read_fast >= 250  # many cases were read by both (most mutations are left to pydicom)


def test_nesting_beyond_the_limit_is_left_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=4, cols=4)
    item = Dataset()
    item.CodeValue = "1"
    for _ in range(core.header.MAX_NESTING + 2):
        item.is_undefined_length_sequence_item = True  # else the reader steps over it whole
        outer = Dataset()
        outer.ConceptCodeSequence = Sequence([item])
        outer["ConceptCodeSequence"].is_undefined_length = True
        item = outer
    ds.AcquisitionContextSequence = item.ConceptCodeSequence
    ds["AcquisitionContextSequence"].is_undefined_length = True
    part10 = file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "X") + encode_explicit_le(ds)
    first, reference, fast = both(part10, monkeypatch)
    assert not fast and first == reference and isinstance(first, InstanceHeader)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"12", 12),
        (b" +7 ", 7),
        (b"1.5", "pydicom"),  # an IS pydicom converts by its own rules
        (b"", None),
    ],
)
def test_values_the_reader_takes_and_those_it_leaves(raw: bytes, value: object) -> None:
    if value == "pydicom":
        with pytest.raises(core.header._NotPlain):
            core.header._value(raw, b"IS", False)
    else:
        assert core.header._value(raw, b"IS", False) == value
    with pytest.raises(core.header._NotPlain):
        core.header._value(b"CT\\MR", b"CS", False)  # two values where one is expected
    with pytest.raises(core.header._NotPlain):
        core.header._value("Kopf\u00e9".encode("latin-1"), b"LO", False)  # a character set's
    assert core.header._value(b"0.5\\0.25 ", b"DS", True) == [0.5, 0.25]
    assert core.header._value(b"ORIGINAL\\PRIMARY\\AXIAL ", b"CS", True) == ["ORIGINAL", "PRIMARY", "AXIAL"]


# -- inputs a review found where the first fast reader and pydicom differed ---------------------


def implicit(group: int, element: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHL", group, element, len(value) if length is None else length) + value


def explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in core.header.LONG_VRS:
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


IDS = ((0x0008, 0x0016, b"UI", CTImageStorage.encode() + b"\0"), (0x0020, 0x000D, b"UI", b"1.2.4\0"))
SERIES = (0x0020, 0x000E, b"UI", b"1.2.5\0")


def test_an_implicit_undefined_length_that_is_no_sequence_is_left_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accession Number (SH) with an undefined length: pydicom reads it as raw bytes up to the
    first sequence delimiter, wherever that is, here inside a private value, so what follows is
    a second SOP Instance UID that pydicom reads and a structural walk would step over."""
    fake = implicit(0x0008, 0x0018, b"9.9.9\0")
    inner = implicit(0x0011, 0x1010, b"\xfe\xff\xdd\xe0\0\0\0\0" + fake)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    body = b"".join(implicit(g, e, v) for g, e, _, v in (*IDS[:1], (0x0008, 0x0018, b"", b"1.2.3\0")))
    body += implicit(0x0008, 0x0050, item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), 0xFFFFFFFF)
    body += b"".join(implicit(g, e, v) for g, e, _, v in (IDS[1], SERIES))
    first, reference, fast = both(file_meta(CTImageStorage, "1.2.3", ImplicitVRLittleEndian, "X") + body, monkeypatch)
    assert not fast and first == reference


@pytest.mark.parametrize("tag", [(0x0008, 0x0060), (0x0028, 0x0010)])
def test_a_wanted_element_sent_again_as_a_sequence_is_left_to_pydicom(
    tag: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modality or Rows, then the same tag again with VR SQ: pydicom keeps the last (empty)."""
    first_value = (b"CS", b"CT") if tag == (0x0008, 0x0060) else (b"US", b"\0\2")
    elements = sorted([*IDS, (0x0008, 0x0018, b"UI", b"1.2.3\0"), SERIES, (*tag, *first_value)])
    body = b"".join(explicit(g, e, vr, v) for g, e, vr, v in elements)
    body += explicit(*tag, b"SQ", b"")
    first, reference, fast = both(file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "X") + body, monkeypatch)
    assert not fast and first == reference


def test_a_uid_with_a_leading_space_is_left_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    elements = sorted([*IDS, (0x0008, 0x0018, b"UI", b" 1.2.3"), SERIES])
    body = b"".join(explicit(g, e, vr, v) for g, e, vr, v in elements)
    first, reference, fast = both(file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "X") + body, monkeypatch)
    assert not fast and first == reference


def test_a_compressed_data_set_in_the_receive_buffer_is_read_in_place() -> None:
    """Encapsulated (JPEG) Pixel Data is not the fast case: its structure is walked through a
    file object. Over the SCP's bytearray that file reads the buffer in place; io.BytesIO would
    copy all 32 MB of it."""
    import tracemalloc

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8)
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(32 << 20) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    part10 = bytearray(file_meta(CTImageStorage, ds.SOPInstanceUID, JPEGBaseline8Bit, "X") + encode_explicit_le(ds))
    tracemalloc.start()
    try:
        header = parse_header(part10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.transfer_syntax_uid == JPEGBaseline8Bit and header.warning == ""
    assert peak < 1 << 20, f"{peak >> 20} MiB held while reading a {len(part10) >> 20} MiB data set"
    part10[:0] = b"\x00"  # no view of the buffer is left behind: it can grow again (BufferError else)
