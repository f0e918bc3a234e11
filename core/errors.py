"""One exception base; subclasses exist only where callers branch on them."""

from __future__ import annotations


class EnhanceNodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(EnhanceNodeError):
    """The configuration is invalid; the CLI exits 2 with this one-line message."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class OutOfResources(EnhanceNodeError):
    """Disk below the floor, a write failed or the ledger is unavailable (retryable: 0xA700)."""


class InvalidDataset(EnhanceNodeError):
    """A received dataset cannot be parsed or does not match its SOP class (permanent)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class ProtocolError(EnhanceNodeError):
    """A peer broke the DICOM upper layer or DIMSE protocol (PS3.8, PS3.7): the association is
    aborted."""


class ManifestError(EnhanceNodeError):
    """A model package whose model.toml is missing, malformed or contradicts its ONNX graph (permanent)."""


class EngineUnavailable(EnhanceNodeError):
    """The backend asked for cannot run here (library not installed, no such device)."""


class EngineFailure(EnhanceNodeError):
    """An engine returned output that cannot be written (non-finite values): a model fault."""


class QAFailed(EnhanceNodeError):
    """The worker's QA gate rejected a series and its route says fail (permanent); `figures`
    are what was measured, for the ledger."""

    def __init__(self, reason: str, figures: dict[str, object]) -> None:
        super().__init__(reason)
        self.figures = figures


class UsageError(EnhanceNodeError):
    """A command was asked for something it cannot do with these arguments; the CLI exits 2."""
