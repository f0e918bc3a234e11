"""The DICOM upper layer of the storage SCP (PS3.8): one accepted connection, from its
A-ASSOCIATE-RQ to its release or abort, and the DIMSE messages C-ECHO and C-STORE (PS3.7).

The association request is decoded, and its presentation contexts negotiated, by pynetdicom's
PDU classes and negotiation functions. Everything after (the answer, P-DATA-TF, release,
abort) is read and written here, in the connection's own thread with blocking reads.
pynetdicom's acceptor passes each PDU through a state machine, two threads and queues polled
every millisecond: about 3 ms of CPU per 512x512 instance, more than the instance's durable
write (docs/receiving.md, "Speed").

What the node does with an association (its policy, the ledger, the store) comes in as
`Handlers`, callables bound to their dependencies (node/scp.py), as pynetdicom's event
handlers were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor, negotiate_unrestricted

from core import status
from core.errors import ProtocolError
from node import dimse

log = logging.getLogger(__name__)

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
PROTOCOL_VERSION = 0x0001
# 128 contexts (the most PS3.8 allows) with ten transfer syntaxes each take about 40 kB; pynetdicom
# needs about 0.2 s of CPU to decode this many bytes, before the policy is applied
MAX_ASSOCIATE_RQ_BYTES = 1 << 18
MAX_SHORT_PDU_BYTES = 1 << 8  # release and abort PDUs carry 4 bytes
READ_CHUNK_BYTES = 1 << 16  # how far a read's buffer may grow ahead of the bytes received
LINGER_S = 5.0  # after a rejection, release or abort: how long (in all) to wait for the peer to close
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
# A-ABORT source and reason (PS3.8 9.3.8)
ABORT_BY_USER, ABORT_BY_PROVIDER = 0x00, 0x02
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
# A-ASSOCIATE-RJ (result, source, reason) of the upper layer itself (PS3.8 9.3.4)
REJECT_APPLICATION_CONTEXT = (status.REJECTED_PERMANENT, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (status.REJECTED_PERMANENT, 0x02, 0x02)

Refusal = tuple[tuple[int, int, int], str]  # A-ASSOCIATE-RJ triple and the reason, for the log


class UnrecognisedPDU(ProtocolError):
    """A PDU type PS3.8 does not define (aborted with reason "unrecognized-PDU")."""


class DataSetTooLarge(ProtocolError):
    """A data set past the acceptor's `max_dataset` (aborted by the node as service user)."""

    def __init__(self, command: dimse.Command, limit: int) -> None:
        super().__init__(f"C-STORE data set of {command.sop_instance_uid} beyond {limit >> 20} MiB")
        self.command = command


@dataclasses.dataclass(frozen=True)
class Context:
    abstract_syntax: str
    transfer_syntax: str


