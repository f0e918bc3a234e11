"""What the SCP does at each step of an association (node/ul.py's `Handlers`). Each takes
the association and the step's data first and its dependencies as keyword arguments (bound
with functools.partial in node/scp.py); none does heavy work or decodes pixels.

Unexpected errors propagate: the upper layer answers 0x0110 (processing failure) and logs
them. Only failures that have a status of their own (out of resources, invalid dataset) are
caught here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from core import status
from core.errors import InvalidDataset, OutOfResources
from core.header import DEFLATED_SYNTAXES, Buffer, parse_header
from node.background import BackgroundWriter
from node.config import NodeConfig
from node.dimse import Command
from node.guard import Throttle
from node.instance import check_matches_request, file_meta, inflated_size, strip_file_meta
from node.ul import Association, Context, Refusal, Sink
from storage.filestore import FileStore, object_path
from storage.ledger import EventKind, Ledger, Received, StoredFile

log = logging.getLogger(__name__)


class OpenAssociations:
    """The associations this SCP process holds: each takes one of the node-wide
    `node.max_associations` slots when requested, and gets its ledger row id once established.

    Slots are counted per process in an array shared by every SCP process, so the supervisor
    can give back the slots of a process that died (its count is zeroed when it is replaced)."""

    def __init__(self, limit: int, counts: Any, index: int) -> None:
        self.limit = limit
        self._counts = counts  # multiprocessing.Array("i", processes), shared with the others
        self._index = index  # this process's entry
        self._rows: dict[Association, int | None] = {}
        self._lock = threading.Lock()

    def open_count(self) -> int:
        """Associations open in the whole node now."""
        return int(sum(self._counts[:]))

    def acquire(self, assoc: Association) -> bool:
        with self._counts.get_lock():
            if sum(self._counts[:]) >= self.limit:
                return False
            self._counts[self._index] += 1
        with self._lock:
            self._rows[assoc] = None
        return True

    def bind(self, assoc: Association, row_id: int) -> None:
        with self._lock:
            self._rows[assoc] = row_id

    def row(self, assoc: Association) -> int | None:
        with self._lock:
            return self._rows.get(assoc)

    def release(self, assoc: Association) -> int | None:
        """Free the slot (if this association held one); returns its ledger row id."""
        with self._lock:
            if assoc not in self._rows:
                return None
            row = self._rows.pop(assoc)
        with self._counts.get_lock():
            self._counts[self._index] -= 1
        return row


@dataclass(frozen=True)
class Peer:
    calling_ae: str
    called_ae: str
    host: str
    port: int

    @classmethod
    def of(cls, assoc: Association) -> Peer:
        return cls(assoc.calling_ae, assoc.called_ae, assoc.host, assoc.port)


def refusal(config: NodeConfig, peer: Peer) -> Refusal | None:
    """Why an association must be rejected (A-ASSOCIATE-RJ triple and reason), or None."""
    if peer.called_ae != config.ae_title:
        return status.REJECT_CALLED_AE, f"called AE {peer.called_ae!r} is not {config.ae_title!r}"
    allowed = config.allowed_ae(peer.calling_ae)
    if allowed is None:
        return status.REJECT_CALLING_AE, f"calling AE {peer.calling_ae!r} is not in node.allowed"
    if allowed.host is not None and allowed.host != peer.host:
        return status.REJECT_CALLING_AE, f"calling AE {peer.calling_ae!r} not allowed from {peer.host}"
    return None


def handle_requested(
    assoc: Association, *, config: Callable[[], NodeConfig], open_assocs: OpenAssociations
) -> Refusal | None:
    """The association policy (as config.toml says now), before negotiation; an accepted
    association takes one of the node's slots. The refusal is recorded by handle_rejected,
    after the peer has its A-ASSOCIATE-RJ."""
    refused = refusal(config(), Peer.of(assoc))
    if refused is None and not open_assocs.acquire(assoc):
        refused = status.REJECT_TOO_MANY, f"too many associations (node.max_associations = {open_assocs.limit})"
    return refused


def handle_rejected(assoc: Association, reason: str, *, ledger: Ledger) -> None:
    peer = Peer.of(assoc)
    log.warning("rejected association from %s@%s: %s", peer.calling_ae, peer.host, reason)
    _record_refusal(ledger, EventKind.ASSOCIATION_REJECTED, peer, None, None, reason)


def tls_refused(writer: BackgroundWriter, ledger: Ledger, host: str, reason: str) -> None:
    """A client whose TLS handshake failed (no or untrusted certificate, plain TCP, silence);
    recorded by `writer`, so a busy ledger never holds up the accept loop that calls this."""
    log.warning("refused connection from %s: %s", host, reason)
    peer = Peer("", "", host, 0)
    writer.submit(
        lambda: _record_refusal(ledger, EventKind.ASSOCIATION_REJECTED, peer, None, None, reason),
        f"refusal of {host}",
    )


def connection_refused(
    writer: BackgroundWriter, ledger: Ledger, throttle: Throttle, host: str, kind: str, reason: str
) -> None:
    """A connection the guard refused or closed (node/guard.py): logged and recorded (by
    `writer`, off the accept loop) at most once a minute per host and `kind` of refusal, with
    the count of those not reported since."""
    report, quiet = throttle.take(f"{host} {kind}")
    if report:
        more = f" ({quiet} more since the last report)" if quiet else ""
        log.warning("connection from %s: %s%s", host, reason, more)
        peer = Peer("", "", host, 0)
        writer.submit(
            lambda: _record_refusal(ledger, EventKind.ASSOCIATION_REJECTED, peer, None, None, reason + more),
            f"refusal of {host}",
        )


def handle_established(
    assoc: Association, *, ledger: Ledger, open_assocs: OpenAssociations, node_id: str, tls: bool
) -> None:
    peer = Peer.of(assoc)
    row = ledger.open_association(node_id, peer.calling_ae, peer.called_ae, peer.host, peer.port, tls)
    open_assocs.bind(assoc, row)
    log.info("association %d from %s@%s:%d", row, peer.calling_ae, peer.host, peer.port)


def association_ended(assoc: Association, *, ledger: Ledger, open_assocs: OpenAssociations) -> None:
    """The end of every connection, released, aborted or rejected: give back the
    association's slot and close its ledger row; once (a second call finds no slot)."""
    row = open_assocs.release(assoc)
    if row is not None:
        outcome = "released" if assoc.released else "aborted"
        try:
            ledger.close_association(row, outcome)
        except SQLAlchemyError:
            log.error("ledger unavailable: association %d not closed (start-up closes it as lost)", row)
        log.info("association %d %s", row, outcome)


