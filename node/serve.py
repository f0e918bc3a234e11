"""`enhance-node serve`: open the ledger and store, reconcile them after any crash, then run
the roles asked for until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from types import FrameType

from node.completion import CompletionLoop
from node.config import Config
from node.scp import StorageSCP
from storage.db import make_engine, migrate
from storage.filestore import FileStore
from storage.ledger import Ledger
from storage.recovery import reconcile

log = logging.getLogger(__name__)

ROLES = ("all", "scp")  # worker and sender roles arrive with the engines and delivery work


def node_id(cfg: Config) -> str:
    return f"{socket.gethostname()}:{cfg.node.port}"


def open_storage(cfg: Config) -> tuple[FileStore, Ledger]:
    engine = make_engine(cfg.node.ledger_url)
    migrate(engine)
    store = FileStore(cfg.node.storage_dir, cfg.node.min_free_disk_mb * 2**20)
    return store, Ledger(engine)


def serve(cfg: Config, role: str = "all", ready: threading.Event | None = None) -> int:
    store, ledger = open_storage(cfg)
    reconcile(store, ledger)
    ident = node_id(cfg)
    lost = ledger.close_lost_associations(ident)
    if lost:
        log.warning("%d associations were open when the node last stopped; closed as lost", lost)
    scp = StorageSCP(cfg.node, store, ledger, ident)
    completion = CompletionLoop(ledger, cfg.series.idle_seconds, cfg.node.network_timeout)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    scp.start()
    completion.start()
    log.info("enhance-node ready (role %s, ledger %s, storage %s)", role, _safe_url(cfg), cfg.node.storage_dir)
    if ready is not None:
        ready.set()
    stop.wait()
    scp.stop()
    completion.stop()
    ledger.engine.dispose()
    log.info("stopped")
    return 0


def _safe_url(cfg: Config) -> str:
    from sqlalchemy.engine import make_url

    return make_url(cfg.node.ledger_url).render_as_string(hide_password=True)
