"""Issue 19: peers that try to stop the node. Real TCP connections on loopback against
`enhance-node serve`; the attacker binds 127.0.0.2 (another address on the same loopback), the
allowed scanner (DCMTK storescu) connects from 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.dicom_factory import write_ct_series
from tests.helpers import NodeProcess, free_port, storescu, wait_for

ATTACKER = "127.0.0.2"
GUARD = "negotiation_timeout = 2\nmax_connections_per_host = 4\nnetwork_timeout = 3"


def half_open_rq() -> bytes:
    """The first 50 bytes of an A-ASSOCIATE-RQ that announces 400 bytes: the node has the
    PDU header and waits for the rest, which never comes."""
    body = struct.pack(">HH", 1, 0) + b"ENHANCE".ljust(16) + b"ATTACKER".ljust(16) + bytes(32)
    return (b"\x01\x00" + struct.pack(">L", 400) + body)[:50]


class HalfOpenAttack:
    """Keeps `count` connections from ATTACKER (or from each of `sources` in turn) open, each
    stalled inside its A-ASSOCIATE-RQ, reopening every one the node closes (the attack of
    issue 19, item 1)."""

    def __init__(self, port: int, count: int = 40, sources: tuple[str, ...] = (ATTACKER,)) -> None:
        self.port, self.count, self.sources = port, count, sources
        self.opened = 0
        self.closed_by_node = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        s = socket.socket()
        s.bind((self.sources[self.opened % len(self.sources)], 0))
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", self.port))
            s.sendall(half_open_rq())
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def _run(self) -> None:
        held: list[socket.socket] = []
        while not self._stop.is_set():
            alive = []
            for s in held:
                try:
                    gone = s.recv(1) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    self.closed_by_node += 1
                    s.close()
                else:
                    alive.append(s)
            held = alive
            while len(held) < self.count and not self._stop.is_set():
                s = self._open()
                if s is None:
                    break
                held.append(s)
            self._stop.wait(0.1)
        for s in held:
            s.close()

    def __enter__(self) -> HalfOpenAttack:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_half_open_connections_cannot_stop_an_allowed_scanner(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """40 connections that stall inside their A-ASSOCIATE-RQ, reopened as fast as the node
    closes them: an allowed storescu still stores at 5, 15 and 30 s into the attack."""
    _, _, files = write_ct_series(tmp_path / "ct", 1, rows=64, cols=64)
    node: NodeProcess = node_factory(extra_node=GUARD).start()
    started = time.monotonic()
    with HalfOpenAttack(node.port) as attack:
        for at in (5, 15, 30):
            time.sleep(max(0.0, started + at - time.monotonic()))
            sent = storescu(node.port, files, timeout=20)
            assert sent.returncode == 0, f"at {at} s into the attack: {sent.stderr}"
        assert attack.closed_by_node >= 20  # the node closed what did not negotiate
        assert attack.opened >= 40
    assert node.query("SELECT count(*) FROM instances") == [(1,)]
    # each row is closed just after its A-RELEASE-RP is sent: the last may still be closing
    # when storescu, which has its answer, has exited
    wait_for(
        lambda: node.query("SELECT count(*) FROM associations WHERE outcome = 'released'") == [(3,)],
        timeout=10,
        what="three associations closed as released",
    )
    reasons = [d for (d,) in node.query("SELECT detail FROM events WHERE kind = 'association.rejected'")]
    assert any("no association negotiated within 2 s" in r for r in reasons), reasons
    assert any(f"connections from {ATTACKER} already open" in r for r in reasons), reasons
    assert len(reasons) <= 8  # reported once a minute per host and process, not once per connection


def test_half_open_connections_from_many_addresses_cannot_take_the_process(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same attack from eight addresses, each within its per-host limit: together they get
    no more than node.max_connections, and the allowed scanner's host still stores."""
    _, _, files = write_ct_series(tmp_path / "ct", 1, rows=64, cols=64)
    guard = GUARD.replace("negotiation_timeout = 2", "negotiation_timeout = 20") + "\nmax_connections = 6"
    node: NodeProcess = node_factory(extra_node=guard, receive_processes=1).start()
    sources = tuple(f"127.0.0.{i}" for i in range(2, 10))
    with HalfOpenAttack(node.port, count=24, sources=sources) as attack:
        wait_for(lambda: attack.closed_by_node >= 10, timeout=20, what="the node to refuse beyond its limit")
        sent = storescu(node.port, files, timeout=20)
        assert sent.returncode == 0, sent.stderr
    assert node.query("SELECT count(*) FROM instances") == [(1,)]
    reasons = [d for (d,) in node.query("SELECT detail FROM events WHERE kind = 'association.rejected'")]
    limit = "connections already open from hosts other than the allowed AEs' (node.max_connections)"
    assert any(limit in r for r in reasons), reasons
    assert not any("no association negotiated" in r for r in reasons), reasons  # refused at accept, not late


