"""Delivery (issue: deliver derived series to PACS): scanner -> node -> PACS with real peers.
DCMTK storescu pushes, the node denoises with the shipped model and stores the derived series
into Orthanc; findscu, Orthanc's REST API and getscu find and pull it; dciodvfy checks what was
pulled. Faults: Orthanc down while the node delivers, destinations that refuse (unknown called
AE, an SCP answering 0xA700 or aborting mid-association), SIGKILL of the node mid-delivery."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from engines.manifest import load
from node.derive import derived_uid
from tests.dicom_factory import write_ct_series
from tests.helpers import (
    REPO,
    NodeProcess,
    ct_route,
    dcmtk_env,
    destination_toml,
    pipeline_node,
    require,
    run_cli,
    storescu,
    wait_for,
)
from tests.integration.test_worker import dciodvfy_errors
from tests.peers import Orthanc, StoreSCP

VERSION = load(REPO / "models" / "ct-denoise").version


def start_node(node_factory, extra: str) -> NodeProcess:  # type: ignore[no-untyped-def]
    return pipeline_node(node_factory, extra).start()


def deliveries(node: NodeProcess) -> list[tuple[str, str, int, int, int, str]]:
    """(kind, state, attempts, stored, of, error) of every delivery, in id order."""
    return node.query("SELECT kind, state, attempts, stored_count, instance_count, error FROM deliveries ORDER BY id")  # type: ignore[return-value]


def wait_delivered(node: NodeProcess, count: int, timeout: float = 180) -> None:
    def done() -> bool:
        rows = deliveries(node)
        failed = [r for r in rows if r[1] == "failed"]
        if failed:
            raise AssertionError(f"delivery failed: {failed}\n{node.log_text()}")
        return len(rows) == count and all(r[1] == "delivered" for r in rows)

    wait_for(done, timeout=timeout, interval=0.1, what=f"{count} deliveries to be delivered")


def findscu_series(orthanc: Orthanc, study_uid: str) -> dict[str, int]:
    """Series UID -> number of instances, as Orthanc answers a SERIES-level C-FIND (DCMTK)."""
    cmd = [
        require("findscu"),
        "-S",
        "-aec",
        orthanc.aet,
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "-k",
        "SeriesInstanceUID",
        "-k",
        "NumberOfSeriesRelatedInstances",
        "127.0.0.1",
        str(orthanc.dicom_port),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    found: dict[str, int] = {}
    uid = None
    for line in out.stderr.splitlines() + out.stdout.splitlines():
        if "[" not in line:  # the request's empty keys ("no value available")
            continue
        # DCMTK prints the value as sent: Orthanc pads an odd-length UID with one NUL (PS3.5 6.2)
        value = line.split("[", 1)[1].split("]", 1)[0].rstrip("\x00 ")
        if "(0020,000e)" in line:
            uid = value
        elif "(0020,1209)" in line and uid is not None:
            found[uid] = int(value)
            uid = None
    return found


def test_scanner_to_node_to_orthanc_then_a_radiologist_pulls_the_derived_series(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """64-slice CT, node inline (originals forwarded too): the derived series lands in Orthanc
    beside the original with the source's instance count, is found by C-FIND and by REST,
    and a C-GET of it returns objects dciodvfy accepts."""
    with Orthanc(tmp_path / "orthanc", modalities={"reader": ("READER", 1)}).start() as orthanc:
        study_uid, series_uid, files = write_ct_series(tmp_path / "series", 64, rows=256, cols=256)
        node = start_node(
            node_factory,
            destination_toml("pacs", orthanc.aet, orthanc.dicom_port) + ct_route('"pacs"', "forward_original = true\n"),
        )
        assert storescu(node.port, files).returncode == 0
        wait_delivered(node, 2)
        output_uid = derived_uid(series_uid, "ct-denoise", VERSION)
        assert sorted(r[:2] + r[3:5] for r in deliveries(node)) == [
            ("derived", "delivered", 64, 64),
            ("original", "delivered", 64, 64),
        ]
        assert node.query("SELECT count(*) FROM delivery_instances WHERE status = 0") == [(128,)]

        assert findscu_series(orthanc, study_uid) == {series_uid: 64, output_uid: 64}
        assert orthanc.instance_count(output_uid) == 64 and orthanc.instance_count(series_uid) == 64
        study = orthanc.get(f"/series/{orthanc.series(output_uid)['ID']}/study")  # type: ignore[index]
        assert len(study["Series"]) == 2  # beside the original, in the same study

        pulled = tmp_path / "pulled"
        pulled.mkdir()
        get = subprocess.run(
            [
                require("getscu"),
                "-aet",
                "READER",
                "-aec",
                orthanc.aet,
                "-S",
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={study_uid}",
                "-k",
                f"SeriesInstanceUID={output_uid}",
                "-od",
                str(pulled),
                "127.0.0.1",
                str(orthanc.dicom_port),
            ],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=120,
        )
        assert get.returncode == 0, get.stderr
        retrieved = sorted(pulled.iterdir())
        assert len(retrieved) == 64
        for path in retrieved:
            ds = dcmread(path)
            assert ds.SeriesInstanceUID == output_uid and ds.StudyInstanceUID == study_uid
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert dciodvfy_errors(path) == []
        assert "PHANTOM" not in node.log_text().upper()  # no patient name or ID in the node's logs
        assert output_uid in node.log_text()  # UIDs are how the logs name what they are about


def test_orthanc_down_while_delivering_backs_off_and_completes_once_it_returns(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """Orthanc (made slow: 0.2 s per instance) dies mid-association after storing a few; the
    delivery backs off while it is down (connection refused), and once it is back the rest
    arrives: Orthanc holds each derived instance once and what it had confirmed was not resent."""
    with Orthanc(tmp_path / "orthanc", store_delay=0.2).start() as orthanc:
        _, series_uid, files = write_ct_series(tmp_path / "series", 24, rows=128, cols=128)
        node = start_node(node_factory, destination_toml("pacs", orthanc.aet, orthanc.dicom_port) + ct_route('"pacs"'))
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: node.query("SELECT 1 FROM deliveries WHERE state = 'sending' AND stored_count >= 3"),
            timeout=120,
            interval=0.02,
            what="the delivery to be under way",
        )
        orthanc.kill()

        def retried() -> bool:
            rows = deliveries(node)
            return rows[0][1] == "pending" and rows[0][2] >= 2  # the second attempt found it down

        wait_for(retried, timeout=120, interval=0.05, what="the delivery to have failed twice")
        _, _, _, stored, total, error = deliveries(node)[0]
        assert 3 <= stored < total == 24 and "cannot connect" in error
        confirmed = node.query("SELECT id, attempts FROM delivery_instances WHERE outcome = 'stored' ORDER BY id")
        orthanc.store_delay = 0.0
        orthanc.start()  # same storage, same ports
        wait_delivered(node, 1)
        assert orthanc.instance_count(derived_uid(series_uid, "ct-denoise", VERSION)) == 24
        assert orthanc.get("/statistics")["CountInstances"] == 24  # each derived instance once
        ids = ",".join(str(i) for i, _ in confirmed)
        again = node.query(f"SELECT id, attempts FROM delivery_instances WHERE id IN ({ids}) ORDER BY id")
        assert again == confirmed and {a for _, a in again} == {1}  # what Orthanc had confirmed was not resent
        assert node.query("SELECT count(*) FROM events WHERE kind = 'delivery.retry'")[0][0] >= 2


def test_an_scp_that_aborts_mid_association_gets_only_what_it_has_not_stored(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """The peer aborts after 5 instances: the attempt ends with 5 recorded as stored, and the
    retry sends the other 11 only, each exactly once."""
    with StoreSCP("PEER").start() as peer:
        peer.abort_after = 5
        _, _series_uid, files = write_ct_series(tmp_path / "series", 16, rows=64, cols=64)
        node = start_node(node_factory, destination_toml("peer", "PEER", peer.port) + ct_route('"peer"'))
        assert storescu(node.port, files).returncode == 0
        wait_delivered(node, 1)
        _, _, attempts, stored, total, _ = deliveries(node)[0]
        assert (attempts, stored, total) == (2, 16, 16)
        assert len(peer.received) == 16 and len(set(peer.received)) == 16
        assert peer.requests == 17  # 5 stored, 1 aborted, 11 on the retry
        assert node.query("SELECT max(attempts), min(attempts) FROM delivery_instances") == [(2, 1)]


def test_a_destination_answering_a700_ends_failed_then_jobs_retry_delivers(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    with StoreSCP("PEER").start() as peer:
        peer.answer = lambda _ds: 0xA700
        _, _, files = write_ct_series(tmp_path / "series", 4, rows=64, cols=64)
        node = start_node(
            node_factory, destination_toml("peer", "PEER", peer.port, max_attempts=2) + ct_route('"peer"')
        )
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: deliveries(node) and deliveries(node)[0][1] == "failed", timeout=120, what="failed")
        _, _, attempts, stored, _, error = deliveries(node)[0]
        assert (attempts, stored) == (2, 0) and "4 instances not stored" in error
        assert node.query("SELECT DISTINCT status, outcome FROM delivery_instances") == [(0xA700, "failed")]
        job_id = node.query("SELECT id FROM jobs")[0][0]
        shown = run_cli(node.config, "jobs", "show", str(job_id))
        assert shown.returncode == 0 and "failed" in shown.stdout and "0xA700" in shown.stdout
        listed = run_cli(node.config, "jobs", "list")
        assert "0/1 delivered, 1 failed" in listed.stdout

        peer.answer = lambda _ds: 0x0000
        retry = run_cli(node.config, "jobs", "retry", str(job_id))
        assert retry.returncode == 0, retry.stderr
        assert "resubmitted" in retry.stdout
        wait_delivered(node, 1)
        assert len(set(peer.received)) == 4
        again = run_cli(node.config, "jobs", "retry", str(job_id))
        assert again.returncode == 2 and "nothing failed" in again.stderr
        missing = run_cli(node.config, "jobs", "retry", "999")
        assert missing.returncode == 2 and "no job 999" in missing.stderr


def test_warning_statuses_count_as_stored_and_are_recorded(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with StoreSCP("PEER").start() as peer:
        answers = iter([0xB000, 0xB006, 0xB007, 0x0000])
        peer.answer = lambda _ds: next(answers)
        _, _, files = write_ct_series(tmp_path / "series", 4, rows=64, cols=64)
        node = start_node(node_factory, destination_toml("peer", "PEER", peer.port) + ct_route('"peer"'))
        assert storescu(node.port, files).returncode == 0
        wait_delivered(node, 1)
        assert node.query("SELECT stored_count, warning_count, attempts FROM deliveries") == [(4, 3, 1)]
        rows = node.query("SELECT status, outcome FROM delivery_instances ORDER BY status")
        assert rows == [(0x0000, "stored"), (0xB000, "warning"), (0xB006, "warning"), (0xB007, "warning")]


def test_an_unknown_called_ae_fails_with_the_rejection_and_a_fixed_config_plus_retry_delivers(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    with Orthanc(tmp_path / "orthanc", check_called_aet=True).start() as orthanc:
        _, series_uid, files = write_ct_series(tmp_path / "series", 3, rows=64, cols=64)
        wrong = destination_toml("pacs", "NOSUCHAE", orthanc.dicom_port, max_attempts=2) + ct_route('"pacs"')
        node = start_node(node_factory, wrong)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: deliveries(node) and deliveries(node)[0][1] == "failed", timeout=120, what="failed")
        error = deliveries(node)[0][5]
        assert "association rejected" in error and "Called AE title not recognised" in error
        assert node.query("SELECT count(*) FROM events WHERE kind = 'delivery.failed'") == [(1,)]
        assert orthanc.get("/statistics")["CountInstances"] == 0

        assert node.stop() == 0  # the admin fixes the AE title and restarts the node
        node.config.write_text(node.config.read_text().replace("NOSUCHAE", orthanc.aet))
        node.start()
        job_id = node.query("SELECT id FROM jobs")[0][0]
        assert run_cli(node.config, "jobs", "retry", str(job_id)).returncode == 0
        wait_delivered(node, 1)
        assert orthanc.instance_count(derived_uid(series_uid, "ct-denoise", VERSION)) == 3


def test_every_rejection_is_reported_as_one_even_when_pynetdicom_loses_it(tmp_path: Path) -> None:
    """pynetdicom 3.0 reports about 1 in 30 of Orthanc's rejections as a failed connection (its
    DUL thread reads the A-ASSOCIATE-RJ and closes the socket before the requestor looks): 200
    rejected batches all say "association rejected" with Orthanc's reason, and none "cannot
    connect". Without the sender's look into the DUL's queue this fails about 99 times in 100."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from node.config import DestinationConfig, SenderConfig
    from node.sender import send_batch
    from storage.deliveries import PendingInstance
    from storage.filestore import FileStore

    never_sent = [PendingInstance(1, "1.2.3.4", CTImageStorage, ExplicitVRLittleEndian, "unused.dcm")]
    store = FileStore(tmp_path / "store", 0)
    with Orthanc(tmp_path / "orthanc", check_called_aet=True).start() as orthanc:
        dest = DestinationConfig("pacs", "NOSUCHAE", "127.0.0.1", orthanc.dicom_port)
        errors = [
            send_batch(dest, "ENHANCE", SenderConfig(), store, never_sent, lambda *_: True).error for _ in range(200)
        ]
    lost = [e for e in errors if "association rejected" not in e or "Called AE title not recognised" not in e]
    assert not lost, f"{len(lost)} of 200: {lost[0]}"


