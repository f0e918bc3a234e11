"""Chaos benchmark (issue 19, item 8): SIGKILL the node at random moments of receiving,
inference and delivery, restart it, let the scanner send again, and count what Orthanc (the
destination) ends up with: every derived instance exactly once, or the trial fails. Then a
load run: concurrent associations storing at once, with each C-STORE's latency.

    .venv/bin/python bench/chaos.py [--trials 20] [--slices 24] [--seed 8]
                                    [--load-associations 10] [--load-instances 300]

A scanner re-sends a whole series after an interrupted association (storescu exits non-zero);
identical re-sends are stored once (docs/receiving.md). Prints each trial's moment and phase,
lost and duplicated counts, and the load figures; asserts nothing; exit 1 if any trial lost
or duplicated an instance.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # noqa: E402

from engines.manifest import load  # noqa: E402
from node.derive import derived_uid  # noqa: E402
from tests.dicom_factory import write_ct_series  # noqa: E402
from tests.helpers import (  # noqa: E402
    PIPELINE_SENDER,
    PIPELINE_WORKER,
    NodeProcess,
    ct_route,
    destination_toml,
    free_port,
    storescu,
    toml_config,
    wait_for,
)
from tests.peers import Orthanc  # noqa: E402

VERSION = load(REPO / "models" / "ct-denoise").version


def phase(node: NodeProcess, slices: int) -> str:
    """Where the pipeline was, from the ledger as the killed node left it."""
    try:
        received = node.query("SELECT count(*) FROM instances")[0][0]
        jobs = [s for (s,) in node.query("SELECT state FROM jobs")]
        deliveries = [s for (s,) in node.query("SELECT state FROM deliveries")]
    except Exception:
        return "start-up"
    if received < slices or not jobs:
        return "receive"
    if deliveries and all(s == "delivered" for s in deliveries):
        return "done"
    if deliveries:
        return "delivery"
    return "inference"


def kill(node: NodeProcess) -> None:
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(timeout=30)
    wait_for(lambda: not node.receivers(), timeout=30, what="children to die with the node")


def trial(n: int, orthanc: Orthanc, slices: int, at: float, root: Path) -> dict[str, object]:
    tmp = root / f"trial-{n}"
    _, series_uid, files = write_ct_series(tmp / "series", slices, rows=128, cols=128, seed=n)
    output = derived_uid(series_uid, "ct-denoise", VERSION)
    port = free_port()
    cfg = toml_config(
        tmp,
        port,
        idle_seconds=0.5,
        worker_processes=1,
        worker=PIPELINE_WORKER,
        sender_processes=1,
        sender=PIPELINE_SENDER,
        extra=destination_toml("pacs", orthanc.aet, orthanc.dicom_port) + ct_route('"pacs"'),
    )
    node = NodeProcess(cfg, port, tmp).start()
    sender = threading.Thread(target=storescu, args=(port, files), daemon=True)
    started = time.monotonic()
    sender.start()
    time.sleep(at)
    where = phase(node, slices)
    kill(node)
    sender.join(timeout=60)
    node.start()
    resent = storescu(port, files)  # the scanner sends the series again
    try:
        wait_for(lambda: orthanc.instance_count(output) >= slices, timeout=240, interval=0.2)
        wait_for(lambda: node.query("SELECT count(*) FROM deliveries WHERE state = 'delivered'")[0][0] >= 1, timeout=60)
    except AssertionError:
        pass
    finally:
        node.stop()
    stored = orthanc.instance_count(output)
    sources = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    expected = {derived_uid(s, "ct-denoise", VERSION) for s in sources}
    series = orthanc.series(output)
    in_pacs = {
        orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in (series or {}).get("Instances", [])
    }
    return {
        "trial": n,
        "kill_at_s": round(at, 2),
        "phase": where,
        "resend_exit": resent.returncode,
        "lost": len(expected - in_pacs),
        "duplicated": stored - len(in_pacs) + len(in_pacs - expected),
        "seconds": round(time.monotonic() - started, 1),
    }


def load_run(associations: int, instances: int, root: Path) -> dict[str, float]:
    """`associations` pynetdicom SCUs at once, `instances` 64x64 slices each; per-C-STORE latency."""
    port = free_port()
    tmp = root / "load"
    tmp.mkdir()
    node = NodeProcess(toml_config(tmp, port, idle_seconds=30), port, tmp).start()
    datasets = []
    for a in range(associations):
        _, _, files = write_ct_series(tmp / f"s{a}", instances, rows=64, cols=64, seed=a)
        datasets.append([dcmread(f) for f in files])
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def send(batch: list[object]) -> None:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="ENHANCE")
        if not assoc.is_established:
            with lock:
                failures.append("association refused")
            return
        mine = []
        for ds in batch:
            t0 = time.perf_counter()
            status = assoc.send_c_store(ds)
            mine.append(time.perf_counter() - t0)
            if not status or status.Status != 0:
                with lock:
                    failures.append(str(status))
        assoc.release()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=send, args=(b,)) for b in datasets]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - started
    stored = node.query("SELECT count(*) FROM instances")[0][0]
    node.stop()
    latencies.sort()
    return {
        "associations": associations,
        "instances": associations * instances,
        "stored": stored,
        "failures": len(failures),
        "seconds": round(took, 1),
        "files_per_s": round(associations * instances / took, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--load-associations", type=int, default=10)
    ap.add_argument("--load-instances", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="enhance-chaos-"))
    bad = 0
    with Orthanc(root / "orthanc").start() as orthanc:
        for n in range(args.trials):
            # receive takes ~1 s, completion 0.5 s, inference and delivery the next 2-3: kill in 0..4 s
            result = trial(n, orthanc, args.slices, float(rng.uniform(0.0, 4.0)), root)
            bad += bool(result["lost"] or result["duplicated"])
            print(result, flush=True)
    print(f"\n{args.trials - bad}/{args.trials} trials with nothing lost or duplicated")
    print("load:", load_run(args.load_associations, args.load_instances, root))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
