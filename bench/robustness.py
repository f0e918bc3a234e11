"""Robustness benchmark (issue 17): every shipped model against its classical baseline in every
cell of a matrix of acquisition conditions, on held-out real images, degraded by
bench/acquisition.py: a simulator written apart from train/degrade.py, so no model is judged on
the physics it was trained with. Prints per-cell figures, the worst cell and the mean; asserts
nothing.

    .venv/bin/python bench/robustness.py [--models ROOT ...] [--only ct-denoise ...] [--slices 6]
                                         [--realisations 2] [--json PATH] [--update-manifest]

Matrices (docs/training.md, "Robustness"):
- ct-denoise: reconstruction kernel (sharp .. very smooth) x dose (100%, 25%, 10%, 5%); the
  target is the clean image through the same kernel. Baseline: NLM given the true noise SD,
  its h the best of a grid per slice (an oracle); a model with a noise map is told the noise SD
  too, and is scored beside that as the node runs it, the level estimated from the slice
  (engines.qa.noise_sd; `gain_estimated`, worst and mean; not in the verdict). Beside it the
  gain against NLM at a fixed h = 0.8 SD, the baseline issue 17 measured with (scikit-image's
  rule of thumb; `gain_fixed`, worst and mean): the verdict is the oracle's.
  Also the largest ROI mean-HU bias in uniform soft-tissue regions of the target,
  E[output] - target, over 8 noise draws (the model and NLM, with the h the oracle chose on the
  first draw, on the draws beyond --realisations), with the input's noise as a control variate
  (roi_bias); beside it the estimate's standard error and the same figure for NLM (the
  baseline's own bias: smoothing moves small ROIs' means too).
- mr-denoise: Rician noise 1%, 2%, 5%, 10% x no / a smooth 30% bias field. Baseline: NLM as above.
- ct-sr2: PSF (none, 1, 2, 3 pixels FWHM, anisotropic 1 x 3) x noise in the low-resolution
  image (0, 8 HU). Baseline: the better of Lanczos and bicubic.
- mr-sr2: k-space x2 with apodisation none / Hamming / Tukey x full / 5/8 partial Fourier x
  noise 0 / 2%. Baseline: the better of Lanczos and bicubic.

The model runs as the node runs it (ONNX Runtime through engines.pipeline.enhance_volume).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import acquisition as acq  # noqa: E402
from engines import qa  # noqa: E402
from engines.manifest import ModelManifest, dump, load  # noqa: E402
from engines.pipeline import enhance_volume, resize  # noqa: E402
from engines.registry import EngineOptions, open_engine  # noqa: E402
from train import metrics  # noqa: E402
from train.evaluate import NLM_H, nlm  # noqa: E402
from train.volumes import read_series  # noqa: E402

Array = NDArray[np.float32]

# Real images no shipped model was trained on (they were trained on phantoms only): every 512x512
# CT in pydicom and pydicom-data, and the two larger MR images (centre 512x512 crops).
HELD_OUT = {
    "CT": [
        "693_UNCI.dcm",
        "bad_sequence.dcm",
        "explicit_VR-UN.dcm",
        "eCT_Supplemental.dcm",
        "J2K_pixelrep_mismatch.dcm",
    ],
    "MR": ["MR-SIEMENS-DICOM-WithOverlays.dcm", "MR2_UNCI.dcm"],
}
HELD_OUT_MODELS = ("ct-denoise", "mr-denoise", "ct-sr2", "mr-sr2")  # the shipped models the matrix judges
CROP = 512
SOFT_TISSUE = (-50.0, 100.0)
BIAS_DRAWS = 8  # CT denoising: noise draws the model's mean-HU bias is averaged over


@dataclass(frozen=True)
class Cell:
    """One acquisition condition: a name for the table and the degradation it applies."""

    name: str
    degrade: Callable[[Array, float, np.random.Generator], tuple[Array, Array, float]]
    # clean slice, pixel spacing, rng -> (input, target, true noise SD of the input; 0 for SR)


def ct_denoise_cells() -> list[Cell]:
    def make(kernel: acq.Kernel, dose: float) -> Cell:
        def run(clean: Array, spacing: float, rng: np.random.Generator) -> tuple[Array, Array, float]:
            noisy, target = acq.low_dose_ct(clean, spacing, kernel, dose, rng)
            return noisy, target, float(np.std(noisy - target))

        return Cell(f"{kernel.name} {dose:.0%}", run)

    return [make(k, d) for k in acq.KERNELS.values() for d in (1.0, 0.25, 0.10, 0.05)]


def mr_denoise_cells() -> list[Cell]:
    def make(percent: float, bias: float) -> Cell:
        def run(clean: Array, spacing: float, rng: np.random.Generator) -> tuple[Array, Array, float]:
            target = clean * acq.bias_field(clean.shape, bias, rng) if bias else clean
            noisy = acq.rician_noise(target, percent, rng)
            return noisy, target, float(np.std(noisy - target))

        return Cell(f"rician {percent:g}%{' + bias' if bias else ''}", run)

    return [make(p, b) for b in (0.0, 0.3) for p in (1.0, 2.0, 5.0, 10.0)]


def ct_sr_cells(scale: int) -> list[Cell]:
    def make(fwhm: tuple[float, float], noise: float) -> Cell:
        def run(clean: Array, spacing: float, rng: np.random.Generator) -> tuple[Array, Array, float]:
            return acq.low_resolution(clean, scale, fwhm, noise, rng), clean, 0.0

        psf = "area only" if max(fwhm) == 0 else f"psf {fwhm[0]:g}x{fwhm[1]:g}"
        return Cell(f"{psf}, noise {noise:g} HU", run)

    psfs = [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (1.0, 3.0)]
    return [make(p, n) for n in (0.0, 8.0) for p in psfs]


def mr_sr_cells(scale: int) -> list[Cell]:
    def make(apod: str, pf: float, noise: float) -> Cell:
        def run(clean: Array, spacing: float, rng: np.random.Generator) -> tuple[Array, Array, float]:
            return acq.mr_low_resolution(clean, scale, apod, pf, noise, rng), clean, 0.0

        return Cell(f"{apod}{', pf 5/8' if pf < 1 else ''}, noise {noise:g}%", run)

    return [make(a, pf, n) for n in (0.0, 2.0) for pf in (1.0, 0.625) for a in acq.APODISATIONS]


def cells_for(manifest: ModelManifest) -> list[Cell]:
    ct = "CT" in manifest.modalities
    if manifest.task == "denoise":
        return ct_denoise_cells() if ct else mr_denoise_cells()
    return ct_sr_cells(manifest.scale) if ct else mr_sr_cells(manifest.scale)


@dataclass
class Slice:
    name: str
    pixels: Array
    spacing: float


def held_out_slices(modality: str, limit: int) -> list[Slice]:
    from pydicom.data import get_testdata_file

    paths = []
    for name in HELD_OUT[modality]:
        found = get_testdata_file(name, download=False)
        if found is None:
            raise FileNotFoundError(f"{name} not found: install pydicom-data (pip install 'enhance-node[train]')")
        paths.append(Path(str(found)))
    slices = []
    for vol in read_series(paths):
        for z in range(vol.slices):
            img = vol.pixels[z]
            top, left = max(0, (img.shape[0] - CROP) // 2), max(0, (img.shape[1] - CROP) // 2)
            img = np.ascontiguousarray(img[top : top + CROP, left : left + CROP], np.float32)
            slices.append(Slice(f"{vol.description or vol.series_uid[-12:]}#{z}", img, vol.spacing[0]))
    return slices[:limit]


@dataclass
class CellResult:
    psnr: dict[str, list[float]] = field(default_factory=dict)
    bias: list[float] = field(default_factory=list)  # CT denoise: the model's ROI mean bias per slice
    bias_se: list[float] = field(default_factory=list)  # that estimate's standard error
    nlm_bias: list[float] = field(default_factory=list)  # and on NLM's outputs (the baseline's own bias)

    def add(self, method: str, value: float) -> None:
        self.psnr.setdefault(method, []).append(value)

    def summary(self, baseline: str, slices: int) -> dict[str, float]:
        means = {m: float(np.mean(v)) for m, v in self.psnr.items()}
        out = {f"{m}_psnr": round(v, 3) for m, v in means.items()}
        out["gain"] = round(means["model"] - means[baseline], 3)
        # each slice's own gain (its draws averaged), the slices in order: the worst image, which
        # a cell's mean over images can hide
        per_slice = (np.array(self.psnr["model"]) - np.array(self.psnr[baseline])).reshape(slices, -1).mean(axis=1)
        out["worst_slice"] = int(np.argmin(per_slice))
        out["worst_slice_gain"] = round(float(per_slice.min()), 3)
        if "nlm_fixed" in means:
            out["gain_fixed"] = round(means["model"] - means["nlm_fixed"], 3)
        if "estimated" in means:
            out["gain_estimated"] = round(means["estimated"] - means[baseline], 3)
        if self.bias:
            out["model_bias"] = round(float(np.nanmax(self.bias)), 3)
            out["bias_se"] = round(float(np.nanmax(self.bias_se)), 3)
            out["nlm_bias"] = round(float(np.nanmax(self.nlm_bias)), 3)
        return out


def _window(manifest: ModelManifest, target: Array) -> tuple[float, float]:
    if "CT" in manifest.modalities and manifest.task == "denoise":
        return metrics.CT_WINDOW
    return metrics.percentile_window(target)


def _nlm_grid(
    noisy: Array, target: Array, sigma: float, window: tuple[float, float]
) -> dict[float, tuple[float, Array]]:
    """NLM at every h of the grid: h -> (PSNR, image). The best PSNR is the oracle's."""
    grid: dict[float, tuple[float, Array]] = {}
    for h in NLM_H:
        image = nlm(noisy, sigma, h)
        grid[h] = (metrics.psnr(image, target, window), image)
    return grid


