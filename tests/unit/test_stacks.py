"""Issue 18, mixed series: node.series.stacks splits a series into volumes of parallel slices,
one per position, with no missing slice between neighbours, or refuses it with the reason."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from core.geometry import Frame, frames
from node.series import UnsplittableSeries, stacks
from tests.dicom_factory import ct_slice, mr_slice


def ct(z: float, number: int, **changes: Any) -> Dataset:
    ds = ct_slice("1.2.3", "1.2.3.4", number, rows=32, cols=32)
    ds.ImagePositionPatient = [0, 0, z]
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def split(*datasets: Dataset) -> list[list[int]]:
    """The stacks as lists of InstanceNumber, in their order."""
    items: list[Frame] = [f for ds in datasets for f in frames(ds)]
    return [[int(f.dataset.InstanceNumber) for f in stack] for stack in stacks(items)]


def test_one_axial_series_is_one_stack_ordered_along_the_normal() -> None:
    assert split(ct(2.0, 2), ct(0.0, 0), ct(1.0, 1)) == [[1, 2, 3]]


def test_two_orientations_are_two_stacks() -> None:
    coronal = [ct(float(i), 10 + i, ImageOrientationPatient=[1, 0, 0, 0, 0, -1]) for i in range(2)]
    for i, ds in enumerate(coronal):
        ds.ImagePositionPatient = [0, float(i), 0]
    assert sorted(split(ct(0.0, 0), ct(1.0, 1), *coronal)) == [[1, 2], [11, 12]]


def test_two_slice_thicknesses_are_two_stacks() -> None:
    thick = [ct(float(i * 5), 10 + i, SliceThickness=5.0) for i in range(2)]
    assert sorted(split(ct(0.0, 0), ct(1.0, 1), *thick)) == [[1, 2], [11, 12]]


def test_two_matrices_are_two_stacks() -> None:
    big = ct_slice("1.2.3", "1.2.3.4", 9, rows=48, cols=48)
    assert sorted(split(ct(0.0, 0), ct(1.0, 1), big)) == [[1, 2], [10]]


def test_a_missing_slice_cuts_the_stack_so_no_slice_gets_a_wrong_neighbour() -> None:
    assert split(*(ct(float(z), z) for z in (0, 1, 2, 4, 5))) == [[1, 2, 3], [5, 6]]


def test_uneven_but_gapless_spacing_is_one_stack() -> None:
    assert split(*(ct(z, i) for i, z in enumerate((0.0, 1.0, 2.2, 3.2, 4.3)))) == [[1, 2, 3, 4, 5]]


def test_two_echoes_at_each_position_are_split_by_echo_number() -> None:
    items = []
    for echo in (1, 2):
        for z in range(3):
            ds = mr_slice("1.2.3", "1.2.3.5", 10 * echo + z, rows=32, cols=32)
            ds.ImagePositionPatient, ds.EchoNumbers, ds.EchoTime = [0, 0, float(z)], echo, 10.0 * echo
            items.append(ds)
    assert sorted(split(*items)) == [[11, 12, 13], [21, 22, 23]]


def test_dynamic_phases_are_split_by_temporal_position() -> None:
    items = [ct(float(z), 10 * p + z, TemporalPositionIdentifier=p) for p in (1, 2) for z in range(2)]
    assert sorted(split(*items)) == [[11, 12], [21, 22]]


def test_images_at_one_position_that_nothing_tells_apart_are_refused() -> None:
    with pytest.raises(UnsplittableSeries, match="several images at one position"):
        split(ct(0.0, 0), ct(0.0, 1), ct(1.0, 2))


def test_frames_without_geometry_are_one_stack_in_instance_order() -> None:
    a, b = ct(0.0, 1), ct(1.0, 0)
    for ds in (a, b):
        del ds.ImagePositionPatient
    assert split(a, b) == [[1, 2]]
