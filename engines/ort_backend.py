"""ONNX Runtime on the CPU: the engine every installation has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.base import INPUT, OUTPUT, Array, check_probe, check_signature
from engines.manifest import ModelManifest


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, manifest: ModelManifest, onnx_path: Path, threads: int = 0) -> None:
        self.manifest = manifest
        self.device = "cpu"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: one per core
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        check_signature(
            manifest,
            [(i.name, i.shape) for i in self._session.get_inputs()],
            [(o.name, o.shape) for o in self._session.get_outputs()],
        )
        check_probe(manifest, self.infer)

    def infer(self, batch: Array) -> Array:
        (out,) = self._session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        del self._session
