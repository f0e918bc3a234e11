"""The sender: claims pending deliveries and stores their instances on the destination, one
association per delivery (reused for all its instances), recording every C-STORE status in
the ledger as it arrives. A delivery is `delivered` only when every instance was stored
(success, or a warning after which the object is kept: B000, B006, B007...); anything else is
retried with backoff and jitter until the destination's `max_attempts`, then `failed`
(`enhance-node jobs retry ID` resubmits it).

Instances are sent as stored, byte for byte (pynetdicom streams the file without decoding it),
in a presentation context of their own transfer syntax; each SOP class is also proposed with
Explicit VR Little Endian, and a compressed instance whose own syntax the destination refuses
is decompressed and sent in that.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from core.status import REJECTED_PERMANENT, REJECTED_TRANSIENT, SUCCESS, stored
from node.config import DestinationConfig, SenderConfig
from node.heartbeat import heartbeating
from storage.deliveries import Delivery, DeliveryQueue, PendingInstance
from storage.filestore import FileStore
from storage.schema import INSTANCE_FAILED, INSTANCE_STORED, INSTANCE_WARNING

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# Send files as they are, streamed from disk, instead of decoding each into a Dataset first.
_config.STORE_SEND_CHUNKED_DATASET = True

Record = Callable[[PendingInstance, str, int | None, str], bool]  # False: stop, no longer ours


@dataclass(frozen=True)
class Attempt:
    sent: int
    error: str  # "" when every instance got an answer (each answer is recorded separately)


def contexts(instances: Sequence[PendingInstance]) -> list[PresentationContext]:
    """Each (SOP class, own transfer syntax) pair, and each SOP class in Explicit VR Little
    Endian, as separate contexts so the destination can accept either."""
    wanted: dict[tuple[str, str], None] = {}
    for inst in instances:
        wanted[(inst.sop_class_uid, inst.transfer_syntax_uid)] = None
        wanted[(inst.sop_class_uid, ExplicitVRLittleEndian)] = None
    if len(wanted) > MAX_CONTEXTS:
        raise ValueError(f"{len(wanted)} presentation contexts needed; at most {MAX_CONTEXTS} fit an association")
    return [build_context(sop, [ts]) for sop, ts in wanted]


def outcome_of(status: int | None) -> str:
    if status == SUCCESS:
        return INSTANCE_STORED
    return INSTANCE_WARNING if stored(status) else INSTANCE_FAILED


def send_batch(
    dest: DestinationConfig,
    calling_ae: str,
    cfg: SenderConfig,
    store: FileStore,
    instances: Sequence[PendingInstance],
    record: Record,
) -> Attempt:
    """One association to `dest` carrying `instances`; `record` gets each C-STORE answer."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    try:
        requested = contexts(instances)
    except ValueError as exc:
        return Attempt(0, str(exc))
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = requested
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = cfg.timeout
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    if not assoc.is_established:
        return Attempt(0, association_failure(assoc, where))
    sent = 0
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        for n, inst in enumerate(instances):
            status, detail = _store(assoc, accepted, store, inst, msg_id=n % 65535 + 1)
            sent += 1
            if not record(inst, outcome_of(status), status, detail):
                return Attempt(sent, "the delivery is no longer this sender's (cancelled, or re-queued as stale)")
            if not assoc.is_established:
                return Attempt(sent, f"association with {where} ended after {sent} of {len(instances)}: {detail}")
        return Attempt(sent, "")
    finally:
        if assoc.is_established:
            assoc.release()


def _no_delay(event: Event) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY. pynetdicom leaves Nagle's algorithm on, and the last small
    segment of every object then waits for the peer's delayed ACK: ~30 ms per instance
    (300 slices: 8.9 s to DCMTK storescp, against 0.6 s from storescu)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _store(
    assoc: Association, accepted: set[tuple[str, str]], store: FileStore, inst: PendingInstance, msg_id: int
) -> tuple[int | None, str]:
    """The C-STORE status (None when none came back) and a reason when it was not success."""
    path = store.abspath(inst.path)
    as_stored = (inst.sop_class_uid, inst.transfer_syntax_uid) in accepted
    fallback = next((ts for ts in UNCOMPRESSED if (inst.sop_class_uid, ts) in accepted), None)
    if not as_stored and fallback is None:
        return None, f"the destination accepted neither {UID(inst.transfer_syntax_uid).name} nor an uncompressed syntax"
    try:
        if as_stored:
            rsp = assoc.send_c_store(path, msg_id=msg_id)
        else:
            ds = pydicom.dcmread(path)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            rsp = assoc.send_c_store(ds, msg_id=msg_id)
    except Exception as exc:  # a bad file fails this instance (recorded), not the whole delivery
        return None, f"cannot send {inst.path}: {type(exc).__name__}: {exc}"
    status = rsp.get("Status") if rsp else None
    if status is None:
        return None, "no C-STORE response (association aborted or timed out)"
    comment = str(rsp.get("ErrorComment", ""))
    return int(status), "" if status == SUCCESS else f"status 0x{int(status):04X} {comment}".strip()


