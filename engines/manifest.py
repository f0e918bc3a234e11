"""model.toml (DESIGN 3.4): what a model package promises about its ONNX graph.

Read strictly (a package the node cannot trust is refused with the reason), written by the
trainer's export with provenance and held-out metrics.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from engines.normalization import Normalization
from node.errors import ManifestError

TASKS = ("denoise", "sr")


@dataclass(frozen=True)
class Tile:
    size: int = 512
    overlap: int = 32


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    task: str
    modalities: tuple[str, ...]
    scale: int
    context_slices: int
    normalization: Normalization
    tile: Tile = Tile()
    onnx_sha256: str = ""
    net: dict[str, Any] = field(default_factory=dict)  # architecture, so the trainer can rebuild it
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # a denoiser told each series' noise level: one more input channel after the context slices,
    # the series' estimated noise SD in normalised units times the route's strength (DESIGN 3.4)
    noise_map: bool = False
    # a denoiser's output gets the regional mean of what it removed put back (Gaussian sigma in
    # pixels; engines.pipeline.restore_mean): it may remove noise, not shift mean HU. 0 = off
    restore_mean_px: float = 0.0
    # super-resolution: each output pixel is kept within the range of the 3x3 input pixels round
    # it (engines.pipeline.clamp_to_input): no halo or overshoot beyond what the input shows
    clamp_to_input: bool = False

    @property
    def input_channels(self) -> int:
        return self.context_slices + int(self.noise_map)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ManifestError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "denoise" and self.scale != 1:
            raise ManifestError("a denoise model has scale 1")
        if self.task == "sr" and self.scale < 2:
            raise ManifestError("an sr model has scale >= 2")
        if self.context_slices < 1 or self.context_slices % 2 != 1:
            raise ManifestError(f"context_slices must be odd and >= 1, got {self.context_slices}")
        if self.restore_mean_px < 0 or (self.restore_mean_px and self.task != "denoise"):
            raise ManifestError("restore_mean_px is a denoiser's, and >= 0")
        if self.clamp_to_input and self.task != "sr":
            raise ManifestError("clamp_to_input is for sr models")
        if self.noise_map and self.task != "denoise":
            raise ManifestError("noise_map is for denoise models")
        if not self.modalities:
            raise ManifestError("modalities must list at least one modality")
        if self.tile.size < 16 or not 0 <= self.tile.overlap < self.tile.size // 2:
            raise ManifestError(f"tile needs size >= 16 and 0 <= overlap < size/2, got {self.tile}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        try:
            tile = data.get("tile", {})
            if not isinstance(tile, dict):
                raise TypeError("tile must be a table {size, overlap}")
            if not isinstance(data["modalities"], list):
                raise TypeError('modalities must be a list, e.g. ["CT"]')
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                task=str(data["task"]),
                modalities=tuple(str(m) for m in data["modalities"]),
                scale=int(data.get("scale", 1)),
                context_slices=int(data.get("context_slices", 1)),
                normalization=Normalization.from_dict(data["normalization"]),
                tile=Tile(int(tile.get("size", 512)), int(tile.get("overlap", 32))),
                onnx_sha256=str(data.get("onnx_sha256", "")),
                net=dict(data.get("net", {})),
                training=dict(data.get("training", {})),
                metrics=dict(data.get("metrics", {})),
                noise_map=_boolean(data.get("noise_map", False)),
                restore_mean_px=float(data.get("restore_mean_px", 0.0)),
                clamp_to_input=_boolean(data.get("clamp_to_input", False)),
            )
        except KeyError as exc:
            raise ManifestError(f"model.toml lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"model.toml: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "modalities": list(self.modalities),
            "scale": self.scale,
            "context_slices": self.context_slices,
            "noise_map": self.noise_map,
            "restore_mean_px": self.restore_mean_px,
            "clamp_to_input": self.clamp_to_input,
            "normalization": self.normalization.as_dict(),
            "tile": {"size": self.tile.size, "overlap": self.tile.overlap},
            "onnx_sha256": self.onnx_sha256,
            "net": self.net,
            "training": self.training,
            "metrics": self.metrics,
        }


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"noise_map and clamp_to_input must be true or false, got {value!r}")
    return value


def load(package: Path) -> ModelManifest:
    """Read models/NAME/model.toml and check model.onnx is the file it describes."""
    toml_path, onnx_path = package / "model.toml", package / "model.onnx"
    if not toml_path.is_file() or not onnx_path.is_file():
        raise ManifestError(f"{package}: a model package needs model.toml and model.onnx")
    try:
        manifest = ModelManifest.from_dict(tomllib.loads(toml_path.read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{toml_path}: {exc}") from None
    if manifest.onnx_sha256 and manifest.onnx_sha256 != sha256_file(onnx_path):
        raise ManifestError(f"{onnx_path}: sha256 differs from model.toml's onnx_sha256")
    return manifest


def dump(manifest: ModelManifest, path: Path) -> None:
    path.write_text(tomlkit.dumps(_drop_none(manifest.as_dict())))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
