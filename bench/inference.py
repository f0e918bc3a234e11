"""Inference benchmark (issue 4): 512x512 slices/s for each available backend against torch
eager on the same model and device, side by side, with the fraction of the device's peak
FLOP/s achieved; series latency for a 300-slice series per backend; and the worker's end to
end time for a 300-slice CT series (decode, infer, encode, write), the issue's bar.
Prints figures and ratios; asserts nothing.

    .venv/bin/python bench/inference.py [--model models/ct-denoise] [--slices 300] [--skip-worker]

On a CUDA machine it compares torch CUDA FP16 with CUDA graphs (our torch backend) and
TensorRT (when importable) against torch eager FP32 on the GPU; on a CPU, ONNX Runtime and
our torch backend against torch eager.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import EnhanceNodeError
from engines.base import Engine
from engines.manifest import load
from engines.pipeline import enhance_volume
from engines.registry import EngineOptions, cuda_available, open_engine

SIDE = 512
# dense tensor-core / vector peaks from the vendors' data sheets (FLOP/s)
GPU_PEAKS = {"H100": {"fp16": 989e12, "fp32": 67e12}, "H200": {"fp16": 989e12, "fp32": 67e12}}


def conv_flops(model: Path) -> float:
    """FLOPs of one 512x512 slice: 2 x multiply-adds of every convolution (torch forward hooks)."""
    import torch

    from engines.nets import build
    from engines.netspec import NetSpec

    net = build(NetSpec(**load(model).net)).eval()
    total = 0.0

    def hook(module: torch.nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2.0 * module.in_channels * k * out.numel() // max(1, module.groups)

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        net(torch.zeros(1, load(model).input_channels, SIDE, SIDE))
    return total


def cpu_peak() -> tuple[float, str]:
    """cores x clock x FP32 FLOPs per cycle (AVX-512: 64, AVX2+FMA: 32, else 8)."""
    flags, mhz = "", 0.0
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        if line.startswith("flags") and not flags:
            flags = line
        if line.startswith("cpu MHz"):
            mhz = max(mhz, float(line.split(":")[1]))
    per_cycle = 64 if "avx512f" in flags else 32 if ("avx2" in flags and "fma" in flags) else 8
    cores = len(os.sched_getaffinity(0))
    return cores * mhz * 1e6 * per_cycle, f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FP32 FLOP/cycle"


def torch_eager(model: Path, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """The same weights as plain torch FP32 modules, no graphs, no half precision."""
    import torch

    from engines.torch_backend import TorchEngine

    engine = TorchEngine(load(model), model / "model.onnx", device=device, fp16=False)
    net = engine._net  # the eager module the backend built from model.onnx

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = net(torch.from_numpy(batch).to(device))
            return np.asarray(out.cpu().numpy())

    return run


def throughput(infer: Callable[[np.ndarray], np.ndarray], batch: int, seconds: float = 8.0, channels: int = 1) -> float:
    """Slices per second; `channels` = the model's input channels (a noise map is one more)."""
    x = np.random.default_rng(0).uniform(0.2, 0.3, (batch, channels, SIDE, SIDE)).astype(np.float32)
    infer(x)  # warm-up (CUDA graph capture, allocator, ORT first run)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 2 * batch:
        infer(x)
        done += batch
    return done / (time.perf_counter() - started)


def series_latency(engine: Engine, slices: int, batch: int) -> float:
    rng = np.random.default_rng(1)
    volume = (rng.normal(0, 20, (slices, SIDE, SIDE))).astype(np.float32)
    started = time.perf_counter()
    enhance_volume(engine, volume, batch)
    return time.perf_counter() - started


