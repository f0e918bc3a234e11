"""Real CT that public packages ship, written as DICOM series for `enhance-node train --data`
(scripts/fetch-real-ct fetches them): an InVesalius project's volume (the Debian package
invesalius-examples' head CT: raw int16 HU and a property list) and 256x256 crops of single
512x512 slices (so that they share one size with the volume in a training bank).

None of it is among the held-out images of bench/ (pydicom and pydicom-data); docs/training.md
lists the sources and their licences.

    python -m train.realct --invesalius PROJECT_DIR --slices FILE ... --out DIR
"""

from __future__ import annotations

import argparse
import plistlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from train.presets import HU

CROP = 256  # the InVesalius volume's size: the crops of single slices match it


def write_series(volume: NDArray[np.int16], spacing: tuple[float, float, float], description: str, out: Path) -> int:
    """(Z, rows, cols) HU as one CT series of single-frame files in `out`; returns the count.
    spacing: (row, column, slice) in mm."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for z, image in enumerate(volume):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesDescription, ds.PatientID = "CT", description, "training"
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [0.0, 0.0, z * spacing[2]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(image, "<i2").tobytes()
        ds.save_as(out / f"{z:04d}.dcm", enforce_file_format=True)
    return len(volume)


def invesalius(project: Path, out: Path) -> int:
    """An unpacked InVesalius project (main.plist and the matrix it names) as a CT series."""
    props = plistlib.loads((project / "main.plist").read_bytes())
    matrix = props["matrix"]
    if props.get("modality") != "CT" or matrix["dtype"] != "int16":
        raise ValueError(f"{project}: not an int16 CT project")
    volume = np.fromfile(project / matrix["filename"], "<i2").reshape(matrix["shape"])
    sx, sy, sz = (float(v) for v in props["spacing"])
    # InVesalius keeps rows bottom to top: flipped, the face is at the top as DICOM shows it
    return write_series(volume[:, ::-1, :], (sy, sx, sz), str(props.get("name", "InVesalius")), out)


def crops(paths: Iterable[Path], out: Path, size: int = CROP) -> int:
    """Up to four overlapping size x size crops of each single slice, each a series: their
    corners 7/8 and 1/8 of a crop before the centre in each direction (at the image's edge if
    that is past it); a crop that would run past the far edge is left out."""
    count = 0
    for path in paths:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
        thickness = float(ds.get("SliceThickness", 1.0) or 1.0)
        for r in _starts(hu.shape[0], size):
            for c in _starts(hu.shape[1], size):
                crop = np.clip(np.rint(hu[r : r + size, c : c + size]), HU.lo, HU.hi).astype(np.int16)
                write_series(crop[None], (spacing[0], spacing[1], thickness), f"{path.stem} crop", out / f"{count:03d}")
                count += 1
    return count


def _starts(length: int, size: int) -> list[int]:
    starts = (max(0, length // 2 - size + size // 8), max(0, length // 2 - size // 8))
    return [s for s in starts if s + size <= length]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--invesalius", type=Path, nargs="*", default=[], help="unpacked InVesalius projects")
    ap.add_argument("--slices", type=Path, nargs="*", default=[], help="single 512x512 CT slices to crop")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    slices = sum(invesalius(p, args.out / f"invesalius-{i}") for i, p in enumerate(args.invesalius))
    slices += crops(args.slices, args.out / "crops")
    print(f"{args.out}: {slices} CT slices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
