"""Dashboard log-in: one admin password, stored only as a salted scrypt hash (config
`dashboard.admin_password_hash` or env ENHANCE_NODE_ADMIN_PASSWORD_HASH, made with
`enhance-node dashboard hash-password`), a signed session cookie, and a CSRF token in the
session that every form posts back."""

from __future__ import annotations

import hashlib
import hmac
import secrets

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
