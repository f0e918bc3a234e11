"""A series' frames as stacks of parallel slices (docs/processing.md, "Mixed series"): how the
worker tells apart reformats, thicknesses, echoes, phases and gaps before it runs a model.
The frames themselves and their geometry are core/geometry.py.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from core.geometry import Frame, functional_groups, lookup, ordered

# A series is split into stacks (docs/processing.md, "Mixed series"); these tolerances decide
# when two frames share a plane, a position or a thickness.
ORIENTATION_DECIMALS = 3  # slice normals equal to 1e-3 (~0.06 deg) are parallel
POSITION_TOLERANCE_MM = 0.01
GAP_FACTOR = 1.5  # a step this many times the stack's median step is a missing slice
# what tells apart several images at one position: echoes, dynamic phases, b-values, acquisitions
# (top-level attributes, or in an enhanced object's per-frame functional groups)
DISTINGUISHING = (
    (None, "EchoNumbers"),
    ("MREchoSequence", "EffectiveEchoTime"),
    (None, "EchoTime"),
    (None, "DiffusionBValue"),
    ("MRDiffusionSequence", "DiffusionBValue"),
    (None, "TemporalPositionIdentifier"),
    ("FrameContentSequence", "TemporalPositionIndex"),
    (None, "TriggerTime"),
    (None, "AcquisitionNumber"),
)


class UnsplittableSeries(ValueError):
    """Several images at one position that no attribute tells apart: no stack can be built."""


def _plane_key(f: Frame) -> tuple[object, ...]:
    normal = tuple(np.round(f.normal, ORIENTATION_DECIMALS) + 0.0) if f.normal is not None else None
    thickness = f.dataset.get("SliceThickness")
    try:
        thick = round(float(thickness), 2) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thick = None
    return (f.pixels.shape, tuple(round(v, 4) for v in f.spacing), normal, thick)


def _distinguishing(f: Frame) -> tuple[str, ...]:
    groups = functional_groups(f.dataset, f.index)
    values = []
    for sequence, keyword in DISTINGUISHING:
        value = lookup(f.dataset, groups, sequence, keyword) if sequence else f.dataset.get(keyword)
        values.append(str(value) if value not in (None, "") else "")
    return tuple(values)


def _positions(stack: list[Frame]) -> NDArray[np.float64]:
    normal = stack[0].normal
    assert normal is not None
    return np.asarray([float(np.dot(normal, f.position)) for f in stack])  # type: ignore[arg-type]


def _has_duplicates(stack: list[Frame]) -> bool:
    return bool(np.any(np.diff(np.sort(_positions(stack))) < POSITION_TOLERANCE_MM))


def _split_at_gaps(stack: list[Frame]) -> list[list[Frame]]:
    if len(stack) < 3:
        return [stack]
    steps = np.diff(_positions(stack))
    step = float(np.median(steps))
    cuts = [i + 1 for i, s in enumerate(steps) if s > GAP_FACTOR * step]
    return [stack[a:b] for a, b in zip([0, *cuts], [*cuts, len(stack)], strict=True)]


def stacks(items: list[Frame]) -> list[list[Frame]]:
    """The series' frames as volumes of parallel slices, each ordered along its normal with
    no missing slice between neighbours (docs/processing.md, "Mixed series"):

    1. frames are grouped by matrix, pixel spacing, orientation and slice thickness (a
       series with reformats or two thicknesses gives several stacks);
    2. a group with several frames at one position (echoes, phases, b-values) is split by
       the first attribute in DISTINGUISHING whose values part it into groups with one frame
       per position; when none does, UnsplittableSeries;
    3. a stack is cut where a step is more than GAP_FACTOR times its median step (a missing
       slice), so no slice is given a wrong neighbour.

    Frames without position or orientation form one stack per matrix, in InstanceNumber order.
    """
    groups: dict[tuple[object, ...], list[Frame]] = {}
    for f in items:
        geometric = f.normal is not None and f.position is not None
        groups.setdefault(_plane_key(f) if geometric else ("no geometry", f.pixels.shape), []).append(f)
    out: list[list[Frame]] = []
    for key, group in groups.items():
        if key[0] == "no geometry":
            out.append(ordered(group))
            continue
        parts = [group]
        if _has_duplicates(group):
            parts = _split_duplicates(group)
        for part in parts:
            out.extend(_split_at_gaps(ordered(part)))
    return out


def _split_duplicates(group: list[Frame]) -> list[list[Frame]]:
    keys = [_distinguishing(f) for f in group]
    for i in range(len(DISTINGUISHING)):
        parts: dict[str, list[Frame]] = {}
        for f, key in zip(group, keys, strict=True):
            parts.setdefault(key[i], []).append(f)
        if len(parts) > 1 and not any(_has_duplicates(p) for p in parts.values()):
            return list(parts.values())
    position = float(np.sort(_positions(group))[np.argmin(np.diff(np.sort(_positions(group))))])
    raise UnsplittableSeries(
        f"several images at one position ({position:.2f} mm along the normal) that no echo, phase, "
        "b-value or acquisition number tells apart"
    )
