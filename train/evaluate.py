"""Held-out evaluation of a model package against classical filters; Markdown report + PNG panel.

The model runs through ONNX Runtime exactly as the node's CPU engine will (whole slice,
normalisation per DESIGN 3.4), so its seconds per slice are the deployed figure.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from core.errors import ManifestError, UsageError
from engines.manifest import ModelManifest, dump, load
from engines.pipeline import context_indices, enhance_volume, resize
from engines.registry import EngineOptions, open_engine
from train import metrics
from train.data import Slab, degrade
from train.degrade import LowDoseCT
from train.presets import Degradation
from train.volumes import Volume, read_series

log = logging.getLogger(__name__)
Array = NDArray[np.float32]

# Real images the shipped models never saw in training (DESIGN 4: evaluation only).
HELD_OUT = {
    "CT": ["693_UNCI.dcm", "bad_sequence.dcm", "explicit_VR-UN.dcm", "eCT_Supplemental.dcm"],
    "MR": ["MR-SIEMENS-DICOM-WithOverlays.dcm", "MR2_UNCI.dcm"],
}
SOFT_TISSUE = (-50.0, 100.0)


def held_out_paths(modality: str) -> list[Path]:
    from pydicom.data import get_testdata_file

    paths = []
    for name in HELD_OUT.get(modality, []):
        found = get_testdata_file(name, download=False)
        if found is None:
            raise FileNotFoundError(f"{name} not found: install pydicom-data (pip install 'enhance-node[train]')")
        paths.append(Path(str(found)))
    return paths


class OnnxModel:
    """The model as the node runs it: the onnxruntime engine through the series pipeline
    (normalisation per series, padding, content box, tiling), one degraded series at a time."""

    def __init__(self, package: Path, threads: int = 0) -> None:
        self.engine = open_engine(package, EngineOptions(backend="onnxruntime", device="cpu", threads=threads))
        self.manifest = self.engine.manifest
        self._done: dict[int, tuple[Array, float]] = {}

    def __call__(self, case: Case) -> tuple[Array, float]:
        """The enhanced slice of `case` and the seconds per slice its series took."""
        key = id(case.series)
        if key not in self._done:
            started = time.perf_counter()
            out = enhance_volume(self.engine, case.series)
            self._done[key] = (out, (time.perf_counter() - started) / len(case.series))
        out, seconds = self._done[key]
        return out[case.index], seconds


@dataclass
class Case:
    """One held-out slice: clean target, degraded input (with context), noise SD."""

    name: str
    target: Array
    degraded: Array  # (context, h, w): what the baselines see
    series: Array  # the whole degraded series (slices, h, w): what the model sees, as in the node
    index: int  # this slice in `series`
    sigma: float  # noise SD in image units (denoise), 0 for SR


def degradation_for(manifest: ModelManifest, dose: float, sigma_percent: float) -> Degradation:
    """The training physics for what the model undoes, at one fixed dose or noise level."""
    ct = "CT" in manifest.modalities
    if manifest.task == "denoise":
        return Degradation("lowdose-ct" if ct else "rician", dose=(dose, dose), sigma_percent=(sigma_percent,) * 2)
    scale = float(manifest.scale)
    return Degradation("ct-sr" if ct else "mr-kspace", scale=manifest.scale, psf_fwhm=(scale, scale))


def make_cases(
    volumes: list[Volume],
    manifest: ModelManifest,
    deg: Degradation,
    max_slices: int,
    seed: int,
    sim: LowDoseCT | None = None,
) -> list[Case]:
    """The held-out slices degraded with noise drawn from `seed`. Pass one `sim` to every draw of
    the same slices: it keeps their projections, the slow part of the CT simulation."""
    rng = np.random.default_rng(seed)
    sim = sim or LowDoseCT()
    half, scale = manifest.context_slices // 2, manifest.scale
    cases: list[Case] = []
    for vol in volumes:
        # degrade only the slices evaluated (and their context): CT simulation costs seconds a slice
        count = min(vol.slices, max_slices - len(cases) + half)
        h, w = vol.pixels.shape[1] // scale * scale, vol.pixels.shape[2] // scale * scale
        clean = vol.pixels[:count, :h, :w]
        degraded = degrade(Slab(clean, vol.spacing[0]), deg, rng, sim)[0]
        for z in range(min(count, max_slices - len(cases))):
            idx = context_indices(z, count, manifest.context_slices)
            sigma = float(np.std(degraded[z] - clean[z])) if manifest.task == "denoise" else 0.0
            name = f"{vol.description or vol.series_uid[-12:]}#{z}"
            cases.append(Case(name, clean[z], degraded[idx], degraded, z, sigma))
        if len(cases) == max_slices:
            break
    return cases


def _ct_denoise(manifest: ModelManifest) -> bool:
    return "CT" in manifest.modalities and manifest.task == "denoise"


def _display_window(manifest: ModelManifest, target: Array) -> tuple[float, float]:
    """Where PSNR/SSIM are measured: CT noise in the soft-tissue window, the rest by percentiles."""
    return metrics.CT_WINDOW if _ct_denoise(manifest) else metrics.percentile_window(target)


Method = Callable[[Case], tuple[Array, float]]  # a case -> (prediction, seconds it took)


def _timed(run: Callable[[], Array]) -> tuple[Array, float]:
    started = time.perf_counter()
    out = run()
    return out, time.perf_counter() - started


def _centre(c: Case) -> Array:
    return c.degraded[len(c.degraded) // 2]


def baselines(manifest: ModelManifest, bm3d: bool = False) -> dict[str, Method]:
    """The classical methods for the model's task; `bm3d` adds BM3D to the denoising ones
    (an evaluation-only baseline: it must be installed separately, see _bm3d_function)."""
    if manifest.task == "sr":
        s = manifest.scale
        return {
            "bicubic": lambda c: _timed(lambda: resize(_centre(c), s, Image.Resampling.BICUBIC)),
            "lanczos": lambda c: _timed(lambda: resize(_centre(c), s, Image.Resampling.LANCZOS)),
        }

    def best_of(strengths: tuple[float, ...], run: Callable[[Array, float, float], Array]) -> Method:
        """The output with the best PSNR against the target over `strengths`, timed as one run."""

        def method(c: Case) -> tuple[Array, float]:
            window = _display_window(manifest, c.target)
            runs = [_timed(partial(run, _centre(c), c.sigma, k)) for k in strengths]
            return max(runs, key=lambda r: metrics.psnr(r[0], c.target, window))

        return method

    methods: dict[str, Method] = {
        "input": lambda c: (_centre(c), 0.0),
        "nlm": best_of(NLM_H, nlm),
        "tv": best_of(TV_WEIGHT, _tv),
    }
    if bm3d:
        run = _bm3d_function()
        methods["bm3d"] = lambda c: _timed(lambda: run(_centre(c), noise_psd(_centre(c) - c.target)))
    return methods


# Classical baselines get their strength parameter chosen per slice against the target (an
# oracle no deployed filter has), so the model is compared with the best each filter can do.
NLM_H = (0.8, 1.0, 1.3, 1.6)  # h in units of sigma; 0.8 is skimage's rule of thumb for fast mode
TV_WEIGHT = (0.5, 1.0, 2.0)  # weight in units of sigma


def nlm(image: Array, sigma: float, h: float) -> Array:
    # sigma passed explicitly: estimate_sigma underestimates CT's spatially correlated noise
    return np.asarray(
        denoise_nl_means(image, h=h * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6), np.float32
    )


def _tv(image: Array, sigma: float, weight: float) -> Array:
    return np.asarray(denoise_tv_chambolle(image, weight=weight * sigma), np.float32)


def noise_psd(noise: NDArray[np.floating]) -> NDArray[np.float64]:
    """The power spectrum of a noise image in BM3D's convention (|FFT|^2, so white noise of
    variance v is v * rows * cols in every bin): its periodogram, smoothed over 2 bins."""
    power = np.abs(np.fft.fft2(np.asarray(noise, np.float64))) ** 2
    return np.asarray(ndimage.gaussian_filter(power, 2.0, mode="wrap"), np.float64)


def _bm3d_function() -> Callable[[Array, NDArray[np.float64]], Array]:
    """BM3D for correlated noise (Makinen, Azzari, Foi 2020), given the noise's power spectrum
    as NLM is given sigma. Its licence allows non-commercial use only, so it is never a
    dependency of enhance-node: `pip install bm3d` to evaluate against it."""
    try:
        import bm3d
    except ImportError:
        raise ValueError(
            "the BM3D baseline needs the bm3d package, which is not installed "
            "(non-commercial licence, evaluation only: pip install bm3d)"
        ) from None
    if not hasattr(np, "trapz"):  # bm4d 4.2.5, which bm3d runs on, calls np.trapz (NumPy 2 renamed it)
        np.trapz = np.trapezoid  # type: ignore[attr-defined]

    def run(image: Array, psd: NDArray[np.float64]) -> Array:
        return np.asarray(bm3d.bm3d(np.asarray(image, np.float64), psd), np.float32)

    return run


def evaluate(
    package: Path,
    data: list[Path],
    out: Path,
    dose: float = 0.25,
    sigma_percent: float = 5.0,
    max_slices: int = 8,
    seed: int = 0,
    realisations: int = 1,
    bm3d: bool = False,
) -> dict[str, Any]:
    """Every method on every held-out slice, for `realisations` independent draws of the noise
    (seeds seed, seed + 1, ...; SR degradations have no noise and are drawn once). PSNR, SSIM,
    RMSE, ROI SD and seconds are means over slices and draws. `roi_bias` is the largest
    systematic ROI mean error: of each method's output averaged over the draws, so that the
    noise left in a 15x15 ROI's mean does not count as bias; `roi_error` is the largest ROI mean
    error in one draw (the mean over draws of each draw's worst): what one scan shows."""
    if realisations < 1:
        raise ValueError(f"realisations must be at least 1, got {realisations}")
    model = OnnxModel(package)
    manifest = model.manifest
    if bm3d and manifest.task != "denoise":
        raise ValueError(f"BM3D is a denoising baseline; {manifest.name} is a {manifest.task} model")
    modality = manifest.modalities[0]
    volumes = [v for v in read_series(data or held_out_paths(modality)) if v.modality in manifest.modalities]
    if not volumes:
        raise ValueError(f"no {'/'.join(manifest.modalities)} images to evaluate on")
    deg = degradation_for(manifest, dose, sigma_percent)
    draws = realisations if manifest.task == "denoise" else 1
    sim = LowDoseCT()  # projected once, whatever the number of draws
    runs = [make_cases(volumes, manifest, deg, max_slices, seed + k, sim) for k in range(draws)]
    methods: dict[str, Method] = {
        **baselines(manifest, bm3d),
        "model": model,
    }
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    worst: dict[str, NDArray[np.float64]] = defaultdict(lambda: np.zeros(draws))  # per draw, over slices
    panel: dict[str, Array] = {}
    for i, cases in enumerate(zip(*runs, strict=True)):  # the draws of slice i
        target = cases[0].target
        window = _display_window(manifest, target)
        rois = metrics.uniform_rois(target, SOFT_TISSUE) if _ct_denoise(manifest) else []
        for name, fn in methods.items():
            r = rows[name]
            total = np.zeros(target.shape, np.float64)
            for k, case in enumerate(cases):
                pred, seconds = fn(case)
                r["psnr"].append(metrics.psnr(pred, target, window))
                r["ssim"].append(metrics.ssim(pred, target, window))
                r["rmse"].append(metrics.rmse(pred, target))
                r["seconds"].append(seconds)
                if rois:
                    error, sd = metrics.roi_bias_and_sd(pred, target, rois)
                    worst[name][k] = max(worst[name][k], error)
                    r["roi_sd"].append(sd)
                    total += pred
                if i == 0 and k == 0:
                    panel[name] = pred
            if rois:
                r["roi_bias"].append(metrics.roi_bias_and_sd((total / draws).astype(np.float32), target, rois)[0])
    summary = {
        name: {k: float(np.nanmax(v)) if k == "roi_bias" else float(np.nanmean(v)) for k, v in r.items()}
        for name, r in rows.items()
    }
    for name, per_draw in worst.items():
        summary[name]["roi_error"] = float(per_draw.mean())
    out.mkdir(parents=True, exist_ok=True)
    first = runs[0]
    context = {
        "model": f"{manifest.name} {manifest.version}",
        "task": manifest.task,
        "slices": len(first),
        "realisations": draws,
        "images": sorted({c.name.rsplit("#", 1)[0] for c in first}),
        "degradation": _degradation_text(deg),
        "window": "soft tissue -160..240 HU" if _ct_denoise(manifest) else "0.5-99.5 percentile of the target",
    }
    (out / "report.md").write_text(_report(context, summary))
    _panel(out / "panel.png", first[0], panel, manifest)
    return {**context, "results": summary}


def _degradation_text(deg: Degradation) -> str:
    return {
        "lowdose-ct": f"simulated {deg.dose[0]:.0%} dose",
        "rician": f"Rician noise {deg.sigma_percent[0]}% of signal",
        "ct-sr": f"x{deg.scale} PSF blur + block decimation",
        "mr-kspace": f"x{deg.scale} k-space truncation",
    }[deg.kind]


def _report(context: dict[str, Any], summary: dict[str, dict[str, float]]) -> str:
    lines = [
        f"# Evaluation of {context['model']}",
        "",
        f"- Held-out images: {', '.join(context['images'])} ({context['slices']} slices)",
        f"- Degradation: {context['degradation']}",
        f"- PSNR/SSIM window: {context['window']}",
        f"- Noise realisations per slice: {context['realisations']} (figures are means over them)",
        "",
        "| method | PSNR dB | SSIM | RMSE | max ROI mean bias | worst ROI error, one draw | ROI SD | s/slice |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary.items():
        lines.append(
            f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['rmse']:.2f} | {_fmt(m.get('roi_bias'))} "
            f"| {_fmt(m.get('roi_error'))} | {_fmt(m.get('roi_sd'))} | {m['seconds']:.3f} |"
        )
    if context["realisations"] > 1 and "roi_bias" in next(iter(summary.values())):
        lines += [
            "",
            f"ROI mean bias is measured on each method's output averaged over the {context['realisations']} "
            "draws (what the method does to mean HU); the worst error in one draw adds the noise left "
            "in a 15x15 ROI's mean.",
        ]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _panel(path: Path, case: Case, preds: dict[str, Array], manifest: ModelManifest) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = _display_window(manifest, case.target)
    baseline = "nlm" if manifest.task == "denoise" else "lanczos"
    images = [
        ("input", _centre(case)),
        (baseline, preds[baseline]),
        ("model", preds["model"]),
        ("target", case.target),
        ("model - target", preds["model"] - case.target),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.4))
    for ax, (title, img) in zip(axes, images, strict=True):
        if title == "model - target":
            span = (hi - lo) / 8
            ax.imshow(img, cmap="coolwarm", vmin=-span, vmax=span)
        else:
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def evaluate_cli(args: argparse.Namespace) -> int:
    try:
        result = evaluate(
            args.model,
            args.data,
            args.out or args.model / "evaluation",
            args.dose,
            args.sigma_percent,
            args.max_slices,
            args.seed,
            args.realisations,
            args.bm3d,
        )
    except (ManifestError, ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    print((args.out or args.model / "evaluation").joinpath("report.md").read_text())
    if args.update_manifest:
        record_metrics(args.model, result)
    return 0


def record_metrics(package: Path, result: dict[str, Any]) -> None:
    manifest = load(package)
    metrics_ = {k: v for k, v in result.items() if k != "results"}
    metrics_["results"] = {name: {k: round(v, 4) for k, v in m.items()} for name, m in result["results"].items()}
    # replaces this evaluation's keys and keeps the rest (bench/robustness.py's matrix)
    dump(
        ModelManifest.from_dict({**manifest.as_dict(), "metrics": {**manifest.metrics, **metrics_}}),
        package / "model.toml",
    )