def peer_answer(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE response (accept or reject), if one came.

    pynetdicom 3.0 can lose a rejection: its DUL thread reads the A-ASSOCIATE-RJ and closes the
    socket, and when that happens before the requesting thread has checked that the socket is
    connected, the requestor aborts as if the connection had failed and the response stays in
    the DUL's queue (about 1 in 30 rejections by Orthanc on loopback)."""
    if assoc.acceptor.primitive is not None:
        return assoc.acceptor.primitive
    queued = (p for p in list(assoc.dul.to_user_queue.queue) if isinstance(p, A_ASSOCIATE))
    return next(queued, None)


def association_failure(assoc: Association, where: str) -> str:
    """Why an association that was not established failed, in one line."""
    answer = peer_answer(assoc)
    if answer is None:
        return f"cannot connect to {where} (refused, unreachable, or no answer in time)"
    if answer.result in (REJECTED_PERMANENT, REJECTED_TRANSIENT):
        return f"association rejected by {where}: {answer.result_str}, {answer.source_str}, {answer.reason_str}"
    if not assoc.accepted_contexts:
        return f"{where} accepted none of the presentation contexts proposed"
    return f"association with {where} aborted during negotiation"


class Sender:
    """Runs deliveries until stopped, `cfg.concurrency` at a time; the ledger is the only
    coordination between senders."""

    def __init__(
        self,
        cfg: SenderConfig,
        destinations: Callable[[], Sequence[DestinationConfig]],
        calling_ae: str,
        queue: DeliveryQueue,
        store: FileStore,
        ident: str,
        node_prefix: str | None = None,
    ) -> None:
        """`ident` names this process's sender; `node_prefix` what every sender of this node
        (this run's and earlier runs') has in common, to resume what an earlier run left."""
        self.cfg = cfg
        self.destinations = destinations  # as config.toml says now
        self.calling_ae = calling_ae
        self.queue = queue
        self.store = store
        self.ident = ident
        self.node_prefix = node_prefix
        self._next_stale_check = 0.0
        self._stale_lock = threading.Lock()

    def run_once(self, slot: int = 0) -> bool:
        """Runs one delivery if one is due; False when none was."""
        self._requeue_stale()
        sender = f"{self.ident}/{slot}"
        delivery = self.queue.claim(sender, [d.name for d in self.destinations()])
        if delivery is None:
            return False
        started = time.monotonic()
        beat = lambda: self.queue.heartbeat(delivery.id, sender)  # noqa: E731
        with heartbeating(beat, self.cfg.heartbeat_seconds, f"delivery {delivery.id}"):
            attempt = self._attempt(delivery, sender)
        state = self.queue.finish_attempt(delivery.id, sender, attempt.error)
        log_at = logging.INFO if state == "delivered" else logging.WARNING
        log.log(
            log_at,
            "delivery %d (%s series %s) to %s, attempt %d/%d: %d sent in %.1f s, now %s%s",
            delivery.id,
            delivery.kind,
            delivery.series_instance_uid,
            delivery.destination,
            delivery.attempts,
            delivery.max_attempts,
            attempt.sent,
            time.monotonic() - started,
            state or "no longer ours",
            f" ({attempt.error})" if attempt.error else "",
        )
        return True

    def _attempt(self, delivery: Delivery, sender: str) -> Attempt:
        dest = next((d for d in self.destinations() if d.name == delivery.destination), None)
        if dest is None:
            return Attempt(0, f"destination {delivery.destination!r} is not configured here")
        pending = self.queue.pending_instances(delivery.id)
        if not pending:
            return Attempt(0, "")

        def record(inst: PendingInstance, outcome: str, status: int | None, detail: str) -> bool:
            return self.queue.record(delivery.id, sender, inst.id, outcome, status, detail)

        return send_batch(dest, self.calling_ae, self.cfg, self.store, pending, record)

    def _requeue_stale(self) -> None:
        """Once per heartbeat period (each check takes the ledger's write lock)."""
        with self._stale_lock:
            if time.monotonic() < self._next_stale_check:
                return
            self._next_stale_check = time.monotonic() + self.cfg.heartbeat_seconds
        if self.node_prefix is not None:  # first: what this node's earlier run left is not the delivery's fault
            quiet = 2 * self.cfg.heartbeat_seconds
            for delivery_id in self.queue.requeue_abandoned(self.node_prefix, self.ident, quiet):
                log.warning("delivery %d was in flight when this node last stopped; resuming it", delivery_id)
        for delivery_id in self.queue.requeue_stale(self.cfg.stale_after_seconds):
            log.warning("delivery %d had no heartbeat for %.0f s; re-queued", delivery_id, self.cfg.stale_after_seconds)

    def run(self, stop: threading.Event) -> None:
        def loop(slot: int) -> None:
            while not stop.is_set():
                try:
                    busy = self.run_once(slot)
                except Exception:  # the ledger may be briefly unavailable: log, wait, go on
                    log.exception("sender slot %d failed; continuing", slot)
                    busy = False
                if not busy:
                    stop.wait(IDLE_POLL_S)

        threads = [threading.Thread(target=loop, args=(i,), name=f"sender-{i}") for i in range(self.cfg.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
