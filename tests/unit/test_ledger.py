"""Ledger and file store against a real SQLite file, with an injected clock (no sleeping)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import func, select

from core.errors import OutOfResources
from core.header import InstanceHeader, parse_header
from node.completion import stale_association_seconds, sweep
from node.instance import file_meta
from storage import schema as t
from storage.db import make_engine, migrate
from storage.filestore import FileStore, object_path
from storage.ledger import EventKind, Ledger, Received, StoredFile, StoreOutcome
from storage.recovery import reconcile
from tests.dicom_factory import ct_slice, encode_explicit_le
from tests.helpers import Clock, temp_files


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Ledger:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    migrate(engine)  # idempotent
    return Ledger(engine, now=clock)


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "storage", min_free_bytes=0)


def header(sop: str, series: str = "1.2.3.4", study: str = "1.2.3") -> InstanceHeader:
    return InstanceHeader(CTImageStorage, sop, study, series, ExplicitVRLittleEndian, "CT", "desc", 1)


def received(path: str, data: bytes, ae: str = "CT01", assoc: int | None = None) -> Received:
    return Received(StoredFile(path, hashlib.sha256(data).hexdigest(), len(data)), ae, "127.0.0.1", assoc)


def current_file(ledger: Ledger, sop: str) -> StoredFile | None:
    with ledger.engine.connect() as conn:
        row = conn.execute(
            select(t.instances.c.path, t.instances.c.sha256, t.instances.c.size).where(
                t.instances.c.sop_instance_uid == sop
            )
        ).first()
    return StoredFile(*row) if row else None


def series_state(ledger: Ledger, uid: str) -> str | None:
    with ledger.engine.connect() as conn:
        return conn.execute(select(t.series.c.state).where(t.series.c.series_instance_uid == uid)).scalar()


def events(ledger: Ledger, kind: EventKind) -> list[str]:
    with ledger.engine.connect() as conn:
        return list(conn.execute(select(t.events.c.detail).where(t.events.c.kind == str(kind))).scalars())


def test_sqlite_runs_in_wal_mode(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: files carry durability


def test_a_row_is_committed_only_after_before_commit_returns_and_not_when_it_raises(ledger: Ledger) -> None:
    """The SCP waits for its file's sync in `before_commit`: inside the transaction, after the
    statements, so no other connection sees the row before the file is durable (read here by
    a plain SQLite reader: the ledger's own connections wait for the write lock)."""
    database = ledger.engine.url.database
    assert database is not None

    def visible(sop: str) -> bool:
        with contextlib.closing(sqlite3.connect(database)) as reader:
            query = "SELECT count(*) FROM instances WHERE sop_instance_uid = ?"
            return bool(reader.execute(query, (sop,)).fetchone()[0])

    seen: list[bool] = []
    ledger.record_instance(header("1.5"), received("a", b"one"), before_commit=lambda: seen.append(visible("1.5")))
    assert seen == [False]
    assert visible("1.5")

    def sync_failed() -> None:
        raise OutOfResources("cannot make the instance file durable")

    with pytest.raises(OutOfResources):
        ledger.record_instance(header("1.6", series="1.2.3.9"), received("b", b"two"), before_commit=sync_failed)
    assert current_file(ledger, "1.6") is None
    assert series_state(ledger, "1.2.3.9") is None  # the whole transaction rolled back


def test_new_duplicate_and_replaced_instances(ledger: Ledger) -> None:
    assert ledger.record_instance(header("1.1"), received("a", b"one")) is StoreOutcome.NEW
    assert ledger.record_instance(header("1.1"), received("a", b"one")) is StoreOutcome.DUPLICATE
    assert ledger.record_instance(header("1.1"), received("b", b"two")) is StoreOutcome.REPLACED
    current = current_file(ledger, "1.1")
    assert current == StoredFile("b", hashlib.sha256(b"two").hexdigest(), 3)
    assert ledger.known_paths() == {"a", "b"}  # the older version is kept and still known
    with ledger.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.instances)).scalar() == 1
    assert len(events(ledger, EventKind.INSTANCE_DUPLICATE)) == 1
    assert len(events(ledger, EventKind.INSTANCE_REPLACED)) == 1
    with ledger.engine.connect() as conn:
        assert conn.execute(select(t.series.c.instance_count)).scalar() == 1


