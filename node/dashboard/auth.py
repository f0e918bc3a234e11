"""Dashboard log-in: one admin password, stored only as a salted scrypt hash (config
`dashboard.admin_password_hash` or env ENHANCE_NODE_ADMIN_PASSWORD_HASH, made with
`enhance-node dashboard hash-password`), a signed session cookie, and a CSRF token in the
session that every form posts back."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque

from core.clock import Monotonic

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"{SCHEME}${N}${R}${P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """False for a wrong password and for a hash we cannot read (never an exception)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(session_token: str | None, posted: str | None) -> bool:
    return bool(session_token) and bool(posted) and hmac.compare_digest(str(session_token), str(posted))


class Sessions:
    """Logged-in sessions, kept here (server side): the cookie carries only a random id, so
    log-out, expiry and a restart end a session even for a copy of its cookie."""

    def __init__(self, lifetime_s: float, clock: Monotonic = time.monotonic, most: int = 1000) -> None:
        self.lifetime_s = lifetime_s
        self.clock = clock
        self.most = most
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def open(self) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            self._expiry = {k: v for k, v in self._expiry.items() if v > now}
            if len(self._expiry) >= self.most:  # the oldest goes first
                self._expiry.pop(min(self._expiry, key=self._expiry.__getitem__))
            self._expiry[sid] = now + self.lifetime_s
        return sid

    def valid(self, sid: object) -> bool:
        with self._lock:
            return isinstance(sid, str) and self._expiry.get(sid, 0.0) > self.clock()

    def close(self, sid: object) -> None:
        with self._lock:
            if isinstance(sid, str):
                self._expiry.pop(sid, None)


class LoginThrottle:
    """At most `attempts` wrong passwords per client address in `window_s` seconds; then the
    address waits (`retry_after`) before it may try again, and its tries are not checked."""

    def __init__(self, attempts: int = 5, window_s: float = 300.0, clock: Monotonic = time.monotonic) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int:
        """Seconds this address must wait before trying again (0: it may try now)."""
        with self._lock:
            recent = self._recent(address)
            if len(recent) < self.attempts:
                return 0
            return max(1, int(recent[0] + self.window_s - self.clock()) + 1)

    def failed(self, address: str) -> None:
        with self._lock:
            self._recent(address).append(self.clock())
            if len(self._failures) > 10_000:  # bounded under many addresses
                self._failures = {address: self._failures[address]}

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def _recent(self, address: str) -> deque[float]:
        recent = self._failures.setdefault(address, deque())
        while recent and recent[0] <= self.clock() - self.window_s:
            recent.popleft()
        return recent
