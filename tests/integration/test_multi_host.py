"""Roles on several hosts (issue 20 item 4). Six `enhance-node serve --role ...` processes play
six hosts: two receivers on two ports, two workers and two senders, each with its own host
identity (ENHANCE_NODE_HOST_ID), sharing one PostgreSQL ledger and one storage directory and
nothing else. A 200-instance CT series sent half to each receiver at once is processed once and
delivered once into Orthanc. The worker host holding the job is SIGKILLed mid-job (supervisor
and worker process together, as a host dies) and the other worker finishes it; then the sender
host delivering it is SIGKILLed mid-delivery and the other sender resumes it without resending
what Orthanc had confirmed, as Orthanc's own log of every C-STORE it received shows.

The job is made long enough to be caught running in a real way: 200 slices through the shipped
ct-denoise on one thread (worker.threads = 1). The delivery is made long enough by Orthanc
taking 10 ms more per instance (a Lua filter, tests/peers.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import Engine, text

from engines.manifest import load
from node.derive import derived_uid
from storage.db import make_engine
from tests.dicom_factory import write_ct_series
from tests.helpers import (
    PIPELINE_SENDER,
    PIPELINE_WORKER,
    REPO,
    NodeProcess,
    ct_route,
    dcmtk_env,
    destination_toml,
    free_port,
    require,
    toml_config,
    wait_for,
)
from tests.peers import Orthanc

SLICES = 200
VERSION = load(REPO / "models" / "ct-denoise").version


class Hosts:
    """The six processes, by host identity, and the ledger they share."""

    def __init__(self, tmp: Path, ledger_url: str, orthanc: Orthanc) -> None:
        self.nodes: dict[str, NodeProcess] = {}
        self.ledger: Engine = make_engine(ledger_url)
        shared = {"ENHANCE_NODE_LEDGER_URL": ledger_url, "ENHANCE_NODE_STORAGE_DIR": str(tmp / "storage")}
        configs = {name: self._config(tmp / name, orthanc) for name in ("front-a", "front-b", "back")}
        for host, roles, config in (
            ("front-a", "scp", "front-a"),  # the receivers listen on ports of their own
            ("front-b", "scp", "front-b"),
            ("worker-a", "worker", "back"),  # one config.toml: only the host identity tells them apart
            ("worker-b", "worker", "back"),
            ("sender-a", "sender", "back"),
            ("sender-b", "sender", "back"),
        ):
            logs = tmp / "logs" / host
            logs.mkdir(parents=True)
            env = {**shared, "ENHANCE_NODE_HOST_ID": host}
            self.nodes[host] = NodeProcess(configs[config][0], configs[config][1], logs, roles=roles, env=env)

    @staticmethod
    def _config(folder: Path, orthanc: Orthanc) -> tuple[Path, int]:
        folder.mkdir()
        port = free_port()
        config = toml_config(
            folder,
            port,
            idle_seconds=1.0,
            receive_processes=1,
            worker_processes=1,
            worker=PIPELINE_WORKER,
            sender_processes=1,
            sender=PIPELINE_SENDER,
            extra=destination_toml("pacs", orthanc.aet, orthanc.dicom_port) + ct_route('"pacs"'),
        )
        return config, port

    def start(self) -> None:
        for node in self.nodes.values():  # side by side: they migrate the fresh ledger at once
            node.launch()
        for node in self.nodes.values():
            node.wait_ready(timeout=120)

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None:
                node.stop()
        self.ledger.dispose()

    def query(self, sql: str) -> list[Any]:
        with self.ledger.connect() as conn:
            return list(conn.execute(text(sql)).all())

    def log_text(self) -> str:
        return "\n".join(f"--- {host}\n{node.log_text()}" for host, node in self.nodes.items())


def host_of(holder: str) -> str:
    """`worker-a/worker-0/PID` -> `worker-a`: the host identity a lease holder starts with."""
    return holder.split("/", 1)[0]


def send_half_to_each(hosts: Hosts, files: list[Path]) -> None:
    """DCMTK storescu into both receivers at once, one half of the series each."""
    half = len(files) // 2
    runs = [
        subprocess.Popen(
            [
                *(require("storescu"), "-aet", "STORESCU", "-aec", "ENHANCE", "127.0.0.1"),
                *(str(hosts.nodes[host].port), *map(str, part)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dcmtk_env(),
        )
        for host, part in (("front-a", files[:half]), ("front-b", files[half:]))
    ]
    for run in runs:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out


def test_six_hosts_one_ledger_process_and_deliver_once_through_a_worker_and_a_sender_killed(
    postgres_url: str, tmp_path: Path
) -> None:
    _, series_uid, files = write_ct_series(tmp_path / "series", SLICES, rows=64, cols=64)
    output_uid = derived_uid(series_uid, "ct-denoise", VERSION)
    expected = {
        derived_uid(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID), "ct-denoise", VERSION) for f in files
    }
    with Orthanc(tmp_path / "orthanc", store_delay=0.01, log_received=True).start() as orthanc:
        hosts = Hosts(tmp_path, postgres_url, orthanc)
        try:
            hosts.start()
            send_half_to_each(hosts, files)
            assert hosts.query("SELECT node_id, count(*) FROM associations GROUP BY node_id ORDER BY node_id") == [
                ("front-a", 1),
                ("front-b", 1),
            ]

            # -- the worker host holding the job dies mid-job; the other finishes it ------------
            def running_on() -> str | None:
                rows = hosts.query("SELECT worker FROM jobs WHERE state = 'running'")
                return host_of(rows[0][0]) if rows else None

            first = wait_for(running_on, timeout=120, interval=0.02, what="the job to be running")
            hosts.nodes[first].kill()
            other = "worker-b" if first == "worker-a" else "worker-a"

            def job_done() -> Any:
                rows = hosts.query("SELECT state, attempts, worker, output_series_uid, output_count, error FROM jobs")
                assert len(rows) == 1, rows
                assert rows[0].state != "failed", f"{rows[0].error}\n{hosts.log_text()}"
                return rows[0] if rows[0].state == "done" else None

            job = wait_for(job_done, timeout=180, interval=0.05, what="the job to be done")
            assert job.attempts == 2, "the kill came too late to interrupt the job"
            assert (host_of(job.worker), job.output_series_uid, job.output_count) == (other, output_uid, SLICES)
            started = hosts.query("SELECT detail FROM events WHERE kind = 'job.started' ORDER BY id")
            assert [host_of(d.split(" on ", 1)[1]) for (d,) in started] == [first, other]

            # -- the sender host delivering it dies mid-delivery; the other resumes it ----------
            def sending_on() -> str | None:
                rows = hosts.query("SELECT sender FROM deliveries WHERE state = 'sending' AND stored_count >= 20")
                return host_of(rows[0][0]) if rows else None

            holder = wait_for(sending_on, timeout=120, interval=0.02, what="the delivery to be under way")
            hosts.nodes[holder].kill()
            confirmed = hosts.query(
                "SELECT sop_instance_uid, attempts FROM delivery_instances WHERE outcome = 'stored' ORDER BY id"
            )
            assert 20 <= len(confirmed) < SLICES, "the kill came too late to interrupt the delivery"

            def delivered() -> Any:
                rows = hosts.query("SELECT id, state, attempts, stored_count, instance_count FROM deliveries")
                assert len(rows) == 1 and rows[0].state != "failed", f"{rows}\n{hosts.log_text()}"
                return rows[0] if rows[0].state == "delivered" else None

            delivery = wait_for(delivered, timeout=180, interval=0.05, what="the delivery to be delivered")
            assert (delivery.attempts, delivery.stored_count, delivery.instance_count) == (2, SLICES, SLICES)
            survivor = hosts.nodes["sender-b" if holder == "sender-a" else "sender-a"].log_text()
            assert f"delivery {delivery.id} had no heartbeat" in survivor  # re-queued as stale by the other
            resumed = f"attempt 2/50: {SLICES - len(confirmed)} sent"  # exactly what was not confirmed
            assert resumed in survivor and "now delivered" in survivor

            # -- exactly once ---------------------------------------------------------------------
            assert orthanc.instance_count(output_uid) == SLICES
            assert orthanc.get("/statistics")["CountInstances"] == SLICES  # the derived series only, each once
            received = orthanc.received()
            assert set(received) == expected
            resent = [uid for uid in set(received) if received.count(uid) > 1]
            assert len(resent) <= 1  # at most the one in flight when the sender died
            assert not {uid for uid, _ in confirmed} & set(resent)  # nothing Orthanc had confirmed was sent again
            again = hosts.query(
                "SELECT sop_instance_uid, attempts FROM delivery_instances WHERE outcome = 'stored' ORDER BY id"
            )
            assert [r for r in again if r.sop_instance_uid in {uid for uid, _ in confirmed}] == confirmed
            assert hosts.query("SELECT state, instance_count FROM series") == [("routed", SLICES)]
            assert hosts.query("SELECT count(*) FROM instances") == [(SLICES,)]
            outbox = tmp_path / "storage" / "outbox" / output_uid
            assert {p.stem for p in outbox.glob("*.dcm")} == expected
            kinds = hosts.query("SELECT kind, count(*) FROM events WHERE kind LIKE 'job.%' GROUP BY kind ORDER BY kind")
            assert kinds == [("job.done", 1), ("job.queued", 1), ("job.requeued", 1), ("job.started", 2)]
            for host in ("front-a", "front-b"):  # both ran completion and routing: neither failed
                assert "completion sweep failed" not in hosts.nodes[host].log_text()
        finally:
            hosts.stop()