def test_series_completes_after_idle_period_and_reopens_on_late_instance(ledger: Ledger, clock: Clock) -> None:
    ledger.record_instance(header("1.1"), received("a", b"a"))
    clock.advance(29)
    assert sweep(ledger, idle_seconds=30, network_timeout=60) == []
    ledger.record_instance(header("1.2"), received("b", b"b"))
    clock.advance(29)
    assert sweep(ledger, 30, 60) == []  # the quiet period restarts with each instance
    clock.advance(1)
    assert sweep(ledger, 30, 60) == ["1.2.3.4"]
    assert series_state(ledger, "1.2.3.4") == t.SERIES_COMPLETE
    assert sweep(ledger, 30, 60) == []  # completes once
    ledger.record_instance(header("1.3"), received("c", b"c"))  # late instance
    assert series_state(ledger, "1.2.3.4") == t.SERIES_RECEIVING
    assert events(ledger, EventKind.SERIES_REOPENED) == ["was complete"]
    clock.advance(30)
    assert sweep(ledger, 30, 60) == ["1.2.3.4"]


def test_open_association_from_the_sender_holds_completion(ledger: Ledger, clock: Clock) -> None:
    assoc = ledger.open_association("n:1", "CT01", "ENHANCE", "127.0.0.1", 5000, False)
    other = ledger.open_association("n:1", "MR01", "ENHANCE", "127.0.0.1", 5001, False)
    ledger.record_instance(header("1.1"), received("a", b"a", assoc=assoc))
    clock.advance(31)
    assert sweep(ledger, 30, 60) == []  # CT01 still has its association open
    ledger.close_association(assoc, "released")
    assert sweep(ledger, 30, 60) == ["1.2.3.4"]  # MR01's open association is not the sender
    ledger.close_association(other, "released")


def test_a_silent_association_stops_holding_completion(ledger: Ledger, clock: Clock) -> None:
    assoc = ledger.open_association("n:1", "CT01", "ENHANCE", "127.0.0.1", 5000, False)
    ledger.record_instance(header("1.1"), received("a", b"a", assoc=assoc))
    clock.advance(stale_association_seconds(60) + 1)
    assert sweep(ledger, 30, 60) == ["1.2.3.4"]


def test_associations_of_a_dead_scp_are_closed_as_lost(ledger: Ledger, clock: Clock) -> None:
    ledger.open_association("host:11112", "CT01", "ENHANCE", "127.0.0.1", 5000, False)
    ledger.open_association("other:11112", "CT02", "ENHANCE", "127.0.0.1", 5000, False)
    assert ledger.close_lost_associations("host:11112") == 1
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(t.associations.c.calling_ae, t.associations.c.outcome)).all()
    assert sorted(rows, key=lambda r: r[0]) == [("CT01", "lost"), ("CT02", None)]