def test_sigkill_of_the_node_mid_delivery_resumes_after_restart_and_loses_nothing(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    with StoreSCP("PEER").start() as peer:
        peer.delay = 0.1  # a slow PACS: the kill lands mid-association
        _, _series_uid, files = write_ct_series(tmp_path / "series", 40, rows=64, cols=64)
        node = start_node(node_factory, destination_toml("peer", "PEER", peer.port) + ct_route('"peer"'))
        assert storescu(node.port, files).returncode == 0
        wait_for(
            lambda: (
                node.query("SELECT stored_count FROM deliveries WHERE state = 'sending'") and len(peer.received) >= 5
            ),
            timeout=120,
            interval=0.02,
            what="the delivery to be under way",
        )
        node.kill()
        stored_before = node.query("SELECT stored_count FROM deliveries")[0][0]
        assert stored_before < 40, "the kill came too late to interrupt the delivery"
        node.start()
        wait_delivered(node, 1)
        expected = {derived_uid(str(dcmread(f).SOPInstanceUID), "ct-denoise", VERSION) for f in files}
        assert set(peer.received) == expected  # nothing lost
        assert len(peer.received) <= 41  # at most the one in flight at the kill is sent twice
        assert "was in flight when this node last stopped; resuming it" in node.log_text()
        assert node.query("SELECT attempts FROM deliveries") == [(1,)]  # the node failed, not the delivery


def test_send_back_stores_the_derived_series_on_the_calling_ae(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The scanner (calling AE STORESCU) gets the derived series back: DCMTK storescp plays it."""
    from tests.helpers import free_port

    port, received = free_port(), tmp_path / "back"
    received.mkdir()
    scp = subprocess.Popen([require("storescp"), "-aet", "STORESCU", "-od", str(received), str(port)], env=dcmtk_env())
    try:
        _, series_uid, files = write_ct_series(tmp_path / "series", 5, rows=64, cols=64)
        node = start_node(
            node_factory, destination_toml("scanner", "STORESCU", port) + ct_route("", "send_back = true\n")
        )
        assert storescu(node.port, files).returncode == 0
        wait_delivered(node, 1)
        back = [dcmread(p) for p in sorted(received.iterdir())]
        assert len(back) == 5
        assert {ds.SeriesInstanceUID for ds in back} == {derived_uid(series_uid, "ct-denoise", VERSION)}
    finally:
        scp.terminate()
        scp.wait(timeout=30)


@pytest.mark.parametrize("bad", ["send_back = 1", "forward_original = true"])
def test_bad_delivery_options_are_refused_at_start(tmp_path: Path, bad: str) -> None:
    from tests.helpers import free_port, toml_config

    cfg = toml_config(tmp_path, free_port(), extra=ct_route("", bad + "\n"))
    out = run_cli(cfg, "serve")
    assert out.returncode == 2
    assert "routes[0]." in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_sender_turns_nagle_off_on_its_connection() -> None:
    """Without TCP_NODELAY every instance's last segment waits for the peer's delayed ACK
    (~30 ms per object); the sender's connection handler turns it off."""
    import socket

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from node.sender import _no_delay

    with StoreSCP("PEER").start() as peer:
        for handlers, expected in (([], 0), ([(evt.EVT_CONN_OPEN, _no_delay)], 1)):
            ae = AE("ENHANCE")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", peer.port, ae_title="PEER", evt_handlers=handlers)
            assert assoc.is_established
            sock = assoc.dul.socket.socket  # type: ignore[union-attr]
            assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) == bool(expected)
            assoc.release()
