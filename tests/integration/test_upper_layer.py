"""The SCP's upper layer (node/ul.py) as a peer on the wire sees it: `enhance-node serve` as a
subprocess, a raw TCP client that builds its PDUs with pynetdicom's PDU classes and its command
sets with pydicom, so every byte the node is sent is chosen here and every byte it answers is
read here (PS3.8 9.3, PS3.7 E)."""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_role
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from storage.filestore import content_matches_name
from tests.dicom_factory import ct_slice, encode_explicit_le
from tests.helpers import NodeProcess, peak_rss, wait_for

VERIFICATION_CX, CT_CX = 1, 3
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def associate_rq(max_pdu: int = 0, protocol_version: int = 1, application_context: str = APPLICATION_CONTEXT) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = application_context
    prim.calling_ae_title = "STORESCU"
    prim.called_ae_title = "ENHANCE"
    verification = build_context(Verification, [ImplicitVRLittleEndian])
    verification.context_id = VERIFICATION_CX
    ct = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    ct.context_id = CT_CX
    prim.presentation_context_definition_list = [verification, ct]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.826.0.1.3680043.10.1533.99"
    prim.user_information = [length, uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    pdu.protocol_version = protocol_version
    return bytes(pdu.encode())


def command(field: int, message_id: int, sop_class: str, sop_instance: str = "", dataset: bool = False) -> bytes:
    ds = Dataset()
    if sop_class:
        ds.AffectedSOPClassUID = sop_class
    ds.CommandField = field
    ds.MessageID = message_id
    ds.CommandDataSetType = 0x0001 if dataset else 0x0101
    if sop_instance:
        ds.AffectedSOPInstanceUID = sop_instance
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def p_data(context: int, flags: int, value: bytes) -> bytes:
    return struct.pack(">BBLLBB", 4, 0, len(value) + 6, len(value) + 2, context, flags) + value


class Peer:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)

    def read_pdu(self) -> tuple[int, bytes]:
        head = self._exact(6)
        kind, _, length = struct.unpack(">BBL", head)
        return kind, self._exact(length)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def associate(self, max_pdu: int = 0) -> A_ASSOCIATE_AC:
        self.sock.sendall(associate_rq(max_pdu))
        kind, body = self.read_pdu()
        assert kind == 2, f"expected an A-ASSOCIATE-AC, got PDU type {kind}"
        ac = A_ASSOCIATE_AC()
        ac.decode(struct.pack(">BBL", kind, 0, len(body)) + body)
        return ac

    def response(self, max_pdu: int = 0) -> Dataset:
        """Read P-DATA-TF PDUs until a command's last fragment; check each within `max_pdu`."""
        parts = b""
        while True:
            kind, body = self.read_pdu()
            assert kind == 4, f"expected P-DATA-TF, got PDU type {kind}"
            assert max_pdu == 0 or len(body) <= max_pdu, f"a {len(body)}-byte PDU past the {max_pdu} negotiated"
            length, _context, flags = struct.unpack(">LBB", body[:6])
            assert length == len(body) - 4 and flags & 1
            parts += body[6:]
            if flags & 2:
                return decode(BytesIO(parts), True, True)

    def close(self) -> None:
        self.sock.close()


