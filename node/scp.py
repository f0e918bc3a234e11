"""The storage SCP: a threaded TCP server whose connections run node/ul.py's upper layer,
accepting C-ECHO and C-STORE for every storage SOP class and transfer syntax pynetdicom knows,
with the node's association policy, connection guard and TLS."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import handlers, ul
from node.background import BackgroundWriter
from node.config import NodeConfig, TLSConfig
from node.guard import Connection, ConnectionGuard, Throttle
from node.instance import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from storage.filestore import FileStore
from storage.ledger import Ledger

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.25
ABORT_WAIT_S = 5.0  # at stop: for aborted associations' threads to record their end
REPORT_PERIOD_S = 60.0  # refused or closed connections: one log line and event per host and minute


class NodeServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread per connection, each running node/ul.py's upper layer, and:

    - binds with SO_REUSEPORT, so several SCP processes share the port (the kernel spreads
      connections over them);
    - sets TCP_NODELAY on every accepted connection: C-STORE responses are small, and with
      Nagle's algorithm each may wait for the peer's delayed ACK (~40 ms on Linux); and the
      network timeout on its reads and writes, so a PDU that stalls halfway is closed;
    - admits a connection only within the per-host limit, and closes one that has not
      negotiated an association in time (node/guard.py); refusals go to `on_refused`;
    - does the TLS handshake in the connection's own thread with the negotiation timeout, not
      in the accept loop, so a silent or failing client never stops others from connecting, and
      a failed handshake is reported to `on_tls_refused`.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        *,
        acceptor: ul.Acceptor,
        handlers: ul.Handlers,
        network_timeout: float,
        ssl_context: ssl.SSLContext | None,
        on_tls_refused: Callable[[str, str], None],
        guard: ConnectionGuard,
        on_refused: Callable[[str, str, str], None],
    ) -> None:
        self.acceptor = acceptor
        self.handlers = handlers
        self.network_timeout = network_timeout
        self.ssl_context = ssl_context
        self.on_tls_refused = on_tls_refused
        self.guard = guard
        self.on_refused = on_refused
        self.associations: set[ul.Association] = set()  # open now, for stop()
        self.stopping = False  # set by stop(): connections that reach run() after are closed
        self._lock = threading.Lock()
        self._reaping = threading.Event()
        super().__init__(address, ConnectionHandler)
        threading.Thread(target=self._reap, name="scp-reaper", daemon=True).start()

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a read that gets no byte for network_timeout fails: a PDU that stalls halfway is
        # closed, a slow link that keeps sending is not; the same for a peer that stops reading
        seconds = self.network_timeout
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Runs in the accept loop, which socketserver does not protect: an exception here
        would end serve_forever with the process still up, so none may escape."""
        try:
            refused = self.guard.admit(client_address[0])
            if refused is not None:
                self.on_refused(client_address[0], "limit", refused)
                return False
            return True
        except Exception:
            log.exception("admitting a connection from %s", client_address[0])
            return False

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            # the handshake is under the negotiation deadline too: a client that drips it a
            # byte at a time is closed by the reaper (each read alone has the same timeout)
            host, token, done = client_address[0], id(request), threading.Event()
            close = functools.partial(_shut, request)
            self.guard.watch(token, Connection(host, self.guard.clock(), close, done.is_set))
            request.settimeout(self.guard.negotiation_timeout)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except OSError as exc:  # ssl.SSLError, timeout, reset, closed by the reaper: this client only
                self.guard.release(token, host)
                self.on_tls_refused(host, f"TLS handshake failed: {exc}")
                request.close()
                return
            done.set()
            self.guard.unwatch(token)  # the association's own deadline starts when it is created
            request.settimeout(self.network_timeout)
        super().finish_request(request, client_address)

    def run(self, assoc: ul.Association) -> None:
        """One connection, under the guard's negotiation deadline, to its end."""
        token, host = id(assoc), assoc.host
        close = functools.partial(_shut, assoc.sock)
        self.guard.watch(token, Connection(host, self.guard.clock(), close, lambda: assoc.negotiated))
        with self._lock:
            if self.stopping:  # accepted (or in its TLS handshake) when the node began to stop
                self.guard.release(token, host)
                _shut(assoc.sock)
                return
            self.associations.add(assoc)
        try:
            ul.serve(assoc, self.handlers, self.acceptor)
        finally:
            with self._lock:
                self.associations.discard(assoc)
            self.guard.release(token, host)

    def refuse_new(self) -> None:
        """From now on a connection that reaches run() is closed at once."""
        with self._lock:
            self.stopping = True

    def open_associations(self) -> list[ul.Association]:
        with self._lock:
            return list(self.associations)

    def _reap(self) -> None:
        """Close connections past their negotiation deadline, until the server closes; nothing
        that goes wrong for one connection may stop it."""
        while not self._reaping.wait(REAP_INTERVAL_S):
            try:
                for c in self.guard.sweep():
                    c.close()
                    timeout = self.guard.negotiation_timeout
                    self.on_refused(c.host, "negotiation", f"closed: no association negotiated within {timeout:g} s")
            except Exception:  # a bug here must not leave the port open to the attack
                log.exception("connection reaper")

    def server_close(self) -> None:
        self._reaping.set()
        super().server_close()


