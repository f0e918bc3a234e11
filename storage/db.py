"""Ledger connections: SQLite in WAL mode with a busy timeout and immediate transactions,
or PostgreSQL; the schema is brought up to date by alembic at start-up."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
MIGRATION_LOCK_KEY = 0x656E68616E6365  # "enhance": the PostgreSQL advisory lock migrations hold


def make_engine(url: str) -> Engine:
    """An engine whose every transaction is short and, on SQLite, takes the write lock first.

    SQLite's default deferred transactions fail at once with 'database is locked' when two
    writers upgrade their read locks; BEGIN IMMEDIATE makes them wait (busy timeout) instead.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        _set_wal(cur)
        # NORMAL in WAL mode: a commit survives a process crash, and at worst the last few
        # commits roll back on power loss. The instance file itself is synced before the
        # C-STORE is answered, and start-up reconciliation re-records any file whose row was
        # lost (storage/recovery.py), so an acknowledged instance is never lost. FULL would
        # add an fsync per instance for nothing.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _set_wal(cur: sqlite3.Cursor) -> None:
    """WAL mode, which the file keeps once set. Processes opening a new ledger together race to
    set it, and the losers' PRAGMA fails at once with 'database is locked' (SQLite does not
    wait out the busy timeout for it): they try again until the timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Upgrade the ledger schema to the newest revision (idempotent), one process at a time.

    Every role's process migrates as it starts, and roles on several hosts may start together
    on one fresh PostgreSQL ledger: there the transaction first takes an advisory lock, so the
    others wait and then find the schema current (without it they failed creating the same
    tables). On SQLite, BEGIN IMMEDIATE already serialises them.
    """
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
