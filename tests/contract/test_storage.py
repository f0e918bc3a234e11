"""The storage contract (DESIGN 3.3 and 6): one test class that every ledger backend passes
(tests/contract/conftest.py runs each test on a SQLite file and on a real PostgreSQL server).
It goes through the public operations only: the Ledger's receiving and completion, the job and
delivery queues, the reports the CLI and dashboard read, and the schema's migrations; claims
and sweeps race from several processes, each with its own engine.

Data a PostgreSQL column cannot hold (NUL, over-long text, integers past 32 bits) gets the
same answer on both backends: kept as far as the column holds it, or refused permanently
(0xA900) when it is a key; never a DataError, which the SCP would answer 0xA700 (retry)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import multiprocessing
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from prometheus_client import CollectorRegistry, generate_latest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import Engine, func, inspect, select

from core import status
from core.errors import InvalidDataset
from core.header import InstanceHeader, parse_header
from node.completion import CompletionLoop
from node.config import ENV_LEDGER_URL, DestinationConfig, RouteConfig, RouteMatch
from node.dashboard.metrics import LedgerCollector
from node.instance import file_meta
from node.routing import route_complete_series
from storage import reports
from storage import schema as t
from storage.db import alembic_config, make_engine, migrate
from storage.deliveries import DeliveryQueue, Outgoing, Target
from storage.jobs import Assignment, JobQueue, JobSpec, SeriesFacts
from storage.ledger import EventKind, Ledger, Received, StoredFile, StoreOutcome
from tests.dicom_factory import UID_ROOT, ct_slice, encode_explicit_le
from tests.helpers import Clock, NodeProcess, free_port, toml_config

IDLE_S = 30.0
STALE_ASSOCIATION_S = 120.0
MAX_ATTEMPTS = 3
PACS, ARCHIVE = Target("pacs", 3), Target("archive", 2)
OUTPUTS = [Outgoing(f"2.25.9.{k}", CTImageStorage, ExplicitVRLittleEndian, f"outbox/2.25.9/{k}.dcm") for k in range(3)]
PROCESSES = 4
# elements of a CT slice from tests/dicom_factory.py as encoded (explicit VR little endian), and hostile versions
DESCRIPTION, NUL_DESCRIPTION = b"LO\x12\x00Synthetic phantom ", b"LO\x12\x00Synthetic\x00phantom "
NUMBER, HUGE_NUMBER = b"\x20\x00\x13\x00IS\x02\x001 ", b"\x20\x00\x13\x00IS\x0c\x00999999999999"


# -- building blocks ---------------------------------------------------------------------------
def header(sop: str, series: str = "1.2.3.4", study: str = "1.2.3", **changes: Any) -> InstanceHeader:
    h = InstanceHeader(CTImageStorage, sop, study, series, ExplicitVRLittleEndian, "CT", "chest", 1)
    return dataclasses.replace(h, **changes)


def received(path: str, ae: str = "CT01", host: str = "127.0.0.1", association: int | None = None) -> Received:
    stored = StoredFile(path, hashlib.sha256(path.encode()).hexdigest(), len(path))
    return Received(stored, ae, host, association)


def add_series(ledger: Ledger, series: str, instances: int = 1, modality: str = "CT") -> None:
    for k in range(instances):
        sop = f"{series}.{k}"
        ledger.record_instance(header(sop, series, modality=modality, instance_number=k + 1), received(sop))


def complete(ledger: Ledger, clock: Clock) -> list[str]:
    clock.advance(IDLE_S + 1)
    return ledger.complete_idle_series(IDLE_S, STALE_ASSOCIATION_S)


def assigner(
    targets: tuple[Target, ...] = (PACS,), forward_original: bool = False
) -> Callable[[SeriesFacts], Assignment]:
    """Routing as node/routing.py would decide it: CT gets a job, SR is skipped with a reason,
    anything else matches no route."""

    def assign(facts: SeriesFacts) -> Assignment:
        if facts.modality == "SR":
            return Assignment(None, skipped="no model applies to SR")
        if facts.modality != "CT":
            return Assignment(None)
        return Assignment(JobSpec("ct", "ct-denoise", targets, forward_original, "high", "fail"))

    return assign


def queued_jobs(ledger: Ledger, jobs: JobQueue, clock: Clock, n: int, targets: tuple[Target, ...] = ()) -> list[int]:
    for k in range(n):
        add_series(ledger, f"1.2.3.{100 + k}")
    complete(ledger, clock)
    ids = sorted(r.job_id for r in jobs.route_complete_series(assigner(targets), MAX_ATTEMPTS) if r.job_id)
    assert len(ids) == n
    return ids


def pending_deliveries(ledger: Ledger, jobs: JobQueue, clock: Clock, n: int) -> list[int]:
    """n jobs done, each with one pending delivery of OUTPUTS to PACS; the delivery ids."""
    for job_id in queued_jobs(ledger, jobs, clock, n, (PACS,)):
        claimed = jobs.claim("w1")
        assert claimed is not None and claimed.id == job_id
        assert jobs.finish(
            job_id, "w1", f"2.25.{job_id}", len(OUTPUTS), "1.0.0", "onnxruntime", {"infer": 1.0}, OUTPUTS
        )
    return [d["id"] for d in rows_of(ledger.engine, t.deliveries)]


def part10(old: bytes = b"", new: bytes = b"", sop_class: str = CTImageStorage) -> bytes:
    """A small CT slice of a series of its own as the SCP stores it, `old` bytes made `new`."""
    ds = ct_slice("1.2.3", generate_uid(UID_ROOT), 0, rows=8, cols=8)
    ds.SOPClassUID = sop_class
    body = encode_explicit_le(ds)
    assert body.count(old) == 1 or not old
    return file_meta(sop_class, ds.SOPInstanceUID, ExplicitVRLittleEndian, "SENDER") + body.replace(old, new)


def c_store(port: int, sop_class: str, tmp: Path, data: bytes) -> int:
    """One C-STORE of `data` (a Part 10 file's bytes) to the node; its status."""
    path = tmp / f"{len(list(tmp.glob('*.dcm')))}.dcm"
    path.write_bytes(data)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def rows_of(engine: Engine, table: Any, *where: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).where(*where).order_by(table.c.id))]


