"""What a super-resolution model's `consistency` weight (engines.pipeline.enforce_consistency)
costs or gains on the training simulator, apart from the held-out images the robustness matrix
judges it with.

For each weight in a grid, the model runs once per phantom and condition (the preset's PSF and
low-resolution noise ranges, train/degrade.py), the consistency step is applied at that weight,
and the gain over the better of Lanczos and bicubic is printed per condition with the worst and
the mean. The shipped ct-sr2 uses weight 1 (exact consistency) as a safety rule, not a tuned
figure: on the phantoms the net was trained on it costs a little (docs/training.md, Safe
super-resolution); on scans unlike them it is what keeps the output from being worse than
Lanczos. Asserts nothing.

    .venv/bin/python bench/consistency.py [--model models/ct-sr2] [--phantoms 4]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines.pipeline import enforce_consistency, enhance_volume, resize  # noqa: E402
from engines.registry import EngineOptions, open_engine  # noqa: E402
from train import metrics  # noqa: E402
from train.degrade import ct_downsample  # noqa: E402
from train.phantoms import ct_phantom  # noqa: E402

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
PSF_FWHM = (0.0, 1.0, 2.0, 3.0, 3.5)  # the ct-sr2 preset's range, HR pixels
LR_NOISE = (0.0, 6.0, 12.0)  # HU


def main() -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "ct-sr2")
    ap.add_argument("--phantoms", type=int, default=4)
    ap.add_argument("--seed", type=int, default=20_000, help="phantom seeds (training used 0..)")
    args = ap.parse_args()
    engine = open_engine(args.model, EngineOptions(backend="onnxruntime", device="cpu"))
    scale = engine.manifest.scale
    engine.manifest = replace(engine.manifest, consistency=0.0)  # the step is applied here, per weight
    gains: dict[str, list[list[float]]] = {}
    for p in range(args.phantoms):
        clean = ct_phantom(np.random.default_rng([args.seed, p]), size=512, slices=1)[0][0]
        window = metrics.percentile_window(clean)
        for fwhm in PSF_FWHM:
            for noise in LR_NOISE:
                rng = np.random.default_rng([args.seed, p, int(fwhm * 10), int(noise)])
                low = ct_downsample(clean, scale, fwhm)
                low = (low + rng.normal(0.0, noise, low.shape)).astype(np.float32) if noise else low
                base = max(
                    metrics.psnr(resize(low, scale, m), clean, window)
                    for m in (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC)
                )
                out = enhance_volume(engine, low[None])[0]
                row = [metrics.psnr(enforce_consistency(low, out, scale, w), clean, window) - base for w in WEIGHTS]
                gains.setdefault(f"psf {fwhm:g}, noise {noise:g} HU", []).append(row)
    print(f"{engine.manifest.name}: gain over the better of Lanczos and bicubic (dB), {args.phantoms} phantoms")
    print(f"{'condition':<24}" + "".join(f"  w={w:<5g}" for w in WEIGHTS))
    table = {name: np.mean(rows, axis=0) for name, rows in gains.items()}
    for name, row in table.items():
        print(f"{name:<24}" + "".join(f"  {g:+7.2f}" for g in row))
    stacked = np.array(list(table.values()))
    worst, mean = stacked.min(axis=0), stacked.mean(axis=0)
    print(f"{'worst':<24}" + "".join(f"  {g:+7.2f}" for g in worst))
    print(f"{'mean':<24}" + "".join(f"  {g:+7.2f}" for g in mean))
    best = max(range(len(WEIGHTS)), key=lambda i: (round(float(worst[i]), 2), float(mean[i])))
    print(f"best worst condition on this simulator at consistency = {WEIGHTS[best]:g}")
    change = f"worst {worst[-1] - worst[0]:+.2f} dB, mean {mean[-1] - mean[0]:+.2f} dB"
    print(f"exact consistency (1) against none (0): {change}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
