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
from collections.abc import Callable
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.engine import make_url

from core.clock import Monotonic
from core.errors import EnhanceNodeError
from node.completion import CompletionLoop
from node.config import Config
from node.derive import device_uid
from node.handlers import OpenAssociations
from node.live import LiveConfig
from node.logs import LogSettings, configure_logging, current_settings
from node.routing import ManifestCache, Router, route_complete_series
from node.scp import StorageSCP
from node.sender import Sender
from node.worker import Worker
from storage.db import make_engine, migrate
from storage.deliveries import DeliveryQueue
from storage.filestore import FileStore
from storage.jobs import JobQueue
from storage.ledger import Ledger
from storage.recovery import reconcile

log = logging.getLogger(__name__)

# What `serve --role` may name, comma-separated; "all" is every one of them. Series completion
# (and the routing that follows it) runs with the receivers unless named on its own: one place
# per host that receives, not every worker and sender. The dashboard runs only where named
# (or with "all"): one port, one process.
ROLES = ("scp", "worker", "sender", "completion", "dashboard")


def parse_roles(text: str) -> frozenset[str]:
    """`scp,dashboard` -> the roles this process runs; "all" -> every role. Raises ValueError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROLES) - {"all"})
    if unknown or not names:
        expected = f"all or a comma-separated set of {', '.join(ROLES)}"
        raise ValueError(f"unknown role {', '.join(unknown) or repr(text)} (expected {expected})")
    roles = frozenset(ROLES) if "all" in names else frozenset(names)
    return roles | {"completion"} if "scp" in roles else roles


MAX_AUTO_PROCESSES = 8
START_TIMEOUT_S = 60.0
RESTART_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 60.0
_PR_SET_PDEATHSIG = 1


def node_id(cfg: Config) -> str:
    """This process's name in the ledger: `node.host_id` (or ENHANCE_NODE_HOST_ID), else
    hostname:port. Its receivers' associations are recorded under it (and closed as lost
    when it starts again), its workers and senders lease jobs and deliveries as
    `NAME/worker-N/PID`, and a sender resumes at once what a sender of the same name left
    in flight. Two processes sharing a ledger under one name would take each other's work
    for their own earlier run's (docs/deployment.md, "Host identities")."""
    return cfg.node.host_id or f"{socket.gethostname()}:{cfg.node.port}"


def receive_process_count(cfg: Config) -> int:
    return cfg.node.receive_processes or min(os.cpu_count() or 1, MAX_AUTO_PROCESSES)


def open_storage(cfg: Config, *, upgrade: bool = True) -> tuple[FileStore, Ledger]:
    engine = make_engine(cfg.node.ledger_url)
    if upgrade:
        migrate(engine)
    store = FileStore(cfg.node.storage_dir, cfg.node.min_free_disk_mb * 2**20, node_id(cfg))
    return store, Ledger(engine)


