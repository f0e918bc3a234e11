"""train.volumes: DICOM series from any folder layout into volumes in HU, ordered in space."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from tests.dicom_factory import UID_ROOT, ct_slice, write_ct_series
from train.volumes import Volume, read_series

ROWS = COLS = 32


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) - 1024.0


def _write_shuffled_series(root: Path, count: int, seed: int = 0) -> list[pydicom.Dataset]:
    """`count` slices whose InstanceNumber runs against their position, saved in shuffled order
    into nested folders; returns the datasets in the order of increasing z."""
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    datasets = []
    for i in range(count):
        ds = ct_slice(study, series, i, ROWS, COLS, seed=seed)
        ds.InstanceNumber = count - i  # reversed against position
        ds.ImagePositionPatient = [-11.2, -11.2, -50.0 + 2.5 * i]
        datasets.append(ds)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    for n, i in enumerate(order):
        folder = root / f"a{n % 3}" / f"b{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        datasets[i].save_as(folder / f"img{n:03d}", enforce_file_format=True)  # no extension, as PACS exports
    return datasets


def test_series_in_nested_shuffled_folders_is_read_in_hu_and_ordered(tmp_path: Path) -> None:
    datasets = _write_shuffled_series(tmp_path / "export", 6)
    (tmp_path / "export" / "README.txt").write_text("not a DICOM file\n")
    (tmp_path / "export" / "a0" / "empty.dcm").write_bytes(b"")

    volumes = read_series([tmp_path / "export"])
    assert len(volumes) == 1
    vol = volumes[0]
    assert isinstance(vol, Volume)
    assert vol.series_uid == datasets[0].SeriesInstanceUID
    assert vol.modality == "CT"
    assert vol.description == "Synthetic phantom"
    assert vol.slices == 6
    assert vol.pixels.shape == (6, ROWS, COLS) and vol.pixels.dtype == np.float32
    assert vol.spacing == (0.7, 0.7)

    # ordered by position along the normal (z), not by InstanceNumber or file name
    assert [p[2] for p in vol.positions] == [-50.0 + 2.5 * i for i in range(6)]
    for i, ds in enumerate(datasets):
        np.testing.assert_array_equal(vol.pixels[i], _hu(ds))

    # rescale applied: water ~0 HU in the middle, air ~-1000 HU in the corners
    assert abs(float(np.median(vol.pixels[:, 12:20, 12:20]))) < 15.0
    assert abs(float(np.median(vol.pixels[:, :3, :3])) + 1000.0) < 60.0


def test_order_follows_the_slice_normal_not_z(tmp_path: Path) -> None:
    """Sagittal slices (normal along x): ordered by x, whatever their z or instance numbers say."""
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    xs = [30.0, -10.0, 10.0, -30.0]
    datasets = []
    for i, x in enumerate(xs):
        ds = ct_slice(study, series, i, ROWS, COLS)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # normal = (0,1,0) x (0,0,-1) = (-1, 0, 0)
        ds.ImagePositionPatient = [x, -11.2, 5.0 * i]
        ds.save_as(tmp_path / f"s{i}.dcm", enforce_file_format=True)
        datasets.append(ds)
    (vol,) = read_series([tmp_path])
    # along the normal (-x): decreasing x
    assert [p[0] for p in vol.positions] == sorted(xs, reverse=True)
    for k, x in enumerate(sorted(xs, reverse=True)):
        np.testing.assert_array_equal(vol.pixels[k], _hu(datasets[xs.index(x)]))


def test_instance_number_orders_slices_without_geometry(tmp_path: Path) -> None:
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    datasets = []
    for i, number in enumerate([3, 1, 2]):
        ds = ct_slice(study, series, i, ROWS, COLS)
        ds.InstanceNumber = number
        del ds.ImagePositionPatient
        del ds.ImageOrientationPatient
        ds.save_as(tmp_path / f"s{i}.dcm", enforce_file_format=True)
        datasets.append(ds)
    (vol,) = read_series([tmp_path])
    assert vol.positions == ()
    for k, i in enumerate([1, 2, 0]):  # instance numbers 1, 2, 3
        np.testing.assert_array_equal(vol.pixels[k], _hu(datasets[i]))


def test_duplicate_instances_are_counted_once(tmp_path: Path) -> None:
    _, series_uid, paths = write_ct_series(tmp_path / "one", 4, ROWS, COLS)
    # the same instances again: a plain copy, and one in another transfer syntax
    (tmp_path / "copy").mkdir()
    for p in paths:
        (tmp_path / "copy" / p.name).write_bytes(p.read_bytes())
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True, enforce_file_format=True)

    (vol,) = read_series([tmp_path / "one", tmp_path / "copy", tmp_path / "implicit.dcm"])
    assert vol.series_uid == series_uid
    assert vol.slices == 4
    assert [p[2] for p in vol.positions] == [0.0, 1.0, 2.0, 3.0]


def test_files_and_folders_mix_and_two_series_stay_apart(tmp_path: Path) -> None:
    _, uid_a, paths_a = write_ct_series(tmp_path / "a", 3, ROWS, COLS, seed=1)
    _, uid_b, _ = write_ct_series(tmp_path / "b", 2, ROWS, COLS, seed=2)
    volumes = read_series([paths_a[0], paths_a[2], tmp_path / "b", tmp_path / "missing"])
    by_uid = {v.series_uid: v for v in volumes}
    assert set(by_uid) == {uid_a, uid_b}
    assert by_uid[uid_a].slices == 2  # only the two files given
    assert by_uid[uid_b].slices == 2


def test_nothing_readable_gives_no_volumes(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert read_series([tmp_path]) == []
    assert read_series([]) == []


def test_series_mixing_image_sizes_is_skipped(tmp_path: Path) -> None:
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    ct_slice(study, series, 0, 32, 32).save_as(tmp_path / "a.dcm", enforce_file_format=True)
    ct_slice(study, series, 1, 16, 16).save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert read_series([tmp_path]) == []


def test_enhanced_multiframe_ct_is_in_hu_per_frame() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    if path is None:
        pytest.skip("pydicom test data eCT_Supplemental.dcm not installed")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float32)
    frame_z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]

    (vol,) = read_series([Path(path)])
    assert vol.modality == "CT"
    assert vol.slices == 2
    assert vol.pixels.shape == (2, 512, 512)
    assert vol.spacing == pytest.approx((0.388672, 0.388672))
    # the rescale is in the functional groups (intercept -1024), not at the top level
    assert "RescaleIntercept" not in ds
    assert float(vol.pixels.min()) == pytest.approx(float(raw.min()) - 1024.0)
    # ordered along the normal: orientation (-1,0,0),(0,1,0) gives normal (0,0,-1), so z decreases
    zs = [p[2] for p in vol.positions]
    assert zs == sorted(frame_z, reverse=True)
    for k, z in enumerate(zs):
        np.testing.assert_array_equal(vol.pixels[k], raw[frame_z.index(z)] - 1024.0)


def test_mr_stays_in_stored_values() -> None:
    path = get_testdata_file("MR_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom test data MR_small.dcm not installed")
    ds = pydicom.dcmread(path)
    (vol,) = read_series([Path(path)])
    assert vol.modality == "MR"
    assert vol.slices == 1
    np.testing.assert_array_equal(vol.pixels[0], ds.pixel_array.astype(np.float32))
    assert vol.spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert vol.positions == (tuple(float(v) for v in ds.ImagePositionPatient),)


def test_reading_leaves_pydicom_settings_as_they_were(tmp_path: Path) -> None:
    write_ct_series(tmp_path, 2, ROWS, COLS)
    (tmp_path / "junk.dcm").write_bytes(b"DICM but not really")
    before = pydicom.config.settings.reading_validation_mode
    (vol,) = read_series([tmp_path])
    assert vol.slices == 2
    assert pydicom.config.settings.reading_validation_mode == before


def test_values_that_break_the_standard_are_read_without_complaint(tmp_path: Path) -> None:
    """Real exports carry over-long strings and the like: they are read, silently."""
    _, _, paths = write_ct_series(tmp_path, 2, ROWS, COLS)
    for path in paths:
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.SeriesDescription = "x" * 80  # LO allows 64 characters
            ds.save_as(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (vol,) = read_series([tmp_path])
    assert vol.slices == 2
    assert vol.description == "x" * 80
