"""bench/robustness.py through the running node (issue 17): each cell's degraded held-out slices
are written as a DICOM series, pushed to `enhance-node serve` with DCMTK storescu, processed by
the worker as any scanner's series would be (strength, QA gate, derivation), and the derived
series read back from the outbox is scored against the target beside the classical baseline
and beside the same model run through the library. Printed, never asserted.

    .venv/bin/python bench/robustness_node.py [--only ct-denoise ct-sr2] [--cells 4] [--slices 3]

`--cells N` takes every N-th cell of each model's matrix (1 = all). Exit 0 when every series came
back, 1 otherwise, 2 when DCMTK is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import apply_rescale
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.robustness import _best_nlm, _window, cells_for, held_out_slices  # noqa: E402
from engines.manifest import load  # noqa: E402
from engines.pipeline import enhance_volume, resize  # noqa: E402
from engines.registry import EngineOptions, open_engine  # noqa: E402
from node.derive import derived_uid  # noqa: E402
from tests.dicom_factory import UID_ROOT, ct_slice, mr_slice  # noqa: E402
from tests.helpers import NodeProcess, free_port, storescu, toml_config, wait_for  # noqa: E402
from train import metrics  # noqa: E402


def write_series(folder: Path, modality: str, images: list[np.ndarray], spacing: float, description: str) -> list[Path]:
    """The images as one series: CT as signed 16-bit HU + 1024, MR as unsigned 16-bit."""
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        rows, cols = image.shape
        make = ct_slice if modality == "CT" else mr_slice
        ds = make(study, series, k, rows=rows, cols=cols)
        ds.BitsStored, ds.HighBit = 16, 15
        if modality == "CT":
            ds.PixelData = np.clip(np.round(image + 1024), -32768, 32767).astype(np.int16).tobytes()
        else:
            ds.PixelData = np.clip(np.round(image), 0, 65535).astype(np.uint16).tobytes()
        ds.PixelSpacing = [spacing, spacing]
        ds.SeriesDescription = description
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--only", nargs="+", default=["ct-denoise", "ct-sr2", "mr-denoise", "mr-sr2"])
    ap.add_argument("--cells", type=int, default=4, help="every N-th cell of each matrix")
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("storescu") is None:
        print("storescu not found: apt-get install dcmtk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="robustness-node-"))
    plan: list[dict[str, Any]] = []
    routes = []
    for name in args.only:
        manifest = load(args.models / name)
        modality = manifest.modalities[0]
        routes.append(
            f'[[routes]]\nname = "{name}"\nmodel = "{name}"\ndestinations = []\n'
            f'on_qa_fail = "deliver-with-warning"\nmatch = {{ series_description = "^{name} " }}\n'
        )
        held = held_out_slices(modality, args.slices)
        engine = open_engine(args.models / name, EngineOptions(backend="onnxruntime", device="cpu"))
        for cell in cells_for(manifest)[:: args.cells]:
            inputs, targets, sigmas = [], [], []
            for i, s in enumerate(held):
                low, target, sigma = cell.degrade(s.pixels, s.spacing, np.random.default_rng([args.seed, i]))
                inputs.append(low)
                targets.append(target[: low.shape[0] * manifest.scale, : low.shape[1] * manifest.scale])
                sigmas.append(sigma)
            shapes = {a.shape for a in inputs}
            for shape in shapes:  # one series per matrix size
                idx = [k for k, a in enumerate(inputs) if a.shape == shape]
                spacing = float(np.mean([held[k].spacing for k in idx])) * manifest.scale
                label = f"{name} {cell.name} {shape[0]}"
                files = write_series(tmp / f"in{len(plan)}", modality, [inputs[k] for k in idx], spacing, label)
                # the node normalises per series (MR percentiles): so does the library run
                library = list(enhance_volume(engine, np.stack([inputs[k] for k in idx])))
                plan.append(
                    {
                        "model": name,
                        "cell": cell.name if len(shapes) == 1 else f"{cell.name} ({shape[0]}x{shape[1]})",
                        "files": files,
                        "manifest": manifest,
                        "inputs": [inputs[k] for k in idx],
                        "targets": [targets[k] for k in idx],
                        "sigmas": [sigmas[k] for k in idx],
                        "library": library,
                    }
                )
    port = free_port()
    cfg = toml_config(
        tmp,
        port,
        idle_seconds=1.0,
        worker_processes=1,
        worker=f'models_dir = "{args.models.resolve()}"\nmax_batch = 4',
        extra="\n".join(routes),
    )
    node = NodeProcess(cfg, port, tmp).start()
    ok, rows = True, []
    try:
        for item in plan:
            proc = storescu(node.port, item["files"])
            if proc.returncode != 0:
                print(f"storescu failed for {item['cell']}: {proc.stderr.strip()}", file=sys.stderr)
                return 1
        expected = len(plan)

        def all_done() -> bool:
            states = node.query("SELECT state FROM jobs")
            return len(states) == expected and all(s[0] in ("done", "failed") for s in states)

        wait_for(all_done, timeout=3600, interval=0.5, what="every series to be processed")
        print(f"\n## Through the node: {expected} series, {sum(len(p['files']) for p in plan)} instances")
        for item in plan:
            m = item["manifest"]
            sources = [dcmread(f) for f in item["files"]]
            series_uid = derived_uid(str(sources[0].SeriesInstanceUID), m.name, m.version)
            psnr_node, psnr_lib, psnr_base, worst_diff = [], [], [], 0.0
            qa_warning = False
            for src, low, target, sigma, lib in zip(
                sources, item["inputs"], item["targets"], item["sigmas"], item["library"], strict=True
            ):
                sop = derived_uid(str(src.SOPInstanceUID), m.name, m.version)
                path = tmp / "storage" / "outbox" / series_uid / f"{sop}.dcm"
                if not path.exists():
                    ok = False
                    continue
                out_ds = dcmread(path)
                qa_warning |= "QA WARNING" in str(out_ds.SeriesDescription)
                out = np.asarray(apply_rescale(out_ds.pixel_array, out_ds), np.float32)
                window = _window(m, target)
                psnr_node.append(metrics.psnr(out, target, window))
                psnr_lib.append(metrics.psnr(lib, target, window))
                # rounding and clipping to the stored range (e.g. MR below 0) aside, the same pixels
                worst_diff = max(worst_diff, float(np.percentile(np.abs(out - np.round(lib)), 99.9)))
                if m.task == "denoise":
                    psnr_base.append(_best_nlm(low, target, sigma, window))
                else:
                    up = resize(low, m.scale, Image.Resampling.LANCZOS)
                    psnr_base.append(metrics.psnr(up, target, window))
            base = "NLM" if m.task == "denoise" else "Lanczos"
            row = {
                "model": item["model"],
                "cell": item["cell"],
                "node_psnr": float(np.mean(psnr_node)) if psnr_node else float("nan"),
                "library_psnr": float(np.mean(psnr_lib)),
                "baseline_psnr": float(np.mean(psnr_base)) if psnr_base else float("nan"),
                "p999_abs_diff_vs_library": worst_diff,
                "qa_warning": qa_warning,
            }
            rows.append(row)
            gain = row["node_psnr"] - row["baseline_psnr"]
            print(
                f"  {item['model']:<10} {item['cell']:<38} node {row['node_psnr']:6.2f}"
                f"  library {row['library_psnr']:6.2f}"
                f"  {base} {row['baseline_psnr']:6.2f}  gain {gain:+6.2f} dB  p99.9 |node - library| {worst_diff:.1f}"
                f"{'  QA WARNING' if qa_warning else ''}"
            )
        failed = node.query("SELECT id, error FROM jobs WHERE state = 'failed'")
        for job_id, error in failed:
            print(f"  job {job_id} failed: {error}")
            ok = False
    finally:
        node.stop()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
