"""The storage SCP: a pynetdicom AE that accepts C-ECHO and C-STORE for every storage SOP
class and transfer syntax pynetdicom knows, with the node's association policy and TLS."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node import handlers
from node.background import BackgroundWriter
from node.config import NodeConfig, TLSConfig
from node.guard import Connection, ConnectionGuard, Throttle
from storage.filestore import FileStore
from storage.ledger import Ledger

log = logging.getLogger(__name__)

ACSE_TIMEOUT_S = 30.0
DIMSE_TIMEOUT_S = 60.0
REAP_INTERVAL_S = 0.25
REPORT_PERIOD_S = 60.0  # refused or closed connections: one log line and event per host and minute
# pynetdicom's own limit counts half-open connections too; the node's limit is the slots of
# node/handlers.OpenAssociations, taken only once the association policy accepted a peer
UNLIMITED_CONNECTIONS = 1 << 20


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with these changes:

    - binds with SO_REUSEPORT, so several SCP processes share the port (the kernel spreads
      connections over them);
    - sets TCP_NODELAY on every accepted connection: C-STORE responses are small, and with
      Nagle's algorithm each may wait for the peer's delayed ACK (~40 ms on Linux); and the
      network timeout on its reads, so a PDU that stalls halfway is closed;
    - admits a connection only within the per-host limit, and closes one that has not
      negotiated an association in time (node/guard.py); refusals go to `on_refused`;
    - does the TLS handshake in the connection's own thread with the negotiation timeout, not
      in the accept loop, so a silent or failing client never stops others from connecting, and
      a failed handshake is reported to `on_tls_refused`.
    """

    def __init__(
        self,
        *args: Any,
        on_tls_refused: Callable[[str, str], None],
        guard: ConnectionGuard,
        on_refused: Callable[[str, str, str], None],
        on_ended: Callable[[Association], None],
        **kwargs: Any,
    ) -> None:
        self.on_tls_refused = on_tls_refused
        self.guard = guard
        self.on_refused = on_refused
        self.on_ended = on_ended  # what EVT_CONN_CLOSE would have done, for a reactor that died
        self._reaping = threading.Event()
        kwargs["request_handler"] = GuardedRequestHandler
        super().__init__(*args, **kwargs)
        threading.Thread(target=self._reap, name="scp-reaper", daemon=True).start()

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[Any, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a read that gets no byte for network_timeout fails: a PDU that stalls halfway is
        # closed, a slow link that keeps sending is not (accepted sockets have no timeout).
        # The kernel's receive timeout, not Python's settimeout: that one polls before every
        # 4 kB read pynetdicom makes (its TLS sockets get settimeout in finish_request)
        seconds = float(self.ae.network_timeout or 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
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
            self.guard.watch(token, Connection(host, self.guard.clock(), close, done.is_set, lambda: False))
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
            request.settimeout(self.ae.network_timeout)
        super().finish_request(request, client_address)

    def watch(self, assoc: Association, request: Any, host: str) -> None:
        """Start the association's negotiation deadline; release its count when it ends."""
        token = id(assoc)

        def negotiated() -> bool:
            return bool(assoc.is_established or assoc.is_rejected or assoc.is_aborted or assoc.is_released)

        def ended() -> bool:  # started, and finished
            return assoc.ident is not None and not assoc.is_alive() and not assoc.dul.is_alive()

        close = functools.partial(_shut, request)

        def dispose() -> None:
            self.on_ended(assoc)  # the slot is free before the peer sees the connection close
            _dispose(request)

        self.guard.watch(token, Connection(host, self.guard.clock(), close, negotiated, ended, dispose))
        assoc.bind(evt.EVT_CONN_CLOSE, lambda _event: self._closed(token, host, request))

    def _closed(self, token: int, host: str, request: Any) -> None:
        """EVT_CONN_CLOSE. pynetdicom skips close() when its shutdown() fails (a peer that
        hung up first, or a socket this guard shut down), which would leak the descriptor."""
        self.guard.release(token, host)
        _dispose(request)

    def _reap(self) -> None:
        """Close connections past their negotiation deadline, until the server closes; nothing
        that goes wrong for one connection may stop it."""
        while not self._reaping.wait(REAP_INTERVAL_S):
            try:
                late, ended = self.guard.sweep()
                for c in ended:  # usually closed already; not when pynetdicom's reactor died
                    c.dispose()
                for c in late:
                    c.close()
                    timeout = self.guard.negotiation_timeout
                    self.on_refused(c.host, "negotiation", f"closed: no association negotiated within {timeout:g} s")
            except Exception:  # a bug here must not leave the port open to the attack
                log.exception("connection reaper")

    def server_close(self) -> None:
        self._reaping.set()
        super().server_close()


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the connection put under the server's guard before the
    association's reactor starts."""

    server: NodeServer

    def handle(self) -> None:
        assoc = self._create_association()
        self.server.watch(assoc, self.request, self.client_address[0])
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


def _shut(request: Any) -> None:
    """Shut a connection down so a read blocked on it returns (its thread then ends it)."""
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


def _dispose(request: Any) -> None:
    """Close the socket of a connection whose threads are gone."""
    _shut(request)
    with contextlib.suppress(OSError):
        request.close()


def tls_context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=cfg.cert_file, keyfile=cfg.key_file)
    if cfg.ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=cfg.ca_file)
    return ctx


