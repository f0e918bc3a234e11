"""Checkpoint -> model package (DESIGN 3.4): model.onnx + model.toml, checked against torch."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from core.errors import EnhanceNodeError, UsageError
from engines import qdq
from engines.manifest import ModelManifest, Tile, dump, sha256_file
from engines.nets import build
from engines.netspec import ACTIVATION_STEPS, NetSpec
from engines.normalization import Normalization
from train.loop import CHECKPOINT, net_from_checkpoint, package_state
from train.presets import APPLIES_TO, PRESETS

log = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-4  # normalised units: 0.4 HU in the HU window
QUANTISED_TOLERANCE = 4e-3  # an int8 net's largest difference (check_round_trip): 16 HU
WATER, CT_NOISE = 0.25, 20.0 / 4096  # normalised: the int8 check's input, water with 20 HU of noise


class ExportMismatch(EnhanceNodeError):
    """ONNX Runtime's output differs from torch's beyond the tolerance."""


def onnx_bytes(model: torch.nn.Module, context: int) -> bytes:
    example = torch.zeros(1, context, 64, 64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            buf,  # type: ignore[arg-type]  # a file-like object is accepted at run time
            input_names=["input"],
            output_names=["output"],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={
                "input": {0: "batch", 2: "height", 3: "width"},
                "output": {0: "batch", 2: "height", 3: "width"},
            },
        )
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    return buf.getvalue()


def graph_of(model: torch.nn.Module, spec: NetSpec) -> bytes:
    """The ONNX graph of a trained net: float, or for an int8 net its QDQ form (engines.qdq) made
    from a float twin holding the weights on their 8-bit grid."""
    if spec.quantize == "none":
        return onnx_bytes(model, spec.input_channels)
    twin = build(replace(spec, quantize="none"))
    twin.load_state_dict(model.float_state())  # type: ignore[operator]  # DnCNN.float_state
    steps = model.state_dict()[ACTIVATION_STEPS].exp().tolist()
    return qdq.to_qdq(onnx_bytes(twin.eval(), spec.input_channels), steps, spec.input_channels)


def check_round_trip(model: torch.nn.Module, data: bytes, spec: NetSpec, seed: int = 0) -> float:
    """Largest |ORT - torch| over a few batch sizes and shapes (odd sizes too: the graph is dynamic).

    An int8 net is given a CT-like input (water with 20 HU of noise, and that level in its noise
    map): its steps were learnt for such images, and ONNX Runtime's exact integer sums and torch's
    float ones round an activation on a step boundary to neighbouring steps, a difference the
    layers after it amplify more the further the input is from what the net was trained on. Its
    bar is then the mean difference (TOLERANCE) and a looser largest one (QUANTISED_TOLERANCE)."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    quantised = spec.quantize != "none"
    worst, mean = 0.0, 0.0
    channels = spec.input_channels
    shapes = [(1, channels, 96, 96), (2, channels, 67, 45), (1, channels, 128, 80)]
    for shape in shapes:
        if quantised:
            x = (WATER + CT_NOISE * rng.standard_normal(shape)).astype(np.float32)
            x[:, spec.context_slices :] = CT_NOISE
        else:
            x = (0.3 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        (got,) = session.run(["output"], {"input": x})
        if got.shape != expected.shape:
            raise ExportMismatch(f"ONNX output shape {got.shape} differs from torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
        mean = max(mean, float(np.abs(got - expected).mean()))
    mean_bar, worst_bar = (TOLERANCE, QUANTISED_TOLERANCE) if quantised else (float("inf"), TOLERANCE)
    if mean > mean_bar or worst > worst_bar:
        raise ExportMismatch(
            f"ONNX Runtime differs from torch by {worst:.2e} at most (bar {worst_bar:.0e}), "
            f"{mean:.2e} on average (bar {mean_bar:.0e})"
        )
    return worst


def averaged(checkpoints: list[Path]) -> dict[str, Any]:
    """One checkpoint, or the average of several runs' weights (a "model soup": fine-tunes of
    one network, e.g. from one --init-from, averaged layer by layer, no training). The runs
    must share the preset and the net; the last one's training record is kept, with the runs
    averaged listed as `averaged_from`. UsageError otherwise. A model package (a folder) may be
    one of them but not the last: e.g. the package a run was fine-tuned from."""
    try:
        states = [
            package_state(c) if c.is_dir() else torch.load(c, map_location="cpu", weights_only=False)
            for c in checkpoints
        ]
    except ValueError as exc:  # a package's manifest or weights (source_net, _package_weights)
        raise UsageError(str(exc)) from None
    state: dict[str, Any] = states[-1]
    if "history" not in state:
        raise UsageError(f"{checkpoints[-1]}: a model package holds no training record; name a run last")
    if len(states) == 1:
        return state
    for other, path in zip(states, checkpoints, strict=True):
        if other["preset"] != state["preset"] or other["net"] != state["net"]:
            raise UsageError(f"{path}: another preset or net than {checkpoints[-1]}: runs averaged must share both")
    mean = {k: sum(s["model"][k].double() for s in states) / len(states) for k in state["model"]}
    state["model"] = {k: v.to(state["model"][k].dtype) for k, v in mean.items()}
    state["run"] = {**state["run"], "averaged_from": [str(c) for c in checkpoints]}
    return state


def export(checkpoints: Path | list[Path], out: Path, name: str | None = None, version: str = "1.0.0") -> ModelManifest:
    """Write the package of a run's checkpoint, or of several runs' averaged weights."""
    state = averaged(checkpoints if isinstance(checkpoints, list) else [checkpoints])
    model = net_from_checkpoint(state)
    preset = PRESETS[state["preset"]]
    run = state["run"]
    spec = NetSpec(**state["net"])
    context = spec.context_slices
    data = graph_of(model, spec)
    error = check_round_trip(model, data, spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(data)
    history = state["history"]
    manifest = ModelManifest(
        name=name or preset.name,
        version=version,
        task=preset.task,
        modalities=(preset.modality,),
        scale=int(state["net"]["scale"]),
        context_slices=context,
        noise_map=spec.noise_map,
        restore_mean_px=preset.restore_mean_px,
        restore_mean_bounds=preset.restore_mean_bounds,
        applies_to=APPLIES_TO[preset.modality],
        normalization=Normalization.from_dict(run["normalization"]),
        tile=Tile(*preset.tile),
        onnx_sha256=sha256_file(out / "model.onnx"),
        net=dict(state["net"]),
        training={
            **{k: v for k, v in run.items() if k not in ("net", "normalization")},
            "epochs_done": state["epoch"],
            "final_train_loss": history[-1]["train_loss"],
            "validation": {k: v for k, v in history[-1].items() if k.startswith("val")},
            "train_seconds": round(sum(r["seconds"] for r in history), 1),
            "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "onnx_vs_torch_max_abs": error,
        },
    )
    dump(manifest, out / "model.toml")
    return manifest


def export_cli(args: argparse.Namespace) -> int:
    def checkpoint_of(run: Path) -> Path:  # a model package is named as its folder
        return run / CHECKPOINT if run.is_dir() and not (run / "model.toml").is_file() else run

    checkpoints = [checkpoint_of(run) for run in args.run]
    for checkpoint in checkpoints:
        if not (checkpoint.is_file() or checkpoint.is_dir()):
            raise UsageError(f"no checkpoint at {checkpoint}")
    manifest = export(checkpoints, args.out, args.name, args.version)  # ExportMismatch: exit 1
    print(f"{args.out}: {manifest.name} {manifest.version} ({manifest.task}, onnx sha256 {manifest.onnx_sha256[:12]})")
    return 0