def handle_echo(assoc: Association) -> int:
    return status.SUCCESS


class RunningHash:
    """The sha256 of an instance's file (File Meta, then the data set), computed while the data
    set arrives (`Handlers.receiving`) instead of after: the peer is still sending meanwhile."""

    def __init__(self, meta: bytes) -> None:
        self.meta = meta  # the File Meta hashed first; `handle_store` checks it is the file's
        self._sha = hashlib.sha256(meta)

    def update(self, data: memoryview, /) -> None:
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def handle_receiving(assoc: Association, rq: Command, context: Context) -> RunningHash | None:
    """A C-STORE's data set is about to arrive: hash it as it does. None when no File Meta can
    be made of the request (a UID that is not ASCII): handle_store answers that."""
    try:
        meta = file_meta(rq.sop_class_uid, rq.sop_instance_uid, context.transfer_syntax, assoc.calling_ae)
    except UnicodeEncodeError:
        return None
    return RunningHash(meta)


def handle_store(
    assoc: Association,
    rq: Command,
    context: Context,
    dataset: bytes | bytearray,
    running: Sink | None = None,
    *,
    store: FileStore,
    ledger: Ledger,
    open_assocs: OpenAssociations,
    max_inflated: int,
) -> int:
    """C-STORE: persist the bytes as received, durably, then record them; then answer.
    Before anything is written: a deflated data set must inflate within `max_inflated` bytes
    (counted 1 MiB at a time, never held), and File Meta elements (group 0002) the peer put
    in the data set are dropped, answered 0xB006 (docs/receiving.md, "Malformed data").
    `running` is handle_receiving's hash of what arrived: used when it covers exactly the file
    written (the same File Meta, nothing dropped), else the file is hashed here."""
    peer = Peer.of(assoc)
    sop_class, sop_uid = rq.sop_class_uid, rq.sop_instance_uid
    ts = context.transfer_syntax
    series_uid: str | None = None
    if sop_class != context.abstract_syntax:  # PS3.7 9.1.1.1.2: the SOP class of the context
        why = f"C-STORE for SOP Class {sop_class} on a presentation context negotiated for {context.abstract_syntax}"
        return _refuse(ledger, peer, status.SOP_CLASS_NOT_SUPPORTED, sop_uid, None, why)
    try:
        if ts in DEFLATED_SYNTAXES:
            inflated_size(dataset, max_inflated)
        dataset, dropped = strip_file_meta(dataset, ts)
        meta = file_meta(sop_class, sop_uid, ts, peer.calling_ae)
        part10 = _with_meta(meta, dataset)
        header = parse_header(part10)
        series_uid = header.series_instance_uid
        check_matches_request(header, sop_class, sop_uid)
        if isinstance(running, RunningHash) and running.meta == meta and not dropped:
            sha = running.hexdigest()
        else:  # the request named no SOP class (its context's is used), or elements were dropped
            sha = hashlib.sha256(part10).hexdigest()
        path = object_path(header.study_instance_uid, series_uid, sop_uid, sha)
        assoc_row = open_assocs.row(assoc)
        received = Received(StoredFile(path, sha, len(part10)), peer.calling_ae, peer.host, assoc_row)
        # The path names the content (sha256), so an existing file there holds these bytes:
        # an identical re-send is stored once (the first copy may still be waiting for its sync).
        wrote = not store.abspath(path).exists()
        with store.place(path, part10) if wrote else store.existing(path) as durable:
            if open_assocs.open_count() > 1:
                # others write too: wait here, so that the ledger's write lock (a transaction
                # waiting in before_commit holds it) is not held through a flush they share
                durable.wait()
            try:  # alone, the ledger's statements run while the file is flushed; the commit waits for it
                outcome = ledger.record_instance(header, received, before_commit=durable.wait)
            except SQLAlchemyError as exc:
                # the file stays: an identical re-send on another association may have recorded
                # it meanwhile; a re-send records it, start-up recovery adopts it otherwise
                raise OutOfResources(f"ledger unavailable: {type(exc).__name__}") from None
    except OutOfResources as exc:
        return _refuse(ledger, peer, status.OUT_OF_RESOURCES, sop_uid, series_uid, str(exc))
    except InvalidDataset as exc:
        return _refuse(ledger, peer, exc.status, sop_uid, series_uid, str(exc))
    log.debug("stored %s (%s) from %s", sop_uid, outcome.value, peer.calling_ae)
    if header.warning:  # stored as sent; the worker refuses it with this reason
        code, kind, why = status.DOES_NOT_MATCH_WARNING, EventKind.INSTANCE_MALFORMED, header.warning
    elif dropped:
        why = f"{dropped} File Meta element(s) (group 0002) in the data set dropped"
        code, kind = status.ELEMENTS_DISCARDED, EventKind.INSTANCE_ELEMENTS_DISCARDED
    else:
        return status.SUCCESS
    log.warning("stored %s from %s with warning 0x%04X: %s", sop_uid, peer.calling_ae, code, why)
    _record_refusal(ledger, kind, peer, sop_uid, series_uid, why, code)
    return code


