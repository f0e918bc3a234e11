"""The node as a subprocess: completion after the idle period, the disk floor, re-send after
completion. Peers are DCMTK's storescu on loopback."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from storage.filestore import content_matches_name
from tests.dicom_factory import ct_slice, write_ct_series
from tests.helpers import NodeProcess, peak_rss, storescu, temp_files, wait_for
from tests.postgres import PostgresServer


def test_series_completes_after_idle_period_and_reopens(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, series_uid, files = write_ct_series(tmp_path / "s", 5, rows=64, cols=64)
    node: NodeProcess = node_factory(idle_seconds=1).start()
    assert storescu(node.port, files[:4]).returncode == 0

    def state() -> str:
        rows = node.query("SELECT state FROM series WHERE series_instance_uid = ?", series_uid)
        return rows[0][0] if rows else ""

    # complete, then routed at once (no route matches in this config: recorded, no job)
    wait_for(lambda: state() == "routed", what="series complete and routed")
    assert storescu(node.port, files[4:]).returncode == 0  # a late instance reopens it
    assert node.query("SELECT reopened_count FROM series") == [(1,)]
    wait_for(lambda: state() == "routed", what="series complete and routed again")
    assert node.query("SELECT instance_count FROM series") == [(5,)]
    assert node.query("SELECT count(*) FROM events WHERE kind = 'series.complete'") == [(2,)]
    assert node.query("SELECT count(*) FROM events WHERE kind = 'series.unrouted'") == [(2,)]
    assert node.query("SELECT count(*) FROM jobs") == [(0,)]


def test_disk_below_floor_answers_a700_and_writes_nothing(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, files = write_ct_series(tmp_path / "s", 2, rows=64, cols=64)
    node: NodeProcess = node_factory(min_free_disk_mb=2**40).start()
    result = storescu(node.port, files, "-v", "--no-halt")
    out = result.stdout + result.stderr
    assert out.count("Received Store Response (Refused: OutOfResources)") == 2, out
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    assert [p for p in (node.storage / "objects").rglob("*") if p.is_file()] == []
    assert temp_files(node.storage) == []
    refused = node.query("SELECT status, detail FROM events WHERE kind = 'store.refused'")
    assert len(refused) == 2 and all(code == 0xA700 and "floor" in detail for code, detail in refused)


def test_a_ledger_lost_mid_association_answers_a700_and_keeps_the_file_for_the_re_send(  # type: ignore[no-untyped-def]
    node_factory, tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """The ledger's database stops taking connections while an association is open (and the
    node's connections to it are ended): the C-STORE is answered 0xA700, and the file, whole
    and durable, stays where it was written, as an identical re-send on another association
    may be recording it at that moment. The re-send once the ledger is back records it."""
    node: NodeProcess = node_factory()
    node.config.write_text(re.sub(r'ledger_url = ".*"', f'ledger_url = "{postgres_url}"', node.config.read_text()))
    node.start()
    database = postgres_url.rsplit("/", 1)[1]
    _, _, files = write_ct_series(tmp_path / "s", 1, rows=64, cols=64)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert assoc.is_established
    postgres_server.psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        postgres_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        assert assoc.send_c_store(dcmread(files[0])).Status == 0xA700
        assoc.release()
        [kept] = list((node.storage / "objects").rglob("*.dcm"))
        sha = hashlib.sha256(kept.read_bytes()).hexdigest()
        assert content_matches_name(kept.name, sha)
    finally:
        postgres_server.psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    assert storescu(node.port, files).returncode == 0
    recorded = postgres_server.psql("SELECT path, sha256 FROM instances", database=database)
    assert [cell.strip() for cell in recorded.split("|")] == [str(kept.relative_to(node.storage)), sha]


def test_sigterm_stops_cleanly(node_factory) -> None:  # type: ignore[no-untyped-def]
    node: NodeProcess = node_factory().start()
    assert node.stop() == 0
    assert "stopped" in node.log_text()


def test_a_large_data_set_is_held_once_not_twice(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 98 MB CT slice (7000 x 7000): the receiving process grows by about the data set, not by
    twice it. The bytes received take the node's File Meta in place to become the file, instead
    of a second buffer holding meta + data set (docs/receiving.md, "Data set size")."""
    path = tmp_path / "large.dcm"
    ds = ct_slice("1.2.826.0.1.3680043.10.1533.99.30", "1.2.826.0.1.3680043.10.1533.99.31", 1, rows=7000, cols=7000)
    ds.save_as(path, enforce_file_format=True)
    size = path.stat().st_size
    node: NodeProcess = node_factory(receive_processes=1).start()
    receivers = node.receivers()
    before = peak_rss(receivers)
    result = storescu(node.port, [path])
    assert result.returncode == 0, result.stderr
    growth = peak_rss(receivers) - before
    [(stored_size,)] = node.query("SELECT size FROM instances")
    assert stored_size > size - 1000
    assert growth < 1.4 * size, f"the receiver grew by {growth >> 20} MiB for a {size >> 20} MiB data set"
