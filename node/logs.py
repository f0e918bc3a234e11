"""Logging set-up shared by the CLI and the processes it spawns: human-readable lines on
stderr by default, or one JSON object per line (`--log-format json`) for a log shipper.

What is logged is UIDs, AE titles, addresses, states and figures; never patient names or
pixel data. pynetdicom's own chatter is kept at WARNING and above: its debug output would
dump datasets, which hold patient names. Its errors about what a peer sent (an undecodable
PDU, a bad event for the state) come as one line each, without the traceback pynetdicom
attaches: they are handled (the association is aborted), and a hostile peer must not be able
to fill the log at 20 lines a connection.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


@dataclass(frozen=True)
class LogSettings:
    """What a spawned process needs to log as its parent does."""

    level: int = logging.INFO
    format: str = "text"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class PeerErrorsOnOneLine(logging.Filter):
    """Drops the traceback from pynetdicom's records (module docstring); keeps the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom") and record.exc_info:
            record.exc_info = None
            record.exc_text = None
        return True


_current = LogSettings()


def configure_logging(settings: LogSettings) -> None:
    global _current
    _current = settings
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(PeerErrorsOnOneLine())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, settings.level))


def current_settings() -> LogSettings:
    return _current