def _best_nlm(noisy: Array, target: Array, sigma: float, window: tuple[float, float]) -> float:
    return max(score for score, _ in _nlm_grid(noisy, target, sigma, window).values())


NLM_FIXED_H = NLM_H[0]  # issue 17's baseline as measured there: h = 0.8 SD, scikit-image's rule of thumb

NlmCache = dict[tuple[str, str], tuple[list[tuple[float, float]], float]]
# (cell, slice) -> NLM's PSNR on each of the first draws (the oracle's h, h = NLM_FIXED_H) and its
# ROI bias over all the draws: the baseline depends on the degraded slices only, so models scored
# in one run share it


def run_cell(
    engine: Any,
    manifest: ModelManifest,
    cell: Cell,
    slices: list[Slice],
    realisations: int,
    seed: int,
    bias_draws: int = BIAS_DRAWS,
    nlm_cache: NlmCache | None = None,
) -> CellResult:
    """The model and its baselines on every held-out slice, `realisations` draws each; for CT
    denoising the model and NLM (with the h the oracle chose on the slice's first draw) run on
    `bias_draws` draws in all, for their mean-HU bias. NLM's figures come from `nlm_cache` when
    an earlier model of the same run has scored the cell (the draws are seeded alike)."""
    from PIL import Image

    result = CellResult()
    denoise = manifest.task == "denoise"
    ct = "CT" in manifest.modalities
    ct_denoise = denoise and ct
    draws = realisations if denoise else 1
    for i, s in enumerate(slices):
        outputs, inputs, nlm_outputs, target, h = [], [], [], None, NLM_H[0]
        cached = nlm_cache.get((cell.name, s.name)) if nlm_cache is not None and denoise else None
        nlm_scores = list(cached[0]) if cached else []
        for k in range(max(draws, bias_draws if ct_denoise else 0)):
            rng = np.random.default_rng([seed, i, k])
            low, target, sigma = cell.degrade(s.pixels, s.spacing, rng)
            window = _window(manifest, target)
            # a denoiser with a noise map is told the noise SD, as NLM is: in the object (soft tissue
            # for CT); an SR net's map is the node's estimate from its input, what it was trained with
            told = manifest.noise_map and denoise
            known = float(np.std((low - target)[qa.object_mask(target, ct)])) if told else None
            out = enhance_volume(engine, low[None], noise_sd=known)[0]
            if known is not None and k < draws:  # and as the node runs it: the level estimated from the slice
                estimated = enhance_volume(engine, low[None])[0]
                result.add("estimated", metrics.psnr(estimated, target, window))
            if ct_denoise:
                outputs.append(out)
                inputs.append(low)
            if k < draws:
                result.add("model", metrics.psnr(out, target, window))
                if denoise:
                    result.add("input", metrics.psnr(low, target, window))
                    if cached is None:
                        grid = _nlm_grid(low, target, sigma, window)
                        oracle = max(grid, key=lambda g: grid[g][0])
                        nlm_scores.append((grid[oracle][0], grid[NLM_FIXED_H][0]))
                        h = oracle if k == 0 else h
                    result.add("nlm", nlm_scores[k][0])
                    result.add("nlm_fixed", nlm_scores[k][1])
                else:
                    th, tw = low.shape[0] * manifest.scale, low.shape[1] * manifest.scale
                    target = target[:th, :tw]
                    for name, method in (("lanczos", Image.Resampling.LANCZOS), ("bicubic", Image.Resampling.BICUBIC)):
                        result.add(name, metrics.psnr(resize(low, manifest.scale, method), target, window))
            if ct_denoise and cached is None:  # the first draws' NLM at h is in their grid already
                nlm_outputs.append(grid[h][1] if k < draws else nlm(low, sigma, h))
        nlm_bias = float("nan")  # MR: no ROI bias
        if ct_denoise and target is not None:
            rois = metrics.uniform_rois(target, SOFT_TISSUE)
            bias, se = roi_bias(outputs, inputs, target, rois)
            result.bias.append(bias)
            result.bias_se.append(se)
            nlm_bias = cached[1] if cached else roi_bias(nlm_outputs, inputs, target, rois)[0]
            result.nlm_bias.append(nlm_bias)
        if nlm_cache is not None and denoise and cached is None:
            nlm_cache[(cell.name, s.name)] = (nlm_scores, nlm_bias)
    return result