def one(engine: Engine, table: Any, *where: Any) -> dict[str, Any]:
    [row] = rows_of(engine, table, *where)
    return row


def events(engine: Engine, kind: EventKind) -> list[dict[str, Any]]:
    return rows_of(engine, t.events, t.events.c.kind == str(kind))


def run_processes(target: Callable[..., Any], *args: Any) -> list[Any]:
    """What `target(*args, name, barrier)` returns in each of PROCESSES forked processes, which
    wait at the barrier to race; an exception in one fails the test with its traceback."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(PROCESSES, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(target, (*args, f"p{k}", barrier), results)) for k in range(PROCESSES)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    failed = [text for ok, text in out if not ok]
    assert not failed, failed[0]
    return [value for _, value in out]


def _child(target: Callable[..., Any], args: tuple[Any, ...], results: Any) -> None:
    try:
        results.put((True, target(*args)))
    except BaseException:
        args[-1].abort()  # the others stop waiting at the barrier
        results.put((False, traceback.format_exc()))


# -- what each racing process does, with its own engine (forked: no connection is shared) -------
def _migrate(url: str, name: str, barrier: Any) -> str:
    engine = make_engine(url)
    barrier.wait()
    try:
        migrate(engine)
    except Exception as exc:  # the answer the test compares
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _record(url: str, name: str, barrier: Any) -> list[str]:
    """Every process receives the first instances of the same new studies and series at once,
    and one instance they all receive (a re-send on another association)."""
    ledger = Ledger(make_engine(url))
    barrier.wait()
    outcomes = []
    for k in range(5):
        for sop in (f"1.2.{k}.{name[1:]}", f"1.2.{k}.99"):
            outcomes.append(ledger.record_instance(header(sop, f"1.4.{k}", f"1.3.{k}"), received(sop)).value)
    return outcomes


def _claim_jobs(url: str, name: str, barrier: Any) -> list[int]:
    queue = JobQueue(make_engine(url))
    barrier.wait()
    claimed = []
    while (job := queue.claim(name)) is not None:
        claimed.append(job.id)
        assert queue.finish(job.id, name, f"2.25.{job.id}", 0, "1.0.0", "onnxruntime", {})
    return claimed


def _claim_deliveries(url: str, name: str, barrier: Any) -> list[int]:
    queue = DeliveryQueue(make_engine(url))
    barrier.wait()
    claimed = []
    while (delivery := queue.claim(name)) is not None:
        claimed.append(delivery.id)
        for item in queue.pending_instances(delivery.id):
            assert queue.record(delivery.id, name, item.id, t.INSTANCE_STORED, 0x0000, "")
        assert queue.finish_attempt(delivery.id, name) == t.DELIVERY_DELIVERED
    return claimed


class _Errors(logging.Handler):
    """The messages of the records logged at ERROR or above while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _complete_and_route(url: str, now: dt.datetime, name: str, barrier: Any) -> tuple[list[str], list[Any]]:
    """Rounds of the completion loop (the sweep, then node/routing.py with a route that forwards
    the originals too), as each host running the `completion` role does them: the errors they
    logged and the (series, job) pairs this process routed."""
    engine = make_engine(url)
    ledger, queue = Ledger(engine, now=lambda: now), JobQueue(engine, now=lambda: now)
    route = RouteConfig("ct", "ct-denoise", ("pacs",), match=RouteMatch(modality="CT"), forward_original=True)
    pacs = DestinationConfig("pacs", "PACS", "127.0.0.1", 104, max_attempts=3)
    routed: list[Any] = []
    loop = CompletionLoop(
        ledger,
        IDLE_S,
        STALE_ASSOCIATION_S / 2,
        after=lambda: routed.extend(route_complete_series(queue, (route,), MAX_ATTEMPTS, (pacs,))),
    )
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    barrier.wait()
    for _ in range(2):
        loop.run_once()
    return errors.messages, [(r.series_instance_uid, r.job_id) for r in routed]


def _sweep(url: str, kind: str, now: dt.datetime, name: str, barrier: Any) -> list[int]:
    engine = make_engine(url)
    queue = JobQueue(engine, now=lambda: now) if kind == "jobs" else DeliveryQueue(engine, now=lambda: now)
    barrier.wait()
    return queue.requeue_stale(60)


