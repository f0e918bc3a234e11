"""train.realct: real CT that packages ship, written as DICOM series the trainer reads."""

from __future__ import annotations

import plistlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.dicom_factory import write_ct_series
from train.realct import crops, invesalius, main
from train.volumes import read_series


def _project(folder: Path, volume: np.ndarray, modality: str = "CT") -> Path:
    folder.mkdir(parents=True)
    volume.astype("<i2").tofile(folder / "matrix.dat")
    props = {
        "modality": modality,
        "name": "test head",
        "spacing": [0.5, 0.75, 2.0],  # x, y, z as InVesalius writes them
        "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(volume.shape)},
    }
    (folder / "main.plist").write_bytes(plistlib.dumps(props))
    return folder


def test_an_invesalius_project_becomes_a_ct_series_face_up(tmp_path: Path) -> None:
    volume = np.full((3, 8, 6), -1000, np.int16)
    volume[:, 0, :] = 40  # InVesalius's first row is the image's bottom
    volume[1] += 7
    assert invesalius(_project(tmp_path / "inv", volume), tmp_path / "out") == 3
    (series,) = read_series([tmp_path / "out"])
    assert series.modality == "CT" and series.description == "test head"
    assert series.pixels.shape == (3, 8, 6)
    np.testing.assert_array_equal(series.pixels[:, -1, :], np.array([40, 47, 40])[:, None].repeat(6, 1))
    assert float(series.pixels[0, :-1].max()) == -1000.0
    assert series.spacing[0] == pytest.approx(0.75)  # rows are y
    ds = pydicom.dcmread(sorted((tmp_path / "out").glob("*.dcm"))[0])
    assert [float(v) for v in ds.PixelSpacing] == [0.75, 0.5] and float(ds.SliceThickness) == 2.0


def test_a_project_that_is_not_int16_ct_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an int16 CT project"):
        invesalius(_project(tmp_path / "mr", np.zeros((1, 4, 4), np.int16), "MR"), tmp_path / "out")


def test_single_slices_are_cropped_where_a_crop_fits(tmp_path: Path) -> None:
    """A 512x512 slice gives four 256x256 crops, a 400x512 one two (the lower row of crops would
    run past its edge); HU are kept through the rescale."""
    _, _, square = write_ct_series(tmp_path / "square", 1, rows=512, cols=512)
    _, _, wide = write_ct_series(tmp_path / "wide", 1, rows=400, cols=512, seed=1)
    assert crops([square[0], wide[0]], tmp_path / "out") == 6
    series = read_series([tmp_path / "out"])
    assert len(series) == 6 and {s.pixels.shape for s in series} == {(1, 256, 256)}
    source = read_series([tmp_path / "square"])[0].pixels[0]
    first = read_series([tmp_path / "out" / "000"])[0].pixels[0]
    np.testing.assert_array_equal(first, np.clip(source[32:288, 32:288], -1024, 3071))


def test_the_command_line_writes_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = _project(tmp_path / "inv", np.zeros((2, 256, 256), np.int16))
    _, _, square = write_ct_series(tmp_path / "square", 1)
    assert main(["--invesalius", str(project), "--slices", str(square[0]), "--out", str(tmp_path / "out")]) == 0
    assert "6 CT slices" in capsys.readouterr().out
    assert sum(s.slices for s in read_series([tmp_path / "out"])) == 6
