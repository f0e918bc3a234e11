"""`enhance-node serve`: open the ledger and store, reconcile them after any crash, then run
the roles asked for until SIGTERM/SIGINT.

Receiving runs in `node.receive_processes` SCP processes sharing the port (SO_REUSEPORT):
pynetdicom handles DIMSE in Python, so one process is bound to one core by the GIL, and
concurrent associations need processes to use more. This process supervises them (a dead
one is restarted) and runs series completion. They die with it, even on SIGKILL.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Event as MpEvent
from types import FrameType
from typing import Any

from sqlalchemy.engine import make_url

from node.completion import CompletionLoop
from node.config import Config
from node.handlers import OpenAssociations
from node.logs import configure_logging
from node.scp import StorageSCP
from storage.db import make_engine, migrate
from storage.filestore import FileStore
from storage.ledger import Ledger
from storage.recovery import reconcile

log = logging.getLogger(__name__)

ROLES = ("all", "scp")  # worker and sender roles arrive with the engines and delivery work
MAX_AUTO_PROCESSES = 8
START_TIMEOUT_S = 60.0
RESTART_DELAY_S = 1.0
_PR_SET_PDEATHSIG = 1


def node_id(cfg: Config) -> str:
    return f"{socket.gethostname()}:{cfg.node.port}"


def receive_process_count(cfg: Config) -> int:
    return cfg.node.receive_processes or min(os.cpu_count() or 1, MAX_AUTO_PROCESSES)


def open_storage(cfg: Config, *, upgrade: bool = True) -> tuple[FileStore, Ledger]:
    engine = make_engine(cfg.node.ledger_url)
    if upgrade:
        migrate(engine)
    store = FileStore(cfg.node.storage_dir, cfg.node.min_free_disk_mb * 2**20)
    return store, Ledger(engine)


def serve(cfg: Config, role: str = "all") -> int:
    store, ledger = open_storage(cfg)
    reconcile(store, ledger)
    ident = node_id(cfg)
    lost = ledger.close_lost_associations(ident)
    if lost:
        log.warning("%d associations were open when the node last stopped; closed as lost", lost)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    receivers = Receivers(cfg, receive_process_count(cfg), ident)
    receivers.start()
    completion = CompletionLoop(ledger, cfg.series.idle_seconds, cfg.node.network_timeout)
    completion.start()
    log.info(
        "enhance-node ready (role %s, %d receiving processes, ledger %s, storage %s)",
        role,
        receivers.count,
        make_url(cfg.node.ledger_url).render_as_string(hide_password=True),
        cfg.node.storage_dir,
    )
    while not stop.wait(0.5):
        receivers.restart_dead()
    receivers.stop()
    completion.stop()
    ledger.engine.dispose()
    log.info("stopped")
    return 0


class Receivers:
    """The SCP processes: started, watched, restarted, stopped."""

    def __init__(self, cfg: Config, count: int, ident: str) -> None:
        self.cfg = cfg
        self.count = count
        self.ident = ident
        self._ctx: SpawnContext = multiprocessing.get_context("spawn")
        self._slots = self._ctx.Array("i", count)  # open associations of each process
        # one stop event per process: a process killed while waiting on a shared event would
        # leave a sleeper that never wakes, and Event.set() (notify_all) would wait for it forever
        self._stops: list[MpEvent] = [self._ctx.Event() for _ in range(count)]
        self._procs: list[SpawnProcess] = []

    def _spawn(self, index: int) -> SpawnProcess:
        with self._slots.get_lock():
            self._slots[index] = 0  # a process that died gives its associations' slots back
        ready, stop = self._ctx.Event(), self._ctx.Event()
        self._stops[index] = stop
        proc = self._ctx.Process(
            target=run_receiver,
            args=(self.cfg, self.ident, self._slots, index, stop, ready, logging.getLogger().level, os.getpid()),
            name=f"scp-{index}",
            daemon=True,
        )
        proc.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(0.1):
            if not proc.is_alive() or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"receiving process {index} failed to start (exit {proc.exitcode})")
        return proc

    def start(self) -> None:
        self._procs = [self._spawn(i) for i in range(self.count)]

    def restart_dead(self) -> None:
        for i, proc in enumerate(self._procs):
            if not proc.is_alive():
                log.error("receiving process %d exited with %s; restarting it", i, proc.exitcode)
                time.sleep(RESTART_DELAY_S)
                self._procs[i] = self._spawn(i)

    def stop(self) -> None:
        for proc, stop in zip(self._procs, self._stops, strict=True):
            if proc.is_alive():
                stop.set()
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def run_receiver(
    cfg: Config, ident: str, slots: Any, index: int, stop: MpEvent, ready: MpEvent, log_level: int, parent: int
) -> None:
    """Entry point of one SCP process."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level)
    store, ledger = open_storage(cfg, upgrade=False)
    scp = StorageSCP(cfg.node, store, ledger, ident, OpenAssociations(cfg.node.max_associations, slots, index))
    scp.start()
    ready.set()
    stop.wait()
    scp.stop()
    ledger.engine.dispose()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the supervisor dies, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        log.warning("cannot set PR_SET_PDEATHSIG; receiving processes may outlive a killed node")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
