"""bench/quality.py's series timing runs the shipped ct-denoise on a series of the held-out
slices (the figure itself is a benchmark's to print, never a test's to assert)."""

from __future__ import annotations

import math

from bench import quality
from tests.helpers import REPO


def test_series_seconds_runs_a_series_of_the_held_out_slices() -> None:
    seconds = quality.series_seconds(REPO / "models" / "ct-denoise", slices=2)
    assert math.isfinite(seconds) and seconds > 0.0
