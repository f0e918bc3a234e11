"""The configuration as config.toml says now. `enhance-node ae|dest|route add|remove` (or an
editor) changes the file; each process of a running node notices within `interval` seconds,
validates the new file as a whole, logs what changed and uses it. A file that does not
validate is not applied (the error is logged) and the node keeps its last good configuration.

Applied live: allowed calling AEs (receiving), destinations and routes (routing, delivery).
Everything else (ports, AE title, paths, process counts, engine settings) is read at start:
a change is logged with "restart the node to apply".
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace

from core.clock import Monotonic
from core.errors import ConfigError
from node.config import Config, load_config

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


RESTART_NEEDED = "other settings changed: restart the node to apply them"


def changes(old: Config, new: Config) -> list[str]:
    """Human-readable lines for what differs (RESTART_NEEDED among them when it applies)."""
    lines: list[str] = []

    def diff(kind: str, before: dict[str, object], after: dict[str, object]) -> None:
        lines.extend(f"{kind} {k} added" for k in after.keys() - before.keys())
        lines.extend(f"{kind} {k} removed" for k in before.keys() - after.keys())
        lines.extend(f"{kind} {k} changed" for k in before.keys() & after.keys() if before[k] != after[k])

    diff("allowed AE", {a.ae_title: a for a in old.node.allowed}, {a.ae_title: a for a in new.node.allowed})
    diff("destination", {d.name: d for d in old.destinations}, {d.name: d for d in new.destinations})
    diff("route", {r.name: r for r in old.routes}, {r.name: r for r in new.routes})
    if [r.name for r in old.routes] != [r.name for r in new.routes] and not lines:
        lines.append("routes reordered")
    rest_old = replace(old, node=replace(old.node, allowed=()), destinations=(), routes=())
    rest_new = replace(new, node=replace(new.node, allowed=()), destinations=(), routes=())
    if rest_old != rest_new:
        lines.append(RESTART_NEEDED)
    return sorted(lines)


class LiveConfig:
    def __init__(self, cfg: Config, interval: float = CHECK_INTERVAL_S, clock: Monotonic = time.monotonic) -> None:
        self._cfg = cfg
        self._interval = interval
        self._clock = clock
        self._next = clock() + interval
        # not the file's stamp now: a process started (or respawned) after an edit must
        # still compare the file with the configuration it was given
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def _stamp(self) -> tuple[int, int] | None:
        if self._cfg.source is None:
            return None
        try:
            st = os.stat(self._cfg.source)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> None:
        """Check the file at the next `current()` (after this process edited it itself)."""
        self._next = self._clock()

    def current(self) -> Config:
        if self._cfg.source is None or self._clock() < self._next:
            return self._cfg
        with self._lock:
            self._next = self._clock() + self._interval
            stamp = self._stamp()
            if stamp is None or stamp == self._seen:
                return self._cfg
            self._seen = stamp
            try:
                new = load_config(self._cfg.source, required=True)
            except ConfigError as exc:
                log.error("config %s changed but is not applied: %s", self._cfg.source, exc)
                return self._cfg
            for line in changes(self._cfg, new):
                log.info("config: %s", line)
            # what needs a restart keeps its old value, so a process never mixes the two
            start_time = self._cfg
            self._cfg = replace(
                start_time,
                node=replace(start_time.node, allowed=new.node.allowed),
                destinations=new.destinations,
                routes=new.routes,
            )
            return self._cfg