class ConnectionHandler(socketserver.BaseRequestHandler):
    server: NodeServer

    def handle(self) -> None:
        self.server.run(ul.Association(self.request, self.client_address[0], int(self.client_address[1])))


def _shut(request: Any) -> None:
    """Shut a connection down so a read blocked on it returns (its thread then ends it)."""
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


def _wait_for_none(server: NodeServer, seconds: float) -> None:
    """Until no association is open on `server`, at most `seconds`."""
    end = time.monotonic() + seconds
    while server.open_associations() and time.monotonic() < end:
        time.sleep(0.01)


def tls_context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=cfg.cert_file, keyfile=cfg.key_file)
    if cfg.ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=cfg.ca_file)
    return ctx


def quiet_pydicom() -> None:
    """Skip pydicom's value validation in the SCP process: it only reads headers here (stored
    bytes are never rewritten), and the regex checks cost more than the rest of the read."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


def supported_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows (the standard's, images, SR, SEG, RT, KO, PR,
    encapsulated documents, waveforms, raw data) in every transfer syntax, and Verification.
    With node.accept_unknown_sop_classes (`ul.Acceptor.unrestricted`), also any private or
    unknown abstract syntax a peer proposes (pynetdicom's unrestricted negotiation); other
    services' classes (query/retrieve, worklist) are still refused."""
    classes = [Verification, *(cx.abstract_syntax for cx in AllStoragePresentationContexts)]
    return [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in classes]


class StorageSCP:
    """One listening SCP with its handlers; `start()` returns once it accepts connections."""

    def __init__(
        self,
        cfg: NodeConfig,
        store: FileStore,
        ledger: Ledger,
        node_id: str,
        associations: handlers.OpenAssociations,
        current: Callable[[], NodeConfig] | None = None,
    ) -> None:
        """`current` gives the live configuration (the allowed AEs may change while running);
        everything else is read from `cfg` once."""
        self.cfg = cfg
        self.ledger = ledger
        live = current or (lambda: cfg)
        self.guard = ConnectionGuard(
            cfg.max_connections_per_host,
            cfg.negotiation_timeout,
            exempt_hosts=lambda: {a.host for a in live().allowed if a.host is not None},
            max_total=cfg.max_connections,
        )
        self.acceptor = ul.Acceptor(
            contexts=supported_contexts(),
            max_pdu=cfg.max_pdu_size,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            unrestricted=cfg.accept_unknown_sop_classes,
            max_dataset=cfg.max_dataset_mb << 20,
        )
        slots = associations
        self.handlers = ul.Handlers(
            requested=functools.partial(handlers.handle_requested, config=live, open_assocs=slots),
            rejected=functools.partial(handlers.handle_rejected, ledger=ledger),
            established=functools.partial(
                handlers.handle_established, ledger=ledger, open_assocs=slots, node_id=node_id, tls=cfg.tls is not None
            ),
            echo=handlers.handle_echo,
            receiving=handlers.handle_receiving,
            store=functools.partial(
                handlers.handle_store,
                store=store,
                ledger=ledger,
                open_assocs=slots,
                max_inflated=cfg.max_inflated_mb << 20,
            ),
            too_large=functools.partial(handlers.handle_too_large, ledger=ledger),
            ended=functools.partial(handlers.association_ended, ledger=ledger, open_assocs=slots),
        )
        self._server: NodeServer | None = None
        self._events: BackgroundWriter | None = None

    def start(self) -> None:
        quiet_pydicom()
        self._events = BackgroundWriter("scp-refusals")
        server = NodeServer(
            (self.cfg.host, self.cfg.port),
            acceptor=self.acceptor,
            handlers=self.handlers,
            network_timeout=self.cfg.network_timeout,
            ssl_context=tls_context(self.cfg.tls) if self.cfg.tls else None,
            on_tls_refused=functools.partial(handlers.tls_refused, self._events, self.ledger),
            guard=self.guard,
            on_refused=functools.partial(
                handlers.connection_refused, self._events, self.ledger, Throttle(REPORT_PERIOD_S)
            ),
        )
        self._server = server
        threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True).start()
        log.info(
            "SCP %s listening on %s:%d%s", self.cfg.ae_title, self.cfg.host, self.port, " (TLS)" if self.cfg.tls else ""
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; give open associations `grace_seconds` to end, then abort them.

        An aborted sender is never answered for an instance in flight, so it re-sends it.
        """
        deadline = time.monotonic() + grace_seconds
        server = self._server
        if server is not None:
            server.shutdown()
            server.refuse_new()
            _wait_for_none(server, deadline - time.monotonic())
            for assoc in server.open_associations():
                assoc.abort(source=ul.ABORT_BY_USER)
            # the peers close on the A-ABORT; whatever has not is shut down. Their threads close
            # their ledger rows and give their slots back.
            _wait_for_none(server, ABORT_WAIT_S / 2)
            for assoc in server.open_associations():
                _shut(assoc.sock)
            _wait_for_none(server, ABORT_WAIT_S / 2)
            server.server_close()
        if self._events is not None:
            self._events.close(timeout=max(0.1, deadline - time.monotonic()))
