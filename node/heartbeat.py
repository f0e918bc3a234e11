"""A heartbeat in the ledger while a job or delivery runs, so that one whose process died is
noticed (its heartbeat stops) and taken over, while one that is merely slow is left alone."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def heartbeating(beat: Callable[[], bool], period: float, what: str) -> Iterator[None]:
    """Calls `beat` every `period` seconds in a thread until the block ends; `beat` returns
    False when the work is no longer ours (re-queued meanwhile), which ends the beating."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(period):
            try:
                if not beat():
                    log.warning("%s is no longer ours", what)
                    return
            except Exception:  # the ledger may be briefly unavailable; the next beat retries
                log.exception("heartbeat for %s failed", what)

    thread = threading.Thread(target=run, name=f"heartbeat {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
