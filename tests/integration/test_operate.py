"""A running node applies configuration edits without a restart (issue: operate it): the admin
CLI changes config.toml, and within seconds the receivers accept a newly allowed AE and the
routing and senders use a newly added destination and route; the change is logged."""

from __future__ import annotations

import json
from pathlib import Path

from tests.dicom_factory import write_ct_series
from tests.helpers import pipeline_node, run_cli, storescu, wait_for
from tests.peers import StoreSCP


def test_edits_reach_a_running_node_without_a_restart(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with StoreSCP("PEER").start() as peer:
        node = pipeline_node(node_factory)
        node.log_format = "json"
        node.start()
        _, _, files = write_ct_series(tmp_path / "series", 3, rows=64, cols=64)
        refused = storescu(node.port, files, calling="CT01")
        assert refused.returncode != 0  # not allowed yet

        assert run_cli(node.config, "ae", "add", "CT01", "--host", "127.0.0.1").returncode == 0
        assert run_cli(node.config, "dest", "add", "peer", "PEER", "127.0.0.1", str(peer.port)).returncode == 0
        added = run_cli(
            node.config, "route", "add", "ct", "--model", "ct-denoise", "--modality", "CT", "--dest", "peer"
        )
        assert added.returncode == 0, added.stderr
        wait_for(lambda: "config: route ct added" in node.log_text(), timeout=30, what="the node to log the change")
        assert "config: allowed AE CT01 added" in node.log_text()
        assert "config: destination peer added" in node.log_text()

        assert storescu(node.port, files, calling="CT01").returncode == 0
        wait_for(lambda: len(peer.received) == 3, timeout=120, what="the derived series at the new destination")
        wait_for(lambda: node.query("SELECT state FROM deliveries") == [("delivered",)], what="delivered")
        assert "restart the node to apply" not in node.log_text()
        node.config.write_text(node.config.read_text().replace("idle_seconds = 0.5", "idle_seconds = 5"))
        wait_for(lambda: "restart the node to apply" in node.log_text(), timeout=30, what="a restart notice")
        assert_logs_are_json_without_patient_data(node.log_text())


def assert_logs_are_json_without_patient_data(text: str) -> None:
    """Every line is one JSON object; the run's patient name and ID (and pixel bytes, which
    would show as long binary runs) appear nowhere, while the UIDs and AE titles do."""
    entries = [json.loads(line) for line in text.splitlines()]
    assert entries and all({"time", "level", "process", "logger", "message"} <= e.keys() for e in entries)
    assert "PHANTOM" not in text.upper()  # PatientName PHANTOM^WATER, PatientID PHANTOM-1
    assert any("CT01" in e["message"] for e in entries) and any("series" in e["message"] for e in entries)
    assert max(len(e["message"]) for e in entries) < 2000
