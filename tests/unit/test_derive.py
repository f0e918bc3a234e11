"""node/derive.py against DESIGN 3.6: every rule of a derived image, one small test each."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import DT

from core.errors import InvalidDataset
from node.derive import DeriveSettings, Processing, derive_image, derived_uid, device_uid
from tests.dicom_factory import ct_slice, mr_slice

STUDY, SERIES = "1.2.826.0.1.3680043.10.1533.7", "1.2.826.0.1.3680043.10.1533.7.1"
AT = dt.datetime(2026, 2, 3, 4, 5, 6, 789000, tzinfo=dt.UTC)
DCIODVFY = Path(sys.executable).with_name("dciodvfy")
UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def proc(task: str = "denoise", scale: int = 1, model: str = "ct-denoise", version: str = "1.2.0") -> Processing:
    return Processing(model=model, version=version, task=task, scale=scale, backend="onnxruntime-cpu", at=AT)


def source(index: int = 0, rows: int = 64, cols: int = 64) -> Dataset:
    return ct_slice(STUDY, SERIES, index, rows=rows, cols=cols)


def hu(ds: Dataset) -> NDArray[np.float64]:
    """The source's pixels in HU (what an engine hands back for a denoise that changes nothing)."""
    return np.asarray(ds.pixel_array, np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def upscaled(ds: Dataset, scale: int) -> NDArray[np.float64]:
    return np.asarray(np.kron(hu(ds), np.ones((scale, scale))), np.float64)


def derive(ds: Dataset, task: str = "denoise", scale: int = 1, settings: DeriveSettings | None = None) -> Dataset:
    values = upscaled(ds, scale) if scale > 1 else hu(ds)
    return derive_image(ds, values, proc(task, scale), settings or DeriveSettings())


def round_trip(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(BytesIO(buffer.getvalue()))


def floats(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values]


def code_of(item: Dataset) -> tuple[str, str, str]:
    return item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning


def assert_valid_uid(uid: str) -> None:
    assert len(uid) <= 64, uid
    assert UID_SYNTAX.match(uid), uid
    assert UID(uid).is_valid, uid


def dciodvfy_errors(ds: Dataset, path: Path) -> tuple[list[str], str]:
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False)
    output = done.stdout + done.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


@pytest.fixture
def kolkata_time() -> Iterator[None]:
    """The node writes local time: run in a +05:30 zone so that the conversion is visible."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        if time.strftime("%z") != "+0530":
            pytest.skip("no time zone data for Asia/Kolkata")
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


# --- identity: UIDs, SOP class, unchanged study-level attributes ----------------------------------------------------


def test_same_source_model_and_version_give_the_same_uids() -> None:
    src = source()
    resent = ct_slice(STUDY, SERIES, 5, rows=64, cols=64, seed=9, sop_uid=src.SOPInstanceUID)  # other pixels
    first, again = derive(src), derive(resent)
    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert again.SeriesInstanceUID == first.SeriesInstanceUID
    assert first.SOPInstanceUID == derived_uid(src.SOPInstanceUID, "ct-denoise", "1.2.0")
    assert first.SeriesInstanceUID == derived_uid(SERIES, "ct-denoise", "1.2.0")


def test_uids_are_new() -> None:
    src = source()
    out = derive(src)
    assert out.SOPInstanceUID != src.SOPInstanceUID
    assert out.SeriesInstanceUID != src.SeriesInstanceUID
    assert out.SOPInstanceUID != out.SeriesInstanceUID


def test_slices_of_one_series_share_the_derived_series_uid_but_not_the_instance_uid() -> None:
    a, b = derive(source(0)), derive(source(1))
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID


@pytest.mark.parametrize(("model", "version"), [("ct-denoise", "1.2.1"), ("ct-denoise-v2", "1.2.0")])
def test_another_model_or_version_gives_other_uids(model: str, version: str) -> None:
    src = source()
    base = derive_image(src, hu(src), proc())
    other = derive_image(src, hu(src), proc(model=model, version=version))
    assert other.SOPInstanceUID != base.SOPInstanceUID
    assert other.SeriesInstanceUID != base.SeriesInstanceUID


def test_derived_uids_are_valid_uid_syntax() -> None:
    out = derive(source())
    for uid in (out.SOPInstanceUID, out.SeriesInstanceUID, out.ContributingEquipmentSequence[-1].DeviceUID):
        assert_valid_uid(uid)
    assert_valid_uid(device_uid())
    assert_valid_uid(derived_uid("9" * 64, "m" * 200, "v" * 200))  # long inputs still give a short UID


def test_file_meta_names_the_new_instance_and_explicit_little_endian() -> None:
    out = derive(source())
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_sop_class_is_unchanged() -> None:
    assert derive(source()).SOPClassUID == CTImageStorage
    mr = mr_slice(STUDY, SERIES, 0, rows=16, cols=16)
    out = derive_image(mr, np.asarray(mr.pixel_array, np.float64), proc())
    assert out.SOPClassUID == MRImageStorage
    assert out.file_meta.MediaStorageSOPClassUID == MRImageStorage


@pytest.mark.parametrize("task", ["denoise", "sr"])
def test_study_patient_accession_and_frame_of_reference_are_unchanged(task: str) -> None:
    src = source()
    out = derive(src, task, scale=2 if task == "sr" else 1)
    for keyword in (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "FrameOfReferenceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "Modality",
    ):
        assert out[keyword].value == src[keyword].value, keyword


def test_source_dataset_is_not_modified() -> None:
    src = source()
    before = round_trip(src)
    derive(src, "sr", scale=2)
    after = round_trip(src)
    assert after == before
    assert after.file_meta == before.file_meta


# --- ImageType, derivation, references -------------------------------------------------------------------------------


def test_image_type_becomes_derived_secondary_keeping_value_three_and_more() -> None:
    src = source()
    src.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "HELICAL"]
    assert list(derive(src).ImageType) == ["DERIVED", "SECONDARY", "AXIAL", "HELICAL"]


def test_image_type_keeps_axial() -> None:
    assert list(derive(source()).ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]


def test_image_type_without_one_in_the_source() -> None:
    src = source()
    del src.ImageType
    assert list(derive(src).ImageType) == ["DERIVED", "SECONDARY"]


def test_derivation_description_names_model_version_and_backend() -> None:
    text = derive(source()).DerivationDescription
    assert "ct-denoise" in text
    assert "1.2.0" in text
    assert "onnxruntime-cpu" in text
    assert len(text) <= 1024  # ST


@pytest.mark.parametrize(
    ("task", "scale", "expected"),
    [("denoise", 1, ("113087", "DCM", "Smoothing")), ("sr", 2, ("113085", "DCM", "Spatial resampling"))],
)
def test_derivation_code_follows_the_task(task: str, scale: int, expected: tuple[str, str, str]) -> None:
    seq = derive(source(), task, scale).DerivationCodeSequence
    assert len(seq) == 1
    assert code_of(seq[0]) == expected


def test_source_image_sequence_references_the_source_for_image_processing() -> None:
    src = source()
    seq = derive(src).SourceImageSequence
    assert len(seq) == 1
    item = seq[0]
    assert item.ReferencedSOPClassUID == CTImageStorage
    assert item.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert len(item.PurposeOfReferenceCodeSequence) == 1
    assert code_of(item.PurposeOfReferenceCodeSequence[0]) == (
        "121322",
        "DCM",
        "Source image for image processing operation",
    )


def test_referenced_series_sequence_references_the_source_series_and_instance() -> None:
    src = source()
    seq = derive(src).ReferencedSeriesSequence
    assert len(seq) == 1
    assert seq[0].SeriesInstanceUID == SERIES
    instances = seq[0].ReferencedInstanceSequence
    assert len(instances) == 1
    assert instances[0].ReferencedSOPClassUID == CTImageStorage
    assert instances[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def scanner_equipment() -> Dataset:
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "109101", "DCM", "Acquisition Equipment"
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    item.Manufacturer = "Scanner Co"
    item.ManufacturerModelName = "CT 9000"
    return item


def test_contributing_equipment_keeps_existing_items_and_appends_this_node() -> None:
    src = source()
    src.ContributingEquipmentSequence = Sequence([scanner_equipment()])
    seq = derive(src).ContributingEquipmentSequence
    assert len(seq) == 2
    assert seq[0] == scanner_equipment()
    assert seq[1].Manufacturer == "enhance-node"


def test_contributing_equipment_item_describes_the_processing() -> None:
    src = source()
    out = derive_image(src, hu(src), Processing("ct-denoise", "1.2.0", "denoise", 1, "onnxruntime-cpu", AT, "1.2.3.4"))
    seq = out.ContributingEquipmentSequence
    assert len(seq) == 1  # the source had none
    item = seq[-1]
    assert len(item.PurposeOfReferenceCodeSequence) == 1
    assert code_of(item.PurposeOfReferenceCodeSequence[0]) == ("109102", "DCM", "Processing Equipment")
    assert item.Manufacturer == "enhance-node"
    assert item.ManufacturerModelName == "ct-denoise"
    assert any("1.2.0" in str(v) for v in item.SoftwareVersions)
    assert item.DeviceUID == "1.2.3.4"
    assert DT(item.ContributionDateTime) == AT


def test_contributing_equipment_device_uid_defaults_to_this_host() -> None:
    item = derive(source()).ContributingEquipmentSequence[-1]
    assert item.DeviceUID == device_uid()
    assert_valid_uid(item.DeviceUID)


# --- series number, description, times ------------------------------------------------------------------------------


def test_series_number_is_source_plus_offset() -> None:
    assert derive(source()).SeriesNumber == 1 + 1000
    assert derive(source(), settings=DeriveSettings(series_number_offset=50)).SeriesNumber == 1 + 50


def test_series_description_is_source_plus_suffix() -> None:
    assert derive(source()).SeriesDescription == "Synthetic phantom enhanced"
    settings = DeriveSettings(description_suffix=" (AI)")
    assert derive(source(), settings=settings).SeriesDescription == "Synthetic phantom (AI)"


@pytest.mark.filterwarnings("ignore:The value length")  # the source's own 67-character LO
def test_long_series_description_is_cut_to_64_characters_keeping_the_suffix() -> None:
    src = source()
    src.SeriesDescription = "Thorax abdomen pelvis with contrast, portal venous phase, 1 mm B30f"  # 67 characters
    text = derive(src).SeriesDescription
    assert len(text) == 64
    assert text.endswith(" enhanced")
    assert text.startswith("Thorax abdomen pelvis with contrast, portal venous")
    assert len(round_trip(derive(src)).SeriesDescription) == 64


def test_instance_and_content_date_time_are_the_processing_time_in_local_time(kolkata_time: None) -> None:
    at = dt.datetime(2026, 2, 3, 22, 0, 0, 250000, tzinfo=dt.UTC)  # 03:30:00.25 the next day in Kolkata
    src = source()
    out = derive_image(src, hu(src), Processing("m", "1", "denoise", 1, "cpu", at))
    assert out.ContentDate == out.InstanceCreationDate == "20260204"
    assert out.ContentTime[:6] == out.InstanceCreationTime[:6] == "033000"
    assert float(out.ContentTime) == pytest.approx(33000.25)
    assert DT(out.ContributingEquipmentSequence[-1].ContributionDateTime) == at


def test_timezone_offset_follows_the_local_time_written(kolkata_time: None) -> None:
    src = source()
    src.TimezoneOffsetFromUTC = "+0000"
    assert derive(src).TimezoneOffsetFromUTC == "+0530"


# --- pixels ---------------------------------------------------------------------------------------------------------


def test_bit_depth_and_rescale_are_kept() -> None:
    src = source()
    out = derive(src)
    for keyword in (
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        assert out[keyword].value == src[keyword].value, keyword


def test_integer_hu_round_trip_exactly() -> None:
    src = source()
    values = np.random.default_rng(1).integers(-1024, 1024, size=(64, 64)).astype(np.float64)  # stored 0..2047
    out = round_trip(derive_image(src, values, proc()))
    back = out.pixel_array.astype(np.float64) * float(out.RescaleSlope) + float(out.RescaleIntercept)
    np.testing.assert_array_equal(back, values)


def test_fractional_hu_is_rounded_to_the_nearest_stored_value() -> None:
    src = source(rows=2, cols=2)
    out = derive_image(src, np.array([[10.4, 10.6], [-10.4, -10.6]]), proc())
    np.testing.assert_array_equal(out.pixel_array, [[1034, 1035], [1014, 1013]])


@pytest.mark.parametrize(
    ("pixel_representation", "lowest", "highest"),
    [(1, -2048, 2047), (0, 0, 4095)],
)
def test_values_are_clipped_to_the_12_bit_stored_range(pixel_representation: int, lowest: int, highest: int) -> None:
    src = source(rows=2, cols=2)
    src.PixelRepresentation = pixel_representation
    values = np.array([[1e6, -1e6], [0.0, 2000.0]])  # HU; stored = HU + 1024
    out = round_trip(derive_image(src, values, proc()))
    stored = out.pixel_array.astype(np.int64)
    assert stored[0, 0] == highest
    assert stored[0, 1] == lowest
    assert stored[1, 0] == 1024
    assert stored[1, 1] == min(3024, highest)
    raw = np.frombuffer(out.PixelData, "<i2" if pixel_representation else "<u2")
    assert raw.min() >= lowest
    assert raw.max() <= highest


def test_smallest_and_largest_pixel_values_are_not_carried_over() -> None:
    src = source()
    src.add_new(0x00280106, "SS", -5)  # SmallestImagePixelValue
    src.add_new(0x00280107, "SS", 4000)  # LargestImagePixelValue
    out = derive(src)
    assert "SmallestImagePixelValue" not in out
    assert "LargestImagePixelValue" not in out


def test_window_center_and_width_are_kept_for_denoise() -> None:
    out = round_trip(derive(source()))
    assert float(out.WindowCenter) == 40
    assert float(out.WindowWidth) == 400


def test_denoise_keeps_the_matrix() -> None:
    out = derive(source(rows=48, cols=64))
    assert (out.Rows, out.Columns) == (48, 64)
    assert out.pixel_array.shape == (48, 64)
    assert len(out.PixelData) == 48 * 64 * 2


@pytest.mark.parametrize(("task", "scale"), [("denoise", 1), ("sr", 2)])
def test_output_round_trips_through_bytes(task: str, scale: int) -> None:
    src = source(rows=48, cols=64)
    out = derive(src, task, scale)
    back = round_trip(out)
    assert back.SOPInstanceUID == out.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.pixel_array.shape == (48 * scale, 64 * scale)
    np.testing.assert_array_equal(back.pixel_array, out.pixel_array)
    np.testing.assert_array_equal(
        back.pixel_array.astype(np.float64) - 1024, upscaled(src, scale) if scale > 1 else hu(src)
    )


# --- super-resolution geometry --------------------------------------------------------------------------------------


def test_sr_axial_golden_geometry() -> None:
    src = source(index=3)
    assert floats(src.ImagePositionPatient) == [-22.4, -22.4, 3.0]
    out = derive(src, "sr", scale=2)
    assert (out.Rows, out.Columns) == (128, 128)
    assert floats(out.PixelSpacing) == pytest.approx([0.35, 0.35])
    assert floats(out.ImagePositionPatient) == pytest.approx([-22.575, -22.575, 3.0])
    assert floats(out.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]


def test_sr_uses_row_spacing_for_the_column_direction_and_column_spacing_for_the_row_direction() -> None:
    src = source(rows=32, cols=48)
    src.PixelSpacing = [0.8, 0.5]  # between rows (along y), between columns (along x)
    src.ImagePositionPatient = [0, 0, 0]
    out = derive(src, "sr", scale=2)
    assert (out.Rows, out.Columns) == (64, 96)
    assert floats(out.PixelSpacing) == pytest.approx([0.4, 0.25])
    assert floats(out.ImagePositionPatient) == pytest.approx([-0.125, -0.2, 0.0])


def test_sr_sagittal_golden_geometry() -> None:
    src = source()
    src.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # rows run anterior -> posterior, columns head -> feet
    src.PixelSpacing = [1.0, 0.5]
    src.ImagePositionPatient = [10.0, -16.0, 32.0]
    out = derive(src, "sr", scale=2)
    assert floats(out.PixelSpacing) == pytest.approx([0.5, 0.25])
    # x untouched; y moves by (0.25 - 0.5) / 2 along +y; z by (0.5 - 1.0) / 2 along -z
    assert floats(out.ImagePositionPatient) == pytest.approx([10.0, -16.125, 32.25])


def pixel_centre(ds: Dataset, row: float, col: float) -> NDArray[np.float64]:
    iop = np.asarray(floats(ds.ImageOrientationPatient))
    row_spacing, col_spacing = floats(ds.PixelSpacing)
    return np.asarray(floats(ds.ImagePositionPatient)) + iop[:3] * col * col_spacing + iop[3:] * row * row_spacing


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_sr_keeps_the_field_of_view_of_an_oblique_rotated_slice(scale: int) -> None:
    src = source(rows=40, cols=56)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    ct, st = np.cos(np.radians(20)), np.sin(np.radians(20))
    # rotated 30 degrees in-plane, then tilted 20 degrees about x
    src.ImageOrientationPatient = [f"{v:.10f}" for v in (c, s, 0.0, -s * ct, c * ct, st)]
    src.PixelSpacing = [0.9, 0.6]
    src.ImagePositionPatient = [-12.5, 40.25, 101.0]
    out = derive(src, "sr", scale)
    assert (out.Rows, out.Columns) == (40 * scale, 56 * scale)
    assert floats(out.PixelSpacing) == pytest.approx([0.9 / scale, 0.6 / scale])
    assert floats(out.ImageOrientationPatient) == floats(src.ImageOrientationPatient)
    # the outer corner of the first pixel, the image centre and the far corner stay where they were
    for src_point, out_point in [
        ((-0.5, -0.5), (-0.5, -0.5)),
        ((19.5, 27.5), ((40 * scale - 1) / 2, (56 * scale - 1) / 2)),
        ((39.5, 55.5), (40 * scale - 0.5, 56 * scale - 0.5)),
    ]:
        np.testing.assert_allclose(pixel_centre(out, *out_point), pixel_centre(src, *src_point), atol=1e-6)
    # the first pixel moved by half a new pixel minus half an old one, along each in-plane axis
    shift = np.asarray(floats(out.ImagePositionPatient)) - np.asarray(floats(src.ImagePositionPatient))
    iop = np.asarray(floats(src.ImageOrientationPatient))
    assert float(shift @ iop[:3]) == pytest.approx((0.6 / scale - 0.6) / 2, abs=1e-6)
    assert float(shift @ iop[3:]) == pytest.approx((0.9 / scale - 0.9) / 2, abs=1e-6)


def test_sr_geometry_values_are_valid_decimal_strings() -> None:
    src = source()
    src.PixelSpacing = [0.7031250, 0.7031250]
    src.ImagePositionPatient = [-179.6484375, -179.6484375, -1234.5678]
    out = derive(src, "sr", scale=3)
    for value in (*out.PixelSpacing, *out.ImagePositionPatient):
        assert len(str(value)) <= 16, value
    round_trip(out)


def add_overlay(ds: Dataset) -> None:
    ds.add_new(0x60000010, "US", int(ds.Rows))
    ds.add_new(0x60000011, "US", int(ds.Columns))
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", bytes(int(ds.Rows) * int(ds.Columns) // 8))


def overlay_tags(ds: Dataset) -> list[int]:
    return [int(e.tag) for e in ds if 0x6000 <= e.tag.group <= 0x601E]


def test_overlays_are_removed_for_sr() -> None:
    src = source()
    add_overlay(src)
    out = derive(src, "sr", scale=2)
    assert overlay_tags(out) == []


def test_overlays_are_kept_for_denoise() -> None:
    src = source()
    add_overlay(src)
    out = derive(src)
    assert overlay_tags(out) == overlay_tags(src)
    assert out[0x60003000].value == src[0x60003000].value


def test_icon_image_is_removed_for_sr() -> None:
    src = source()
    icon = Dataset()
    icon.Rows, icon.Columns = 8, 8
    src.IconImageSequence = Sequence([icon])
    assert "IconImageSequence" not in derive(src, "sr", scale=2)


# --- invalid input, lossy history -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "scale", "shape"),
    [
        ("denoise", 1, (48, 65)),
        ("denoise", 1, (64, 48)),  # transposed: same size, wrong shape
        ("denoise", 1, (96, 128)),
        ("denoise", 1, (48, 64, 1)),
        ("sr", 2, (48, 64)),
        ("sr", 2, (128, 96)),
        ("sr", 2, (96, 129)),
    ],
)
def test_pixels_of_the_wrong_shape_are_invalid(task: str, scale: int, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidDataset):
        derive_image(source(rows=48, cols=64), np.zeros(shape), proc(task, scale))


def test_lossy_jpeg_source_is_marked_lossy() -> None:
    src = source()
    values = hu(src)
    src.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.50")  # JPEG baseline
    out = derive_image(src, values, proc())
    assert out.LossyImageCompression == "01"
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_lossless_source_is_not_marked_lossy() -> None:
    assert "LossyImageCompression" not in derive(source())
    assert "LossyImageCompression" not in derive(source(), "sr", scale=2)


def test_output_of_an_encapsulated_jpeg_source_is_native_and_round_trips() -> None:
    src = source()
    values = hu(src)
    src.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.50")
    src.PixelData = encapsulate([b"\xff\xd8 not decoded here \xff\xd9"])
    src["PixelData"].VR = "OB"
    src["PixelData"].is_undefined_length = True
    out = derive_image(src, values, proc())
    assert not out["PixelData"].is_undefined_length
    back = round_trip(out)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(back.pixel_array.astype(np.float64) - 1024, values)


def test_source_already_marked_lossy_stays_marked() -> None:
    src = source()
    src.LossyImageCompression = "01"
    assert derive(src).LossyImageCompression == "01"


# --- dciodvfy -------------------------------------------------------------------------------------------------------


def test_dciodvfy_check_sees_errors(tmp_path: Path) -> None:
    """The checks below are only worth something if a broken file does produce Error lines."""
    out = derive(source())
    del out.Rows
    errors, output = dciodvfy_errors(out, tmp_path / "broken.dcm")
    assert errors, output


def ct_source_for_dciodvfy() -> Dataset:
    """A non-square CT slice with an overlay and an earlier Contributing Equipment item."""
    src = source(rows=48, cols=64)
    src.ImagePositionPatient = [-22.4, -16.8, 0.0]  # ct_slice computes -16.799999999999997: too long for DS
    add_overlay(src)
    src.ContributingEquipmentSequence = Sequence([scanner_equipment()])
    return src


def test_ct_source_passes_dciodvfy(tmp_path: Path) -> None:
    errors, output = dciodvfy_errors(ct_source_for_dciodvfy(), tmp_path / "ct.dcm")
    assert "CTImage" in output, output
    assert not errors, output


@pytest.mark.parametrize(("task", "scale"), [("denoise", 1), ("sr", 2)])
def test_ct_output_passes_dciodvfy(tmp_path: Path, task: str, scale: int) -> None:
    errors, output = dciodvfy_errors(derive(ct_source_for_dciodvfy(), task, scale), tmp_path / "out.dcm")
    assert "CTImage" in output, output
    assert not errors, output


def test_mr_source_passes_dciodvfy(tmp_path: Path) -> None:
    errors, output = dciodvfy_errors(mr_slice(STUDY, SERIES, 0, rows=32, cols=48), tmp_path / "mr.dcm")
    assert "MRImage" in output, output
    assert not errors, output


@pytest.mark.parametrize(("task", "scale"), [("denoise", 1), ("sr", 2)])
def test_mr_output_passes_dciodvfy(tmp_path: Path, task: str, scale: int) -> None:
    src = mr_slice(STUDY, SERIES, 0, rows=32, cols=48)
    values = np.kron(np.asarray(src.pixel_array, np.float64), np.ones((scale, scale)))
    out = derive_image(src, values, Processing("mr-sr", "0.3.1", task, scale, "onnxruntime-cpu", AT))
    errors, output = dciodvfy_errors(out, tmp_path / "mr-out.dcm")
    assert "MRImage" in output, output
    assert not errors, output
    assert out.SOPClassUID == MRImageStorage
    np.testing.assert_array_equal(round_trip(out).pixel_array, values)


def test_source_stored_as_implicit_vr_gives_a_valid_explicit_vr_output(tmp_path: Path) -> None:
    src = ct_source_for_dciodvfy()
    src.add_new(0x00280106, "SS", 0)  # SmallestImagePixelValue: US or SS, decided by PixelRepresentation
    src.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    src.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    received = dcmread(tmp_path / "implicit.dcm")
    out = derive(received, "sr", scale=2)
    errors, output = dciodvfy_errors(out, tmp_path / "out.dcm")
    assert not errors, output
    assert dcmread(tmp_path / "out.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_non_finite_engine_output_is_refused() -> None:
    """A model that returns NaN must fail the job with the reason, not write arbitrary pixels."""
    from core.errors import EngineFailure

    values = np.zeros((64, 64), np.float32)
    values[3, 4] = np.nan
    with pytest.raises(EngineFailure, match="non-finite"):
        derive_image(source(), values, proc())


def test_multiframe_positions_move_once_per_frame_and_once_when_shared() -> None:
    """Enhanced objects: every per-frame Plane Position moves by (new - old spacing) / 2; a
    Plane Position in the shared group (one for all frames) moves once, not once per frame."""
    base = source()
    del base.ImagePositionPatient, base.ImageOrientationPatient, base.PixelSpacing
    base.NumberOfFrames = 2
    base.PixelData = base.PixelData * 2
    shared = Dataset()
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing = [0.7, 0.7]
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    frames = []
    for z in (0.0, 5.0):
        frame, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-22.4, -22.4, z]
        frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    base.SharedFunctionalGroupsSequence = Sequence([shared])
    base.PerFrameFunctionalGroupsSequence = Sequence(frames)
    out = derive_image(base, np.zeros((2, 128, 128)), proc("sr", 2))
    moved = [floats(f.PlanePositionSequence[0].ImagePositionPatient) for f in out.PerFrameFunctionalGroupsSequence]
    np.testing.assert_allclose(moved, [[-22.575, -22.575, 0.0], [-22.575, -22.575, 5.0]])
    assert floats(out.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing) == pytest.approx(
        [0.35] * 2
    )

    position = Dataset()
    position.ImagePositionPatient = [-22.4, -22.4, 0.0]
    shared.PlanePositionSequence = Sequence([position])
    for frame in frames:
        del frame.PlanePositionSequence
    out = derive_image(base, np.zeros((2, 128, 128)), proc("sr", 2))
    got = floats(out.SharedFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient)
    assert got == pytest.approx([-22.575, -22.575, 0.0])
