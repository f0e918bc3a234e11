"""PyTorch: the verified GPU path (CUDA, FP16, CUDA graphs for repeated shapes); also runs on CPU.

It runs the very weights in model.onnx: the net is rebuilt from model.toml's [net] table and
loaded from the ONNX graph's initializers (their names are the torch parameter names; a
quantised net's are dequantised, engines/qdq.py), so
the two backends cannot drift apart. Needs the `gpu` (or `train`) extra.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import EngineUnavailable, ManifestError
from engines.base import Array, check_probe
from engines.manifest import ModelManifest

log = logging.getLogger(__name__)

MAX_GRAPHS = 8  # CUDA graphs kept, one per input shape (a series repeats one or two shapes)


class TorchEngine:
    backend = "torch"

    def __init__(self, manifest: ModelManifest, onnx_path: Path, device: str = "cpu", fp16: bool | None = None) -> None:
        try:
            import onnx
            import torch

            from engines import qdq
        except ImportError as exc:
            raise EngineUnavailable(f"the torch backend needs the gpu extra ({exc.name} missing)") from None
        from engines.nets import build
        from engines.netspec import NetSpec

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(f"device {device}: torch sees no CUDA device")
        self.manifest = manifest
        self.device = device
        self._torch = torch
        if not manifest.net:  # e.g. a third-party ONNX model: "auto" then falls through to onnxruntime
            raise EngineUnavailable(f"{manifest.name}: the torch backend needs model.toml's [net] table")
        try:
            spec = NetSpec(**manifest.net)
            net = build(spec)
            weights = qdq.state_of(onnx.load(str(onnx_path)).graph)  # a quantised net's dequantised
            net.load_state_dict({k: torch.from_numpy(weights[k]) for k in net.state_dict()})
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise ManifestError(f"{manifest.name}: model.onnx does not hold the weights of its [net]: {exc}") from None
        self._cuda = device.startswith("cuda")
        # an int8 net's fake quantisation needs float32 (its steps and bias steps underflow in fp16)
        self._half = (self._cuda if fp16 is None else fp16) and spec.quantize == "none"
        self._dtype = torch.float16 if self._half else torch.float32
        self._net = net.to(device=device, dtype=self._dtype).eval()
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}
        check_probe(manifest, self.infer)

    def infer(self, batch: Array) -> Array:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(self.device, non_blocking=True).to(self._dtype)
            out = self._graphed(x) if self._cuda else self._net(x)
            return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    def _graphed(self, x: Any) -> Any:
        """Replays a CUDA graph captured for this input shape (launch overhead gone)."""
        torch = self._torch
        key = tuple(x.shape)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= MAX_GRAPHS:
                return self._net(x)
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
                for _ in range(2):
                    self._net(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._net(static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out  # read (copied to the host) before the next replay overwrites it

    def close(self) -> None:
        self._graphs.clear()
        del self._net
        if self._cuda:
            self._torch.cuda.empty_cache()
