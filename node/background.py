"""Ledger writes that must not hold up the thread that asks for them.

The SCP's accept loop records refused and dropped connections as events. A ledger that is busy
(another process holding SQLite's write lock, a PostgreSQL failover) would otherwise stall
accepting for as long as the write waits, and a peer that provokes refusals could use that to
stop the port. `BackgroundWriter` runs such writes on one daemon thread, in order; it is bounded,
and a write past its capacity is dropped with a log line (the log already carries what the
event would have said).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

CAPACITY = 1000


class BackgroundWriter:
    def __init__(self, name: str, capacity: int = CAPACITY) -> None:
        self.name = name
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], None], what: str) -> bool:
        """Queue `write`; False (and a log line naming `what`) when the queue is full."""
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            log.warning("%s: ledger writes are backed up; not recorded: %s", self.name, what)
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("%s: %d ledger writes not done at shutdown", self.name, self._queue.qsize())
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (write := self._queue.get()) is not None:
            try:
                write()
            except Exception:  # a write's own errors are its to log; the thread must go on
                log.exception("%s: a background ledger write failed", self.name)
