"""Synthetic DICOM instances for tests and benchmarks (no patient data, nothing downloaded).

The images are a simple water cylinder phantom with noise: enough to exercise receiving,
storage and pixel handling; the `train` package has the realistic phantoms.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1533."


def _image(
    sop_class: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    index: int,
    sop_uid: str | None,
    rows: int,
    cols: int,
) -> Dataset:
    """File meta, patient, study, series, equipment and 12-bit grey pixel-module attributes
    shared by the test images."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid or generate_uid(UID_ROOT)
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(UID_ROOT, [study_uid])
    ds.Modality = modality
    ds.PatientName = "PHANTOM^WATER"
    ds.PatientID = "PHANTOM-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = dt.date(2026, 1, 1).strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.InstanceNumber = index + 1
    ds.Manufacturer = "enhance-node tests"
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    return ds


def ct_slice(
    study_uid: str,
    series_uid: str,
    index: int,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    sop_uid: str | None = None,
) -> Dataset:
    """One CT slice of a water cylinder in air, stored as signed 16-bit with rescale -1024."""
    rng = np.random.default_rng(seed + index)
    yy, xx = np.mgrid[:rows, :cols]
    r = np.hypot(yy - rows / 2, xx - cols / 2)
    hu = np.where(r < min(rows, cols) * 0.4, 0.0, -1000.0) + rng.normal(0, 20, (rows, cols))
    stored = np.clip(np.round(hu + 1024), 0, 4095).astype(np.int16)

    ds = _image(CTImageStorage, "CT", study_uid, series_uid, index, sop_uid, rows, cols)
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Synthetic phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [round(-cols / 2 * 0.7, 4), round(-rows / 2 * 0.7, 4), float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = stored.tobytes()
    return ds


def mr_slice(study_uid: str, series_uid: str, index: int, rows: int = 256, cols: int = 256, seed: int = 0) -> Dataset:
    """One axial T1 spin-echo MR slice of a water cylinder, unsigned 16-bit (12 stored), no rescale."""
    rng = np.random.default_rng(seed + index)
    yy, xx = np.mgrid[:rows, :cols]
    r = np.hypot(yy - rows / 2, xx - cols / 2)
    signal = np.where(r < min(rows, cols) * 0.4, 800.0, 10.0) + np.abs(rng.normal(0, 15, (rows, cols)))
    stored = np.clip(np.round(signal), 0, 4095).astype(np.uint16)

    ds = _image(MRImageStorage, "MR", study_uid, series_uid, index, None, rows, cols)
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Synthetic phantom T1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ImagePositionPatient = [-float(cols) / 2, -float(rows) / 2, float(index) * 5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 5.0
    ds.SpacingBetweenSlices = 5.0
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 500
    ds.EchoTime = 15
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = 1.5
    ds.FlipAngle = 90
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 400, 1000
    ds.PixelData = stored.tobytes()
    return ds


def encode_explicit_le(ds: Dataset) -> bytes:
    """The dataset's bytes as a peer sends them in Explicit VR Little Endian (no File Meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def write_ct_series(
    folder: Path, count: int, rows: int = 512, cols: int = 512, seed: int = 0
) -> tuple[str, str, list[Path]]:
    """Write `count` slices of one new series; returns (study UID, series UID, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    paths = []
    for i in range(count):
        ds = ct_slice(study_uid, series_uid, i, rows, cols, seed)
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, series_uid, paths


# -- a whole CT study as a scanner sends it (issue 18) ----------------------------------------

DOSE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
PRIVATE_STORAGE = "1.2.826.0.1.3680043.10.1533.99.1"  # a vendor's private class (under our test root)


@dataclass(frozen=True)
class StudyMix:
    study_uid: str
    axial: str  # series UIDs by role
    localizer: str
    dose_sr: str
    seg: str
    dose_screen: str
    private_series: str
    files: list[Path]  # everything storescu sends (the private object is sent apart)
    private: Path


def _non_image(sop_class: str, modality: str, study_uid: str, series_uid: str, number: int) -> Dataset:
    ds = _image(sop_class, modality, study_uid, series_uid, 0, None, 0, 0)
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated"):
        delattr(ds, keyword)
    for keyword in ("BitsStored", "HighBit"):
        delattr(ds, keyword)
    ds.SeriesNumber = number
    return ds


def write_study_mix(folder: Path, slices: int = 4) -> StudyMix:
    """One CT study as a scanner sends it: a localizer series (two topograms), an axial series
    of `slices` 64x64 slices, a radiation dose SR, a segmentation, a secondary-capture dose
    screen (RGB), and a private-class object; each its own series, files under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, axial = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    localizer, dose_sr, seg, screen, private = (generate_uid(UID_ROOT) for _ in range(5))
    datasets: list[tuple[str, Dataset]] = []
    for i in range(slices):
        datasets.append((f"axial{i}", ct_slice(study_uid, axial, i, rows=64, cols=64)))
    for i in range(2):
        topo = ct_slice(study_uid, localizer, i, rows=128, cols=128)
        topo.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        topo.SeriesNumber, topo.SeriesDescription = 100, "Topogram"
        topo.ImageOrientationPatient = [1, 0, 0, 0, 0, -1] if i == 0 else [0, 1, 0, 0, 0, -1]
        datasets.append((f"topogram{i}", topo))
    sr = _non_image(DOSE_SR_STORAGE, "SR", study_uid, dose_sr, 997)
    sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    sr.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
        "113701",
        "DCM",
        "X-Ray Radiation Dose Report",
    )
    sr.ConceptNameCodeSequence = [concept]
    datasets.append(("dose_sr", sr))
    mask = _image(SEGMENTATION_STORAGE, "SEG", study_uid, seg, 0, None, 64, 64)
    mask.BitsAllocated, mask.BitsStored, mask.HighBit, mask.PixelRepresentation = 1, 1, 0, 0
    mask.NumberOfFrames, mask.SegmentationType, mask.SeriesNumber = 1, "BINARY", 998
    mask.PixelData = np.packbits(np.eye(64, dtype=np.uint8).ravel(), bitorder="little").tobytes()
    datasets.append(("seg", mask))
    dose = _image(SECONDARY_CAPTURE_STORAGE, "CT", study_uid, screen, 0, None, 64, 64)
    dose.SamplesPerPixel, dose.PhotometricInterpretation, dose.PlanarConfiguration = 3, "RGB", 0
    dose.BitsAllocated, dose.BitsStored, dose.HighBit, dose.PixelRepresentation = 8, 8, 7, 0
    dose.ImageType, dose.SeriesNumber, dose.SeriesDescription = ["DERIVED", "SECONDARY", "OTHER"], 999, "Dose Report"
    dose.ConversionType = "WSD"
    dose.PixelData = np.full((64, 64, 3), 200, np.uint8).tobytes()
    datasets.append(("dose_screen", dose))
    files = []
    for name, ds in datasets:
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    vendor = _non_image(PRIVATE_STORAGE, "OT", study_uid, private, 996)
    vendor.add_new(0x00291010, "OB", b"\x01\x02\x03\x04")
    private_path = folder / "private.dcm"
    vendor.save_as(private_path, enforce_file_format=True)
    return StudyMix(study_uid, axial, localizer, dose_sr, seg, screen, private, files, private_path)
