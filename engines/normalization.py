"""The normalisation contract of DESIGN 3.4, shared by training and inference.

A model maps normalised input to normalised output in the same normalisation; whoever feeds
it (the trainer, the evaluator, the node's worker) uses these functions so the round trip
is identical everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.errors import ManifestError


@dataclass(frozen=True)
class Normalization:
    kind: str  # "hu": fixed window in Hounsfield units; "percentile": per-series percentiles
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.kind not in ("hu", "percentile"):
            raise ManifestError(f"normalization.kind must be 'hu' or 'percentile', got {self.kind!r}")
        if not self.lo < self.hi:
            raise ManifestError(f"normalization needs lo < hi, got lo={self.lo} hi={self.hi}")
        if self.kind == "percentile" and not 0.0 <= self.lo < self.hi <= 100.0:
            raise ManifestError("percentile normalization needs 0 <= lo < hi <= 100")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        try:
            return cls(str(data["kind"]), float(data["lo"]), float(data["hi"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"normalization must have kind, lo and hi: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi}

    def window(self, values: NDArray[Any]) -> tuple[float, float]:
        """The (offset, span) that maps values to [0, 1]-ish for this series (all its slices)."""
        if self.kind == "hu":
            return self.lo, self.hi - self.lo
        p_lo, p_hi = np.percentile(values, [self.lo, self.hi])
        span = float(p_hi - p_lo)
        return float(p_lo), span if span > 0 else 1.0

    @staticmethod
    def forward(values: NDArray[Any], window: tuple[float, float]) -> NDArray[np.float32]:
        offset, span = window
        x = np.subtract(values, np.float32(offset), dtype=np.float32)  # in float32, as values.astype(float32) would be
        x /= np.float32(span)
        return np.asarray(x, np.float32)

    @staticmethod
    def inverse(x: NDArray[Any], window: tuple[float, float]) -> NDArray[np.float32]:
        offset, span = window
        values = np.multiply(x, np.float32(span), dtype=np.float32)
        values += np.float32(offset)
        return np.asarray(values, np.float32)
