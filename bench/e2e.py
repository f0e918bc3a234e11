"""End-to-end benchmark: scanner -> enhance-node -> Orthanc, with the shipped CT denoiser.

DCMTK storescu pushes N synthetic 512x512 CT slices (one association) into `enhance-node
serve`, which completes the series after `--idle` quiet seconds, denoises it and delivers the
derived series to a local Orthanc. Prints the time of each stage, from the ledger's
timestamps and the job's own timings, and the total from the last C-STORE response to the
last derived instance stored in Orthanc, less the configured idle period. Baseline, in the
same run: the same N files sent by storescu straight into Orthanc (what PACS takes to receive
the series with no node in between). Printed, never asserted (DESIGN 5).

    .venv/bin/python bench/e2e.py [--count 300] [--idle 2] [--json PATH]

Exit status: 0 when Orthanc ended up with every derived instance, 1 otherwise, 2 when DCMTK
or Orthanc is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines.manifest import load  # noqa: E402
from node.derive import derived_uid  # noqa: E402
from tests.dicom_factory import write_ct_series  # noqa: E402
from tests.helpers import NodeProcess, destination_toml, free_port, storescu, toml_config, wait_for  # noqa: E402
from tests.peers import Orthanc  # noqa: E402


def _ts(value: str | None) -> dt.datetime:
    assert value is not None
    return dt.datetime.fromisoformat(value)


def _direct(files: list[Path], tmp: Path) -> float:
    """storescu straight into a fresh Orthanc: seconds until Orthanc holds every file."""
    orthanc = Orthanc(tmp / "orthanc-direct").start()
    try:
        started = time.monotonic()
        out = storescu(orthanc.dicom_port, files, called=orthanc.aet)
        if out.returncode != 0:
            raise RuntimeError(f"storescu into Orthanc failed: {out.stderr[-500:]}")
        wait_for(lambda: orthanc.get("/statistics")["CountInstances"] == len(files), timeout=300, interval=0.05)
        return time.monotonic() - started
    finally:
        orthanc.stop()


def _pipeline(files: list[Path], series_uid: str, tmp: Path, idle: float) -> dict[str, Any]:
    orthanc = Orthanc(tmp / "orthanc").start()
    port = free_port()
    route = destination_toml("pacs", orthanc.aet, orthanc.dicom_port) + (
        '[[routes]]\nname = "ct"\nmodel = "ct-denoise"\ndestinations = ["pacs"]\nmatch = { modality = "CT" }\n'
    )
    cfg = toml_config(
        tmp,
        port,
        idle_seconds=idle,
        worker_processes=1,
        worker=f'models_dir = "{REPO / "models"}"',
        sender_processes=1,
        receive_processes=0,
        extra=route,
    )
    node = NodeProcess(cfg, port, tmp).start()
    output_uid = derived_uid(series_uid, "ct-denoise", load(REPO / "models" / "ct-denoise").version)
    try:
        started = time.monotonic()
        out = storescu(port, files)
        last_response = time.monotonic()
        if out.returncode != 0:
            raise RuntimeError(f"storescu into the node failed: {out.stderr[-500:]}")
        wait_for(lambda: orthanc.instance_count(output_uid) == len(files), timeout=1800, interval=0.05)
        in_pacs = time.monotonic()
        wait_for(lambda: node.query("SELECT 1 FROM deliveries WHERE state = 'delivered'"), timeout=60)
        [series] = node.query("SELECT first_received_at, last_received_at, completed_at FROM series")
        [job] = node.query("SELECT started_at, finished_at, timings, backend FROM jobs")
        [delivery] = node.query("SELECT started_at, finished_at, attempts FROM deliveries")
        timings = json.loads(job[2])
        stages = {
            "receive (storescu, first to last C-STORE response)": last_response - started,
            "wait for completion (idle period)": (_ts(series[2]) - _ts(series[1])).total_seconds(),
            "queue (complete -> job started)": (_ts(job[0]) - _ts(series[2])).total_seconds(),
            "model load": timings.get("load", 0.0),
            "decode": timings.get("decode", 0.0),
            "inference": timings.get("infer", 0.0),
            "encode derived objects": timings.get("encode", 0.0),
            "write to outbox": timings.get("write", 0.0),
            "job (started -> done)": (_ts(job[1]) - _ts(job[0])).total_seconds(),
            "delivery queue (done -> sending)": (_ts(delivery[0]) - _ts(job[1])).total_seconds(),
            "deliver (C-STORE to Orthanc)": (_ts(delivery[1]) - _ts(delivery[0])).total_seconds(),
        }
        return {
            "stages": stages,
            "total_excluding_idle": in_pacs - last_response - idle,
            "backend": job[3],
            "delivery_attempts": delivery[2],
        }
    finally:
        node.stop()
        orthanc.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=300, help="slices (default 300)")
    p.add_argument("--idle", type=float, default=2.0, help="series.idle_seconds (excluded from the total)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"bench/e2e.py: {tool} not found (Debian packages dcmtk and orthanc)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="enhance-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        _, series_uid, files = write_ct_series(tmp / "series", args.count, rows=512, cols=512)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{args.count} slices, 512x512 CT, {mb:.0f} MB; idle period {args.idle:g} s", flush=True)
        direct = _direct(files, tmp)
        try:
            result = _pipeline(files, series_uid, tmp, args.idle)
        except (RuntimeError, AssertionError) as exc:
            print(f"bench/e2e.py: {exc}", file=sys.stderr)
            return 1
    print(f"\nstage{'':<48}seconds")
    for stage, seconds in result["stages"].items():
        print(f"  {stage:<51}{seconds:7.2f}")
    total = result["total_excluding_idle"]
    deliver = result["stages"]["deliver (C-STORE to Orthanc)"]
    print(f"\ntotal, last C-STORE response -> last derived instance in Orthanc, less idle: {total:.1f} s")
    print(f"backend {result['backend']}, delivery attempts {result['delivery_attempts']}")
    print(f"baseline: storescu straight into Orthanc, same files: {direct:.2f} s")
    print(f"ratio node delivery / direct storescu: {deliver / direct:.2f}; node total / direct: {total / direct:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {**result, "direct_storescu_seconds": direct, "count": args.count, "host": platform.node()}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