def test_commands_answered_within_the_peers_pdu_limit_and_the_association_goes_on(node_factory) -> None:  # type: ignore[no-untyped-def]
    """A peer whose largest PDU is 32 bytes gets each response in several PDUs within it; a
    command the SCP does not serve is answered 0x0211 and a C-STORE that says no data set
    follows 0xC000, and the association goes on to an echo and a release."""
    node: NodeProcess = node_factory().start()
    peer = Peer(node.port)
    ac = peer.associate(max_pdu=32)
    results = ac.to_primitive().presentation_context_definition_results_list
    accepted = {cx.context_id for cx in results if cx.result == 0}
    assert accepted == {VERIFICATION_CX, CT_CX}
    peer.sock.sendall(p_data(VERIFICATION_CX, 3, command(0x0030, 1, Verification)))
    echo = peer.response(max_pdu=32)
    assert (echo.CommandField, echo.MessageIDBeingRespondedTo, echo.Status) == (0x8030, 1, 0)
    peer.sock.sendall(p_data(CT_CX, 3, command(0x0020, 2, CTImageStorage)))  # C-FIND-RQ on a storage context
    find = peer.response(max_pdu=32)
    assert (find.CommandField, find.MessageIDBeingRespondedTo, find.Status) == (0x8020, 2, 0x0211)
    peer.sock.sendall(p_data(CT_CX, 3, command(0x0001, 3, CTImageStorage, "1.2.3.4")))  # no data set
    store = peer.response(max_pdu=32)
    assert (store.CommandField, store.MessageIDBeingRespondedTo, store.Status) == (0x8001, 3, 0xC000)
    peer.sock.sendall(p_data(VERIFICATION_CX, 3, command(0x0030, 4, "")))  # no Affected SOP Class UID
    echo = peer.response(max_pdu=32)
    assert echo.Status == 0 and echo.AffectedSOPClassUID == Verification  # mandatory in the response
    peer.sock.sendall(struct.pack(">BBLL", 5, 0, 4, 0))  # A-RELEASE-RQ
    assert peer.read_pdu() == (6, bytes(4))  # A-RELEASE-RP
    peer.close()
    wait_for(lambda: node.query("SELECT outcome FROM associations") == [("released",)], timeout=10)
    assert node.query("SELECT count(*) FROM instances") == [(0,)]


def test_a_c_store_in_fragments_over_several_pdus_is_stored(node_factory) -> None:  # type: ignore[no-untyped-def]
    """The command in two fragments, the data set in 1000-byte fragments, some PDUs holding two
    PDVs: stored byte for byte after the node's own file meta, under the sha256 of the file
    (hashed as the fragments arrive). Then one whose request names no SOP Class (the context's
    is used in the file meta, so what was hashed on arrival is not the file)."""
    node: NodeProcess = node_factory().start()
    peer = Peer(node.port)
    peer.associate()
    sent = {}
    study, series = "1.2.826.0.1.3680043.10.1533.99.2", "1.2.826.0.1.3680043.10.1533.99.3"
    for message_id, sop_class in ((9, CTImageStorage), (10, "")):
        ds = ct_slice(study, series, message_id, rows=32, cols=32)
        data = sent[str(ds.SOPInstanceUID)] = encode_explicit_le(ds)
        cmd = command(0x0001, message_id, sop_class, str(ds.SOPInstanceUID), dataset=True)
        peer.sock.sendall(p_data(CT_CX, 1, cmd[:20]) + p_data(CT_CX, 3, cmd[20:]))
        chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
        last = len(chunks) - 1
        pdvs = [struct.pack(">LBB", len(c) + 2, CT_CX, 2 if i == last else 0) + c for i, c in enumerate(chunks)]
        for i in range(0, len(pdvs), 2):  # two PDVs in each P-DATA-TF
            body = b"".join(pdvs[i : i + 2])
            peer.sock.sendall(struct.pack(">BBL", 4, 0, len(body)) + body)
        rsp = peer.response()
        assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (message_id, 0)
    peer.close()
    rows = node.query("SELECT sop_instance_uid, path, sha256, size FROM instances")
    assert len(rows) == 2
    for sop, path, sha, size in rows:
        stored = (node.storage / path).read_bytes()
        assert stored.endswith(sent[sop])
        assert dcmread(BytesIO(stored)).file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert (hashlib.sha256(stored).hexdigest(), len(stored)) == (sha, size)
        assert content_matches_name(path, sha)


