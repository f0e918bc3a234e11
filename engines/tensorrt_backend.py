"""TensorRT 10+: builds a plan from model.onnx (one optimisation profile, FP16 where the GPU
has it), caches it on disk, and runs it with the name-based API (set_tensor_address,
execute_async_v3). Optional extra `pip install .[tensorrt]`; buffers are torch CUDA tensors.

The plan cache key is DESIGN 3.5's: ONNX sha256, TensorRT version, GPU name and compute
capability, precision and profile; a plan built for anything else is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import EngineUnavailable, ManifestError
from engines.base import INPUT, OUTPUT, Array, check_probe
from engines.manifest import ModelManifest

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30
MIN_SIDE = 16


@dataclass(frozen=True)
class Profile:
    """Shapes the plan accepts: batch 1..max_batch, sides MIN_SIDE..max_side (the tile size)."""

    channels: int
    max_batch: int
    max_side: int

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        top = (self.max_batch, self.channels, self.max_side, self.max_side)
        return (1, self.channels, MIN_SIDE, MIN_SIDE), top, top


def plan_key(onnx_sha256: str, trt_version: str, gpu: str, capability: str, precision: str, profile: Profile) -> str:
    blob = json.dumps([onnx_sha256, trt_version, gpu, capability, precision, asdict(profile)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _import() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        raise EngineUnavailable(f"the tensorrt backend needs the tensorrt extra ({exc.name} not importable)") from None
    if not torch.cuda.is_available():
        raise EngineUnavailable("the tensorrt backend needs a CUDA device")
    return trt, torch


def build_plan(
    manifest: ModelManifest, onnx_path: Path, cache_dir: Path, device: str = "cuda:0", max_batch: int = 8
) -> Path:
    """The cached plan for this model on this GPU, built when missing (minutes for big nets)."""
    trt, torch = _import()
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    fp16 = True  # TensorRT falls back to FP32 per layer where FP16 is unsupported
    profile = Profile(manifest.context_slices, max_batch, manifest.tile.size)
    capability = f"{props.major}.{props.minor}"
    key = plan_key(manifest.onnx_sha256, trt.__version__, props.name, capability, "fp16" if fp16 else "fp32", profile)
    path = cache_dir / f"{manifest.name}-{manifest.version}-{key[:16]}.plan"
    if path.exists():
        return path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ManifestError(f"{manifest.name}: TensorRT cannot parse model.onnx: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    opt.set_shape(INPUT, *profile.shapes())
    config.add_optimization_profile(opt)
    with torch.cuda.device(index):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ManifestError(f"{manifest.name}: TensorRT failed to build a plan (see the log above)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(plan))
    os.replace(tmp, path)
    log.info("built TensorRT plan %s", path.name)
    return path


class TensorRTEngine:
    backend = "tensorrt"

    def __init__(
        self, manifest: ModelManifest, onnx_path: Path, cache_dir: Path, device: str = "cuda:0", max_batch: int = 8
    ) -> None:
        trt, torch = _import()
        self.manifest = manifest
        self.device = device
        self._torch = torch
        self.max_batch = max_batch
        plan = build_plan(manifest, onnx_path, cache_dir, device, max_batch)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise ManifestError(f"{manifest.name}: TensorRT could not load the cached plan {plan}")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=device)
        check_probe(manifest, self.infer)

    def infer(self, batch: Array) -> Array:
        outputs = [self._run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def _run(self, chunk: Array) -> Array:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(self.device)
        self._context.set_input_shape(INPUT, tuple(x.shape))
        out = torch.empty(tuple(self._context.get_tensor_shape(OUTPUT)), dtype=torch.float32, device=self.device)
        self._context.set_tensor_address(INPUT, x.data_ptr())
        self._context.set_tensor_address(OUTPUT, out.data_ptr())
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"{self.manifest.name}: TensorRT execution failed")
        self._stream.synchronize()
        return np.asarray(out.cpu().numpy(), dtype=np.float32)

    def close(self) -> None:
        del self._context, self._engine, self._runtime
