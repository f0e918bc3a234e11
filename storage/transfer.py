"""Moving an embedded SQLite ledger into an empty database (normally PostgreSQL), for
`enhance-node ledger migrate --to URL`.

The copy is safe only with the whole node stopped: rows a running node wrote after its table
was copied would be lost. The node has no lock file or liveness row of its own, but every
process that has the ledger open (every role, and the pooled connections it keeps) holds a
shared lock on the SQLite file; this module opens it in SQLite's EXCLUSIVE locking mode, which
cannot be had while any other process has it open, and keeps that lock until the copy is
committed, so a node started meanwhile waits (and then fails) instead of writing. A node that
was killed holds nothing: its leftovers (running jobs, sending deliveries, open associations)
are copied as they are and the node's own start-up and stale-heartbeat sweeps resolve them.

The target is brought to the newest schema by the same alembic migrations the node runs at
start-up (storage.db.migrate), then every table is copied in dependency order, in batches,
inside one transaction that also resets PostgreSQL's sequences (or new rows would collide
with copied ids) and checks each table's row count before committing. Either the whole ledger
is in the target or nothing is.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, create_engine, func, insert, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from core.errors import EnhanceNodeError, UsageError
from storage import schema as t
from storage.db import alembic_config, make_engine, migrate

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
SOURCE_LOCK_WAIT_S = 1.0  # long enough for an admin's `jobs list` to finish, never for a running node
BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class TableCount:
    name: str
    rows: int


@dataclass(frozen=True)
class Leftovers:
    """Work a killed node left in flight, copied as it is (the node resolves it when it starts)."""

    running_jobs: int
    sending_deliveries: int
    open_associations: int


@dataclass(frozen=True)
class TransferReport:
    source: str  # URLs as they may be shown: the password hidden
    target: str
    revision: str
    tables: tuple[TableCount, ...]
    leftovers: Leftovers
    seconds: float

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.tables)


def shown(url: str | URL) -> str:
    """A URL as it may be printed or logged: never with its password."""
    try:
        return (url if isinstance(url, URL) else make_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a database URL)"


def copy_ledger(
    source_url: str, target_url: str, *, batch_rows: int = BATCH_ROWS, clock: Callable[[], float] = time.monotonic
) -> TransferReport:
    """Copy the SQLite ledger at `source_url` into the empty database at `target_url`.

    UsageError (the CLI exits 2) when it must not be done: the source is not an SQLite ledger
    file, is open in another process (a running node) or is not at the newest schema revision;
    the target URL is unusable, is the source, or already holds ledger rows. EnhanceNodeError
    (exit 1) when the target cannot be reached or the copy fails; nothing is then committed.
    """
    started = clock()
    source_path = _sqlite_source(source_url)
    target = _target_url(target_url, source_path)
    raw = _open_exclusive(source_path)
    source = create_engine("sqlite://", creator=lambda: raw, poolclass=StaticPool)
    try:
        with source.connect() as src:
            revision = _current_revision(src, source_url)
            target_engine = _target_engine(target_url)
            try:
                _refuse_unless_empty(target_engine, target)
                try:
                    migrate(target_engine)
                except SQLAlchemyError as exc:
                    raise EnhanceNodeError(
                        f"migrating {shown(target)} to the newest schema failed: {_why(exc)}"
                    ) from None
                counts = _copy_all(src, target_engine, target, batch_rows)
            finally:
                target_engine.dispose()
            leftovers = _leftovers(src)
    finally:
        source.dispose()  # closes `raw`: the source's lock ends only now, after the commit
    return TransferReport(shown(source_url), shown(target), revision, counts, leftovers, clock() - started)


# -- checks before anything is written ------------------------------------------------------


def _sqlite_source(url: str) -> Path:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise UsageError(
            f"node.ledger_url is {shown(parsed)}, not an embedded SQLite ledger: this command moves a "
            "SQLite ledger (copy a PostgreSQL ledger with pg_dump)"
        )
    if not parsed.database or parsed.database == ":memory:":
        raise UsageError("node.ledger_url names no SQLite file")
    path = Path(parsed.database)
    if not path.is_file():
        raise UsageError(f"no ledger at {path} (node.ledger_url): nothing to migrate")
    return path


def _target_url(url: str, source_path: Path) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError("--to: not a database URL (e.g. postgresql+psycopg://USER:PASSWORD@HOST/DATABASE)") from None
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise UsageError(f"--to: {backend!r} databases are not supported: give a postgresql+psycopg:// URL")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise UsageError("--to: an SQLite target must name a file")
        if Path(parsed.database).resolve() == source_path.resolve():
            raise UsageError("--to names the ledger being migrated")
    return parsed


def _target_engine(url: str) -> Engine:
    try:
        return make_engine(url)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise UsageError(
            f"--to: no driver for {shown(url)} ({exc}): use postgresql+psycopg:// with the extra "
            "`postgres` installed (pip install 'enhance-node[postgres]')"
        ) from None


def _open_exclusive(path: Path) -> sqlite3.Connection:
    """The source ledger, opened so that no other process can read or write it until closed.

    In WAL mode every open connection of another process holds a shared lock on the file, so
    an exclusive lock is refused while any process of a node (or anything else) has it open.
    The lock is taken before this connection first reads the WAL, so SQLite keeps the WAL index
    in this process and the lock lasts until the connection closes, across transactions.
    """
    raw = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=rw",
        uri=True,
        timeout=SOURCE_LOCK_WAIT_S,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        raw.execute("PRAGMA locking_mode=EXCLUSIVE")
        raw.execute("BEGIN EXCLUSIVE")
        raw.execute("COMMIT")
        raw.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as exc:  # locked, or not a database at all
        raw.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise UsageError(
                f"{path} is open in another process: stop the node (every role using this ledger) and run this again"
            ) from None
        raise UsageError(f"{path} cannot be opened as a ledger: {exc}") from None
    return raw


def _current_revision(src: Connection, source_url: str) -> str:
    """The source's schema revision, which must be the newest (the copy is the newest schema's)."""
    scripts = ScriptDirectory.from_config(alembic_config(source_url))
    head = scripts.get_current_head()
    try:
        current = MigrationContext.configure(src).get_current_revision()
    except SQLAlchemyError as exc:
        raise UsageError(f"the source is not a ledger: {_why(exc)}") from None
    if current is None:
        raise UsageError("the source ledger has no schema revision (not a ledger, or never started)")
    if current not in {r.revision for r in scripts.walk_revisions()}:
        raise UsageError(
            f"the source ledger's schema is revision {current}, newer than this enhance-node's ({head}): "
            "migrate it with the version that wrote it"
        )
    if current != head:
        raise UsageError(
            f"the source ledger's schema is revision {current}, this enhance-node's is {head}: run this "
            "version of the node once on it (`enhance-node serve` upgrades it), stop it, then migrate"
        )
    assert head is not None
    return head


def _refuse_unless_empty(engine: Engine, target: URL) -> None:
    """Before the migrations touch it: a database holding ledger rows is never written to."""
    try:
        with engine.connect() as conn:
            present = set(inspect(conn).get_table_names())
            held = {tb.name: _count(conn, tb) for tb in t.metadata.sorted_tables if tb.name in present}
    except SQLAlchemyError as exc:
        raise EnhanceNodeError(f"cannot use {shown(target)}: {_why(exc)}") from None
    _refuse_rows(held, target)


def _refuse_rows(held: dict[str, int], target: URL) -> None:
    full = {name: n for name, n in held.items() if n}
    if full:
        what = ", ".join(f"{n} in {name}" for name, n in full.items())
        raise UsageError(f"{shown(target)} already holds ledger rows ({what}): migrate only into an empty database")


# -- the copy -------------------------------------------------------------------------------


def _copy_all(src: Connection, engine: Engine, target: URL, batch_rows: int) -> tuple[TableCount, ...]:
    tables = t.metadata.sorted_tables  # parents before the rows that refer to them
    step = "locking the target's tables"
    try:
        with engine.begin() as dst:
            if dst.dialect.name == "postgresql":  # nothing else writes them until this commits
                names = ", ".join(dst.dialect.identifier_preparer.format_table(tb) for tb in tables)
                dst.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))
            _refuse_rows({tb.name: _count(dst, tb) for tb in tables}, target)  # written since the check?
            counts = []
            for tb in tables:
                step = f"copying table {tb.name}"
                counts.append(TableCount(tb.name, _copy_table(src, dst, tb, batch_rows)))
            step = "setting the id sequences"
            if dst.dialect.name == "postgresql":
                for tb in tables:
                    _reset_sequence(dst, tb)
            step = "counting rows"
            for tb in tables:  # the source is locked: its counts are what was copied
                here, there = _count(src, tb), _count(dst, tb)
                if here != there:
                    raise EnhanceNodeError(f"table {tb.name}: {here} rows in the source but {there} in the target")
            step = "committing"
        return tuple(counts)
    except SQLAlchemyError as exc:
        why = _why(exc)
        raise EnhanceNodeError(f"{step} into {shown(target)} failed, nothing was committed: {why}") from None


def _copy_table(src: Connection, dst: Connection, table: Table, batch_rows: int) -> int:
    """Every row as it is, ids included; values pass through the schema's column types both
    ways (SQLite's naive-UTC text becomes the target's timestamps)."""
    copied = 0
    result = src.execute(select(table).order_by(*table.primary_key.columns))
    for rows in result.partitions(batch_rows):
        dst.execute(insert(table), [row._asdict() for row in rows])
        copied += len(rows)
    log.info("ledger migrate: %s: %d rows", table.name, copied)
    return copied


def _reset_sequence(dst: Connection, table: Table) -> None:
    """The id sequence continues after the copied ids (they were inserted explicitly, which
    leaves a sequence at 1: the next insert would collide)."""
    [pk] = table.primary_key.columns
    sequence = dst.execute(
        text("SELECT pg_get_serial_sequence(:table, :column)"), {"table": table.name, "column": pk.name}
    ).scalar_one()
    if sequence is None:
        return
    top = dst.execute(select(func.max(pk))).scalar_one()
    # is_called false with 1: an empty table's next id is 1; true with max: the next is max + 1
    dst.execute(
        text("SELECT setval(:seq, :value, :called)"), {"seq": sequence, "value": top or 1, "called": top is not None}
    )


def _count(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _leftovers(src: Connection) -> Leftovers:
    def count(table: Table, *where: Any) -> int:
        return int(src.execute(select(func.count()).select_from(table).where(*where)).scalar_one())

    return Leftovers(
        running_jobs=count(t.jobs, t.jobs.c.state == t.JOB_RUNNING),
        sending_deliveries=count(t.deliveries, t.deliveries.c.state == t.DELIVERY_SENDING),
        open_associations=count(t.associations, t.associations.c.closed_at.is_(None)),
    )


def _why(exc: SQLAlchemyError) -> str:
    """The database's own one-line reason, without SQLAlchemy's statement and parameters."""
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__
