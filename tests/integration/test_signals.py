"""Issue 19, item 3: SIGTERM or SIGINT at any moment of start-up ends every process of the node
within the grace period; a child that dies during start-up fails start-up loudly (exit 1)
without orphans. The node runs as an admin runs it (`enhance-node serve`, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.helpers import PIPELINE_SENDER, PIPELINE_WORKER, REPO, free_port, toml_config, wait_for

GRACE_S = 15.0


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


def echo(port: int) -> bool:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def start(tmp_path: Path, **config: object) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    settings: dict[str, object] = {
        "worker_processes": 1,
        "worker": PIPELINE_WORKER,
        "sender_processes": 1,
        "sender": PIPELINE_SENDER,
        **config,
    }
    cfg = toml_config(tmp_path, port, **settings)  # type: ignore[arg-type]
    log = tmp_path / "node.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--config", str(cfg), "serve"],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, port, log


def gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.parametrize(
    ("signum", "dashboard"), [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)]
)
def test_a_signal_after_the_scp_answers_but_before_ready_stops_every_process(
    tmp_path: Path, signum: signal.Signals, dashboard: bool
) -> None:
    proc, port, log = start(tmp_path, dashboard_port=free_port() if dashboard else 0)
    try:
        wait_for(lambda: echo(port), timeout=60, what="the SCP to answer C-ECHO")
        assert "enhance-node ready" not in log.read_text()  # still starting (workers, senders)
        family = children(proc.pid)
        assert family, "the node has child processes"
        os.kill(proc.pid, signum)
        started = time.monotonic()
        assert proc.wait(timeout=GRACE_S) == 0, log.read_text()
        wait_for(lambda: gone(family), timeout=5, what="every child to end")
        assert time.monotonic() - started < GRACE_S
        assert not echo(port)
        assert "stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_a_signal_at_any_moment_of_start_up_ends_the_node(tmp_path: Path, delay: float) -> None:
    proc, _, log = start(tmp_path)
    try:
        time.sleep(delay)
        family = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=GRACE_S)
        assert code in (0, -signal.SIGTERM), log.read_text()  # before the handler is set: the default action
        wait_for(lambda: gone(family + children(proc.pid)), timeout=5, what="every child to end")
    finally:
        if proc.poll() is None:
            proc.kill()


def spawned(pid: int) -> list[int]:
    """The node's multiprocessing children (not its resource tracker)."""
    out = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            out.append(child)
    return out


def test_a_child_that_dies_during_start_up_fails_start_up_loudly(tmp_path: Path) -> None:
    """The first receiving process is SIGKILLed the moment it appears, before it is ready (as
    the kernel's OOM killer would): the node exits 1 saying which process failed, and no
    process it started is left."""
    proc, port, log = start(tmp_path)
    try:
        first = wait_for(lambda: spawned(proc.pid), timeout=30, interval=0.002, what="a child process")
        os.kill(first[0], signal.SIGKILL)
        code = proc.wait(timeout=60)
        text = log.read_text()
        assert code == 1, text
        assert "start-up failed: scp process 0 failed to start (exit -9)" in text
        assert "enhance-node ready" not in text
        assert not echo(port)
        wait_for(lambda: gone(first + children(proc.pid)), timeout=5, what="no orphans")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_child_that_dies_again_while_restarting_does_not_stop_the_running_node(tmp_path: Path) -> None:
    """Once the node runs, a child is SIGKILLed and so is its replacement the moment it
    appears (an OOM killer at work): the supervisor logs it, tries again later, and the node
    stays up with every role; a SIGTERM then still stops it cleanly. Before, the failed
    restart raised out of the supervisor's loop and took the whole node down."""
    proc, port, log = start(tmp_path)
    try:
        wait_for(lambda: "enhance-node ready" in log.read_text(), timeout=90, what="the node to be ready")
        before = spawned(proc.pid)
        os.kill(before[0], signal.SIGKILL)
        born = wait_for(
            lambda: [p for p in spawned(proc.pid) if p not in before],
            timeout=30,
            interval=0.002,
            what="the replacement process",
        )
        os.kill(born[0], signal.SIGKILL)
        wait_for(lambda: "failed to start (exit -9); restarting it in 2 s" in log.read_text(), timeout=30)
        assert proc.poll() is None, log.read_text()
        wait_for(lambda: len(spawned(proc.pid)) == len(before), timeout=60, what="a replacement that starts")
        assert echo(port)
        family = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GRACE_S) == 0, log.read_text()
        wait_for(lambda: gone(family), timeout=5, what="every child to end")
    finally:
        if proc.poll() is None:
            proc.kill()
