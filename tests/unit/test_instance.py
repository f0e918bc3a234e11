from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from node import status
from node.errors import InvalidDataset
from node.instance import IMPLEMENTATION_CLASS_UID, check_matches_request, file_meta, parse_header
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
