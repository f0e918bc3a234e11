"""model.toml (DESIGN 3.4): what a model package promises about its ONNX graph.

Read strictly (a package the node cannot trust is refused with the reason), written by the
trainer's export with provenance and held-out metrics.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import tomlkit

from core.errors import ManifestError
from core.images import ImageFacts
from engines.normalization import Normalization

TASKS = ("denoise", "sr")
PLANES = ("any", "axial")
# |slice normal . patient z| at least this is axial: gantry tilts and oblique axials up to ~35 deg
AXIAL_MIN_COSINE = 0.8
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Tile:
    size: int = 512
    overlap: int = 32


@dataclass(frozen=True)
class AppliesTo:
    """The images a model is made for (model.toml's [applies_to]); the node processes nothing
    else, whatever a route says. Each check is on header facts (core.images.ImageFacts)."""

    exclude_image_types: tuple[str, ...] = ("LOCALIZER",)  # any of these values in ImageType
    photometric: tuple[str, ...] = MONOCHROME
    min_matrix: int = 32  # rows and columns at least
    max_matrix: int = 4096
    plane: str = "any"  # "axial": the slice normal within ~37 deg of the patient's z axis
    pixel_spacing_mm: tuple[float, float] = (0.0, 100.0)
    sop_classes: tuple[str, ...] = ()  # empty: any image SOP class

    def __post_init__(self) -> None:
        if self.plane not in PLANES:
            raise ManifestError(f"applies_to.plane must be one of {PLANES}, got {self.plane!r}")
        if not 1 <= self.min_matrix <= self.max_matrix:
            raise ManifestError("applies_to needs 1 <= min_matrix <= max_matrix")
        lo, hi = self.pixel_spacing_mm
        if not 0 <= lo <= hi:
            raise ManifestError("applies_to.pixel_spacing_mm must be [low, high] with 0 <= low <= high")

    def refusal(self, facts: ImageFacts, model: str, modalities: tuple[str, ...]) -> str | None:
        """Why `model` does not apply to an object with these facts, or None when it does."""
        if not facts.is_image:
            return "not an image"
        if facts.modality.upper() not in (m.upper() for m in modalities):
            return f"modality {facts.modality or '(none)'} is not {'/'.join(modalities)} ({model})"
        if self.sop_classes and facts.sop_class_uid not in self.sop_classes:
            return f"SOP class {facts.sop_class_uid} is not one {model} takes"
        excluded = [v for v in facts.image_type if v in self.exclude_image_types]
        if excluded:
            return f"image type {excluded[0]} ({model} excludes {', '.join(self.exclude_image_types)})"
        if facts.photometric not in self.photometric:
            return f"photometric interpretation {facts.photometric or '(none)'} is not {'/'.join(self.photometric)}"
        small, large = min(facts.rows, facts.columns), max(facts.rows, facts.columns)
        if small < self.min_matrix or large > self.max_matrix:
            return f"matrix {facts.rows}x{facts.columns} outside {self.min_matrix}..{self.max_matrix}"
        if self.plane == "axial":
            normal = facts.normal
            if normal is None:
                return "no image orientation: cannot tell the plane"
            if abs(normal[2]) < AXIAL_MIN_COSINE:
                return f"not axial (slice normal {normal[0]:.2f}, {normal[1]:.2f}, {normal[2]:.2f})"
        lo, hi = self.pixel_spacing_mm
        if (lo > 0 or hi < 100) and facts.pixel_spacing is None:
            return "no pixel spacing"
        if facts.pixel_spacing is not None and not all(lo <= v <= hi for v in facts.pixel_spacing):
            spacing = "x".join(f"{v:g}" for v in facts.pixel_spacing)
            return f"pixel spacing {spacing} mm outside {lo:g}..{hi:g} mm"
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppliesTo:
        d = cls()
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise TypeError(f"applies_to: unknown key(s) {', '.join(sorted(unknown))}")
        spacing = data.get("pixel_spacing_mm", d.pixel_spacing_mm)
        if not isinstance(spacing, list | tuple) or len(spacing) != 2:
            raise TypeError("applies_to.pixel_spacing_mm must be [low, high]")
        return cls(
            exclude_image_types=tuple(str(v).upper() for v in _strings(data, "exclude_image_types", d)),
            photometric=tuple(str(v) for v in _strings(data, "photometric", d)),
            min_matrix=int(data.get("min_matrix", d.min_matrix)),
            max_matrix=int(data.get("max_matrix", d.max_matrix)),
            plane=str(data.get("plane", d.plane)),
            pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
            sop_classes=tuple(str(v) for v in _strings(data, "sop_classes", d)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "exclude_image_types": list(self.exclude_image_types),
            "photometric": list(self.photometric),
            "min_matrix": self.min_matrix,
            "max_matrix": self.max_matrix,
            "plane": self.plane,
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "sop_classes": list(self.sop_classes),
        }


def _strings(data: dict[str, Any], key: str, default: AppliesTo) -> tuple[Any, ...]:
    value = data.get(key, getattr(default, key))
    if not isinstance(value, list | tuple):
        raise TypeError(f"applies_to.{key} must be a list")
    return tuple(value)


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
    # with restore_mean_px: class bounds in the image's units (HU for CT), increasing; the body is
    # split into classes by the denoised value and each class gets its own regional mean back
    # (engines.pipeline.restore_mean), so nothing is carried across a tissue edge. () = one class
    restore_mean_bounds: tuple[float, ...] = ()
    # super-resolution: each output pixel is kept within the range of the 3x3 input pixels round
    # it (engines.pipeline.clamp_to_input): no halo or overshoot beyond what the input shows
    clamp_to_input: bool = False
    # super-resolution: after the clamp, each scale x scale block of the output is moved this
    # fraction of the way to the input pixel it came from (engines.pipeline.enforce_consistency;
    # 1 = the block means reproduce the input exactly). 0 = off
    consistency: float = 0.0
    # super-resolution: the output's share taken from a classical estimate, Lanczos with the same
    # clamp and consistency (engines.pipeline.classical_sr): a hedge where the net is wrong about
    # the input (an unblurred one it sharpens as if blurred). 0 = the net's output alone
    classical_share: float = 0.0
    applies_to: AppliesTo = AppliesTo()

    def refusal(self, facts: ImageFacts) -> str | None:
        """Why this model does not apply to an object (AppliesTo.refusal), or None."""
        return self.applies_to.refusal(facts, self.name, self.modalities)

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
        bounds = self.restore_mean_bounds
        if bounds and (not self.restore_mean_px or any(b >= c for b, c in pairwise(bounds))):
            raise ManifestError("restore_mean_bounds need restore_mean_px > 0 and must increase")
        if self.clamp_to_input and self.task != "sr":
            raise ManifestError("clamp_to_input is for sr models")
        if not 0.0 <= self.consistency <= 1.0 or (self.consistency and self.task != "sr"):
            raise ManifestError(f"consistency is for sr models, between 0 and 1, got {self.consistency}")
        if not 0.0 <= self.classical_share <= 1.0 or (self.classical_share and self.task != "sr"):
            raise ManifestError(f"classical_share is for sr models, between 0 and 1, got {self.classical_share}")
        if not self.modalities:
            raise ManifestError("modalities must list at least one modality")
        if self.tile.size < 16 or not 0 <= self.tile.overlap < self.tile.size // 2:
            raise ManifestError(f"tile needs size >= 16 and 0 <= overlap < size/2, got {self.tile}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        try:
            tile = data.get("tile", {})
            tile = _table(tile, "tile")
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
                restore_mean_bounds=tuple(float(b) for b in data.get("restore_mean_bounds", ())),
                clamp_to_input=_boolean(data.get("clamp_to_input", False)),
                consistency=float(data.get("consistency", 0.0)),
                classical_share=float(data.get("classical_share", 0.0)),
                applies_to=AppliesTo.from_dict(_table(data.get("applies_to", {}), "applies_to")),
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
            "restore_mean_bounds": list(self.restore_mean_bounds),
            "clamp_to_input": self.clamp_to_input,
            "consistency": self.consistency,
            "classical_share": self.classical_share,
            "applies_to": self.applies_to.as_dict(),
            "normalization": self.normalization.as_dict(),
            "tile": {"size": self.tile.size, "overlap": self.tile.overlap},
            "onnx_sha256": self.onnx_sha256,
            "net": self.net,
            "training": self.training,
            "metrics": self.metrics,
        }


def _table(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a table")
    return value


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