def roi_bias(outputs: list[Array], inputs: list[Array], target: Array, rois: list[metrics.Roi]) -> tuple[float, float]:
    """The largest |E[output] - target| over the ROIs, and the largest standard error of those
    estimates, from K paired draws. Per ROI, with o and i each draw's ROI mean minus the
    target's: mean(o - c i), c the regression of o on i over the draws (a control variate).
    E[i] = 0 because the simulator's noise is zero-mean, so this estimates E[o] for any c, and
    the fitted c takes out the part of the input's noise that the method passed through: the
    mean of o alone (c = 0) keeps what a method leaves of the noise's low frequencies, the mean
    of o - i (c = 1) what it removed of them. (nan, nan) without ROIs."""
    if not rois:
        return float("nan"), float("nan")

    reference = np.array([float(r.of(target).mean()) for r in rois])

    def means(images: list[Array]) -> NDArray[np.float64]:  # (draws, rois): ROI means minus the target's
        return np.array([[float(r.of(x).mean()) for r in rois] for x in images]) - reference

    o, i = means(outputs), means(inputs)
    if len(o) < 3:
        return float(np.abs(o.mean(axis=0)).max()), float("nan")
    oc, ic = o - o.mean(axis=0), i - i.mean(axis=0)
    var_i = (ic**2).sum(axis=0)
    c = np.divide((oc * ic).sum(axis=0), var_i, out=np.zeros(len(rois)), where=var_i > 0)
    adjusted = o - c * i
    se = adjusted.std(axis=0, ddof=2) / np.sqrt(len(o))  # one degree of freedom more for c
    return float(np.abs(adjusted.mean(axis=0)).max()), float(se.max())


