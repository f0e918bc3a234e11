"""`serve --role`: each process runs what it is told and nothing more (issue 20 item 7). A
worker or a sender never opens the dashboard's port nor runs series completion; the receivers
bring completion with them; the dashboard runs only where named."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, NodeProcess, free_port, toml_config, wait_for


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _process(config: Path, tmp: Path, roles: str) -> NodeProcess:
    logs = tmp / roles.replace(",", "-")  # each process its own log; the config is shared
    logs.mkdir()
    return NodeProcess(config, 0, logs, roles=roles).launch()


def _ready_line(node: NodeProcess) -> str:
    return next(line for line in node.log_text().splitlines() if "enhance-node ready" in line)


def test_each_process_runs_only_its_roles(tmp_path: Path) -> None:
    dash = free_port()
    config = toml_config(tmp_path, free_port(), worker_processes=1, sender_processes=1, dashboard_port=dash)
    nodes = []
    try:
        worker, sender = _process(config, tmp_path, "worker"), _process(config, tmp_path, "sender")
        nodes += [worker, sender]  # started side by side
        for node in nodes:
            node.wait_ready()
        assert "roles worker, 1 worker processes" in _ready_line(worker)
        assert "roles sender, 1 sender processes" in _ready_line(sender)
        assert not _listening(dash)  # neither a worker nor a sender process has the dashboard
        front = _process(config, tmp_path, "scp,dashboard")
        nodes.append(front)
        front.wait_ready()
        assert "roles scp,completion,dashboard, 2 scp processes" in _ready_line(front)
        wait_for(lambda: _listening(dash), timeout=30, what="the dashboard")
        for node in nodes:
            assert node.stop() == 0
        assert "completion" not in "".join(_ready_line(n) for n in nodes[:2])
        assert "starting the dashboard" not in worker.log_text() + sender.log_text()
    finally:
        for node in nodes:
            node.stop()


def test_an_unknown_role_is_a_usage_error(tmp_path: Path) -> None:
    config = toml_config(tmp_path, free_port())
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), "serve", "--role", "scp,wroker"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown role wroker (expected all or a comma-separated set of scp, worker, sender" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
