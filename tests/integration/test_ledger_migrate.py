"""`enhance-node ledger migrate --to URL` (storage/transfer.py, docs/deployment.md): an SQLite
ledger with real rows in every table, written through the node's own ledger APIs (instances,
a replaced version, associations, events, series in each state, jobs queued, running, done and
failed, deliveries pending, sending, delivered and failed, per-instance results) is copied
into a fresh database on a real PostgreSQL server by the console script; every table is then
compared row by row, and the PostgreSQL ledger takes new rows through the same APIs (its
sequences continue after the copied ids). The refusals: a target holding data, unusable URLs,
a source at an older or newer schema revision, and a running node (a real `enhance-node serve`)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import Engine, Row, column, select, table, update
from sqlalchemy.engine import make_url

from core.header import InstanceHeader
from node.cli import main
from node.config import DestinationConfig, RouteConfig
from node.routing import route_complete_series
from storage import schema as t
from storage.db import alembic_config, make_engine, migrate
from storage.deliveries import DeliveryQueue, Outgoing
from storage.jobs import JobQueue
from storage.ledger import EventKind, Ledger, Received, StoredFile, StoreOutcome
from tests.helpers import REPO, Clock
from tests.postgres import PostgresServer

PASSWORD = "s3cret-Pw"  # trust authentication ignores it; it must never be printed
DESTINATIONS = (
    DestinationConfig("pacs", "PACS", "127.0.0.1", 4242, max_attempts=3),
    DestinationConfig("archive", "ARCHIVE", "127.0.0.1", 4243, max_attempts=1),
)
ROUTE = RouteConfig("ct", "ct-denoise", ("pacs", "archive"))
CT = CTImageStorage
SERIES = [f"1.2.826.0.1.3680043.2.1.{k}" for k in range(6)]


def header(series: str, k: int, study: str = "1.2.826.0.1.3680043.2") -> InstanceHeader:
    return InstanceHeader(CT, f"{series}.{k}", study, series, ExplicitVRLittleEndian, "CT", "Chest", k)


def received(path: str, association: int | None) -> Received:
    return Received(
        StoredFile(path, hashlib.sha256(path.encode()).hexdigest(), 1000 + len(path)), "CT01", "10.0.0.5", association
    )


def build_ledger(url: str, clock: Clock) -> None:
    """A ledger as a node leaves it after a busy morning and a kill -9 (work still in flight)."""
    engine = make_engine(url)
    migrate(engine)
    ledger = Ledger(engine, now=clock)
    jobs = JobQueue(engine, now=clock, rng=random.Random(0))
    sends = DeliveryQueue(engine, now=clock, rng=random.Random(0))
    scanner = ledger.open_association("node-a:11112", "CT01", "ENHANCE", "10.0.0.5", 50000, tls=False)
    other = ledger.open_association("node-a:11112", "CT02", "ENHANCE", "10.0.0.6", 50001, tls=True)
    for series in SERIES[:5]:
        for k in range(1, 4):
            clock.advance(0.25)
            assert ledger.record_instance(header(series, k), received(f"objects/{series}/{k}.dcm", scanner))
    first = header(SERIES[0], 1)
    assert ledger.record_instance(first, received(f"objects/{SERIES[0]}/1-v2.dcm", scanner)) == StoreOutcome.REPLACED
    ledger.close_association(scanner, "released")
    clock.advance(31)
    assert len(ledger.complete_idle_series(30, 120)) == 5
    routed = route_complete_series(jobs, [ROUTE], 3, DESTINATIONS)
    job_ids = sorted(r.job_id for r in routed if r.job_id is not None)
    assert len(job_ids) == 5
    ledger.record_instance(header(SERIES[5], 1), received(f"objects/{SERIES[5]}/1.dcm", other))  # still receiving
    ledger.add_event(EventKind.TEMP_DISCARDED, detail="3 interrupted writes")

    def outputs(job: int) -> list[Outgoing]:
        return [Outgoing(f"2.25.{job}.{k}", CT, ExplicitVRLittleEndian, f"outbox/2.25.{job}/{k}.dcm") for k in range(2)]

    done, sending, failed, running = job_ids[:4]  # the fifth stays queued
    for job in (done, sending):
        claimed = jobs.claim("node-a:11112/worker-0/1")
        assert claimed is not None and claimed.id == job
        assert jobs.finish(
            job, "node-a:11112/worker-0/1", f"2.25.{job}", 2, "2.0.0", "onnxruntime", {"infer": 1.5}, outputs(job)
        )
    pacs = sends.claim("s1", ["pacs"])  # the first done job's: delivered
    assert pacs is not None and pacs.job_id == done
    for inst in sends.pending_instances(pacs.id):
        assert sends.record(pacs.id, "s1", inst.id, t.INSTANCE_STORED, 0x0000, "")
    assert sends.finish_attempt(pacs.id, "s1") == t.DELIVERY_DELIVERED
    archive = sends.claim("s1", ["archive"])  # refused by its only attempt: failed
    assert archive is not None and archive.job_id == done
    inst = sends.pending_instances(archive.id)[0]
    assert sends.record(archive.id, "s1", inst.id, t.INSTANCE_FAILED, 0xA700, "Out of resources")
    assert sends.finish_attempt(archive.id, "s1", "0xA700 Out of resources") == t.DELIVERY_FAILED
    in_flight = sends.claim("s1", ["pacs"])  # the second's: sending when the node was killed
    assert in_flight is not None and in_flight.job_id == sending
    for _ in (failed, running):
        assert jobs.claim("node-a:11112/worker-0/1") is not None
    assert (
        jobs.fail(failed, "node-a:11112/worker-0/1", "model ct-denoise cannot be loaded", permanent=True)
        == t.JOB_FAILED
    )
    engine.dispose()


def all_rows(engine: Engine) -> dict[str, list[Row[Any]]]:
    """Every table's rows in id order, as the schema's column types read them (rows compare
    as tuples, whichever backend they came from)."""
    with engine.connect() as conn:
        return {
            tb.name: list(conn.execute(select(tb).order_by(*tb.primary_key.columns))) for tb in t.metadata.sorted_tables
        }


@pytest.fixture
def source(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    build_ledger(url, Clock())
    return url


def migrate_cli(source: str, to: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script as an admin runs it, the source ledger named by the environment."""
    env = {**os.environ, "ENHANCE_NODE_LEDGER_URL": source}
    env.pop("ENHANCE_NODE_CONFIG", None)
    argv = [sys.executable, "-m", "node.cli", "ledger", "migrate", "--to", to]
    return subprocess.run(
        argv, cwd=cwd, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120
    )