def baseline_name(manifest: ModelManifest, result: CellResult) -> str:
    if manifest.task == "denoise":
        return "nlm"
    lanczos, bicubic = (float(np.mean(result.psnr[m])) for m in ("lanczos", "bicubic"))
    return "lanczos" if lanczos >= bicubic else "bicubic"


def evaluate_model(
    package: Path,
    slices: int,
    realisations: int,
    seed: int,
    log: Callable[[str], None],
    threads: int = 0,
    bias_draws: int = BIAS_DRAWS,
    nlm_cache: NlmCache | None = None,
) -> dict[str, Any]:
    engine = open_engine(package, EngineOptions(backend="onnxruntime", device="cpu", threads=threads))
    manifest = engine.manifest
    modality = manifest.modalities[0]
    held = held_out_slices(modality, slices)
    rows: dict[str, dict[str, float]] = {}
    log(f"\n## {manifest.name} {manifest.version}: {len(held)} held-out slices ({', '.join(s.name for s in held)})")
    for cell in cells_for(manifest):
        result = run_cell(engine, manifest, cell, held, realisations, seed, bias_draws, nlm_cache)
        base = baseline_name(manifest, result)
        row = result.summary(base, len(held))
        row["baseline"] = base  # type: ignore[assignment]
        row["worst_slice"] = held[int(row["worst_slice"])].name  # type: ignore[assignment]
        rows[cell.name] = row
        bias = (
            f", bias {row['model_bias']:.2f} +/- {row['bias_se']:.2f} HU (NLM {row['nlm_bias']:.2f})"
            if "model_bias" in row
            else ""
        )
        fixed = f" (h = {NLM_FIXED_H:g} SD: {row['gain_fixed']:+.2f})" if "gain_fixed" in row else ""
        estimated = f" (level estimated: {row['gain_estimated']:+.2f})" if "gain_estimated" in row else ""
        log(
            f"  {cell.name:<28} model {row['model_psnr']:6.2f}  {base} {row[base + '_psnr']:6.2f}"
            f"  gain {row['gain']:+6.2f} dB{fixed}{estimated}{bias}, worst slice {row['worst_slice_gain']:+.2f}"
        )
    gains = {name: r["gain"] for name, r in rows.items()}
    worst = min(gains, key=lambda n: gains[n])
    worst_image = min(rows, key=lambda n: rows[n]["worst_slice_gain"])
    summary: dict[str, Any] = {
        "model": f"{manifest.name} {manifest.version}",
        "simulator": "bench/acquisition.py",
        "slices": len(held),
        "realisations": realisations if manifest.task == "denoise" else 1,
        **(
            {"bias_draws": max(realisations, bias_draws)}
            if "CT" in manifest.modalities and manifest.task == "denoise"
            else {}
        ),
        "images": sorted({s.name.rsplit("#", 1)[0] for s in held}),
        "worst_cell": worst,
        "worst_gain": gains[worst],
        "mean_gain": round(float(np.mean(list(gains.values()))), 3),
        "worst_slice": f"{worst_image}, {rows[worst_image]['worst_slice']}",
        "worst_slice_gain": rows[worst_image]["worst_slice_gain"],
        "cells": rows,
    }
    if any("model_bias" in r for r in rows.values()):
        summary["max_bias"] = max(r["model_bias"] for r in rows.values())
        summary["max_nlm_bias"] = max(r["nlm_bias"] for r in rows.values())
    log(f"  worst cell: {worst} ({gains[worst]:+.2f} dB); mean gain {summary['mean_gain']:+.2f} dB")
    log(f"  worst single slice: {summary['worst_slice']} ({summary['worst_slice_gain']:+.2f} dB; not in the verdict)")
    for variant, what in (
        ("fixed", f"against NLM at h = {NLM_FIXED_H:g} SD (no oracle)"),
        ("estimated", "with the noise level the node estimates (engines.qa), not told"),
    ):
        if all(f"gain_{variant}" in r for r in rows.values()):
            gain = {name: r[f"gain_{variant}"] for name, r in rows.items()}
            worst_v = summary[f"worst_cell_{variant}"] = min(gain, key=lambda n: gain[n])
            summary[f"worst_gain_{variant}"] = gain[worst_v]
            summary[f"mean_gain_{variant}"] = round(float(np.mean(list(gain.values()))), 3)
            log(
                f"  {what}: worst cell {worst_v} ({gain[worst_v]:+.2f} dB);"
                f" mean gain {summary[f'mean_gain_{variant}']:+.2f} dB"
            )
    if "max_bias" in summary:
        log(
            f"  largest ROI mean-HU bias over all cells: {summary['max_bias']:.2f} HU (bar 2;"
            f" NLM's own: {summary['max_nlm_bias']:.2f} HU)"
        )
    return summary