def test_what_breaks_the_protocol_is_aborted_and_the_node_goes_on(node_factory) -> None:  # type: ignore[no-untyped-def]
    """A PDV on a context that was not accepted, a data set before its command, a second
    A-ASSOCIATE-RQ, a P-DATA-TF past node.max_pdu_size: each gets an A-ABORT, the association
    is recorded as aborted, and the node still answers."""
    node: NodeProcess = node_factory(extra_node="max_pdu_size = 16384").start()
    attacks = {
        "unaccepted context": p_data(5, 3, command(0x0030, 1, Verification)),
        "data before command": p_data(CT_CX, 2, b"\x08\x00\x16\x00"),
        "second request": associate_rq(),
        "pdu too large": p_data(CT_CX, 0, bytes(20_000)),
        "unknown pdu type": struct.pack(">BBL", 9, 0, 4) + bytes(4),
    }
    reasons = {"unknown pdu type": 1}  # unrecognized-PDU; the others unexpected-PDU (2)
    for name, attack in attacks.items():
        peer = Peer(node.port)
        peer.associate()
        peer.sock.sendall(attack)
        kind, body = peer.read_pdu()
        assert kind == 7, f"{name}: expected A-ABORT, got PDU type {kind}"
        assert (body[2], body[3]) == (2, reasons.get(name, 2)), f"{name}: source service provider, reason"
        peer.close()
    wait_for(
        lambda: node.query("SELECT outcome, count(*) FROM associations GROUP BY outcome") == [("aborted", 5)],
        timeout=10,
        what="five associations closed as aborted",
    )
    peer = Peer(node.port)
    peer.associate()
    peer.sock.sendall(p_data(VERIFICATION_CX, 3, command(0x0030, 1, Verification)))
    assert peer.response().Status == 0
    peer.close()


def test_an_unsupported_protocol_version_or_application_context_is_rejected_and_recorded(node_factory) -> None:  # type: ignore[no-untyped-def]
    node: NodeProcess = node_factory().start()
    for rq, expected in (
        (associate_rq(protocol_version=2), (1, 2, 2)),
        (associate_rq(application_context="1.2.3.4"), (1, 1, 2)),
    ):
        peer = Peer(node.port)
        peer.sock.sendall(rq)
        kind, body = peer.read_pdu()
        assert kind == 3 and (body[1], body[2], body[3]) == expected
        peer.close()
    sql = "SELECT detail FROM events WHERE kind = 'association.rejected'"
    wait_for(lambda: len(node.query(sql)) == 2, timeout=10, what="both rejections recorded")  # after the answer
    # in either order: each is recorded after its answer, by whichever SCP process took it
    details = sorted(detail for (detail,) in node.query(sql))
    assert "1.2.3.4" in details[0] and "protocol version 2" in details[1]
    assert node.query("SELECT count(*) FROM associations") == [(0,)]


def test_a_proposed_role_selection_leaves_the_default_roles_and_the_store_succeeds(node_factory) -> None:  # type: ignore[no-untyped-def]
    """The SCP answers no role selection item, so the default roles hold (PS3.7 D.3.3.4: the
    requestor SCU, the node SCP), as pynetdicom's acceptor did for contexts without roles."""
    node: NodeProcess = node_factory().start()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scu_role=True)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE", ext_neg=[role])
    assert assoc.is_established
    assert assoc.acceptor.role_selection == {}
    ds = ct_slice("1.2.826.0.1.3680043.10.1533.99.4", "1.2.826.0.1.3680043.10.1533.99.5", 0, rows=16, cols=16)
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    assert node.query("SELECT count(*) FROM instances") == [(1,)]