def test_filestore_write_is_whole_and_respects_the_disk_floor(store: FileStore) -> None:
    rel = object_path("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    store.write(rel, b"x" * 1000)
    assert store.abspath(rel).read_bytes() == b"x" * 1000
    assert temp_files(store.root) == []
    full = FileStore(store.root, min_free_bytes=store.free_bytes() + 2**30)
    with pytest.raises(OutOfResources, match="below"):
        full.write(object_path("1.2", "1.2.3", "1.2.3.5", "cd" * 32), b"y")
    assert list(store.iter_objects()) == [rel]
    assert temp_files(store.root) == []


def test_a_host_discards_only_its_own_interrupted_writes(tmp_path: Path) -> None:
    """Hosts sharing a storage directory: one that starts must not delete the temp file another
    host is writing at that moment (its instance would be answered 0xA700, its output lost);
    loose files in tmp/ itself are from versions before per-host folders and go too."""
    root = tmp_path / "shared"
    mine, theirs = FileStore(root, 0, "ct-node:104"), FileStore(root, 0, "mr-node:104")
    in_flight = root / "tmp" / "mr-node_104" / "writing.part"
    in_flight.write_bytes(b"half")
    (root / "tmp" / "ct-node_104" / "dead.part").write_bytes(b"half")
    (root / "tmp" / "legacy.part").write_bytes(b"half")
    assert mine.discard_temp_files() == 2
    assert temp_files(root) == [in_flight]
    assert theirs.discard_temp_files() == 1 and temp_files(root) == []
    rel = object_path("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    theirs.write(rel, b"x")  # a new study and series folder, made by the write
    assert mine.abspath(rel).read_bytes() == b"x"


def test_unsafe_uids_never_escape_the_store() -> None:
    rel = object_path("../../etc", "1.2", "a/b", "0" * 64)
    assert ".." not in rel and rel.count("/") == 3


def part10(sop: str, series: str = "1.2.3.4") -> bytes:
    ds = ct_slice("1.2.3", series, 0, rows=8, cols=8, sop_uid=sop)
    return file_meta(CTImageStorage, sop, ExplicitVRLittleEndian, "CT01") + encode_explicit_le(ds)


def test_reconcile_after_crash(store: FileStore, ledger: Ledger) -> None:
    # A row whose file exists, a file renamed but never recorded, a temp file, garbage.
    known = part10("1.2.1")
    h = parse_header(known)
    rel_known = object_path("1.2.3", "1.2.3.4", "1.2.1", hashlib.sha256(known).hexdigest())
    store.write(rel_known, known)
    ledger.record_instance(h, received(rel_known, known))
    orphan = part10("1.2.2")
    rel_orphan = object_path("1.2.3", "1.2.3.4", "1.2.2", hashlib.sha256(orphan).hexdigest())
    store.write(rel_orphan, orphan)
    (store.root / "tmp" / "local" / "dead.part").write_bytes(b"half")  # the store's own temp folder
    store.write("objects/x/y/garbage_000000000000.dcm", b"not dicom")
    gone = "objects/1.2.3/1.2.3.4/lost_000000000000.dcm"
    ledger.record_instance(header("1.2.9"), received(gone, b"lost"))

    report = reconcile(store, ledger)

    assert (report.temp_discarded, report.adopted, report.quarantined, report.missing) == (1, 1, 1, 1)
    assert current_file(ledger, "1.2.2") == StoredFile(rel_orphan, hashlib.sha256(orphan).hexdigest(), len(orphan))
    assert set(store.iter_objects()) == {rel_known, rel_orphan}
    assert temp_files(store.root) == []
    assert len(os.listdir(store.root / "quarantine")) == 1
    assert events(ledger, EventKind.INSTANCE_MISSING) == [gone]
    again = reconcile(store, ledger)
    assert (again.adopted, again.quarantined) == (0, 0)


def test_a_file_whose_bytes_are_not_what_its_name_says_is_quarantined_not_adopted(
    store: FileStore, ledger: Ledger
) -> None:
    """A power cut after the rename and before the sync can leave a file under its final name
    whose tail never reached the disk (zeros): it parses, but its bytes do not hash to the
    sha256 in its name, so recovery quarantines it instead of adopting it."""
    data = part10("1.2.5")
    rel = object_path("1.2.3", "1.2.3.4", "1.2.5", hashlib.sha256(data).hexdigest())
    (store.root / rel).parent.mkdir(parents=True)
    (store.root / rel).write_bytes(data[:-64] + bytes(64))
    report = reconcile(store, ledger)
    assert (report.adopted, report.quarantined) == (0, 1)
    assert "content is not what was written" in events(ledger, EventKind.FILE_QUARANTINED)[0]


def instance_counts(ledger: Ledger) -> dict[str, int]:
    with ledger.engine.connect() as conn:
        return dict(conn.execute(select(t.series.c.series_instance_uid, t.series.c.instance_count)).all())


def test_series_instance_counts_through_new_reopened_and_moved_instances(ledger: Ledger, clock: Clock) -> None:
    ledger.record_instance(header("1.1"), received("a", b"one"))
    ledger.record_instance(header("1.2"), received("b", b"two"))
    assert instance_counts(ledger) == {"1.2.3.4": 2}
    clock.advance(60)
    assert ledger.complete_idle_series(30, 120) == ["1.2.3.4"]
    ledger.record_instance(header("1.3"), received("c", b"three"))  # a late instance reopens and counts
    assert series_state(ledger, "1.2.3.4") == "receiving"
    assert instance_counts(ledger) == {"1.2.3.4": 3}
    ledger.record_instance(header("1.3", series="1.2.3.5"), received("d", b"moved"))  # re-sent into another series
    assert instance_counts(ledger) == {"1.2.3.4": 2, "1.2.3.5": 1}


def test_the_migrations_build_exactly_the_schema_the_code_uses(tmp_path: Path) -> None:
    """alembic's autogenerate comparison finds nothing between the migrated ledger and
    storage/schema.py: a table or column added to one but not the other fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), t.metadata)
    assert diff == []


def test_recovery_takes_the_calling_ae_from_the_nodes_meta_never_from_the_data_set(
    store: FileStore, ledger: Ledger
) -> None:
    """A file stored before group 0002 was dropped from data sets: pydicom reads the data
    set's SourceApplicationEntityTitle as file meta; recovery must not."""
    ds = ct_slice("1.2.3", "1.2.3.4", 0, rows=8, cols=8, sop_uid="1.2.7")
    spoof = b"\x02\x00\x16\x00AE\x06\x00SPOOF "
    data = file_meta(CTImageStorage, "1.2.7", ExplicitVRLittleEndian, "CT01") + spoof + encode_explicit_le(ds)
    store.write(object_path("1.2.3", "1.2.3.4", "1.2.7", hashlib.sha256(data).hexdigest()), data)
    assert reconcile(store, ledger).adopted == 1
    with ledger.engine.connect() as conn:
        assert conn.execute(select(t.instances.c.calling_ae)).scalar_one() == "CT01"
        assert conn.execute(select(t.series.c.calling_ae)).scalar_one() == "CT01"