class Association:
    """One connection as the SCP sees it; what the request named, what was negotiated, how it
    ended. Sends are serialised: `abort` may come from another thread (the node stopping)."""

    def __init__(self, sock: Any, host: str, port: int) -> None:
        self.sock = sock
        self.host = host
        self.port = port
        self.calling_ae = ""
        self.called_ae = ""
        self.contexts: dict[int, Context] = {}
        self.peer_max_pdu = 0  # 0: no limit
        self.negotiated = False  # accepted, rejected or ended
        self.released = False
        self.ending = False  # our last PDU (RJ, RP, A-ABORT) is sent: wait for the peer to close
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def abort(self, source: int = ABORT_BY_PROVIDER, reason: int = 0) -> None:
        """A-ABORT (best effort), then end our side of the connection: the peer reads the
        A-ABORT, then the end of the stream, and closes."""
        with contextlib.suppress(OSError):
            self.send(struct.pack(">BBLBBBB", ABORT, 0, 4, 0, 0, source, reason))
        self.ending = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def linger(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Wait, at most LINGER_S in all, for the peer to close after our last PDU: closing
        first with its bytes unread would reset the connection, which can lose the PDU we sent.
        Whatever the peer sends meanwhile is dropped."""
        end = clock() + LINGER_S
        with contextlib.suppress(OSError):
            while (left := end - clock()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    return


class Sink(Protocol):
    """Takes a data set's bytes as they arrive, in order (a running hash)."""

    def update(self, data: memoryview, /) -> None: ...


@dataclasses.dataclass(frozen=True)
class Handlers:
    """What the node does at each step; each is called in the association's thread."""

    requested: Callable[[Association], Refusal | None]  # the association policy (may take a slot)
    rejected: Callable[[Association, str], None]  # after an A-ASSOCIATE-RJ was sent
    established: Callable[[Association], None]
    echo: Callable[[Association], int]
    # a C-STORE-RQ's command is in and its data set follows: what its fragments are fed to as
    # they arrive (work done while the peer is still sending), given back to `store`
    receiving: Callable[[Association, dimse.Command, Context], Sink | None]
    store: Callable[[Association, dimse.Command, Context, bytearray, Sink | None], int]  # + data set, sink
    too_large: Callable[[Association, dimse.Command, str], None]  # a data set aborted past the limit
    ended: Callable[[Association], None]  # every connection, once, at its end


@dataclasses.dataclass(frozen=True)
class Acceptor:
    """What this SCP offers: its AE's supported contexts, and the largest P-DATA-TF it takes."""

    contexts: list[PresentationContext]
    max_pdu: int  # 0: no limit
    implementation_class_uid: str
    implementation_version_name: str
    unrestricted: bool = False  # any private or unknown storage SOP class (negotiate_unrestricted)
    max_dataset: int = 0  # bytes of one message's data set; 0: no limit


def serve(assoc: Association, handlers: Handlers, acceptor: Acceptor) -> None:
    """Run one connection to its end; never raises."""
    try:
        if _negotiate(assoc, handlers, acceptor):
            _transfer(assoc, handlers, acceptor)
    except DataSetTooLarge as exc:
        log.warning("aborting association from %s@%s: %s", assoc.calling_ae, assoc.host, exc)
        assoc.abort(source=ABORT_BY_USER)  # the node's own policy, not a protocol fault
        try:
            handlers.too_large(assoc, exc.command, str(exc))
        except Exception:
            log.exception("recording the data set from %s@%s", assoc.calling_ae, assoc.host)
    except ProtocolError as exc:
        log.warning("aborting association from %s@%s: %s", assoc.calling_ae, assoc.host, exc)
        unrecognised = isinstance(exc, UnrecognisedPDU)
        assoc.abort(reason=ABORT_UNRECOGNIZED_PDU if unrecognised else ABORT_UNEXPECTED_PDU)
    except OSError as exc:  # closed, reset, timed out (SO_RCVTIMEO), shut down by the guard
        log.info("connection from %s@%s ended: %s", assoc.calling_ae, assoc.host, exc or type(exc).__name__)
        assoc.abort()  # a peer still there (one that stalled) is told; sending to a closed one fails quietly
    except Exception:  # a bug, or a handler that failed (the ledger gone when the association opened)
        log.exception("association from %s@%s", assoc.calling_ae, assoc.host)
        assoc.abort()
    finally:
        assoc.negotiated = True
        try:
            handlers.ended(assoc)  # the slot is free and the row closed before any lingering
        except Exception:
            log.exception("ending association from %s@%s", assoc.calling_ae, assoc.host)
        if assoc.ending:
            assoc.linger()
        with contextlib.suppress(OSError):
            assoc.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            assoc.sock.close()


def _read_into(sock: Any, buf: bytearray, n: int) -> None:
    """Append exactly n bytes from the peer to `buf`; ConnectionError when it closes first.
    Memory follows what arrives, never what a length field announces: `buf` grows at most
    READ_CHUNK_BYTES ahead of the bytes received, so a PDV that claims gigabytes and stalls
    costs what it sent."""
    while n:
        step = min(n, READ_CHUNK_BYTES)
        start = len(buf)
        buf.extend(bytes(step))
        view = memoryview(buf)
        try:
            got = 0
            while got < step:
                k = sock.recv_into(view[start + got :], step - got)
                if not k:
                    raise ConnectionAbortedError("closed by the peer")
                got += k
        finally:
            view.release()  # the next extend() may move the buffer
        n -= step


def _read(sock: Any, n: int) -> bytearray:
    """Exactly n bytes, for what is small or capped before it is read (PDU and PDV headers,
    short PDUs, an A-ASSOCIATE-RQ under MAX_ASSOCIATE_RQ_BYTES): one buffer, no growing."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionAbortedError("closed by the peer")
        got += k
    return buf


def _header(sock: Any) -> tuple[int, int]:
    kind, _, length = struct.unpack(">BBL", _read(sock, 6))
    return kind, length


def _negotiate(assoc: Association, handlers: Handlers, acceptor: Acceptor) -> bool:
    """Read the A-ASSOCIATE-RQ and answer it; True when the association is established."""
    kind, length = _header(assoc.sock)
    if kind != ASSOCIATE_RQ:
        raise ProtocolError(f"PDU type 0x{kind:02X} before an A-ASSOCIATE-RQ")
    if length > MAX_ASSOCIATE_RQ_BYTES:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes")
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(struct.pack(">BBL", kind, 0, length) + bytes(_read(assoc.sock, length)))
        rq = pdu.to_primitive()
        assoc.calling_ae = str(rq.calling_ae_title).strip()
        assoc.called_ae = str(rq.called_ae_title).strip()
        user_items = list(rq.user_information)
        proposed = list(rq.presentation_context_definition_list)
    except OSError:
        raise
    except Exception as exc:  # pynetdicom raises many kinds on garbage
        raise ProtocolError(f"A-ASSOCIATE-RQ cannot be decoded: {type(exc).__name__}") from None
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    for item in user_items:
        if isinstance(item, MaximumLengthNotification):
            assoc.peer_max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    refused: Refusal | None
    if pdu.protocol_version != PROTOCOL_VERSION:
        refused = REJECT_PROTOCOL_VERSION, f"protocol version {pdu.protocol_version} is not 1"
    elif str(rq.application_context_name) != APPLICATION_CONTEXT:
        refused = REJECT_APPLICATION_CONTEXT, f"application context {rq.application_context_name} is not DICOM's"
    else:
        refused = handlers.requested(assoc)
    if refused is not None:
        (result, source, reason), why = refused
        assoc.send(struct.pack(">BBLBBBB", ASSOCIATE_RJ, 0, 4, 0, result, source, reason))
        assoc.negotiated = assoc.ending = True
        handlers.rejected(assoc, why)
        return False
    negotiate = negotiate_unrestricted if acceptor.unrestricted else negotiate_as_acceptor
    try:
        contexts, reply_roles = negotiate(proposed, acceptor.contexts, roles)
        assoc.contexts = {
            int(cx.context_id): Context(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in contexts
            if cx.result == 0 and cx.context_id is not None
        }
        assoc.send(_accept(rq, contexts, reply_roles, acceptor))
    except OSError:
        raise
    except Exception as exc:  # contexts pynetdicom could decode but not negotiate
        raise ProtocolError(f"presentation contexts cannot be negotiated: {type(exc).__name__}") from None
    assoc.negotiated = True
    handlers.established(assoc)
    return True


def _accept(rq: A_ASSOCIATE, result: list[PresentationContext], roles: list[Any], acceptor: Acceptor) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = rq.calling_ae_title
    primitive.called_ae_title = rq.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = result
    length = MaximumLengthNotification()
    length.maximum_length_received = acceptor.max_pdu
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = acceptor.implementation_class_uid
    name = ImplementationVersionNameNotification()
    name.implementation_version_name = acceptor.implementation_version_name
    primitive.user_information = [length, uid, name, *roles]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


class _Message:
    """The DIMSE message being received (PS3.7 8.1: its command, then its data set, on one
    presentation context), each part read straight into one buffer."""

    def __init__(self, max_data: int = 0) -> None:
        self.context: int | None = None
        self.command_set = bytearray()
        self.command: dimse.Command | None = None
        self.data = bytearray()
        self.max_data = max_data  # 0: no limit
        self.sink: Sink | None = None  # fed each data set fragment as it is read

    def read_fragment(self, sock: Any, flags: int, length: int) -> bool:
        """Read one PDV's value; True when the message is complete."""
        if flags & COMMAND:
            if self.command is not None:
                raise ProtocolError("a command fragment after its command's last fragment")
            if len(self.command_set) + length > dimse.MAX_COMMAND_BYTES:
                raise ProtocolError(f"command set of more than {dimse.MAX_COMMAND_BYTES} bytes")
            _read_into(sock, self.command_set, length)
            if not flags & LAST:
                return False
            self.command = dimse.decode(bytes(self.command_set))
            return not self.command.has_dataset
        if self.command is None:
            raise ProtocolError("a data set fragment before its command")
        if self.max_data and len(self.data) + length > self.max_data:
            raise DataSetTooLarge(self.command, self.max_data)
        start = len(self.data)
        _read_into(sock, self.data, length)
        if self.sink is not None:
            with memoryview(self.data) as view, view[start:] as fragment:
                self.sink.update(fragment)  # released before the next read may move the buffer
        return bool(flags & LAST)


def _transfer(assoc: Association, handlers: Handlers, acceptor: Acceptor) -> None:
    """The data transfer phase, until the peer releases or aborts."""
    message = _Message(acceptor.max_dataset)
    while True:
        kind, length = _header(assoc.sock)
        if kind == P_DATA_TF:
            if acceptor.max_pdu and length > acceptor.max_pdu:
                raise ProtocolError(f"P-DATA-TF of {length} bytes, more than the {acceptor.max_pdu} negotiated")
            message = _read_pdvs(assoc, handlers, length, message)
            continue
        if not ASSOCIATE_RQ <= kind <= ABORT:
            raise UnrecognisedPDU(f"unrecognised PDU type 0x{kind:02X}")
        if length > MAX_SHORT_PDU_BYTES:
            raise ProtocolError(f"PDU type 0x{kind:02X} of {length} bytes")
        _read(assoc.sock, length)
        if kind == RELEASE_RQ:
            assoc.send(struct.pack(">BBLL", RELEASE_RP, 0, 4, 0))
            assoc.released = assoc.ending = True
            return
        if kind == ABORT:
            log.info("association from %s@%s aborted by the peer", assoc.calling_ae, assoc.host)
            return
        raise ProtocolError(f"unexpected PDU type 0x{kind:02X} in the data transfer phase")


def _read_pdvs(assoc: Association, handlers: Handlers, length: int, message: _Message) -> _Message:
    """Read one P-DATA-TF's presentation data values; answer each message they complete."""
    remaining = length
    while remaining:
        if remaining < 6:
            raise ProtocolError("P-DATA-TF ends inside a PDV header")
        item_length, context, flags = struct.unpack(">LBB", _read(assoc.sock, 6))
        if item_length < 2 or item_length + 4 > remaining:
            raise ProtocolError("a PDV overruns its P-DATA-TF")
        if context not in assoc.contexts:
            raise ProtocolError(f"a PDV on presentation context {context}, which was not accepted")
        if message.context not in (None, context):
            raise ProtocolError("a message's fragments on two presentation contexts")
        message.context = context
        remaining -= item_length + 4
        if message.read_fragment(assoc.sock, flags, item_length - 2):
            _answer(assoc, handlers, message)
            message = _Message(message.max_data)
        elif flags & COMMAND and message.command is not None:  # the command is in, its data set follows
            message.sink = _sink(assoc, handlers, message.command, assoc.contexts[context])
    return message


def _sink(assoc: Association, handlers: Handlers, command: dimse.Command, context: Context) -> Sink | None:
    if not _is_store(command, context):
        return None
    try:
        return handlers.receiving(assoc, command, context)
    except Exception:  # a bug in a handler: `store` gets no sink and does that work itself
        log.exception("receiving C-STORE from %s@%s", assoc.calling_ae, assoc.host)
        return None


def _is_store(command: dimse.Command, context: Context) -> bool:
    """Whether `_answer` gives this request's data set to `store`."""
    return command.field == dimse.C_STORE_RQ and command.has_dataset and context.abstract_syntax != VERIFICATION


def _answer(assoc: Association, handlers: Handlers, message: _Message) -> None:
    command, context_id = message.command, message.context
    assert command is not None and context_id is not None
    context = assoc.contexts[context_id]
    if not command.sop_class_uid:  # mandatory in the response (PS3.7 9.3.5.2, 9.3.1.2)
        command = dataclasses.replace(command, sop_class_uid=context.abstract_syntax)
    if command.field & dimse.RESPONSE_BIT:
        raise ProtocolError(f"a response (command field 0x{command.field:04X}) sent to the SCP")
    if command.field == dimse.C_CANCEL_RQ:  # nothing to cancel: each request is answered in turn
        return
    try:
        if command.field == dimse.C_ECHO_RQ and context.abstract_syntax == VERIFICATION:
            code = handlers.echo(assoc)
        elif _is_store(command, context):
            code = handlers.store(assoc, command, context, message.data, message.sink)  # the buffer itself
        elif command.field == dimse.C_STORE_RQ and context.abstract_syntax != VERIFICATION:
            code = status.CANNOT_UNDERSTAND  # a C-STORE-RQ that says no data set follows
        else:
            code = status.UNRECOGNIZED_OPERATION
    except Exception:  # a bug in a handler: this request fails, the association goes on
        log.exception("handling command 0x%04X from %s@%s", command.field, assoc.calling_ae, assoc.host)
        code = status.PROCESSING_FAILURE
    _send_command(assoc, context_id, dimse.response(command, code))


def _send_command(assoc: Association, context: int, command: bytes) -> None:
    """A command set as P-DATA-TF PDUs within the peer's maximum length (PS3.8 9.3.5)."""
    size = assoc.peer_max_pdu - 6 if assoc.peer_max_pdu > 6 else len(command) or 1
    pdus = []
    for start in range(0, len(command), size):
        chunk = command[start : start + size]
        flags = COMMAND | (LAST if start + size >= len(command) else 0)
        pdus.append(struct.pack(">BBLLBB", P_DATA_TF, 0, len(chunk) + 6, len(chunk) + 2, context, flags) + chunk)
    assoc.send(b"".join(pdus))