def _with_meta(meta: bytes, dataset: Buffer) -> Buffer:
    """The Part 10 file: `meta`, then `dataset`. The upper layer's receive buffer (a bytearray it
    has no further use for) takes the meta in place, in its spare room or by growing where it
    is, so a data set is never held twice (docs/receiving.md, "Data set size")."""
    if isinstance(dataset, bytearray):
        dataset[:0] = meta
        return dataset
    return meta + dataset


def handle_too_large(assoc: Association, rq: Command, reason: str, *, ledger: Ledger) -> None:
    """A data set past node.max_dataset_mb: its association was aborted, nothing was stored."""
    peer = Peer.of(assoc)
    _record_refusal(ledger, EventKind.STORE_REFUSED, peer, rq.sop_instance_uid, None, reason + " (node.max_dataset_mb)")


def _refuse(ledger: Ledger, peer: Peer, code: int, sop_uid: str, series_uid: str | None, reason: str) -> int:
    log.warning("refused C-STORE of %s from %s@%s: 0x%04X %s", sop_uid, peer.calling_ae, peer.host, code, reason)
    _record_refusal(ledger, EventKind.STORE_REFUSED, peer, sop_uid, series_uid, reason, code)
    return code


def _record_refusal(
    ledger: Ledger,
    kind: EventKind,
    peer: Peer,
    sop_uid: str | None,
    series_uid: str | None,
    reason: str,
    code: int | None = None,
) -> None:
    try:
        ledger.add_event(
            kind,
            calling_ae=peer.calling_ae,
            peer_host=peer.host,
            sop_instance_uid=sop_uid,
            series_instance_uid=series_uid,
            status=code,
            detail=reason,
        )
    except SQLAlchemyError:
        log.error("ledger unavailable: could not record %s from %s@%s", kind, peer.calling_ae, peer.host)
