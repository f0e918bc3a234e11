"""Quality benchmark (issue 3's bar): the shipped models against classical filters on held-out
real images (pydicom-data; never used for training). Prints a table and where each model
stands against its bar; asserts nothing.

    .venv/bin/python bench/quality.py [--models models] [--max-slices 8] [--realisations 8] [--bm3d]
                                      [--out var/bench/quality]

Denoisers are evaluated on --realisations noise draws per slice (mean HU bias from the outputs
averaged over them); --bm3d adds BM3D (pip install bm3d; non-commercial, evaluation only), the
published anchor of DESIGN 5 (DnCNN +0.66 dB over BM3D on BSD68).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.manifest import load
from engines.pipeline import enhance_volume
from engines.registry import EngineOptions, open_engine
from train.evaluate import evaluate, held_out_paths, record_metrics
from train.volumes import read_series

SERIES_SLICES = 32  # the model's seconds per slice are also taken on a series this long

BARS = {
    "ct-denoise": "PSNR >= NLM + 1 dB, max ROI mean-HU bias <= 2 HU, >= 4x faster than NLM",
    "mr-denoise": "PSNR > NLM (no bar set by the issue)",
    "ct-sr2": "PSNR >= Lanczos + 1 dB",
    "mr-sr2": "PSNR >= Lanczos + 1 dB",
}


def verdict(name: str, r: dict[str, dict[str, float]]) -> str:
    m = r["model"]
    anchor = f"; {m['psnr'] - r['bm3d']['psnr']:+.2f} dB vs BM3D" if "bm3d" in r else ""
    if name == "ct-denoise":
        gain, speed = m["psnr"] - r["nlm"]["psnr"], r["nlm"]["seconds"] / m["seconds"]
        ok = gain >= 1.0 and m["roi_bias"] <= 2.0 and speed >= 4.0
        figures = f"{gain:+.2f} dB vs NLM, bias {m['roi_bias']:.2f} HU, {speed:.1f}x faster"
        return f"{'PASS' if ok else 'FAIL'}: {figures}{anchor}"
    if name == "mr-denoise":
        gain = m["psnr"] - r["nlm"]["psnr"]
        return f"{'PASS' if gain > 0 else 'FAIL'}: {gain:+.2f} dB vs NLM{anchor}"
    gain = m["psnr"] - r["lanczos"]["psnr"]
    return f"{'PASS' if gain >= 1.0 else 'FAIL'}: {gain:+.2f} dB vs Lanczos"


def ct_series(slices: int) -> NDArray[np.float32]:
    """A `slices`-slice CT series in HU: the held-out 512x512 slices, repeated, with 20 HU of
    noise (a fresh draw on every slice, so no two slices are alike)."""
    images = [v.pixels[z] for v in read_series(held_out_paths("CT")) for z in range(v.slices)]
    images = [im for im in images if im.shape == (512, 512)]
    noise = np.random.default_rng(0).normal(0.0, 20.0, (slices, 512, 512))
    return (np.stack([images[i % len(images)] for i in range(slices)]) + noise).astype(np.float32)


def series_seconds(package: Path, slices: int = SERIES_SLICES) -> float:
    """Seconds per slice of the model on one `slices`-slice CT series (ct_series), as the worker
    runs a series (its noise level estimated from the series, batches of 8), after a warm-up.
    The evaluation's own figure times each held-out file as a series of its own (one slice),
    which also pays each series' fixed costs (the noise estimate, a new input shape) once a slice."""
    engine = open_engine(package, EngineOptions(backend="onnxruntime", device="cpu"))
    series = ct_series(slices)
    enhance_volume(engine, series[: min(8, slices)])
    started = time.perf_counter()
    enhance_volume(engine, series)
    return (time.perf_counter() - started) / slices


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--only", nargs="+", default=list(BARS), choices=list(BARS))
    ap.add_argument("--max-slices", type=int, default=8)
    ap.add_argument("--dose", type=float, default=0.25)
    ap.add_argument("--realisations", type=int, default=8, help="noise draws per slice (denoisers)")
    ap.add_argument("--bm3d", action="store_true", help="add the BM3D baseline (needs pip install bm3d)")
    ap.add_argument("--out", type=Path, default=Path("var/bench/quality"))
    ap.add_argument("--update-manifest", action="store_true", help="record the results in each model.toml")
    args = ap.parse_args()
    summary = {}
    for name in args.only:
        package = args.models / name
        if not (package / "model.onnx").exists():
            print(f"{name}: no model package at {package}, skipped")
            continue
        result = evaluate(
            package,
            [],
            args.out / name,
            dose=args.dose,
            max_slices=args.max_slices,
            realisations=args.realisations,
            bm3d=args.bm3d and load(package).task == "denoise",  # BM3D is a denoising baseline
        )
        summary[name] = result
        if args.update_manifest:
            record_metrics(package, result)
        print(
            f"\n## {name}: {result['degradation']} on {', '.join(result['images'])} "
            f"({result['slices']} slices x {result['realisations']} noise draws), PSNR window {result['window']}"
        )
        print(
            f"{'method':10} {'PSNR dB':>8} {'SSIM':>7} {'RMSE':>8} {'ROI bias':>9} {'1-draw':>7} {'ROI SD':>7} "
            f"{'s/slice':>8}"
        )
        nan = float("nan")
        for method, m in result["results"].items():
            print(
                f"{method:10} {m['psnr']:8.2f} {m['ssim']:7.4f} {m['rmse']:8.2f} {m.get('roi_bias', nan):9.2f} "
                f"{m.get('roi_error', nan):7.2f} {m.get('roi_sd', nan):7.2f} {m['seconds']:8.3f}"
            )
        if name == "ct-denoise":
            per_slice, nlm = series_seconds(package), result["results"]["nlm"]["seconds"]
            print(
                f"model in a {SERIES_SLICES}-slice series: {per_slice:.3f} s/slice, "
                f"{nlm / per_slice:.1f}x faster than NLM (above: each held-out file a series of one slice)"
            )
        print(f"bar: {BARS[name]}\n-> {verdict(name, result['results'])}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
