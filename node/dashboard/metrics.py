"""/metrics: Prometheus figures read from the ledger when scraped, so every process of the
node (and every node sharing a ledger) is counted once, with no per-process registry to merge.

Counters are totals since the ledger began; gauges are the state now; the per-stage latency
histograms are built from the `timings` of done jobs and the durations of finished deliveries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from storage import schema as t

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
REFUSALS = ("association.rejected", "store.refused")


QA_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 8, 12, 20, 50)


def _histogram(
    name: str, doc: str, samples: dict[str, list[float]], label: str = "stage", buckets: tuple[float, ...] = BUCKETS
) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=[label])
    for key, values in sorted(samples.items()):
        counts = [sum(1 for v in values if v <= b) for b in buckets]
        h.add_metric([key], [*((str(b), c) for b, c in zip(buckets, counts, strict=True)), ("+Inf", len(values))],
                     sum(values))  # fmt: skip
    return h


def gpu_figures() -> list[tuple[str, float, float]]:
    """(GPU, memory used bytes, utilisation 0..1) from nvidia-smi; empty without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        try:
            index, mem, util = (x.strip() for x in line.split(","))
            rows.append((index, float(mem) * 2**20, float(util) / 100))
        except ValueError:  # "[N/A]" (MIG slices, some boards): nothing to report for that GPU
            continue
    return rows


class LedgerCollector(Collector):
    def __init__(self, engine: Engine, storage_dir: Path) -> None:
        self.engine = engine
        self.storage_dir = storage_dir

    def collect(self) -> Iterator[Metric]:
        i, old, e, j, d, di = t.instances, t.superseded_instances, t.events, t.jobs, t.deliveries, t.delivery_instances
        with self.engine.connect() as conn:
            # current versions plus the older versions they replaced: every instance ever kept
            count, size = conn.execute(select(func.count(), func.coalesce(func.sum(i.c.size), 0))).one()
            old_count, old_size = conn.execute(select(func.count(), func.coalesce(func.sum(old.c.size), 0))).one()
            count, size = count + old_count, size + old_size
            refusals = conn.execute(
                select(e.c.kind, e.c.status, func.count()).where(e.c.kind.in_(REFUSALS)).group_by(e.c.kind, e.c.status)
            ).all()
            jobs = conn.execute(select(j.c.state, func.count()).group_by(j.c.state)).all()
            timings = conn.execute(select(j.c.timings).where(j.c.state == t.JOB_DONE, j.c.timings != "")).scalars()
            stages: dict[str, list[float]] = {}
            for text in timings:
                for stage, seconds in json.loads(text).items():
                    stages.setdefault(stage, []).append(float(seconds))
            qa_figures: dict[str, list[float]] = {}
            qa_verdicts = {"passed": 0, "failed": 0}
            for text in conn.execute(select(j.c.qa).where(j.c.qa != "")).scalars():
                report = json.loads(text)
                qa_verdicts["passed" if report["passed"] else "failed"] += 1
                for figure, value in report["figures"].items():
                    qa_figures.setdefault(figure, []).append(float(value))
            deliveries = conn.execute(select(d.c.state, func.count()).group_by(d.c.state)).all()
            sends = conn.execute(select(d.c.started_at, d.c.finished_at).where(d.c.state == t.DELIVERY_DELIVERED)).all()
            outcomes = conn.execute(select(di.c.outcome, func.count()).group_by(di.c.outcome)).all()
        job_counts: dict[str, int] = {state: n for state, n in jobs}
        delivery_counts: dict[str, int] = {state: n for state, n in deliveries}
        stages["deliver"] = [(b - a).total_seconds() for a, b in sends if a and b]

        yield CounterMetricFamily("enhance_instances_received", "Instances received and kept", value=count)
        yield CounterMetricFamily("enhance_received_bytes", "Bytes of instances received and kept", value=size)
        refused = CounterMetricFamily(
            "enhance_refusals", "Refused associations and C-STOREs", labels=["kind", "status"]
        )
        for kind, status, n in refusals:
            refused.add_metric([kind, f"0x{status:04X}" if status is not None else ""], n)
        yield refused
        by_state = GaugeMetricFamily("enhance_jobs", "Jobs by state", labels=["state"])
        for state in (t.JOB_QUEUED, t.JOB_RUNNING, t.JOB_DONE, t.JOB_FAILED):
            by_state.add_metric([state], job_counts.get(state, 0))
        yield by_state
        yield _histogram("enhance_stage_seconds", "Seconds per processing stage (done jobs) and per delivery", stages)
        verdicts = CounterMetricFamily("enhance_qa_jobs", "Job runs checked by the QA gate", labels=["verdict"])
        for verdict, n in qa_verdicts.items():
            verdicts.add_metric([verdict], n)
        yield verdicts
        yield _histogram(
            "enhance_qa_figure",
            "QA figures of checked jobs (worst slice; engines/qa.py)",
            qa_figures,
            "figure",
            QA_BUCKETS,
        )
        out = GaugeMetricFamily("enhance_deliveries", "Deliveries by state", labels=["state"])
        for state in (t.DELIVERY_PENDING, t.DELIVERY_SENDING, t.DELIVERY_DELIVERED, t.DELIVERY_FAILED):
            out.add_metric([state], delivery_counts.get(state, 0))
        yield out
        sent = GaugeMetricFamily(
            "enhance_delivery_instances", "Instances of deliveries by C-STORE outcome now", labels=["outcome"]
        )
        for outcome, n in outcomes:
            sent.add_metric([outcome], n)
        yield sent
        yield GaugeMetricFamily(
            "enhance_free_disk_bytes",
            "Free bytes where instances are stored",
            value=shutil.disk_usage(self.storage_dir).free,
        )
        gpus = gpu_figures()
        if gpus:
            mem = GaugeMetricFamily("enhance_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            util = GaugeMetricFamily("enhance_gpu_utilization_ratio", "GPU utilisation", labels=["gpu"])
            for index, used, ratio in gpus:
                mem.add_metric([index], used)
                util.add_metric([index], ratio)
            yield mem
            yield util