def test_stopping_aborts_an_open_association_and_closes_its_row(node_factory) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM with an idle association open: after the grace period the peer gets an A-ABORT
    (it re-sends anything it was not answered for) and the node exits 0."""
    node: NodeProcess = node_factory().start()
    peer = Peer(node.port)
    peer.associate()
    assert node.stop() == 0
    kind, body = peer.read_pdu()
    assert kind == 7 and (body[2], body[3]) == (0, 0)  # source service user (the node), no reason
    peer.close()
    assert node.query("SELECT outcome FROM associations") == [("aborted",)]


def test_a_pdv_that_announces_gigabytes_costs_only_what_arrives(node_factory) -> None:  # type: ignore[no-untyped-def]
    """An allowed peer announces a 3 GiB P-DATA-TF and PDV, sends 64 kB and stalls: the node's
    memory grows by what arrived, not by what was announced, and the association ends at the
    network timeout."""
    node: NodeProcess = node_factory(receive_processes=1, extra_node="network_timeout = 2").start()
    receivers = node.receivers()
    before = peak_rss(receivers)
    peer = Peer(node.port)
    peer.associate()
    announced = 3 << 30
    peer.sock.sendall(struct.pack(">BBLLBB", 4, 0, announced + 6, announced + 2, CT_CX, 0) + bytes(64 << 10))
    kind, _body = peer.read_pdu()  # the A-ABORT after the network timeout
    assert kind == 7
    peer.close()
    assert peak_rss(receivers) - before < 100 << 20
    wait_for(lambda: node.query("SELECT outcome FROM associations") == [("aborted",)], timeout=10)


def test_a_c_store_whose_sop_class_is_not_its_contexts_is_refused_0122(node_factory) -> None:  # type: ignore[no-untyped-def]
    """PS3.7: a C-STORE belongs to its presentation context's SOP class; an MR request on the CT
    context is answered 0x0122 and recorded, and nothing is stored."""
    node: NodeProcess = node_factory().start()
    ds = ct_slice("1.2.826.0.1.3680043.10.1533.99.6", "1.2.826.0.1.3680043.10.1533.99.7", 0, rows=16, cols=16)
    ds.SOPClassUID = MRImageStorage
    peer = Peer(node.port)
    peer.associate()
    peer.sock.sendall(p_data(CT_CX, 3, command(0x0001, 1, MRImageStorage, str(ds.SOPInstanceUID), dataset=True)))
    peer.sock.sendall(p_data(CT_CX, 2, encode_explicit_le(ds)))
    assert peer.response().Status == 0x0122
    peer.close()
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    [(status, detail)] = node.query("SELECT status, detail FROM events WHERE kind = 'store.refused'")
    assert status == 0x0122 and "negotiated for 1.2.840.10008.5.1.4.1.1.2" in detail


def test_empty_fragments_cost_no_memory(node_factory) -> None:  # type: ignore[no-untyped-def]
    """8 MB of empty data set fragments (six bytes each on the wire) after a C-STORE command,
    then the data set: stored, and the receiving process grew by far less than what was sent
    (each fragment used to cost about 12 times its size)."""
    node: NodeProcess = node_factory(receive_processes=1).start()
    receivers = node.receivers()
    before = peak_rss(receivers)
    ds = ct_slice("1.2.826.0.1.3680043.10.1533.99.8", "1.2.826.0.1.3680043.10.1533.99.9", 0, rows=16, cols=16)
    peer = Peer(node.port)
    peer.associate()
    peer.sock.sendall(p_data(CT_CX, 3, command(0x0001, 1, CTImageStorage, str(ds.SOPInstanceUID), dataset=True)))
    empty = struct.pack(">LBB", 2, CT_CX, 0) * 100_000
    for _ in range(14):
        peer.sock.sendall(struct.pack(">BBL", 4, 0, len(empty)) + empty)
    peer.sock.sendall(p_data(CT_CX, 2, encode_explicit_le(ds)))
    assert peer.response().Status == 0
    peer.close()
    assert peak_rss(receivers) - before < 20 << 20
    assert node.query("SELECT count(*) FROM instances") == [(1,)]


def test_a_peer_that_will_not_close_after_its_answer_is_cut_off(node_factory) -> None:  # type: ignore[no-untyped-def]
    """After an A-ASSOCIATE-RJ, or an A-RELEASE-RP, the node waits for the peer to close at
    most 5 s in all, however it drips bytes; a released association's slot and row are given
    back at once, not after the wait; an A-ASSOCIATE-RQ past 256 kB is aborted unread."""
    node: NodeProcess = node_factory(extra_node="max_associations = 1").start()

    def drip_until_closed(peer: Peer) -> float:
        start = time.monotonic()
        peer.sock.settimeout(1.0)
        while time.monotonic() - start < 20:
            try:
                peer.sock.sendall(b"x")
                if peer.sock.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        peer.close()
        return time.monotonic() - start

    peer = Peer(node.port)
    peer.sock.sendall(associate_rq(application_context="1.2.3.4"))
    assert peer.read_pdu()[0] == 3
    assert drip_until_closed(peer) < 15  # the old lingering never ended (the loop gives up at 20 s)

    peer = Peer(node.port)
    peer.associate()
    peer.sock.sendall(struct.pack(">BBLL", 5, 0, 4, 0))  # A-RELEASE-RQ
    assert peer.read_pdu() == (6, bytes(4))

    # the slot (max_associations = 1) is free while the peer still holds the connection (the
    # node gives it back right after the A-RELEASE-RP, a moment after the peer has it)
    def another_accepted() -> bool:
        other = Peer(node.port)
        try:
            other.sock.sendall(associate_rq())
            return other.read_pdu()[0] == 2
        finally:
            other.close()

    wait_for(another_accepted, timeout=3, interval=0.1, what="a second association while the first peer lingers")
    assert drip_until_closed(peer) < 15  # the old lingering never ended (the loop gives up at 20 s)
    assert node.query("SELECT outcome FROM associations ORDER BY id")[0] == ("released",)

    peer = Peer(node.port)
    peer.sock.sendall(struct.pack(">BBL", 1, 0, 300_000) + bytes(64))
    assert peer.read_pdu()[0] == 7
    peer.close()


def test_a_data_set_past_the_limit_aborts_its_association_and_costs_only_the_limit(node_factory) -> None:  # type: ignore[no-untyped-def]
    """node.max_dataset_mb = 1: a C-STORE whose data set goes on past 1 MiB (8 MiB sent in 64 kB
    fragments) gets an A-ABORT from the node as service user, is recorded as refused with the
    reason, stores nothing, and the receiving process grows by about the limit, not by what was
    sent; the next association is served."""
    node: NodeProcess = node_factory(receive_processes=1, extra_node="max_dataset_mb = 1").start()
    receivers = node.receivers()
    before = peak_rss(receivers)
    peer = Peer(node.port)
    peer.associate()
    sop = "1.2.826.0.1.3680043.10.1533.99.10"
    peer.sock.sendall(p_data(CT_CX, 3, command(0x0001, 1, CTImageStorage, sop, dataset=True)))
    try:
        for _ in range(128):
            peer.sock.sendall(p_data(CT_CX, 0, bytes(64 << 10)))
    except OSError:
        pass  # the node stopped reading after its A-ABORT and closed
    kind, body = peer.read_pdu()
    assert kind == 7 and (body[2], body[3]) == (0, 0), "A-ABORT, source service user"
    peer.close()
    assert peak_rss(receivers) - before < 30 << 20
    wait_for(lambda: node.query("SELECT outcome FROM associations") == [("aborted",)], timeout=10)
    [(uid, detail)] = node.query("SELECT sop_instance_uid, detail FROM events WHERE kind = 'store.refused'")
    assert uid == sop and "beyond 1 MiB (node.max_dataset_mb)" in detail
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    peer = Peer(node.port)
    peer.associate()
    peer.sock.sendall(p_data(VERIFICATION_CX, 3, command(0x0030, 1, Verification)))
    assert peer.response().Status == 0
    peer.close()
