"""Speed of CT denoisers against NLM (issue 17's bar: ct-denoise >= 4x faster than NLM per 512x512
slice on this CPU), side by side: each package's seconds per slice on a 32-slice series as the
worker runs it (bench.quality.series_seconds: noise estimate, batches of 8, regional mean), and
scikit-image's NLM as the benchmarks run it (fast mode, patch 5, distance 6) on 512x512 slices
of the same series, in alternating rounds so the machine's drift falls on all alike. Prints
figures and ratios; asserts nothing.

    .venv/bin/python bench/denoise_speed.py [PACKAGE ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import SERIES_SLICES, ct_series, series_seconds
from train.evaluate import NLM_H, nlm

REPO = Path(__file__).resolve().parents[1]
NLM_SLICES = 4  # NLM's seconds per slice: the mean over this many slices of the series


def nlm_seconds(slices: int = NLM_SLICES) -> float:
    series = ct_series(slices)
    started = time.perf_counter()
    for image in series:
        nlm(image, 20.0, NLM_H[0])
    return (time.perf_counter() - started) / slices


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packages", type=Path, nargs="*", default=[REPO / "models" / "ct-denoise"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    seconds: dict[str, list[float]] = {str(p): [] for p in args.packages}
    baseline: list[float] = []
    for r in range(args.rounds):
        baseline.append(nlm_seconds())
        for package in args.packages:
            seconds[str(package)].append(series_seconds(package))
        row = ", ".join(f"{p} {s[-1] * 1000:.1f} ms" for p, s in seconds.items())
        print(f"round {r + 1}: NLM {baseline[-1] * 1000:.1f} ms/slice; {row} (a {SERIES_SLICES}-slice series)")
    nlm_median = statistics.median(baseline)
    print(f"\nmedians over {args.rounds} rounds, 512x512 slices; bar: >= 4x faster than NLM")
    print(f"  {'NLM':<40} {nlm_median * 1000:7.1f} ms/slice")
    for package, values in seconds.items():
        median = statistics.median(values)
        print(f"  {package:<40} {median * 1000:7.1f} ms/slice  {nlm_median / median:4.1f}x faster than NLM")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
