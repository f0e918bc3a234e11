"""The engine protocol every backend implements (DESIGN 3.5): load once, infer many, close.

An engine takes a batch of normalised slices (N, context_slices, h, w), float32, and returns
(N, 1, h * scale, w * scale) in the same normalisation. Tiling, batching, normalisation and
context stacking live in engines.pipeline, above every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from core.errors import ManifestError
from engines.manifest import ModelManifest

Array = NDArray[np.float32]
INPUT, OUTPUT = "input", "output"  # tensor names fixed by DESIGN 3.4
PROBE_SIDE = 24  # side of the load-time probe (its width is PROBE_SIDE + 2: non-square)


class Engine(Protocol):
    manifest: ModelManifest
    backend: str  # "onnxruntime" | "torch" | "tensorrt"
    device: str  # "cpu", "cuda:0", ...

    def infer(self, batch: Array) -> Array: ...

    def close(self) -> None: ...


Dim = int | str | None  # a static size, or a symbolic/unknown (dynamic) one


def check_signature(
    manifest: ModelManifest,
    inputs: Sequence[tuple[str, Sequence[Dim]]],
    outputs: Sequence[tuple[str, Sequence[Dim]]],
) -> None:
    """The graph's declared inputs/outputs agree with model.toml (names, rank, channels, dynamic
    batch/height/width); raises ManifestError naming the first disagreement."""
    where = f"{manifest.name} {manifest.version}"
    if [name for name, _ in inputs] != [INPUT] or [name for name, _ in outputs] != [OUTPUT]:
        raise ManifestError(
            f"{where}: the ONNX graph must have one input 'input' and one output 'output', "
            f"has {[n for n, _ in inputs]} -> {[n for n, _ in outputs]}"
        )
    (_, in_shape), (_, out_shape) = inputs[0], outputs[0]
    if len(in_shape) != 4 or len(out_shape) != 4:
        raise ManifestError(f"{where}: input and output must be NCHW (rank 4), got {in_shape} -> {out_shape}")
    if in_shape[1] != manifest.input_channels:
        raise ManifestError(
            f"{where}: model.toml says context_slices = {manifest.context_slices}"
            f"{' plus a noise map' if manifest.noise_map else ''}, the ONNX input has {in_shape[1]} channels"
        )
    if out_shape[1] not in (1, None) and not isinstance(out_shape[1], str):
        raise ManifestError(f"{where}: the output must have 1 channel, the ONNX graph has {out_shape[1]}")
    for label, dim in (("batch", in_shape[0]), ("height", in_shape[2]), ("width", in_shape[3])):
        if isinstance(dim, int) and dim > 0:
            raise ManifestError(f"{where}: the ONNX input's {label} is fixed at {dim}; it must be dynamic")


def check_probe(manifest: ModelManifest, infer: Callable[[Array], Array]) -> None:
    """Runs a tiny batch and checks the output shape against the manifest's task and scale."""
    side = PROBE_SIDE
    probe = np.zeros((2, manifest.input_channels, side, side + 2), np.float32)
    out = infer(probe)
    expected = (2, 1, side * manifest.scale, (side + 2) * manifest.scale)
    if tuple(out.shape) != expected:
        raise ManifestError(
            f"{manifest.name} {manifest.version}: model.toml promises {manifest.task} x{manifest.scale}, "
            f"so {probe.shape} -> {expected}; the ONNX graph gave {tuple(out.shape)}"
        )