def serve(cfg: Config, roles: frozenset[str] = frozenset(ROLES)) -> int:
    """Run `roles` (parse_roles) until SIGTERM or SIGINT; 0 after a clean stop, 1 when start-up
    failed. A signal at any moment of start-up (even before the ledger is open) stops what has
    started."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()  # nothing else here: the handler may interrupt any code, logging included

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    store, ledger = open_storage(cfg)
    ident = node_id(cfg)
    if "scp" in roles:  # what this host's receivers left behind: files to adopt, associations to close
        reconcile(store, ledger)
        lost = ledger.close_lost_associations(ident)
        if lost:
            log.warning("%d associations were open when the node last stopped; closed as lost", lost)
    groups: list[ProcessGroup] = []
    if "scp" in roles:
        groups.append(Receivers(cfg, receive_process_count(cfg), ident))
    if "worker" in roles and cfg.worker.processes > 0:
        groups.append(ProcessGroup("worker", cfg.worker.processes, run_worker, lambda index: (cfg, ident, index)))
    if "sender" in roles and cfg.sender.processes > 0:
        groups.append(ProcessGroup("sender", cfg.sender.processes, run_sender, lambda index: (cfg, ident, index)))
    try:
        for group in groups:
            if not stop.is_set():
                group.start(stop)
    except StartupFailed as exc:
        log.error("start-up failed: %s; stopping", exc)
        _stop_all(groups, ledger)
        return 1
    if stop.is_set():
        log.info("signalled while starting; stopping")
        _stop_all(groups, ledger)
        return 0
    queue = JobQueue(ledger.engine)
    live = LiveConfig(cfg)
    dashboard = None
    if "dashboard" in roles and cfg.dashboard.port:
        from node.dashboard.app import Deps
        from node.dashboard.server import DashboardServer

        dashboard = DashboardServer(
            Deps(ledger.engine, live, store), cfg.dashboard.host, cfg.dashboard.port, cfg.dashboard.tls
        )
        dashboard.start()

    manifests: dict[Path, ManifestCache] = {}

    def route() -> None:
        now = live.current()  # routes, destinations and models as config.toml says now
        cache = manifests.setdefault(now.worker.models_dir, ManifestCache(now.worker.models_dir))
        for r in now.routes:  # (re)load changed manifests before routing takes the ledger's write lock
            cache(r.model)
        router = Router(cache, device_uid())
        route_complete_series(queue, now.routes, now.worker.max_attempts, now.destinations, router.decide)

    completion = None
    if "completion" in roles:
        completion = CompletionLoop(ledger, cfg.series.idle_seconds, cfg.node.network_timeout, after=route)
        completion.start()
    log.info(
        "enhance-node ready (roles %s, %s, host id %s, ledger %s, storage %s)",
        ",".join(r for r in ROLES if r in roles),
        ", ".join(f"{g.count} {g.kind} processes" for g in groups) or "no processes",
        ident,
        make_url(cfg.node.ledger_url).render_as_string(hide_password=True),
        cfg.node.storage_dir,
    )
    while not stop.wait(0.5):
        for group in groups:
            group.restart_dead(stop)
    log.info("signalled; stopping")
    if completion is not None:
        completion.stop()
    if dashboard is not None:
        dashboard.stop()
    _stop_all(groups, ledger)
    return 0


def _stop_all(groups: list[ProcessGroup], ledger: Ledger) -> None:
    for group in groups:
        group.stop()
    ledger.engine.dispose()
    log.info("stopped")


class StartupFailed(EnhanceNodeError):
    """A child process died or hung before it was ready: the node does not start."""


class ProcessGroup:
    """Child processes of one kind: started (each signals ready), watched, restarted, stopped.

    Each child gets its own stop event: a process killed while waiting on a shared event would
    leave a sleeper that never wakes, and Event.set() (notify_all) would wait for it forever.
    """

    def __init__(
        self,
        kind: str,
        count: int,
        target: Callable[..., None],
        args: Callable[[int], tuple[Any, ...]],
        clock: Monotonic = time.monotonic,
    ) -> None:
        self.kind = kind
        self.clock = clock  # the restart delays' (a start-up's own deadline is real time: it waits)
        self.count = count
        self._target = target
        self._args = args  # index -> the target's leading arguments
        self._ctx: SpawnContext = multiprocessing.get_context("spawn")
        self._stops: list[MpEvent] = [self._ctx.Event() for _ in range(count)]
        self._procs: list[SpawnProcess] = []
        self.on_spawn: Callable[[int], None] = lambda _index: None
        self._started: dict[int, float] = {}  # restart_dead's bookkeeping, per child index
        self._deaths: dict[int, int] = {}
        self._due: dict[int, float] = {}

    def _spawn(self, index: int, interrupted: threading.Event) -> SpawnProcess:
        self.on_spawn(index)
        self._started[index] = self.clock()
        ready, stop = self._ctx.Event(), self._ctx.Event()
        self._stops[index] = stop
        proc = self._ctx.Process(
            target=self._target,
            args=(*self._args(index), stop, ready, current_settings(), os.getpid()),
            name=f"{self.kind}-{index}",
            daemon=True,
        )
        proc.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(0.1):
            if interrupted.is_set():  # stop() ends it with the others
                break
            if not proc.is_alive() or time.monotonic() > deadline:
                proc.kill()
                proc.join(timeout=5)
                raise StartupFailed(f"{self.kind} process {index} failed to start (exit {proc.exitcode})")
        return proc

    def start(self, interrupted: threading.Event | None = None) -> None:
        """Start every process, each once it is ready; stop early when `interrupted` is set
        (a signal during start-up). StartupFailed when one dies or hangs first."""
        interrupted = interrupted or threading.Event()
        for i in range(self.count):
            if interrupted.is_set():
                break
            self._procs.append(self._spawn(i, interrupted))

    def restart_dead(self, stop: threading.Event) -> None:
        """Replace each child that died, after a delay that doubles with each death in a row
        (RESTART_DELAY_S up to RESTART_MAX_DELAY_S; a child that ran that long starts the count
        again), so a child that cannot start does not keep a core busy. A replacement that dies
        or hangs before it is ready is logged and tried again later: once the node runs, no
        child's failure stops it (the other roles go on). Never waits for a delay: the caller's
        loop comes back, and a signal (`stop`) ends a replacement's start-up wait at once."""
        for i, proc in enumerate(self._procs):
            if proc.is_alive() or stop.is_set():
                continue
            if i not in self._due:
                self._schedule(i, f"{self.kind} process {i} exited with {proc.exitcode}")
            if self.clock() < self._due[i]:
                continue
            del self._due[i]
            try:
                self._procs[i] = self._spawn(i, stop)
            except StartupFailed as exc:
                self._schedule(i, str(exc))

    def _schedule(self, index: int, why: str) -> None:
        now = self.clock()
        lived = now - self._started.get(index, now)
        self._deaths[index] = 1 if lived >= RESTART_MAX_DELAY_S else self._deaths.get(index, 0) + 1
        delay = min(RESTART_DELAY_S * 2 ** (self._deaths[index] - 1), RESTART_MAX_DELAY_S)
        log.error("%s; restarting it in %g s", why, delay)
        self._due[index] = now + delay

    def stop(self) -> None:
        for proc, stop in zip(self._procs, self._stops, strict=False):  # fewer procs after an interrupted start
            if proc.is_alive():
                stop.set()
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None and p.is_alive()]