def run_main(
    argv: list[str], source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """The command in this process (faster than a console script): exit code, stdout + stderr."""
    monkeypatch.setenv("ENHANCE_NODE_LEDGER_URL", source)
    monkeypatch.delenv("ENHANCE_NODE_CONFIG", raising=False)
    monkeypatch.chdir(Path(make_url(source).database or ".").parent)  # no ./config.toml there
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_migrate_copies_every_row_to_postgresql_which_then_takes_new_rows(
    source: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database = postgres_server.create_database()
    plain = postgres_server.url(database)
    url = make_url(plain).set(password=PASSWORD).render_as_string(hide_password=False)
    try:
        done = migrate_cli(source, url, tmp_path)
        assert done.returncode == 0, done.stderr
        assert PASSWORD not in done.stdout + done.stderr
        assert "postgres:***@" in done.stdout
        assert "verified" in done.stdout and "1 jobs running, 1 deliveries sending, 1 associations open" in done.stdout

        sqlite, pg = make_engine(source), make_engine(url)
        before = all_rows(sqlite)
        after = all_rows(pg)
        assert set(after) == {tb.name for tb in t.metadata.sorted_tables}
        for name, rows in before.items():
            assert rows, f"the source has no {name} rows: the test would prove nothing"
            assert after[name] == rows, name
        assert {r.state for r in before["jobs"]} == {"queued", "running", "done", "failed"}
        assert {r.state for r in before["deliveries"]} == {"pending", "sending", "delivered", "failed"}
        for name, rows in before.items():  # the summary counts each table
            assert re.search(rf"^  {name} +{len(rows)}$", done.stdout, re.MULTILINE), done.stdout

        # the copy is a working ledger: new rows get new ids (sequences continue), work resumes
        clock = Clock()
        clock.advance(3600)
        ledger, jobs = Ledger(pg, now=clock), JobQueue(pg, now=clock, rng=random.Random(0))
        claimed = jobs.claim("node-b:11112/worker-0/1")
        assert claimed is not None and [claimed.id] == [r.id for r in before["jobs"] if r.state == "queued"]
        late = header(SERIES[5], 2)
        assert ledger.record_instance(late, received(f"objects/{SERIES[5]}/2.dcm", 1)) == StoreOutcome.NEW
        new_study = header("1.2.826.0.1.3680043.2.1.99", 1, study="1.2.826.0.1.3680043.3")
        assert ledger.record_instance(new_study, received("objects/99/1.dcm", 1)) == StoreOutcome.NEW
        ledger.add_event(EventKind.TEMP_DISCARDED, detail="after the move")
        assert jobs.requeue_stale(60) == [r.id for r in before["jobs"] if r.state == "running"]  # killed: stale
        grown = all_rows(pg)
        for name in ("instances", "series", "studies", "events"):
            new_ids = [r.id for r in grown[name][len(before[name]) :]]
            assert new_ids and min(new_ids) == max(r.id for r in before[name]) + 1, name
        assert len(grown["instances"]) == len(before["instances"]) + 2

        # a second run finds the target holding data and leaves it alone
        sqlite.dispose()  # (an open connection would be refused as a running node)
        code, out = run_main(["ledger", "migrate", "--to", url], source, monkeypatch, capsys)
        assert code == 2 and "already holds ledger rows" in out and "migrate only into an empty database" in out
        assert PASSWORD not in out
        assert all_rows(pg) == grown
        pg.dispose()
    finally:
        postgres_server.drop_database(database)


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("not a url", "--to: not a database URL"),
        ("mysql+pymysql://enhance:pw@db/enhance", "'mysql' databases are not supported"),
        ("sqlite://", "an SQLite target must name a file"),
    ],
)
def test_unusable_target_urls_are_refused_with_exit_2(
    source: str, to: str, reason: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_main(["ledger", "migrate", "--to", to], source, monkeypatch, capsys)
    assert code == 2 and reason in out
    assert len(out.strip().splitlines()) == 1, out


def test_the_source_itself_and_a_postgresql_source_are_refused(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run_main(["ledger", "migrate", "--to", source], source, monkeypatch, capsys)
    assert code == 2 and "names the ledger being migrated" in out
    pg = f"postgresql+psycopg://enhance:{PASSWORD}@127.0.0.1:1/enhance"
    code, out = run_main(["ledger", "migrate", "--to", source + ".copy"], pg, monkeypatch, capsys)
    assert code == 2 and "not an embedded SQLite ledger" in out and PASSWORD not in out


def test_an_unreachable_server_is_a_runtime_failure_without_the_password(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    to = f"postgresql+psycopg://enhance:{PASSWORD}@127.0.0.1:1/enhance"
    code, out = run_main(["ledger", "migrate", "--to", to], source, monkeypatch, capsys)
    assert code == 1 and "cannot use postgresql+psycopg://enhance:***@127.0.0.1:1/enhance" in out
    assert PASSWORD not in out


def test_a_source_at_another_schema_revision_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(old)
    with engine.begin() as conn:
        cfg = alembic_config(old)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    engine.dispose()
    target = tmp_path / "new.db"
    code, out = run_main(["ledger", "migrate", "--to", f"sqlite:///{target}"], old, monkeypatch, capsys)
    assert code == 2 and "revision 0004" in out and "enhance-node serve" in out
    assert not target.exists()
    engine = make_engine(old)
    with engine.begin() as conn:  # as if a later enhance-node had upgraded it
        conn.execute(update(table("alembic_version", column("version_num"))).values(version_num="0099"))
    engine.dispose()
    code, out = run_main(["ledger", "migrate", "--to", f"sqlite:///{target}"], old, monkeypatch, capsys)
    assert code == 2 and "revision 0099, newer than this enhance-node's" in out
    assert not target.exists()


def test_a_running_node_is_refused_and_a_stopped_one_migrates(
    node_factory: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    node = node_factory(receive_processes=1).start()  # a real `enhance-node serve`
    source = f"sqlite:///{node.ledger}"
    target = node.tmp / "copy.db"
    code, out = run_main(["ledger", "migrate", "--to", f"sqlite:///{target}"], source, monkeypatch, capsys)
    assert code == 2 and "is open in another process: stop the node" in out
    assert not target.exists()
    node.stop()
    code, out = run_main(["ledger", "migrate", "--to", f"sqlite:///{target}"], source, monkeypatch, capsys)
    assert code == 0, out
    assert all_rows(make_engine(f"sqlite:///{target}")) == all_rows(make_engine(source))


def test_values_sqlite_kept_and_postgresql_refuses_are_fitted_or_stop_the_copy(
    tmp_path: Path,
    postgres_server: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An older node's SQLite ledger may hold what PostgreSQL refuses (docs/ledger.md, "What the
    columns keep"): text from outside is fitted on the way as the ledger fits it now, an
    instance number beyond 32 bits becomes NULL, and a UID that cannot be a key stops the copy
    with nothing committed."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    migrate(engine)
    clock = Clock()
    Ledger(engine, now=clock).record_instance(header(SERIES[0], 1), received(f"objects/{SERIES[0]}/1.dcm", None))
    with engine.begin() as conn:  # as an older node wrote them, past today's checks
        conn.exec_driver_sql("UPDATE instances SET instance_number = ?, calling_ae = ?", (2**40, "CT01\x00" + "X" * 20))
        conn.exec_driver_sql(
            "INSERT INTO events (at, kind, calling_ae, detail) VALUES ('2026-11-23 12:00:00', 'store.refused', ?, ?)",
            ("A" * 30, "bad\x00uid"),
        )
    engine.dispose()
    database = postgres_server.create_database()
    try:
        code, out = run_main(["ledger", "migrate", "--to", postgres_server.url(database)], url, monkeypatch, capsys)
        assert code == 0, out
        pg = make_engine(postgres_server.url(database))
        [instance] = all_rows(pg)["instances"]
        assert instance.instance_number is None and instance.calling_ae == "CT01?" + "X" * 11
        event = all_rows(pg)["events"][-1]
        assert (event.calling_ae, event.detail) == ("A" * 16, "bad?uid")
        pg.dispose()
    finally:
        postgres_server.drop_database(database)

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE instances SET sop_instance_uid = ?", (f"{SERIES[0]}.1\x00",))
    engine.dispose()
    database = postgres_server.create_database()
    try:
        code, out = run_main(["ledger", "migrate", "--to", postgres_server.url(database)], url, monkeypatch, capsys)
        reason = out.strip().splitlines()[-1]  # (after the log lines)
        assert code == 1 and reason.startswith("enhance-node: copying table instances into postgresql"), out
        assert "failed, nothing was committed: PostgreSQL text fields cannot contain NUL" in reason
        pg = make_engine(postgres_server.url(database))
        assert not any(all_rows(pg).values())  # the schema, empty: the command can run again
        pg.dispose()
    finally:
        postgres_server.drop_database(database)
