"""What a peer can hold of the SCP before it has said who it is (docs/receiving.md, "Hostile
peers"). A TCP connection costs a thread and, until its A-ASSOCIATE-RQ has been answered,
nothing tells an allowed scanner from anything else on the network. So:

- each connection must finish its TLS handshake, then association negotiation, each within
  `node.negotiation_timeout` seconds, or it is closed;
- a host has at most `node.max_connections_per_host` connections open at once in each
  receiving process, and all hosts together at most `node.max_connections` (peers on many
  addresses, each under its own limit, must not exhaust the process's threads and file
  descriptors), unless it is the `host` of an `[[node.allowed]]` entry (an allowed AE's own
  address keeps its capacity and is not counted);
- half-open connections never take an association slot (`node.max_associations` is counted
  only for associations the policy accepted, node/handlers.py).

A PDU that stalls after negotiation (no byte for `node.network_timeout`) is closed by the
socket's receive timeout (node/scp.py); a slow link that keeps sending is never cut.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from core.clock import Monotonic


@dataclass
class Connection:
    host: str
    opened: float  # the guard's clock
    close: Callable[[], None]  # shuts the socket down (a blocked read returns)
    negotiated: Callable[[], bool]  # the association was accepted, rejected or ended
    deadline_passed: bool = False


class ConnectionGuard:
    """Counts connections per host and finds those that do not negotiate in time. Shared by the
    accept loop, the connection threads and the reaper, so every method takes the lock."""

    def __init__(
        self,
        max_per_host: int,
        negotiation_timeout: float,
        exempt_hosts: Callable[[], Collection[str]] = frozenset,
        clock: Monotonic = time.monotonic,
        max_total: int = 1 << 20,
    ) -> None:
        self.max_per_host = max_per_host
        self.max_total = max_total  # hosts not exempt, together
        self.negotiation_timeout = negotiation_timeout
        self.exempt_hosts = exempt_hosts  # the live config's allowed hosts
        self.clock = clock
        self._per_host: dict[str, int] = {}
        self._open: dict[int, Connection] = {}  # by token, from association creation to release
        self._lock = threading.Lock()

    def admit(self, host: str) -> str | None:
        """Count a new connection from `host`, or say why it is refused (and count nothing)."""
        with self._lock:
            open_now = self._per_host.get(host, 0)
            exempt = self.exempt_hosts()
            if host not in exempt:
                if open_now >= self.max_per_host:
                    return f"{open_now} connections from {host} already open (node.max_connections_per_host)"
                counted = sum(n for h, n in self._per_host.items() if h not in exempt)
                if counted >= self.max_total:
                    why = "hosts other than the allowed AEs' (node.max_connections)"
                    return f"{counted} connections already open from {why}"
            self._per_host[host] = open_now + 1
            return None

    def watch(self, token: int, connection: Connection) -> None:
        """Start the negotiation deadline of an admitted connection."""
        with self._lock:
            self._open[token] = connection

    def unwatch(self, token: int) -> None:
        """Stop the deadline of a phase that ended in time (a TLS handshake), counting nothing."""
        with self._lock:
            self._open.pop(token, None)

    def release(self, token: int | None, host: str) -> None:
        """The connection ended. Once per admitted connection: a token already released is
        ignored; no token when it ended before its association was created (TLS failed)."""
        with self._lock:
            if token is not None and self._open.pop(token, None) is None:
                return
            left = self._per_host.get(host, 0) - 1
            if left > 0:
                self._per_host[host] = left
            else:
                self._per_host.pop(host, None)

    def open_from(self, host: str) -> int:
        with self._lock:
            return self._per_host.get(host, 0)

    def sweep(self) -> list[Connection]:
        """The connections past their negotiation deadline, each reported once; the caller
        closes them (their threads then release them)."""
        now = self.clock()
        with self._lock:
            items = list(self._open.values())
        late = []
        for c in items:
            if not c.deadline_passed and not c.negotiated() and now - c.opened > self.negotiation_timeout:
                c.deadline_passed = True
                late.append(c)
        return late


class Throttle:
    """At most one report per key per `period` seconds (a flood of refused connections must
    not become a flood of ledger writes); `take` says whether to report now and how many
    went unreported since the last report."""

    def __init__(self, period: float, clock: Monotonic = time.monotonic) -> None:
        self.period = period
        self.clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> tuple[bool, int]:
        now = self.clock()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.period:
                self._quiet[key] = self._quiet.get(key, 0) + 1
                return False, 0
            self._last[key] = now
            if len(self._last) > 10_000:  # bounded under a flood from many addresses
                self._last, self._quiet = {key: now}, {}
            return True, self._quiet.pop(key, 0)