class SlowLink:
    """A TCP relay to the node that passes the client's bytes on at `rate` bytes per second:
    a scanner behind a slow link."""

    def __init__(self, target: int, rate: float) -> None:
        self.target, self.rate = target, rate
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self._listener.accept()
        node = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(node, client, 0.0), daemon=True).start()
        self._pump(client, node, self.rate)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: float) -> None:
        chunk = 2048
        try:
            while data := src.recv(chunk):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_a_slow_but_steady_sender_is_never_cut(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 512x512 slice over a 100 kB/s link takes longer than the negotiation timeout and the
    network timeout together; it still completes, because bytes keep coming."""
    _, _, files = write_ct_series(tmp_path / "ct", 1, rows=512, cols=512)
    node: NodeProcess = node_factory(extra_node=GUARD).start()
    link = SlowLink(node.port, rate=100_000)
    started = time.monotonic()
    sent = storescu(link.port, files, timeout=60)
    took = time.monotonic() - started
    assert sent.returncode == 0, sent.stderr
    assert took > 5  # longer than negotiation_timeout (2 s) + network_timeout (3 s)
    assert node.query("SELECT count(*) FROM instances") == [(1,)]


def test_a_pdu_that_stalls_after_negotiation_is_closed(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An allowed peer negotiates, sends half a P-DATA-TF PDU and goes silent: the node closes
    the connection after node.network_timeout (3 s) and stores nothing."""
    node: NodeProcess = node_factory(extra_node=GUARD).start()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    # a P-DATA-TF of 10000 bytes whose one PDV (context 1, a command fragment) announces the
    # rest: 106 of 10006 bytes, then nothing
    raw.sendall(b"\x04\x00" + struct.pack(">L", 10_000) + struct.pack(">LBB", 9_996, 1, 1) + bytes(94))
    stalled = time.monotonic()
    wait_for(lambda: not assoc.is_alive(), timeout=20, what="the node to close the stalled association")
    assert 2.5 < time.monotonic() - stalled < 15
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    wait_for(lambda: node.query("SELECT outcome FROM associations") == [("aborted",)], timeout=10)


def test_associations_aborted_on_garbage_give_their_slot_back(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An allowed peer sends a P-DATA-TF whose PDV cannot be decoded (the node aborts; with
    pynetdicom's acceptor, its reactor thread died without EVT_CONN_CLOSE). Done more times than
    node.max_associations, the node must still accept associations: each slot is given back
    and each row closed."""
    node: NodeProcess = node_factory(extra_node=GUARD + "\nmax_associations = 2", receive_processes=1).start()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage)
    for n in range(5):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
        assert assoc.is_established, f"association {n + 1} refused"
        assoc.dul.socket.socket.sendall(bytes.fromhex("0400000000060000000201ff"))  # type: ignore[union-attr]
        wait_for(lambda a=assoc: not a.is_alive(), timeout=20, what="the association to end")
        # the node sends A-ABORT at once, then frees the slot and closes the row
        wait_for(
            lambda n=n: node.query("SELECT count(*) FROM associations WHERE closed_at IS NOT NULL") == [(n + 1,)],
            timeout=10,
            what="the association's slot given back and its row closed",
        )
    last = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
    assert last.is_established  # not "too many associations"
    last.release()
