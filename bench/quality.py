"""Quality benchmark (issue 3's bar): the shipped models against classical filters on held-out
real images (pydicom-data; never used for training). Prints a table and where each model
stands against its bar; asserts nothing.

    .venv/bin/python bench/quality.py [--models models] [--max-slices 8] [--out var/bench/quality]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.evaluate import evaluate, record_metrics

BARS = {
    "ct-denoise": "PSNR >= NLM + 1 dB, max ROI mean-HU bias <= 2 HU, >= 4x faster than NLM",
    "mr-denoise": "PSNR > NLM (no bar set by the issue)",
    "ct-sr2": "PSNR >= Lanczos + 1 dB",
    "mr-sr2": "PSNR >= Lanczos + 1 dB",
}


def verdict(name: str, r: dict[str, dict[str, float]]) -> str:
    m = r["model"]
    if name == "ct-denoise":
        gain, speed = m["psnr"] - r["nlm"]["psnr"], r["nlm"]["seconds"] / m["seconds"]
        ok = gain >= 1.0 and m["roi_bias"] <= 2.0 and speed >= 4.0
        return f"{'PASS' if ok else 'FAIL'}: {gain:+.2f} dB vs NLM, bias {m['roi_bias']:.2f} HU, {speed:.1f}x faster"
    if name == "mr-denoise":
        gain = m["psnr"] - r["nlm"]["psnr"]
        return f"{'PASS' if gain > 0 else 'FAIL'}: {gain:+.2f} dB vs NLM"
    gain = m["psnr"] - r["lanczos"]["psnr"]
    return f"{'PASS' if gain >= 1.0 else 'FAIL'}: {gain:+.2f} dB vs Lanczos"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--only", nargs="+", default=list(BARS), choices=list(BARS))
    ap.add_argument("--max-slices", type=int, default=8)
    ap.add_argument("--dose", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=Path("var/bench/quality"))
    ap.add_argument("--update-manifest", action="store_true", help="record the results in each model.toml")
    args = ap.parse_args()
    summary = {}
    for name in args.only:
        package = args.models / name
        if not (package / "model.onnx").exists():
            print(f"{name}: no model package at {package}, skipped")
            continue
        result = evaluate(package, [], args.out / name, dose=args.dose, max_slices=args.max_slices)
        summary[name] = result
        if args.update_manifest:
            record_metrics(package, result)
        print(
            f"\n## {name}: {result['degradation']} on {', '.join(result['images'])} "
            f"({result['slices']} slices), PSNR window {result['window']}"
        )
        print(f"{'method':10} {'PSNR dB':>8} {'SSIM':>7} {'RMSE':>8} {'ROI bias':>9} {'ROI SD':>7} {'s/slice':>8}")
        for method, m in result["results"].items():
            print(
                f"{method:10} {m['psnr']:8.2f} {m['ssim']:7.4f} {m['rmse']:8.2f} "
                f"{m.get('roi_bias', float('nan')):9.2f} {m.get('roi_sd', float('nan')):7.2f} {m['seconds']:8.3f}"
            )
        print(f"bar: {BARS[name]}\n-> {verdict(name, result['results'])}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
