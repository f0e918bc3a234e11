"""Tiny hand-built ONNX model packages for engine and worker tests (no training needed)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from engines.manifest import ModelManifest, Tile, dump, sha256_file
from engines.normalization import Normalization

HU = Normalization("hu", -1024.0, 3071.0)


def _io(channels: int | str, static: int | None = None) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    side: int | str = static if static else "h"
    other: int | str = static if static else "w"
    batch: int | str = 1 if static else "n"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, side, other])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 1, "H", "W"])
    return x, y


def _save(folder: Path, graph: onnx.GraphProto, manifest: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    fields: dict[str, object] = {
        "name": folder.name,
        "version": "1.0.0",
        "task": "denoise",
        "modalities": ("CT",),
        "scale": 1,
        "context_slices": 1,
        "normalization": HU,
        "tile": Tile(512, 32),
    }
    fields.update(manifest)
    fields["onnx_sha256"] = sha256_file(folder / "model.onnx")
    dump(ModelManifest(**fields), folder / "model.toml")  # type: ignore[arg-type]
    return folder


def identity(folder: Path, static: int | None = None, **manifest: object) -> Path:
    """output = input (1 channel): proves the normalisation round trip."""
    x, y = _io(1, static)
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity", [x], [y])
    return _save(folder, graph, manifest)


def pick_channel(folder: Path, context: int, channel: int, **manifest: object) -> Path:
    """output = input channel `channel` of `context`: shows which neighbour slice went where."""
    x, y = _io(context)
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [channel])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [channel + 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["output"])
    graph = helper.make_graph([node], "pick", [x], [y], initializer=[starts, ends, axes])
    return _save(folder, graph, {"context_slices": context, **manifest})


def nearest_upscale(folder: Path, scale: int = 2, **manifest: object) -> Path:
    """output = nearest-neighbour x`scale` (a stand-in SR model with known output)."""
    x, y = _io(1)
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, float(scale), float(scale)])
    node = helper.make_node("Resize", ["input", "", "scales"], ["output"], mode="nearest")
    graph = helper.make_graph([node], "nearest", [x], [y], initializer=[scales])
    return _save(folder, graph, {"task": "sr", "scale": scale, **manifest})


def shift(folder: Path, hu: float, **manifest: object) -> Path:
    """output = input + `hu` Hounsfield units (in the HU normalisation): a denoiser that moves
    mean HU, which the worker's QA gate must catch."""
    x, y = _io(1)
    offset = helper.make_tensor("offset", TensorProto.FLOAT, [1], [hu / (HU.hi - HU.lo)])
    graph = helper.make_graph([helper.make_node("Add", ["input", "offset"], ["output"])], "shift", [x], [y], [offset])
    return _save(folder, graph, manifest)