def quiet_pydicom() -> None:
    """Skip pydicom's value validation in the SCP process: it only encodes DIMSE commands and
    reads headers here (stored bytes are never rewritten), and the regex checks cost more
    than the rest of the command encoding."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


def build_ae(cfg: NodeConfig) -> AE:
    """The SCP's AE: every storage SOP class pynetdicom knows (the standard's, images, SR, SEG,
    RT, KO, PR, encapsulated documents, waveforms, raw data) in every transfer syntax, and
    Verification. With node.accept_unknown_sop_classes, also any private or unknown abstract
    syntax a peer proposes (pynetdicom's unrestricted storage service, a setting of the SCP
    process: no other AE runs there); other services' classes (query/retrieve, worklist) are
    still refused."""
    pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE = cfg.accept_unknown_sop_classes
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_associations = UNLIMITED_CONNECTIONS  # node.max_associations is OpenAssociations' (node-wide)
    ae.maximum_pdu_size = cfg.max_pdu_size
    ae.network_timeout = cfg.network_timeout
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """A pynetdicom thread that died on what a peer sent (its state machine meeting an event it
    has no transition for): one line, not a traceback a hostile peer could repeat at will; the
    connection guard then closes the socket it left. Other threads keep the default hook."""
    tb, pynetdicom_frames = args.exc_traceback, False
    while tb is not None:
        pynetdicom_frames |= tb.tb_frame.f_globals.get("__name__", "").startswith("pynetdicom")
        tb = tb.tb_next
    if not pynetdicom_frames:
        threading.__excepthook__(args)
        return
    name = args.thread.name if args.thread else "?"
    log.error("pynetdicom thread %s ended: %s: %s", name, args.exc_type.__name__, args.exc_value)


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
        self._associations = associations
        self.ae = build_ae(cfg)
        live = current or (lambda: cfg)
        self.guard = ConnectionGuard(
            cfg.max_connections_per_host,
            cfg.negotiation_timeout,
            exempt_hosts=lambda: {a.host for a in live().allowed if a.host is not None},
            max_total=cfg.max_connections,
        )
        tls = cfg.tls is not None
        self.evt_handlers: list[Any] = [
            (evt.EVT_REQUESTED, handlers.handle_requested, [live, ledger, associations]),
            (evt.EVT_REJECTED, handlers.handle_rejected, [ledger]),
            (evt.EVT_ESTABLISHED, handlers.handle_established, [ledger, associations, node_id, tls]),
            (evt.EVT_CONN_CLOSE, handlers.handle_closed, [ledger, associations]),
            (evt.EVT_C_ECHO, handlers.handle_echo),
            (evt.EVT_C_STORE, handlers.handle_store, [store, ledger, associations, cfg.max_inflated_mb << 20]),
        ]
        self._server: NodeServer | None = None
        self._events: BackgroundWriter | None = None

    def start(self) -> None:
        quiet_pydicom()
        threading.excepthook = _thread_died
        self._events = BackgroundWriter("scp-refusals")
        server = self.ae.make_server(
            (self.cfg.host, self.cfg.port),
            ssl_context=tls_context(self.cfg.tls) if self.cfg.tls else None,
            evt_handlers=self.evt_handlers,
            server_class=NodeServer,
            on_tls_refused=functools.partial(handlers.tls_refused, self._events, self.ledger),
            guard=self.guard,
            on_refused=functools.partial(
                handlers.connection_refused, self._events, self.ledger, Throttle(REPORT_PERIOD_S)
            ),
            on_ended=functools.partial(handlers.association_ended, self.ledger, self._associations),
        )
        assert isinstance(server, NodeServer)
        self.ae._servers.append(server)  # as AE.start_server does, so shutdown() finds it
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
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        self.ae.shutdown()
        if self._events is not None:
            self._events.close(timeout=max(0.1, deadline - time.monotonic()))
