"""Logging set-up shared by the CLI and the receiving processes it spawns."""

from __future__ import annotations

import logging


def configure_logging(level: int) -> None:
    """Human-readable lines on stderr; pynetdicom's own chatter only from WARNING (its
    debug output would dump datasets, which may hold patient names)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, level))
