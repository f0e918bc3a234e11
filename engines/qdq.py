"""The 8-bit form of a quantised denoiser (NetSpec.quantize = "int8") in ONNX: QuantizeLinear /
DequantizeLinear pairs round the quantised convolutions (QDQ), which ONNX Runtime fuses into
integer convolutions and TensorRT reads as explicit quantisation.

`to_qdq` writes it from the float graph of the net whose weights are already on their 8-bit grid
(engines.nets.fake_quantize_weight) and the activation steps training learnt; `state_of` reads a
graph's weights back as the torch net's state, float graph or QDQ, so a package is its own
source of truth for the torch backend and for fine-tuning.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from engines.netspec import ACTIVATION_STEPS

QUANTISED_SUFFIX = "_quantized"  # ONNX Runtime's name for an initialiser's integer form


def to_qdq(float_graph: bytes, steps: Sequence[float], channels: int) -> bytes:
    """The QDQ graph of a dncnn: every convolution but the first and the last quantised (weights
    int8 symmetric per output channel, activations uint8 with zero point 0 and the learnt
    `steps`, one per ReLU in layer order); the ReLUs fold into the quantisation."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load_from_string(float_graph)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    if len(relus) != len(steps) or len(convs) != len(steps) + 1:
        raise ValueError(
            f"{len(steps)} activation steps for a graph of {len(convs)} convolutions and {len(relus)} ReLUs"
        )
    overrides = {
        name: [{"scale": np.array(step, np.float32), "zero_point": np.array(0, np.uint8)}]
        for name, step in zip(relus, steps, strict=True)
    }

    # every quantised activation's range is given: there is nothing to calibrate
    class Nothing(CalibrationDataReader):  # type: ignore[misc]  # an untyped base class
        def __init__(self) -> None:
            self.batches = iter([{"input": np.zeros((1, channels, 16, 16), np.float32)}])

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        src.write_bytes(float_graph)
        quantize_static(
            src,
            dst,
            Nothing(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Relu"],
            nodes_to_exclude=[convs[0], convs[-1]],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"TensorQuantOverrides": overrides, "WeightSymmetric": True},
        )
        return dst.read_bytes()


def state_of(graph: onnx.GraphProto) -> dict[str, NDArray[np.float32]]:
    """The float initialisers by name, each quantised one dequantised under its float name and,
    for a QDQ graph, ACTIVATION_STEPS: the log of the activation steps in graph order."""
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    steps_of = {n.input[1] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    state = {k: v.astype(np.float32, copy=True) for k, v in init.items() if v.dtype == np.float32 and k not in steps_of}
    steps: list[float] = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith(QUANTISED_SUFFIX) and node.input[0] in init:
            q, step, zero = (init[n] for n in node.input[:3])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [-1 if d == axis else 1 for d in range(q.ndim)] if step.ndim else []
            value = (q.astype(np.float64) - zero.reshape(shape)) * step.reshape(shape)
            state[node.input[0].removesuffix(QUANTISED_SUFFIX)] = value.astype(np.float32)
        elif node.op_type == "QuantizeLinear" and node.input[0] not in init:
            steps.append(float(init[node.input[1]]))
    if steps:
        state[ACTIVATION_STEPS] = np.log(np.array(steps, np.float32))
    return state
