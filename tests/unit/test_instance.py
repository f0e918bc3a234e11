from __future__ import annotations

import struct
import zlib
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

from core import status
from core.errors import InvalidDataset
from core.header import meta_source_ae, parse_header
from node.instance import (
    IMPLEMENTATION_CLASS_UID,
    check_matches_request,
    decode_problem,
    file_meta,
    inflated_size,
    j2k_size,
    strip_file_meta,
)
from tests.dicom_factory import ct_slice, encode_explicit_le


def test_file_meta_is_read_back_by_pydicom_and_keeps_dataset_bytes() -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8)
    body = encode_explicit_le(ds)
    part10 = file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "CT01") + body
    back = dcmread(BytesIO(part10))
    meta = back.file_meta
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "CT01"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert back.PixelData == ds.PixelData
    assert part10.endswith(body)  # the dataset is stored byte for byte


@pytest.mark.parametrize("ae", ["A", "AB", "ODD_LEN", "SIXTEEN_CHARS_AE"])
def test_file_meta_group_length_is_exact_for_odd_and_even_values(ae: str) -> None:
    meta = file_meta("1.2", "1.23", "1.2.840.10008.1.2.1", ae)
    back = dcmread(BytesIO(meta + encode_explicit_le(ct_slice("1.2", "1.2.1", 0, 4, 4))))
    assert back.file_meta.FileMetaInformationGroupLength == len(meta) - 128 - 4 - 12
    assert back.file_meta.SourceApplicationEntityTitle == ae


def test_parse_header_reads_identifiers() -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", 6, rows=8, cols=8)
    h = parse_header(file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "X") + encode_explicit_le(ds))
    assert (h.study_instance_uid, h.series_instance_uid, h.modality, h.instance_number) == ("1.2.3", "1.2.3.4", "CT", 7)
    assert h.series_description == "Synthetic phantom"
    check_matches_request(h, CTImageStorage, ds.SOPInstanceUID)


def test_garbage_cannot_be_understood() -> None:
    with pytest.raises(InvalidDataset) as info:
        parse_header(file_meta(CTImageStorage, "1.2", ExplicitVRLittleEndian, "X") + b"\xff" * 37)
    assert info.value.status == status.CANNOT_UNDERSTAND


def test_an_image_attribute_pydicom_cannot_convert_is_a_warning_not_a_crash() -> None:
    """Bits Allocated (US) three bytes long, as a fuzzed data set had it: pydicom raises its own
    BytesLengthException when the value is read, which the structure check let escape (the SCP
    answered 0x0110). Now the image's size is unusable: stored with the reason."""
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8)
    body = encode_explicit_le(ds)
    bits = struct.pack("<HH", 0x0028, 0x0100) + b"US" + struct.pack("<H", 2)
    at = body.index(bits)
    body = body[:at] + bits[:-2] + struct.pack("<H", 3) + body[at + 8 : at + 10] + b"\x00" + body[at + 10 :]
    header = parse_header(file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "X") + body)
    assert header.warning == "Pixel Data without a usable Rows, Columns or Bits Allocated"


def test_missing_series_uid_does_not_match_sop_class() -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=4, cols=4)
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidDataset) as info:
        parse_header(file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "X") + encode_explicit_le(ds))
    assert info.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_request_mismatch_is_a900() -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=4, cols=4)
    h = parse_header(file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "X") + encode_explicit_le(ds))
    for sop_class, sop_uid in ((MRImageStorage, ds.SOPInstanceUID), (CTImageStorage, "1.2.999")):
        with pytest.raises(InvalidDataset) as info:
            check_matches_request(h, sop_class, sop_uid)
        assert info.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS


# -- what a peer may not put in a data set (issue 19) -----------------------------------------

SPOOF = struct.pack("<HH", 0x0002, 0x0016) + b"AE" + struct.pack("<H", 6) + b"SPOOF "
SPOOF_TS = struct.pack("<HH", 0x0002, 0x0010) + b"UI" + struct.pack("<H", 20) + b"1.2.840.10008.1.2.2\x00"


@pytest.mark.parametrize("kind", [bytes, bytearray])  # the SCP hands over its receive buffer
def test_group_0002_at_the_start_of_a_data_set_is_dropped_and_the_rest_kept_byte_for_byte(kind: type) -> None:
    body = encode_explicit_le(ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8))
    stripped, dropped = strip_file_meta(kind(SPOOF + SPOOF_TS + body), ExplicitVRLittleEndian)
    assert (stripped, dropped) == (body, 2)
    assert strip_file_meta(kind(body), ExplicitVRLittleEndian) == (body, 0)


def test_group_0002_is_dropped_in_implicit_and_big_endian_data_sets() -> None:
    implicit = struct.pack("<HHL", 0x0002, 0x0016, 6) + b"SPOOF " + struct.pack("<HHL", 0x0008, 0x0060, 2) + b"CT"
    assert strip_file_meta(implicit, ImplicitVRLittleEndian) == (implicit[14:], 1)
    big = (
        struct.pack(">HH", 0x0002, 0x0016) + b"AE" + struct.pack(">H", 6) + b"SPOOF " + b"\x00\x08\x00\x60CS\x00\x02CT"
    )
    assert strip_file_meta(big, "1.2.840.10008.1.2.2") == (big[14:], 1)


