"""Shared test helpers: free ports, config files, a node subprocess, DCMTK commands, polling."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class Clock:
    """An injectable clock (the ledger's `now`) that tests move forward instead of sleeping."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def temp_files(storage: Path) -> list[Path]:
    """Every temp file under a storage directory, in any host's folder (storage/filestore.py)."""
    return [p for p in (storage / "tmp").rglob("*") if p.is_file()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll until `predicate()` is truthy (tests never sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def require(cmd: str) -> str:
    """The DCMTK command `cmd`, searched on PATH without the virtualenv's bin folder: pynetdicom
    installs Python apps of the same names there (storescu, storescp, echoscu, ...), which an
    activated virtualenv would otherwise put first."""
    venv_bin = Path(sys.prefix, "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != venv_bin]
    path = shutil.which(cmd, path=os.pathsep.join(dirs))
    if path is None:
        pytest.fail(f"{cmd} not found: `make test` installs dcmtk (Debian package)")
    return path


def dcmtk_env() -> dict[str, str]:
    # DCMTK stalls ~40 ms per object without TCP_NODELAY (Nagle vs delayed ACK).
    return {**os.environ, "TCP_NODELAY": "1"}


def toml_config(
    tmp: Path,
    port: int,
    *,
    allowed: Sequence[tuple[str, str | None]] = (("STORESCU", "127.0.0.1"),),
    idle_seconds: float = 30,
    min_free_disk_mb: int = 0,
    receive_processes: int = 2,
    worker_processes: int = 0,
    worker: str = "",
    sender_processes: int = 0,
    sender: str = "",
    dashboard_port: int = 0,
    dashboard: str = "",
    extra_node: str = "",
    extra: str = "",
) -> Path:
    lines = [
        "[node]",
        'ae_title = "ENHANCE"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f'storage_dir = "{tmp / "storage"}"',
        f'ledger_url = "sqlite:///{tmp / "ledger.db"}"',
        f"min_free_disk_mb = {min_free_disk_mb}",
        f"receive_processes = {receive_processes}",  # fixed, so tests cover several processes anywhere
        extra_node,
    ]
    for ae, host in allowed:
        lines += ["[[node.allowed]]", f'ae_title = "{ae}"'] + ([f'host = "{host}"'] if host else [])
    lines += ["[series]", f"idle_seconds = {idle_seconds}"]
    # no worker or sender unless asked: the receive tests count the node's child processes as receivers
    lines += ["[worker]", f"processes = {worker_processes}", worker]
    lines += ["[sender]", f"processes = {sender_processes}", sender]
    lines += ["[dashboard]", f"port = {dashboard_port}", dashboard, extra]  # 0: no dashboard
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class NodeProcess:
    """`enhance-node serve` as a real subprocess, as an admin would run it."""

    config: Path
    port: int
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    log_format: str = "text"
    roles: str = "all"  # serve --role
    env: dict[str, str] = field(default_factory=dict)  # added to the environment, e.g. ENHANCE_NODE_HOST_ID

    @property
    def ledger(self) -> Path:
        return self.tmp / "ledger.db"

    @property
    def storage(self) -> Path:
        return self.tmp / "storage"

    def start(self) -> NodeProcess:
        return self.launch().wait_ready()

    def launch(self) -> NodeProcess:
        """Start it without waiting (wait_ready waits): several nodes start side by side."""
        log = self.tmp / f"node-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "node.cli", "--config", str(self.config), "--log-format", self.log_format),
                *("serve", "--role", self.roles),
            ],
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        return self

    def wait_ready(self, timeout: float = 60) -> NodeProcess:
        log = self.logs[-1]
        wait_for(lambda: self._ready(log), timeout=timeout, what="node to listen")
        return self

    def _ready(self, log: Path) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited {self.proc.returncode}:\n{log.read_text()}")
        return "enhance-node ready" in log.read_text()

    def receivers(self) -> list[int]:
        """PIDs of the node's receiving SCP processes, from /proc (multiprocessing's resource
        tracker is a child too, but not a receiver)."""
        assert self.proc is not None
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and b"spawn_main" in cmdline:
                pids.append(int(stat.parent.name))
        return pids

    def kill(self) -> None:
        """SIGKILL the node; its receiving processes must die with it (PR_SET_PDEATHSIG)."""
        assert self.proc is not None
        receivers = self.receivers()
        self.proc.kill()
        self.proc.wait(timeout=30)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in receivers), what="receivers to die")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(timeout=30)

    def log_text(self) -> str:
        return "".join(p.read_text() for p in self.logs)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.ledger, timeout=30) as conn:
            return conn.execute(sql, args).fetchall()


def destination_toml(name: str, ae: str, port: int, max_attempts: int = 50) -> str:
    """A [[destinations]] entry on 127.0.0.1, for toml_config's `extra`."""
    return (
        f'[[destinations]]\nname = "{name}"\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
        f"max_attempts = {max_attempts}\n"
    )


PIPELINE_WORKER = f'models_dir = "{REPO / "models"}"\nheartbeat_seconds = 0.2\nstale_after_seconds = 1.5\nthreads = 1'
PIPELINE_SENDER = "retry_base_seconds = 0.2\nretry_max_seconds = 1\nheartbeat_seconds = 0.2\nstale_after_seconds = 2"


def ct_route(destinations: str, options: str = "") -> str:
    """A [[routes]] entry sending CT through the shipped ct-denoise to `destinations` (TOML list items)."""
    return (
        f'[[routes]]\nname = "ct"\nmodel = "ct-denoise"\ndestinations = [{destinations}]\n'
        f'match = {{ modality = "CT" }}\n{options}'
    )


def pipeline_node(node_factory: Callable[..., NodeProcess], extra: str = "", **config: Any) -> NodeProcess:
    """A node (not started yet) that receives, processes with the shipped models and delivers,
    with test timers: series complete after 0.5 s, heartbeats every 0.2 s, retries from 0.2 s."""
    settings: dict[str, Any] = {
        "idle_seconds": 0.5,
        "worker_processes": 1,
        "worker": PIPELINE_WORKER,
        "sender_processes": 1,
        "sender": PIPELINE_SENDER,
        "extra": extra,
    }
    return node_factory(**{**settings, **config})


def run_cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`enhance-node --config CONFIG ARGS...` as an admin types it."""
    cmd = [sys.executable, "-m", "node.cli", "--config", str(config), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def storescu(
    port: int, files: list[Path], *args: str, calling: str = "STORESCU", called: str = "ENHANCE", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, each file proposed and sent in its own transfer syntax (-xs... not forced)."""
    cmd = [require("storescu"), "-aet", calling, "-aec", called, *args, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def peak_rss(pids: list[int]) -> int:
    """The largest resident set any of `pids` ever had (VmHWM), bytes."""
    peaks = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) * 1024)
    return max(peaks)