def worker_end_to_end(model: Path, slices: int, threads: int) -> dict[str, float]:
    """A real 300-slice CT series stored and recorded as the receive path would, then one job
    run by the node's Worker: decode, normalise, infer, derive, encode, write."""
    from core.header import parse_header
    from node.config import RouteConfig, RouteMatch, WorkerConfig
    from node.routing import route_complete_series
    from node.worker import Worker
    from storage.db import make_engine, migrate
    from storage.filestore import FileStore, object_path
    from storage.jobs import JobQueue
    from storage.ledger import Ledger, Received, StoredFile
    from tests.dicom_factory import write_ct_series

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, _, files = write_ct_series(root / "series", slices)
        store = FileStore(root / "storage", 0)
        engine = make_engine(f"sqlite:///{root / 'ledger.db'}")
        migrate(engine)
        ledger = Ledger(engine)
        for f in files:
            data = f.read_bytes()
            header = parse_header(data)
            rel = object_path(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, "x")
            store.write(rel, data)
            ledger.record_instance(header, Received(StoredFile(rel, "x", len(data)), "BENCH"))
        ledger.complete_idle_series(0, 0)
        queue = JobQueue(engine)
        routes = (RouteConfig("bench", model.name, (), RouteMatch()),)
        route_complete_series(queue, routes, 1)
        cfg = WorkerConfig(models_dir=model.parent, threads=threads, backend="onnxruntime", device="cpu")
        worker = Worker(cfg, queue, store, "bench")
        worker.engines.get(model.name)  # load outside the timing, as a running worker has
        started = time.perf_counter()
        assert worker.run_once()
        total = time.perf_counter() - started
        (timings,) = [json.loads(r[0]) for r in engine.connect().exec_driver_sql("SELECT timings FROM jobs")]
        return {"total": total, **timings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/ct-denoise"))
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per throughput figure")
    ap.add_argument("--skip-worker", action="store_true")
    args = ap.parse_args()
    manifest = load(args.model)
    device = "cuda:0" if cuda_available() else "cpu"
    flops = conv_flops(args.model)
    if device == "cpu":
        peak, peak_note = cpu_peak()
        peaks = {"fp32": peak}
    else:
        import torch

        name = torch.cuda.get_device_name(0)
        peaks = next((v for k, v in GPU_PEAKS.items() if k in name), {})
        peak_note = f"{name}: data-sheet dense peaks {peaks or 'unknown'}"
    print(f"model {manifest.name} {manifest.version}: {flops / 1e9:.2f} GFLOP per {SIDE}x{SIDE} slice")
    print(f"device {device} ({platform.processor() or platform.machine()}); peak: {peak_note}\n")
    rows: list[tuple[str, Engine | None, float, str]] = []
    channels = manifest.input_channels
    baseline = throughput(torch_eager(args.model, device), args.batch, args.seconds, channels)
    rows.append(("torch eager FP32", None, baseline, "fp32"))
    for name in ["onnxruntime", "torch"] if device == "cpu" else ["torch", "tensorrt"]:
        try:
            engine = open_engine(args.model, EngineOptions(backend=name, device=device, threads=args.threads))
        except EnhanceNodeError as exc:
            print(f"{name}: not available here ({exc})")
            continue
        precision = "fp32" if device == "cpu" else "fp16"
        label = name if name != "torch" else "torch backend " + ("FP32" if device == "cpu" else "FP16 + CUDA graphs")
        rows.append((label, engine, throughput(engine.infer, args.batch, args.seconds, channels), precision))
    print(f"| backend | slices/s | vs torch eager | % of peak ({device}) | {args.slices}-slice series s |")
    print("|---|---:|---:|---:|---:|")
    for label, engine, rate, precision in rows:
        peak = peaks.get(precision)
        share = f"{100 * rate * flops / peak:.1f}%" if peak else "-"
        latency = f"{series_latency(engine, args.slices, args.batch):.1f}" if engine else "-"
        print(f"| {label} | {rate:.2f} | {rate / baseline:.2f}x | {share} | {latency} |")
    if not args.skip_worker and device == "cpu":
        result = worker_end_to_end(args.model, args.slices, args.threads)
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.items() if k != "total")
        print(f"\nworker end to end, {args.slices} x {SIDE}x{SIDE} CT: {result['total']:.1f} s ({stages}); bar: < 60 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