def test_a_group_0002_element_longer_than_the_data_set_cannot_be_understood() -> None:
    bad = struct.pack("<HH", 0x0002, 0x0016) + b"AE" + struct.pack("<H", 500) + b"SPOOF "
    with pytest.raises(InvalidDataset) as info:
        strip_file_meta(bad, ExplicitVRLittleEndian)
    assert info.value.status == status.CANNOT_UNDERSTAND


def test_the_source_ae_comes_from_the_nodes_own_meta_group_only() -> None:
    meta = file_meta(CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian, "CT01")
    body = encode_explicit_le(ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8))
    spoofed = meta + SPOOF + body  # an old file stored before group 0002 was dropped
    assert dcmread(BytesIO(spoofed)).file_meta.SourceApplicationEntityTitle.strip() == "SPOOF"  # what pydicom reads
    assert meta_source_ae(spoofed) == "CT01"
    assert meta_source_ae(b"not a part 10 file") == ""


def test_inflated_size_counts_without_keeping_and_refuses_a_bomb() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    bomb = b"".join(packer.compress(chunk) for _ in range(64)) + packer.flush()
    assert len(bomb) < 100_000  # 64 MiB of zeros
    assert inflated_size(bomb, 65 << 20) == 64 << 20
    with pytest.raises(InvalidDataset, match=r"inflates beyond 16 MiB \(node.max_inflated_mb\)") as info:
        inflated_size(bomb, 16 << 20)
    assert info.value.status == status.CANNOT_UNDERSTAND
    with pytest.raises(InvalidDataset, match="cannot be inflated"):
        inflated_size(b"\xff" * 100, 1 << 20)


# -- what the worker decodes (issue 19) ---------------------------------------------------------


def j2k_slice() -> Dataset:
    from pydicom.uid import JPEG2000Lossless

    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=64, cols=64)
    ds.compress(JPEG2000Lossless)
    return ds


def claiming(ds: Dataset, width: int, height: int) -> Dataset:
    """The same object with its JPEG 2000 codestream's SIZ marker declaring another size."""
    from pydicom.encaps import encapsulate, generate_frames

    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.find(b"\xff\x4f\xff\x51")
    frame[at + 8 : at + 16] = struct.pack(">LL", width, height)
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


def test_a_jpeg2000_frame_that_declares_its_images_size_may_be_decoded() -> None:
    ds = j2k_slice()
    assert j2k_size(next(generate_frames(ds.PixelData, number_of_frames=1))) == (64, 64, 1)
    assert decode_problem(ds, 1 << 30) == ""


def test_a_jpeg2000_frame_declaring_64k_by_64k_is_refused_before_it_is_decoded() -> None:
    ds = claiming(j2k_slice(), 65535, 65535)
    assert decode_problem(ds, 1 << 30) == (
        "JPEG 2000 frame 0 declares 65535x65535 with 1 component(s), the image is 64x64 with 1"
    )


def test_frames_that_would_decode_past_the_limit_are_refused() -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=64, cols=64)
    ds.NumberOfFrames = 100_000
    assert decode_problem(ds, 1 << 30).startswith("decoding would take 1562 MiB, more than worker.max_decoded_mb")


@pytest.mark.parametrize(("value", "kept"), [("12", 12), ("999999999999", None), ("1.5", None), ("abc", None)])
def test_an_instance_number_the_ledger_cannot_hold_is_not_a_reason_to_refuse(value: str, kept: int | None) -> None:
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8)
    raw = encode_explicit_le(ds).replace(
        b"\x20\x00\x13\x00IS\x02\x001 ",
        b"\x20\x00\x13\x00IS" + bytes([len(value) + len(value) % 2, 0]) + (value + " " * (len(value) % 2)).encode(),
    )
    header = parse_header(file_meta(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, "X") + raw)
    assert header.instance_number == kept


def test_a_refusal_with_a_nul_in_its_uid_is_still_recorded() -> None:
    import sqlalchemy

    from storage import schema as t
    from storage.db import migrate
    from storage.ledger import EventKind, Ledger

    engine = sqlalchemy.create_engine("sqlite://")
    migrate(engine)
    Ledger(engine).add_event(EventKind.STORE_REFUSED, sop_instance_uid="1.2.\x003" + "9" * 80, detail="bad\x00uid")
    with engine.connect() as conn:
        uid, detail = conn.execute(sqlalchemy.select(t.events.c.sop_instance_uid, t.events.c.detail)).one()
    assert uid == ("1.2.?3" + "9" * 80)[:64] and detail == "bad?uid"


def test_a_jpeg_frame_whose_sof_declares_another_size_is_refused_before_it_is_decoded() -> None:
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate

    ds = dcmread(get_testdata_file("JPEG-lossy.dcm", download=False))  # 1024 x 256, 12-bit baseline
    assert decode_problem(ds, 1 << 30) == ""
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.find(b"\xff\xc1")  # extended sequential: Lf(2) P(1) Y(2) X(2) Nf(1)
    frame[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    ds.PixelData = encapsulate([bytes(frame)])
    assert decode_problem(ds, 1 << 40) == (
        "JPEG frame 0 declares 60000x60000 with 1 component(s), the image is 256x1024 with 1"
    )
