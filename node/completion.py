"""Series completion: a series is complete when nothing of it arrived for `idle_seconds`
and its sender has no association open. The ledger's clock decides, so tests inject one."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from storage.ledger import Ledger

log = logging.getLogger(__name__)


def stale_association_seconds(network_timeout: float) -> float:
    """An association silent for this long is gone even if its close was never recorded
    (pynetdicom aborts one idle for network_timeout; a killed SCP records nothing)."""
    return 2 * network_timeout


def sweep(ledger: Ledger, idle_seconds: float, network_timeout: float) -> list[str]:
    done = ledger.complete_idle_series(idle_seconds, stale_association_seconds(network_timeout))
    for uid in done:
        log.info("series %s complete", uid)
    return done


class CompletionLoop:
    """Runs `sweep` every `interval` seconds in a thread until stopped, then `after` (routing
    the completed series to jobs)."""

    def __init__(
        self, ledger: Ledger, idle_seconds: float, network_timeout: float, after: Callable[[], object] | None = None
    ) -> None:
        self.ledger = ledger
        self.after = after
        self.idle_seconds = idle_seconds
        self.network_timeout = network_timeout
        self.interval = min(1.0, max(0.05, idle_seconds / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def run_once(self) -> bool:
        """One round: the sweep, then `after`. False (logged as an error) when it failed; the
        next round tries again. Several processes or hosts may run rounds at once: the sweep
        and the routing each move a series once (storage/ledger.py, storage/jobs.py), so the
        others find nothing to do rather than an error."""
        try:
            sweep(self.ledger, self.idle_seconds, self.network_timeout)
            if self.after is not None:
                self.after()
        except SQLAlchemyError as exc:  # the ledger may be briefly unavailable: try again
            log.error("completion sweep failed: %s", type(exc).__name__)
            return False
        except Exception:  # a bug in routing must not end completion for good: log it, go on
            log.exception("completion sweep failed")
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()
