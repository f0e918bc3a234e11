"""bench/quality.py's series for the speed figure: real held-out CT slices, as a series of
the length asked for, each slice with its own noise (the figure itself is the benchmark's to
print, never a test's to assert)."""

from __future__ import annotations

import numpy as np

from bench import quality


def test_the_timed_series_is_held_out_ct_with_noise_on_every_slice() -> None:
    series = quality.ct_series(12)
    assert series.shape == (12, 512, 512) and series.dtype == np.float32
    body = series[0] > -200  # real anatomy: soft tissue and bone, not a synthetic fill
    assert 0.1 < body.mean() < 0.9 and float(series[0].max()) > 500.0
    # fewer images than slices: a slice that repeats the first image differs from it by two
    # independent 20 HU draws (SD ~28 HU), never by nothing, and far less than another image does
    spread = [float(np.std(series[j] - series[0])) for j in range(1, 12)]
    repeats = [sd for sd in spread if sd < 60.0]
    assert repeats and all(24.0 < sd < 32.0 for sd in repeats)
    assert max(spread) > 100.0