def verdict(summary: dict[str, Any]) -> str:
    ok = summary["worst_gain"] >= 0.0 and summary["mean_gain"] >= 1.0 and summary.get("max_bias", 0.0) <= 2.0
    return "PASS" if ok else "FAIL"


def _models(roots: list[Path], only: list[str] | None) -> Iterator[Path]:
    for root in roots:
        for package in sorted(p.parent for p in root.glob("*/model.toml")):
            if only is None or package.name in only:
                yield package


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[REPO / "models"],
        metavar="ROOT",
        help="folders of model packages; several (e.g. models and a candidate's) are scored side by side "
        "on the same draws, NLM computed once",
    )
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--slices", type=int, default=6, help="held-out slices per modality")
    ap.add_argument("--realisations", type=int, default=2, help="noise draws per slice and cell (denoisers)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = one per core)")
    ap.add_argument("--bias-draws", type=int, default=BIAS_DRAWS, help="CT denoising: draws for the HU bias")
    ap.add_argument("--update-manifest", action="store_true", help="record the matrix in each model.toml")
    args = ap.parse_args()
    results = {}
    packages = list(_models(args.models, args.only))
    names = [p.name for p in packages]
    nlm_cache: NlmCache = {}
    for package in packages:
        summary = evaluate_model(
            package,
            args.slices,
            args.realisations,
            args.seed,
            lambda s: print(s, flush=True),
            args.threads,
            args.bias_draws,
            nlm_cache,
        )
        results[package.name if names.count(package.name) == 1 else str(package)] = summary
        if args.update_manifest:
            manifest = load(package)
            data = manifest.as_dict()
            data.setdefault("metrics", {})["robustness"] = summary
            dump(ModelManifest.from_dict(data), package / "model.toml")
    print("\n## Verdicts (bar: worst cell >= 0 dB, mean >= +1 dB, CT ROI bias <= 2 HU in every cell)")
    for name, s in results.items():
        bias = f", bias {s['max_bias']:.2f} HU" if "max_bias" in s else ""
        worst = f"worst {s['worst_cell']} {s['worst_gain']:+.2f} dB"
        print(f"  {name:<11} {verdict(s)}: {worst}, mean {s['mean_gain']:+.2f} dB{bias}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
