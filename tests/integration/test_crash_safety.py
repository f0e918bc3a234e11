"""Kill -9 of the node mid-transfer loses nothing that was acknowledged (issue: receive, item 7)."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

from pydicom import dcmread

from tests.dicom_factory import write_ct_series
from tests.helpers import NodeProcess, dcmtk_env, require, storescu, temp_files, wait_for


def acknowledged_sop_uids(storescu_log: str, files: list[Path]) -> set[str]:
    """SOP Instance UIDs that storescu saw answered with Success (from its -v log)."""
    by_name = {str(f): f for f in files}
    acked: set[str] = set()
    current: Path | None = None
    for line in storescu_log.splitlines():
        sending = re.match(r"I: Sending file: (.+)$", line)
        if sending:
            current = by_name.get(sending.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.add(str(dcmread(current, stop_before_pixels=True).SOPInstanceUID))
            current = None
    return acked


def ledger_files(node: NodeProcess) -> set[str]:
    rows = node.query("SELECT path FROM instances UNION ALL SELECT path FROM superseded_instances")
    return {r[0] for r in rows}


def disk_files(node: NodeProcess) -> set[str]:
    return {str(p.relative_to(node.storage)) for p in (node.storage / "objects").rglob("*") if p.is_file()}


def test_sigkill_mid_transfer_then_resend_loses_nothing(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, series_uid, files = write_ct_series(tmp_path / "series", 200, rows=256, cols=256)
    node: NodeProcess = node_factory(idle_seconds=1).start()
    sender = subprocess.Popen(
        [
            require("storescu"),
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            "ENHANCE",
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dcmtk_env(),
    )
    wait_for(lambda: node.query("SELECT count(*) FROM instances")[0][0] >= 40, what="40 instances received")
    assert len(node.receivers()) == 2  # receiving processes, killed with the node below
    node.kill()
    log, _ = sender.communicate(timeout=60)
    acked = acknowledged_sop_uids(log, files)
    assert 40 <= len(acked) < 200, f"the kill should land mid-transfer; {len(acked)} acknowledged"

    node.start()  # restart on the same ledger and storage
    resend = storescu(node.port, files)
    assert resend.returncode == 0, resend.stdout + resend.stderr
    wait_for(
        lambda: node.query("SELECT state FROM series WHERE series_instance_uid = ?", series_uid) == [("routed",)],
        what="series complete (and routed)",
    )

    rows = {uid: (path, sha) for uid, path, sha in node.query("SELECT sop_instance_uid, path, sha256 FROM instances")}
    assert len(rows) == 200
    for uid in acked:  # every acknowledged instance is on disk with its recorded hash
        path, sha = rows[uid]
        assert hashlib.sha256((node.storage / path).read_bytes()).hexdigest() == sha
    assert ledger_files(node) == disk_files(node)  # no row without a file, no file without a row
    assert all(p.endswith(".dcm") for p in disk_files(node))
    assert temp_files(node.storage) == []
    assert node.query("SELECT count(*) FROM associations WHERE closed_at IS NULL") == [(0,)]
    assert node.query("SELECT count(*) FROM events WHERE kind = 'association.lost'") == [(1,)]