class TestStorageContract:
    # -- schema --------------------------------------------------------------------------------
    def test_migrations_reach_head_match_the_schema_and_run_again_harmlessly(self, ledger_url: str) -> None:
        engine = make_engine(ledger_url)
        migrate(engine)
        migrate(engine)
        head = ScriptDirectory.from_config(alembic_config(ledger_url)).get_current_head()
        with engine.connect() as conn:
            context = MigrationContext.configure(conn)
            assert context.get_current_revision() == head
            assert compare_metadata(context, t.metadata) == []  # the migrations build schema.py's tables
        assert set(inspect(engine).get_table_names()) == {*t.metadata.tables, "alembic_version"}
        engine.dispose()

    def test_roles_starting_together_migrate_a_fresh_ledger_once(self, ledger_url: str) -> None:
        assert run_processes(_migrate, ledger_url) == ["ok"] * PROCESSES
        engine = make_engine(ledger_url)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(t.jobs)).scalar() == 0
        engine.dispose()

    # -- receiving -----------------------------------------------------------------------------
    def test_new_duplicate_and_replaced_instances(self, ledger: Ledger, engine: Engine) -> None:
        assert ledger.record_instance(header("1.1"), received("a")) is StoreOutcome.NEW
        assert ledger.record_instance(header("1.1"), received("a")) is StoreOutcome.DUPLICATE
        assert ledger.record_instance(header("1.1"), received("b")) is StoreOutcome.REPLACED
        assert ledger.record_instance(header("1.2", instance_number=None), received("c")) is StoreOutcome.NEW
        assert one(engine, t.instances, t.instances.c.sop_instance_uid == "1.1")["path"] == "b"
        assert ledger.known_paths() == {"a", "b", "c"}
        assert one(engine, t.series)["instance_count"] == 2
        assert len(rows_of(engine, t.studies)) == 1
        assert [e["sop_instance_uid"] for e in events(engine, EventKind.INSTANCE_DUPLICATE)] == ["1.1"]
        [replaced] = events(engine, EventKind.INSTANCE_REPLACED)
        assert replaced["detail"].startswith("sha256 ")

    def test_versions_sent_again_in_turn_are_each_listed_once(self, ledger: Ledger, engine: Engine) -> None:
        """A, B, A, B under one SOP Instance UID (the fuzz test's sender did this): each is
        recorded as a replacement; the current version is not listed as superseded and every
        other version once (the third send failed with a unique-key error, answered 0xA700)."""
        assert ledger.record_instance(header("1.1"), received("a")) is StoreOutcome.NEW
        for path in ("b", "a", "b"):
            assert ledger.record_instance(header("1.1"), received(path)) is StoreOutcome.REPLACED
        assert one(engine, t.instances)["path"] == "b"
        assert [r["path"] for r in rows_of(engine, t.superseded_instances)] == ["a"]
        assert ledger.known_paths() == {"a", "b"}
        assert len(events(engine, EventKind.INSTANCE_REPLACED)) == 3

    def test_an_instance_moved_to_another_series_is_counted_there(self, ledger: Ledger, engine: Engine) -> None:
        ledger.record_instance(header("1.1", "1.2.3.4"), received("a"))
        ledger.record_instance(header("1.1", "1.2.3.5"), received("b"))
        counts = {r["series_instance_uid"]: r["instance_count"] for r in rows_of(engine, t.series)}
        assert counts == {"1.2.3.4": 0, "1.2.3.5": 1}

    def test_a_series_completes_when_quiet_and_its_sender_has_gone(
        self, ledger: Ledger, engine: Engine, clock: Clock
    ) -> None:
        assoc = ledger.open_association("node:104", "CT01", "ENHANCE", "10.0.0.5", 50123, tls=False)
        for k in range(3):
            ledger.record_instance(header(f"1.1.{k}"), received(f"p{k}", association=assoc))
        clock.advance(IDLE_S + 1)
        assert ledger.complete_idle_series(IDLE_S, STALE_ASSOCIATION_S) == []  # the sender is still connected
        ledger.close_association(assoc, "released")
        assert ledger.complete_idle_series(IDLE_S, STALE_ASSOCIATION_S) == ["1.2.3.4"]
        assert ledger.complete_idle_series(IDLE_S, STALE_ASSOCIATION_S) == []
        row = one(engine, t.associations)
        assert (row["instances_stored"], row["outcome"], row["tls"]) == (3, "released", False)
        assert [e["detail"] for e in events(engine, EventKind.SERIES_COMPLETE)] == ["3 instances"]

    def test_a_silent_association_does_not_hold_its_series_back(self, ledger: Ledger, clock: Clock) -> None:
        assoc = ledger.open_association("node:104", "CT01", "ENHANCE", "10.0.0.5", 50123, tls=True)
        ledger.record_instance(header("1.1"), received("a", association=assoc))
        clock.advance(STALE_ASSOCIATION_S + 1)
        assert ledger.complete_idle_series(IDLE_S, STALE_ASSOCIATION_S) == ["1.2.3.4"]

    def test_a_late_instance_reopens_a_complete_series(self, ledger: Ledger, engine: Engine, clock: Clock) -> None:
        add_series(ledger, "1.2.3.4", 2)
        assert complete(ledger, clock) == ["1.2.3.4"]
        ledger.record_instance(header("1.2.3.4.late"), received("late"))
        row = one(engine, t.series)
        assert (row["state"], row["reopened_count"], row["instance_count"]) == (t.SERIES_RECEIVING, 1, 3)
        assert row["completed_at"] is None
        assert [e["detail"] for e in events(engine, EventKind.SERIES_REOPENED)] == ["was complete"]

    def test_associations_a_dead_scp_held_are_closed_as_lost(self, ledger: Ledger, engine: Engine) -> None:
        ledger.open_association("node:104", "CT01", "ENHANCE", "10.0.0.5", 1, tls=False)
        ledger.open_association("node:104", "MR01", "ENHANCE", "10.0.0.6", 2, tls=False)
        ledger.open_association("other:104", "CT02", "ENHANCE", "10.0.0.7", 3, tls=False)
        assert ledger.close_lost_associations("node:104") == 2
        assert ledger.close_lost_associations("node:104") == 0
        assert sorted(e["calling_ae"] for e in events(engine, EventKind.ASSOCIATION_LOST)) == ["CT01", "MR01"]
        assert [r["outcome"] for r in rows_of(engine, t.associations)] == ["lost", "lost", None]

    def test_events_keep_what_they_are_given(self, ledger: Ledger, engine: Engine, clock: Clock) -> None:
        ledger.add_event(EventKind.STORE_REFUSED, calling_ae="CT01", peer_host="10.0.0.5", status=0xA900, detail="x")
        ledger.add_events(EventKind.INSTANCE_MISSING, ["objects/a.dcm", "objects/b.dcm"])
        [refused] = events(engine, EventKind.STORE_REFUSED)
        assert (refused["calling_ae"], refused["status"], refused["at"]) == ("CT01", 0xA900, clock.now)
        assert [e["detail"] for e in events(engine, EventKind.INSTANCE_MISSING)] == ["objects/a.dcm", "objects/b.dcm"]

    def test_processes_receiving_the_same_new_series_at_once_all_succeed(self, ledger_url: str) -> None:
        engine = make_engine(ledger_url)
        migrate(engine)
        engine.dispose()  # nothing open across the fork
        outcomes = Counter(o for process in run_processes(_record, ledger_url) for o in process)
        assert outcomes == {"new": 5 * PROCESSES + 5, "duplicate": 5 * (PROCESSES - 1)}
        counts = {r["series_instance_uid"]: r["instance_count"] for r in rows_of(engine, t.series)}
        assert counts == {f"1.4.{k}": PROCESSES + 1 for k in range(5)}
        assert len(rows_of(engine, t.studies)) == 5
        engine.dispose()

    # -- what a column cannot hold (issue item 7) ----------------------------------------------
    def test_text_no_column_can_hold_is_kept_as_far_as_it_fits(self, ledger: Ledger, engine: Engine) -> None:
        h = header(
            "1.1",
            modality="C\x00T" + "X" * 20,
            series_description="head\x00neck \udcff" + "d" * 100,
            instance_number=999_999_999_999,
        )
        r = received("a", ae="CT\x0001" + "E" * 20, host="h\x00" * 40)
        assert ledger.record_instance(h, r) is StoreOutcome.NEW
        huge = header("1.2", "1.2.3.5", instance_number=2**70)  # SQLite cannot bind it either
        assert ledger.record_instance(huge, received("b")) is StoreOutcome.NEW
        assert ledger.record_instance(h, r) is StoreOutcome.DUPLICATE
        series = one(engine, t.series, t.series.c.series_instance_uid == "1.2.3.4")
        assert series["modality"] == "C?T" + "X" * 13
        assert series["series_description"] == ("head?neck ?" + "d" * 100)[:64]
        assert series["calling_ae"] == "CT?01EEEEEEEEEEE"
        assert [i["instance_number"] for i in rows_of(engine, t.instances)] == [None, None]  # the files keep them
        [duplicate] = events(engine, EventKind.INSTANCE_DUPLICATE)
        assert duplicate["peer_host"] == ("h?" * 40)[:64]

    @pytest.mark.parametrize(
        "changes",
        [
            {"sop_class_uid": "1.2.3.4\x005"},
            {"sop_instance_uid": "1." + "2" * 70},
            {"series_instance_uid": "1.2\x00.3"},
            {"study_instance_uid": "1." + "3" * 63},
            {"transfer_syntax_uid": "1.2.840.10008.1.2.1\x00"},
        ],
    )
    def test_a_uid_the_ledger_cannot_key_on_is_refused_permanently(
        self, ledger: Ledger, engine: Engine, changes: dict[str, str]
    ) -> None:
        with pytest.raises(InvalidDataset) as refused:
            ledger.record_instance(header("1.1", **changes), received("a"))
        assert refused.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert "cannot be kept in the ledger" in str(refused.value)
        assert rows_of(engine, t.instances) == [] and rows_of(engine, t.series) == []
        # ... and its refusal, carrying the UID as sent, is recorded (as far as the columns hold it)
        uid = next(iter(changes.values()))
        ledger.add_event(EventKind.STORE_REFUSED, sop_instance_uid=uid, status=refused.value.status, detail=uid)
        [event] = events(engine, EventKind.STORE_REFUSED)
        assert event["sop_instance_uid"] == t.fitted(uid, 64) and event["detail"] == t.fitted(uid)

    @pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
    def test_hostile_data_sets_are_stored_or_refused_never_a_ledger_error(self, ledger: Ledger, engine: Engine) -> None:
        """The SCP's path without the network: parse_header, then record_instance."""
        stored = {
            "NUL in SeriesDescription": (DESCRIPTION, NUL_DESCRIPTION),
            "byte 0xFF in SeriesDescription": (DESCRIPTION, b"LO\x12\x00Synthetic\xffphantom "),
            "InstanceNumber past 32 bits": (NUMBER, HUGE_NUMBER),
        }
        for what, (old, new) in stored.items():
            h = parse_header(part10(old, new))
            assert ledger.record_instance(h, received(what)) is StoreOutcome.NEW, what
        descriptions = {r["series_description"] for r in rows_of(engine, t.series)}
        assert descriptions == {"Synthetic?phantom", "Synthetic\xffphantom", "Synthetic phantom"}
        assert {i["instance_number"] for i in rows_of(engine, t.instances)} == {1, None}
        with pytest.raises(InvalidDataset) as refused:
            parse_header(part10(sop_class="1.2.3.4\x005"))  # a private class a peer negotiated
        assert refused.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert str(refused.value) == "SOPClassUID holds characters a UID may not"

    @pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
    def test_the_scp_stores_or_refuses_hostile_values_and_records_each_refusal(
        self, ledger_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A running node on this backend, over real associations (the PostgreSQL ledger
        answered 0xA700 to the first and the last, and could not record the last's refusal)."""
        monkeypatch.setenv(ENV_LEDGER_URL, ledger_url)
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes as they are
        port = free_port()
        config = toml_config(tmp_path, port, receive_processes=1, extra_node="accept_unknown_sop_classes = true")
        cases = {
            "nul": (CTImageStorage, part10(DESCRIPTION, NUL_DESCRIPTION)),
            "number": (CTImageStorage, part10(NUMBER, HUGE_NUMBER)),
            "class": ("1.2.3.4\x005", part10(sop_class="1.2.3.4\x005")),
        }
        node = NodeProcess(config, port, tmp_path).start()
        try:
            answers = {what: c_store(port, sop_class, tmp_path, data) for what, (sop_class, data) in cases.items()}
        finally:
            node.stop()
        assert answers == {"nul": 0x0000, "number": 0x0000, "class": 0xA900}
        engine = make_engine(ledger_url)
        assert {r["series_description"] for r in rows_of(engine, t.series)} == {
            "Synthetic?phantom",
            "Synthetic phantom",
        }
        [refused] = events(engine, EventKind.STORE_REFUSED)
        assert (refused["status"], refused["detail"]) == (0xA900, "SOPClassUID holds characters a UID may not")
        engine.dispose()

    def test_a_worker_or_peer_text_no_column_can_hold_never_stops_a_queue(
        self, ledger: Ledger, jobs: JobQueue, deliveries: DeliveryQueue, engine: Engine, clock: Clock
    ) -> None:
        worker = "worker\x00" + "w" * 200  # a host name no column holds whole
        [job_id, other] = queued_jobs(ledger, jobs, clock, 2, (PACS,))
        assert jobs.claim(worker) is not None
        assert jobs.heartbeat(job_id, worker)
        error = "decoder said \x00\udcff " + "e" * 3000
        assert jobs.fail(job_id, worker, error, permanent=False) == t.JOB_QUEUED
        assert one(engine, t.jobs, t.jobs.c.id == job_id)["error"].startswith("decoder said ?? eee")
        assert jobs.claim(worker) is not None  # the other job: the first waits for its backoff
        assert jobs.finish(other, worker, "2.25.1", 3, "1.0.0-" + "x" * 40, "onnxruntime\x00", {}, OUTPUTS)
        row = one(engine, t.jobs, t.jobs.c.id == other)
        assert (row["model_version"], row["backend"]) == (("1.0.0-" + "x" * 40)[:32], "onnxruntime?")
        sender = "sender\x00" + "s" * 200
        delivery = deliveries.claim(sender)
        assert delivery is not None
        first = deliveries.pending_instances(delivery.id)[0]
        comment = "PACS says \x00 no" + "!" * 1000
        assert deliveries.record(delivery.id, sender, first.id, t.INSTANCE_FAILED, 0xA700, comment)
        assert deliveries.finish_attempt(delivery.id, sender, "association aborted \x00") == t.DELIVERY_PENDING
        detail = one(engine, t.delivery_instances, t.delivery_instances.c.id == first.id)["detail"]
        assert detail.startswith("PACS says ? no!!!")
        assert one(engine, t.deliveries)["error"] == "association aborted ?"

    # -- jobs ----------------------------------------------------------------------------------
    def test_routing_gives_each_complete_series_one_job_or_a_reason(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        add_series(ledger, "1.2.3.100", 2)
        add_series(ledger, "1.2.3.101", modality="SR")
        add_series(ledger, "1.2.3.102", modality="OT")
        complete(ledger, clock)
        routed = {r.series_instance_uid: r.job_id for r in jobs.route_complete_series(assigner(), MAX_ATTEMPTS)}
        assert routed["1.2.3.101"] is None and routed["1.2.3.102"] is None
        assert jobs.route_complete_series(assigner(), MAX_ATTEMPTS) == []  # routed once
        job = one(engine, t.jobs)
        assert (job["id"], job["state"], job["attempts"], job["max_attempts"]) == (routed["1.2.3.100"], "queued", 0, 3)
        assert [r["state"] for r in rows_of(engine, t.series)] == [t.SERIES_ROUTED] * 3
        assert [e["detail"] for e in events(engine, EventKind.SERIES_SKIPPED)] == ["no model applies to SR"]
        assert [e["series_instance_uid"] for e in events(engine, EventKind.SERIES_UNROUTED)] == ["1.2.3.102"]
        assert len(events(engine, EventKind.JOB_QUEUED)) == 1
        assert jobs.instance_paths(job["series_id"]) == ["1.2.3.100.0", "1.2.3.100.1"]

    def test_a_reopened_series_is_routed_again_as_a_new_generation(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        [first] = queued_jobs(ledger, jobs, clock, 1)
        ledger.record_instance(header("late", "1.2.3.100"), received("late"))
        complete(ledger, clock)
        [again] = jobs.route_complete_series(assigner(), MAX_ATTEMPTS)
        assert again.job_id not in (None, first)
        assert [j["generation"] for j in rows_of(engine, t.jobs)] == [0, 1]

    def test_forwarded_originals_get_their_deliveries_at_routing(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        add_series(ledger, "1.2.3.100", 2)
        complete(ledger, clock)
        [routed] = jobs.route_complete_series(assigner((PACS, ARCHIVE), forward_original=True), MAX_ATTEMPTS)
        made = rows_of(engine, t.deliveries)
        assert [(d["destination"], d["kind"], d["instance_count"]) for d in made] == [
            ("pacs", t.DELIVER_ORIGINAL, 2),
            ("archive", t.DELIVER_ORIGINAL, 2),
        ]
        assert {d["job_id"] for d in made} == {routed.job_id}
        assert len(rows_of(engine, t.delivery_instances)) == 4

    def test_forwarded_originals_go_in_instance_number_order_unnumbered_last(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        for sop, number in (("1.9.1", 2), ("1.9.2", None), ("1.9.3", 1)):
            ledger.record_instance(header(sop, "1.2.3.100", instance_number=number), received(sop))
        complete(ledger, clock)
        jobs.route_complete_series(assigner((PACS,), forward_original=True), MAX_ATTEMPTS)
        assert [i["sop_instance_uid"] for i in rows_of(engine, t.delivery_instances)] == ["1.9.3", "1.9.1", "1.9.2"]

    def test_processes_completing_and_routing_the_same_series_at_once_make_one_job_each_and_log_no_error(
        self, ledger: Ledger, engine: Engine, clock: Clock
    ) -> None:
        """Every host with the `completion` role sweeps the one ledger: each series is completed
        and routed by one of them, with one job, one set of forwarded originals and one event of
        each kind; the others find nothing to do (no unique-key failure, nothing logged)."""
        uids = [f"1.2.3.{100 + k}" for k in range(16)]
        for uid in uids:
            add_series(ledger, uid, 3)
        engine.dispose()
        later = clock.now + dt.timedelta(seconds=IDLE_S + 1)
        results = run_processes(_complete_and_route, url_of(engine), later)
        assert [errors for errors, _ in results] == [[]] * PROCESSES
        routed = [pair for _, pairs in results for pair in pairs]
        assert sorted(uid for uid, _ in routed) == uids  # each series by one process
        jobs_made = rows_of(engine, t.jobs)
        assert sorted(job_id for _, job_id in routed) == [j["id"] for j in jobs_made]
        assert len(jobs_made) == len(uids) and {j["generation"] for j in jobs_made} == {0}
        forwarded = rows_of(engine, t.deliveries)
        assert sorted(d["job_id"] for d in forwarded) == [j["id"] for j in jobs_made]
        assert len(rows_of(engine, t.delivery_instances)) == 3 * len(uids)
        assert {r["state"] for r in rows_of(engine, t.series)} == {t.SERIES_ROUTED}
        for kind in (EventKind.SERIES_COMPLETE, EventKind.JOB_QUEUED):
            assert len(events(engine, kind)) == len(uids), kind

    def test_a_job_is_claimed_heartbeaten_and_finished_by_its_worker_only(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        [first, second] = queued_jobs(ledger, jobs, clock, 2, (PACS, ARCHIVE))
        job = jobs.claim("w1")
        assert job is not None
        assert (job.id, job.series_instance_uid, job.route, job.model, job.attempts) == (
            first,
            "1.2.3.100",
            "ct",
            "ct-denoise",
            1,
        )
        assert (job.strength, job.on_qa_fail) == ("high", "fail")
        assert not jobs.heartbeat(first, "w2") and jobs.heartbeat(first, "w1")
        assert jobs.record_qa(first, "w1", {"passed": False, "figures": {"bias_hu": 3.5}}, "bias 3.5 HU")
        assert not jobs.finish(first, "w2", "2.25.1", 3, "1.0.0", "onnxruntime", {}, OUTPUTS)
        assert jobs.finish(first, "w1", "2.25.1", 3, "1.0.0", "onnxruntime", {"infer": 1.23456}, OUTPUTS)
        assert not jobs.heartbeat(first, "w1")
        row = one(engine, t.jobs, t.jobs.c.id == first)
        assert (row["state"], row["output_series_uid"], row["output_count"]) == (t.JOB_DONE, "2.25.1", 3)
        assert row["timings"] == '{"infer": 1.235}' and '"bias_hu": 3.5' in row["qa"]
        made = rows_of(engine, t.deliveries)
        assert [(d["destination"], d["kind"], d["state"]) for d in made] == [
            ("pacs", t.DELIVER_DERIVED, t.DELIVERY_PENDING),
            ("archive", t.DELIVER_DERIVED, t.DELIVERY_PENDING),
        ]
        assert len(events(engine, EventKind.JOB_QA_WARNING)) == 1
        assert len(events(engine, EventKind.JOB_DONE)) == 1
        nxt = jobs.claim("w2")
        assert nxt is not None and nxt.id == second
        assert jobs.claim("w3") is None

    def test_a_failed_job_waits_its_backoff_then_fails_for_good(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        [job_id] = queued_jobs(ledger, jobs, clock, 1)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            job = jobs.claim("w1")
            assert job is not None and job.attempts == attempt
            expected = t.JOB_QUEUED if attempt < MAX_ATTEMPTS else t.JOB_FAILED
            assert jobs.fail(job_id, "w1", f"timeout {attempt}", permanent=False) == expected
            assert jobs.claim("w1") is None  # waiting out its backoff, or failed
            clock.advance(601)
        row = one(engine, t.jobs)
        assert (row["state"], row["attempts"], row["error"]) == (t.JOB_FAILED, 3, "timeout 3")
        assert len(events(engine, EventKind.JOB_RETRY)) == 2 and len(events(engine, EventKind.JOB_FAILED)) == 1
        assert jobs.fail(job_id, "w1", "late", permanent=True) is None  # no longer this worker's

    def test_a_permanent_error_fails_a_job_at_once_and_an_admin_resubmits_it(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        [job_id] = queued_jobs(ledger, jobs, clock, 1)
        assert jobs.claim("w1") is not None
        assert jobs.fail(job_id, "w1", "bad data", permanent=True) == t.JOB_FAILED
        assert jobs.resubmit(job_id) == (True, [])
        assert jobs.resubmit(job_id) == (False, [])
        row = one(engine, t.jobs)
        assert (row["state"], row["attempts"]) == (t.JOB_QUEUED, 0)
        assert len(events(engine, EventKind.JOB_RESUBMITTED)) == 1

    def test_an_admin_cancels_a_job_and_its_open_deliveries(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        add_series(ledger, "1.2.3.100")
        complete(ledger, clock)
        [routed] = jobs.route_complete_series(assigner((PACS,), forward_original=True), MAX_ATTEMPTS)
        assert routed.job_id is not None
        [delivery] = rows_of(engine, t.deliveries)
        assert jobs.claim("w1") is not None
        assert jobs.cancel(routed.job_id) == (True, [delivery["id"]])
        assert not jobs.heartbeat(routed.job_id, "w1")
        assert jobs.cancel(routed.job_id) == (False, [])
        assert one(engine, t.jobs)["error"] == "cancelled by an admin"
        assert one(engine, t.deliveries)["state"] == t.DELIVERY_FAILED
        assert jobs.resubmit(routed.job_id) == (True, [delivery["id"]])
        assert one(engine, t.deliveries)["state"] == t.DELIVERY_PENDING

    def test_a_job_whose_worker_died_is_requeued_then_fails_on_its_last_attempt(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        [job_id] = queued_jobs(ledger, jobs, clock, 1)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            assert jobs.claim(f"w{attempt}") is not None
            clock.advance(30)
            assert jobs.heartbeat(job_id, f"w{attempt}")
            assert jobs.requeue_stale(60) == []  # alive
            clock.advance(61)
            assert jobs.requeue_stale(60) == ([job_id] if attempt < MAX_ATTEMPTS else [])
        row = one(engine, t.jobs)
        assert (row["state"], row["attempts"], row["worker"]) == (t.JOB_FAILED, 3, None)
        assert "no heartbeat" in row["error"]
        assert len(events(engine, EventKind.JOB_REQUEUED)) == 2

    def test_each_job_is_claimed_once_by_workers_racing_in_several_processes(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        ids = queued_jobs(ledger, jobs, clock, 24)
        engine.dispose()  # nothing open across the fork
        claimed = [job_id for process in run_processes(_claim_jobs, url_of(engine)) for job_id in process]
        assert sorted(claimed) == ids  # every job, none twice
        assert {(r["state"], r["attempts"]) for r in rows_of(engine, t.jobs)} == {(t.JOB_DONE, 1)}
        assert len(events(engine, EventKind.JOB_STARTED)) == len(ids)

    def test_sweepers_racing_in_several_processes_requeue_a_stale_job_once(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        ids = queued_jobs(ledger, jobs, clock, 6)
        for _ in ids:
            assert jobs.claim("w1") is not None
        engine.dispose()
        later = clock.now + dt.timedelta(seconds=61)
        requeued = [i for process in run_processes(_sweep, url_of(engine), "jobs", later) for i in process]
        assert sorted(requeued) == ids
        assert len(events(engine, EventKind.JOB_REQUEUED)) == len(ids)

    # -- deliveries ----------------------------------------------------------------------------
    def test_a_delivery_records_each_instance_and_retries_only_what_is_not_stored(
        self, ledger: Ledger, jobs: JobQueue, deliveries: DeliveryQueue, engine: Engine, clock: Clock
    ) -> None:
        [delivery_id] = pending_deliveries(ledger, jobs, clock, 1)
        delivery = deliveries.claim("s1")
        assert delivery is not None
        assert (delivery.id, delivery.destination, delivery.kind, delivery.attempts) == (
            delivery_id,
            "pacs",
            "derived",
            1,
        )
        assert deliveries.claim("s2") is None
        items = deliveries.pending_instances(delivery_id)
        assert [i.sop_instance_uid for i in items] == [o.sop_instance_uid for o in OUTPUTS]
        assert not deliveries.record(delivery_id, "s2", items[0].id, t.INSTANCE_STORED, 0x0000, "")
        assert deliveries.record(delivery_id, "s1", items[0].id, t.INSTANCE_STORED, 0x0000, "")
        assert deliveries.record(delivery_id, "s1", items[1].id, t.INSTANCE_WARNING, 0xB007, "coerced")
        assert deliveries.record(delivery_id, "s1", items[2].id, t.INSTANCE_FAILED, 0xA700, "out of resources")
        assert deliveries.heartbeat(delivery_id, "s1") and not deliveries.heartbeat(delivery_id, "s2")
        assert deliveries.finish_attempt(delivery_id, "s1") == t.DELIVERY_PENDING
        row = one(engine, t.deliveries)
        assert (row["stored_count"], row["warning_count"], row["error"]) == (2, 1, "1 instances not stored")
        assert row["next_attempt_at"] > clock.now
        assert deliveries.claim("s1") is None  # backoff
        clock.advance(61)
        again = deliveries.claim("s1")
        assert again is not None and again.attempts == 2
        [left] = deliveries.pending_instances(delivery_id)
        assert left.id == items[2].id
        assert deliveries.record(delivery_id, "s1", left.id, t.INSTANCE_STORED, 0x0000, "")
        assert deliveries.finish_attempt(delivery_id, "s1") == t.DELIVERY_DELIVERED
        assert deliveries.finish_attempt(delivery_id, "s1") is None
        assert len(events(engine, EventKind.DELIVERY_RETRY)) == 1
        assert len(events(engine, EventKind.DELIVERY_DELIVERED)) == 1

    def test_a_delivery_fails_after_its_attempts_and_only_known_destinations_are_claimed(
        self, ledger: Ledger, jobs: JobQueue, deliveries: DeliveryQueue, engine: Engine, clock: Clock
    ) -> None:
        [delivery_id] = pending_deliveries(ledger, jobs, clock, 1)
        assert deliveries.claim("s1", destinations=["archive"]) is None
        for attempt in range(1, PACS.max_attempts + 1):
            assert deliveries.claim("s1", destinations=["pacs"]) is not None
            state = deliveries.finish_attempt(delivery_id, "s1", "association refused")
            assert state == (t.DELIVERY_PENDING if attempt < PACS.max_attempts else t.DELIVERY_FAILED)
            clock.advance(61)
        assert deliveries.claim("s1") is None
        row = one(engine, t.deliveries)
        assert (row["state"], row["attempts"], row["error"]) == (t.DELIVERY_FAILED, 3, "association refused")
        [listed] = reports.list_jobs(engine, t.JOB_DONE)
        assert (listed["deliveries"], listed["delivered"], listed["delivery_failed"]) == (1, 0, 1)

    def test_stale_and_abandoned_deliveries_resume(
        self, ledger: Ledger, jobs: JobQueue, deliveries: DeliveryQueue, engine: Engine, clock: Clock
    ) -> None:
        [stale, abandoned] = pending_deliveries(ledger, jobs, clock, 2)
        assert deliveries.claim("other-host:104/7") is not None
        assert deliveries.claim("node:104/1234") is not None
        clock.advance(10)
        assert deliveries.requeue_abandoned("node:104/", "node:104/5678", quiet_s=5) == [abandoned]
        assert one(engine, t.deliveries, t.deliveries.c.id == abandoned)["attempts"] == 0  # the node failed
        assert deliveries.claim("node:104/5678/0") is not None  # a slot of the process itself
        clock.advance(10)
        assert deliveries.requeue_abandoned("node:104/", "node:104/5678", quiet_s=5) == []
        assert deliveries.requeue_abandoned("node:104/", "node:104/567", quiet_s=5) == [
            abandoned
        ]  # PID 567 is not 5678
        clock.advance(60)
        assert deliveries.requeue_stale(60) == [stale]
        assert one(engine, t.deliveries, t.deliveries.c.id == stale)["attempts"] == 1
        assert len(events(engine, EventKind.DELIVERY_REQUEUED)) == 3

    def test_host_ids_differing_only_in_case_are_different_hosts(
        self, ledger: Ledger, jobs: JobQueue, deliveries: DeliveryQueue, clock: Clock
    ) -> None:
        """A restarted node takes back only its own deliveries: SQLite's LIKE (what startswith
        compiles to) ignores ASCII case unless told otherwise, PostgreSQL's does not."""
        [theirs, mine] = pending_deliveries(ledger, jobs, clock, 2)
        assert deliveries.claim("NODE:104/1") is not None
        assert deliveries.claim("node:104/2") is not None
        clock.advance(10)
        assert deliveries.requeue_abandoned("node:104/", "node:104/3", quiet_s=5) == [mine]
        assert deliveries.requeue_abandoned("NODE:104/", "NODE:104/3", quiet_s=5) == [theirs]

    def test_each_delivery_is_claimed_once_by_senders_racing_in_several_processes(
        self, ledger: Ledger, jobs: JobQueue, engine: Engine, clock: Clock
    ) -> None:
        ids = pending_deliveries(ledger, jobs, clock, 16)
        engine.dispose()
        claimed = [i for process in run_processes(_claim_deliveries, url_of(engine)) for i in process]
        assert sorted(claimed) == ids
        assert {(r["state"], r["attempts"]) for r in rows_of(engine, t.deliveries)} == {(t.DELIVERY_DELIVERED, 1)}
        assert {r["attempts"] for r in rows_of(engine, t.delivery_instances)} == {1}

    def test_sweepers_racing_in_several_processes_requeue_a_stale_delivery_once(
        self, ledger: Ledger, jobs: JobQueue, deliveries: DeliveryQueue, engine: Engine, clock: Clock
    ) -> None:
        ids = pending_deliveries(ledger, jobs, clock, 6)
        for _ in ids:
            assert deliveries.claim("s1") is not None
        engine.dispose()
        later = clock.now + dt.timedelta(seconds=61)
        requeued = [i for process in run_processes(_sweep, url_of(engine), "deliveries", later) for i in process]
        assert sorted(requeued) == ids
        assert len(events(engine, EventKind.DELIVERY_REQUEUED)) == len(ids)

    # -- what the CLI and the dashboard read ---------------------------------------------------
    def test_reports_answer_the_same_on_every_backend(
        self, ledger: Ledger, jobs: JobQueue, deliveries: DeliveryQueue, engine: Engine, clock: Clock
    ) -> None:
        since = clock.now
        ledger.record_instance(header("1.1.2", instance_number=2), received("b"))
        ledger.record_instance(header("1.1.1", instance_number=1), received("a"))
        ledger.record_instance(header("1.1.0", instance_number=None), received("n"))  # sorted last
        add_series(ledger, "1.2.3.9", modality="SR")
        complete(ledger, clock)
        routed = {r.series_instance_uid: r.job_id for r in jobs.route_complete_series(assigner((PACS,)), MAX_ATTEMPTS)}
        job_id = routed["1.2.3.4"]
        assert job_id is not None
        assert jobs.claim("w1") is not None
        assert jobs.finish(job_id, "w1", "2.25.1", 3, "1.0.0", "onnxruntime", {"infer": 2.0}, OUTPUTS)
        delivery = deliveries.claim("s1")
        assert delivery is not None
        items = deliveries.pending_instances(delivery.id)
        assert deliveries.record(delivery.id, "s1", items[0].id, t.INSTANCE_WARNING, 0xB007, "coerced")
        assert deliveries.record(delivery.id, "s1", items[1].id, t.INSTANCE_FAILED, 0xA700, "full")
        assert deliveries.finish_attempt(delivery.id, "s1") == t.DELIVERY_PENDING

        [listed] = reports.list_jobs(engine)
        assert (listed["id"], listed["state"], listed["series_instance_uid"], listed["modality"]) == (
            job_id,
            t.JOB_DONE,
            "1.2.3.4",
            "CT",
        )
        assert (listed["deliveries"], listed["delivered"], listed["delivery_failed"]) == (1, 0, 0)
        assert reports.list_jobs(engine, t.JOB_FAILED) == []
        [skipped] = reports.list_skipped(engine)
        assert (skipped["series_instance_uid"], skipped["skip_reason"]) == ("1.2.3.9", "no model applies to SR")
        assert reports.job_exists(engine, job_id) and not reports.job_exists(engine, job_id + 100)
        detail = reports.job_detail(engine, job_id)
        assert detail is not None and reports.job_detail(engine, job_id + 100) is None
        assert (detail.job["calling_ae"], detail.job["output_count"]) == ("CT01", 3)
        assert [(p["outcome"], p["status"]) for p in detail.problems] == [("warning", 0xB007), ("failed", 0xA700)]
        assert [d["state"] for d in detail.deliveries] == [t.DELIVERY_PENDING]
        figures = reports.overview(engine, since)
        assert figures["per_hour"] == [("2026-11-23 12:00", 4)]
        assert figures["jobs"] == {t.JOB_DONE: 1} and figures["deliveries"] == {t.DELIVERY_PENDING: 1}
        assert figures["series"] == {t.SERIES_ROUTED: 2}
        assert (figures["queue_depth"], figures["last_backend"]) == (1, "onnxruntime")
        studies = reports.list_studies(engine)
        assert [(s["study_instance_uid"], s["series"], s["instances"]) for s in studies] == [("1.2.3", 2, 4)]
        assert studies[0]["last_received_at"].tzinfo is dt.UTC
        series = reports.list_series(engine, study_id=studies[0]["id"])
        assert [s["series_instance_uid"] for s in series] == ["1.2.3.9", "1.2.3.4"]
        sources = reports.source_instances(engine, routed_series_id(engine))
        assert [s["sop_instance_uid"] for s in sources] == ["1.1.1", "1.1.2", "1.1.0"]
        timeline = reports.series_detail(engine, routed_series_id(engine))
        assert timeline is not None and reports.series_detail(engine, 999) is None
        kinds = [e["kind"] for e in timeline["timeline"]]
        assert kinds[:3] == [EventKind.SERIES_COMPLETE, EventKind.JOB_QUEUED, EventKind.JOB_STARTED]
        assert EventKind.JOB_DONE in kinds and EventKind.DELIVERY_RETRY in kinds
        assert [r["outcome"] for r in reports.delivery_instances(engine, delivery.id)] == [
            "warning",
            "failed",
            "pending",
        ]

    def test_the_dashboards_metrics_count_the_same_on_every_backend(
        self, ledger: Ledger, engine: Engine, tmp_path: Path
    ) -> None:
        ledger.record_instance(header("1.1"), received("a" * 10))
        ledger.record_instance(header("1.1"), received("b" * 20))  # replaced: both versions kept
        ledger.add_event(EventKind.STORE_REFUSED, status=0xA900, detail="bad uid")
        registry = CollectorRegistry()
        registry.register(LedgerCollector(engine, tmp_path))
        text = generate_latest(registry).decode()
        assert "enhance_instances_received_total 2.0" in text
        assert "enhance_received_bytes_total 30.0" in text
        assert 'enhance_refusals_total{kind="store.refused",status="0xA900"} 1.0' in text


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def routed_series_id(engine: Engine) -> int:
    return int(one(engine, t.series, t.series.c.series_instance_uid == "1.2.3.4")["id"])