class Receivers(ProcessGroup):
    """The SCP processes, sharing the association slots (one counter per process)."""

    def __init__(self, cfg: Config, count: int, ident: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._slots = ctx.Array("i", count)  # open associations of each process
        super().__init__("scp", count, run_receiver, lambda index: (cfg, ident, self._slots, index))
        self.on_spawn = self._free_slots

    def _free_slots(self, index: int) -> None:
        with self._slots.get_lock():
            self._slots[index] = 0  # a process that died gives its associations' slots back


def run_receiver(
    cfg: Config,
    ident: str,
    slots: Any,
    index: int,
    stop: MpEvent,
    ready: MpEvent,
    log_settings: LogSettings,
    parent: int,
) -> None:
    """Entry point of one SCP process."""
    _child_setup(parent, log_settings)
    store, ledger = open_storage(cfg, upgrade=False)
    live = LiveConfig(cfg)
    slots_of_this = OpenAssociations(cfg.node.max_associations, slots, index)
    scp = StorageSCP(cfg.node, store, ledger, ident, slots_of_this, current=lambda: live.current().node)
    scp.start()
    ready.set()
    stop.wait()
    scp.stop()
    ledger.engine.dispose()


def run_worker(
    cfg: Config, ident: str, index: int, stop: MpEvent, ready: MpEvent, log_settings: LogSettings, parent: int
) -> None:
    """Entry point of one worker process: its own engine, claiming jobs from the ledger."""
    _child_setup(parent, log_settings)
    store, ledger = open_storage(cfg, upgrade=False)
    worker = Worker(cfg.worker, JobQueue(ledger.engine), store, f"{ident}/worker-{index}/{os.getpid()}")
    _run_until_stopped(worker.run, stop, ready)
    ledger.engine.dispose()


def run_sender(
    cfg: Config, ident: str, index: int, stop: MpEvent, ready: MpEvent, log_settings: LogSettings, parent: int
) -> None:
    """Entry point of one sender process: deliveries from the ledger to the destinations."""
    _child_setup(parent, log_settings)
    store, ledger = open_storage(cfg, upgrade=False)
    s = cfg.sender
    queue = DeliveryQueue(ledger.engine, retry_base_s=s.retry_base_seconds, retry_max_s=s.retry_max_seconds)
    live = LiveConfig(cfg)
    destinations = lambda: live.current().destinations  # noqa: E731
    me = f"{ident}/sender-{index}/{os.getpid()}"
    sender = Sender(s, destinations, cfg.node.ae_title, queue, store, me, node_prefix=f"{ident}/sender-")
    _run_until_stopped(sender.run, stop, ready)
    ledger.engine.dispose()


def _child_setup(parent: int, log_settings: LogSettings) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_settings)


def _run_until_stopped(run: Callable[[threading.Event], None], stop: MpEvent, ready: MpEvent) -> None:
    """`run` in a thread (the process's main thread waits on the supervisor's stop event)."""
    done = threading.Event()
    thread = threading.Thread(target=run, args=(done,), name="main-loop", daemon=True)
    thread.start()
    ready.set()
    stop.wait()
    done.set()
    thread.join()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the supervisor dies, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        log.warning("cannot set PR_SET_PDEATHSIG; receiving processes may outlive a killed node")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
