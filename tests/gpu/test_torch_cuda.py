"""The GPU path (DESIGN 3.5): the torch backend on CUDA (FP16, CUDA graphs) against ONNX Runtime
on the CPU, and the worker pipeline on CUDA. Skipped without a CUDA device; run on the
accelerator machine when one is lent: `.venv/bin/python -m pytest tests/gpu`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engines.pipeline import enhance_volume
from engines.registry import EngineOptions, cuda_available, open_engine

MODELS = Path(__file__).resolve().parents[2] / "models"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None or not cuda_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", ["ct-denoise", "ct-sr2", "mr-denoise", "mr-sr2"])
def test_cuda_fp16_matches_onnxruntime(name: str) -> None:
    """FP16 on the GPU within 2e-3 of FP32 on the CPU (normalised units; ~8 HU worst pixel for
    CT over a 4095-HU window, far below the noise the models remove)."""
    gpu = open_engine(MODELS / name, EngineOptions(backend="torch", device="cuda:0"))
    cpu = open_engine(MODELS / name, EngineOptions(backend="onnxruntime", device="cpu"))
    channels = cpu.manifest.input_channels  # a noise-map denoiser takes its level as a channel
    x = np.random.default_rng(0).uniform(0.2, 0.35, (4, channels, 128, 96)).astype(np.float32)
    assert (gpu.backend, gpu.device) == ("torch", "cuda:0")
    np.testing.assert_allclose(gpu.infer(x), cpu.infer(x), atol=2e-3)


def test_auto_picks_a_gpu_backend_and_replays_cuda_graphs() -> None:
    engine = open_engine(MODELS / "ct-denoise")
    assert engine.device.startswith("cuda") and engine.backend in ("tensorrt", "torch")
    c = engine.manifest.input_channels
    x = np.random.default_rng(1).uniform(0.2, 0.3, (8, c, 512, 512)).astype(np.float32)
    first, second = engine.infer(x), engine.infer(x)  # the second call replays the captured graph
    np.testing.assert_array_equal(first, second)
    y = np.random.default_rng(2).uniform(0.2, 0.3, (8, c, 512, 512)).astype(np.float32)
    assert not np.array_equal(engine.infer(y), first)  # the graph reads the new input


def test_series_pipeline_on_cuda_keeps_hounsfield_units() -> None:
    gpu = open_engine(MODELS / "ct-denoise", EngineOptions(backend="torch", device="cuda:0"))
    cpu = open_engine(MODELS / "ct-denoise", EngineOptions(backend="onnxruntime", device="cpu"))
    rng = np.random.default_rng(3)
    volume = (rng.normal(40, 20, (10, 256, 256))).astype(np.float32)
    volume[:, :8, :8] = -3024.0  # padding
    on_gpu, on_cpu = enhance_volume(gpu, volume), enhance_volume(cpu, volume)
    assert float(np.abs(on_gpu - on_cpu).max()) < 10.0
    assert abs(float(on_gpu[:, 64:192, 64:192].mean() - volume[:, 64:192, 64:192].mean())) < 2.0
    assert np.all(on_gpu[:, :8, :8] == -3024.0)
