"""Backend registry: `backend = "auto"` picks tensorrt > torch (CUDA) > onnxruntime (CPU).

Each backend is imported only when asked for, so the CPU node needs neither torch nor
TensorRT. A backend that cannot run here raises EngineUnavailable with the reason; "auto"
falls through to the next one and logs why.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, EngineUnavailable
from engines.base import Engine
from engines.manifest import ModelManifest, load

log = logging.getLogger(__name__)

PREFERENCE = ("tensorrt", "torch", "onnxruntime")


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"  # auto | tensorrt | torch | onnxruntime
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per core
    max_batch: int = 8  # slices or tiles per inference call
    plan_cache: Path = Path("var/plans")  # TensorRT plans


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _device(requested: str) -> str:
    if requested == "auto":
        return "cuda:0" if cuda_available() else "cpu"
    return "cuda:0" if requested == "cuda" else requested


def _onnxruntime(manifest: ModelManifest, onnx: Path, device: str, opts: EngineOptions) -> Engine:
    if device != "cpu":
        raise EngineUnavailable(f"this node's onnxruntime backend runs on the CPU, not {device}")
    from engines.ort_backend import OnnxRuntimeEngine

    return OnnxRuntimeEngine(manifest, onnx, threads=opts.threads)


def _torch(manifest: ModelManifest, onnx: Path, device: str, opts: EngineOptions) -> Engine:
    from engines.torch_backend import TorchEngine

    return TorchEngine(manifest, onnx, device=device)


def _tensorrt(manifest: ModelManifest, onnx: Path, device: str, opts: EngineOptions) -> Engine:
    if not device.startswith("cuda"):
        raise EngineUnavailable("the tensorrt backend needs a CUDA device")
    from engines.tensorrt_backend import TensorRTEngine

    return TensorRTEngine(manifest, onnx, opts.plan_cache, device=device, max_batch=opts.max_batch)


FACTORIES: dict[str, Callable[[ModelManifest, Path, str, EngineOptions], Engine]] = {
    "tensorrt": _tensorrt,
    "torch": _torch,
    "onnxruntime": _onnxruntime,
}


def open_engine(package: Path, opts: EngineOptions = EngineOptions()) -> Engine:
    """Loads a model package (manifest, checksum, graph check) on the chosen backend."""
    manifest = load(package)
    onnx = package / "model.onnx"
    device = _device(opts.device)
    if opts.backend != "auto":
        if opts.backend not in FACTORIES:
            known = ", ".join(PREFERENCE)
            raise ConfigError("worker.backend", f"unknown backend {opts.backend!r}; one of auto, {known}")
        return FACTORIES[opts.backend](manifest, onnx, device, opts)
    candidates = PREFERENCE if device.startswith("cuda") else ("onnxruntime",)
    reasons = []
    for name in candidates:
        try:
            engine = FACTORIES[name](manifest, onnx, device if name != "onnxruntime" else "cpu", opts)
        except EngineUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            continue
        if reasons:
            log.info("backend auto chose %s (%s)", name, "; ".join(reasons))
        return engine
    raise EngineUnavailable("; ".join(reasons))  # unreachable while onnxruntime is installed


def backend_status(device: str = "auto") -> dict[str, str | None]:
    """Each backend: None when it can run on `device` here, else why not (no model loaded)."""
    dev = _device(device)
    installed = {name: importlib.util.find_spec(name) is not None for name in ("tensorrt", "torch", "onnx")}
    status: dict[str, str | None] = {"tensorrt": None, "torch": None, "onnxruntime": None}
    if not installed["tensorrt"]:
        status["tensorrt"] = "not installed (extra: tensorrt)"
    elif not dev.startswith("cuda"):
        status["tensorrt"] = "needs a CUDA device"
    if not (installed["torch"] and installed["onnx"]):
        status["torch"] = "not installed (extra: gpu)"
    if dev.startswith("cuda"):
        status["onnxruntime"] = f"runs on the CPU only (device is {dev})"
    return status


def build_plans(packages: list[Path], opts: EngineOptions) -> list[tuple[str, Path]]:
    """TensorRT plans for these model packages, built (or found in the cache) ahead of time."""
    from engines.tensorrt_backend import build_plan

    device = _device(opts.device)
    if not device.startswith("cuda"):
        raise EngineUnavailable("TensorRT plans are built on a CUDA device; this node has none")
    built = []
    for package in packages:
        manifest = load(package)
        built.append(
            (manifest.name, build_plan(manifest, package / "model.onnx", opts.plan_cache, device, opts.max_batch))
        )
    return built
