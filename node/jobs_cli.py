"""`enhance-node jobs list|show|retry`: what the ledger says about processing and delivery,
and an admin's way to resubmit what failed. Reads and writes the ledger directly, so it works
whether or not the node is running (a running node picks a resubmitted delivery up)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import inspect

from core.errors import UsageError
from node.config import Config
from storage.db import make_engine
from storage.jobs import JobQueue
from storage.reports import job_detail, job_exists, list_jobs, list_skipped

EXIT_OK = 0


def run_jobs(args: argparse.Namespace, cfg: Config) -> int:
    engine = make_engine(cfg.node.ledger_url)
    try:
        if not inspect(engine).has_table("deliveries"):  # never upgrade a ledger running nodes share
            raise UsageError("the ledger has no jobs and deliveries yet: start the node once (`enhance-node serve`)")
        if args.action == "list":
            return _list(engine, args.state, args.limit)
        if args.action == "show":
            return _show(engine, args.id)
        if args.action == "cancel":
            return _cancel(engine, args.id)
        return _retry(engine, args.id)
    finally:
        engine.dispose()


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _list(engine: Any, state: str | None, limit: int) -> int:
    if limit < 1:
        raise UsageError("--limit must be at least 1")
    if state == "skipped":
        return _list_skipped(engine, limit)
    rows = list_jobs(engine, state, limit)
    if not rows:
        print("(no jobs)")
    for r in rows:
        deliveries = f"{r['delivered']}/{r['deliveries']} delivered" + (
            f", {r['delivery_failed']} failed" if r["delivery_failed"] else ""
        )
        print(
            f"{r['id']:>6}  {r['state']:<8} {_when(r['queued_at'])}  {r['modality']:<3} {r['route']:<16} "
            f"{r['output_count']:>5} out  {deliveries:<24} {r['series_instance_uid']}"
        )
    return EXIT_OK


def _list_skipped(engine: Any, limit: int) -> int:
    rows = list_skipped(engine, limit)
    if not rows:
        print("(no skipped series)")
    for r in rows:
        print(
            f"{'-':>6}  {'skipped':<8} {_when(r['completed_at'])}  {r['modality']:<3} {r['series_instance_uid']}: "
            f"{r['skip_reason']}"
        )
    return EXIT_OK


def _show(engine: Any, job_id: int) -> int:
    detail = job_detail(engine, job_id)
    if detail is None:
        raise UsageError(f"no job {job_id}")
    j = detail.job
    print(f"job {j['id']}: {j['state']} (attempt {j['attempts']} of {j['max_attempts']})")
    print(f"  series     {j['series_instance_uid']} ({j['modality']}, from {j['calling_ae']})")
    print(f"  route      {j['route']} -> model {j['model']} {j['model_version'] or ''}".rstrip())
    print(f"  queued     {_when(j['queued_at'])}, started {_when(j['started_at'])}, finished {_when(j['finished_at'])}")
    if j["output_series_uid"]:
        print(f"  output     {j['output_series_uid']} ({j['output_count']} instances, {j['backend']})")
    if j["timings"]:
        print(f"  timings    {j['timings']}")
    print(f"  strength   {j['strength']}, on QA failure: {j['on_qa_fail']}")
    if j["qa"]:
        qa = json.loads(j["qa"])
        figures = ", ".join(f"{k} {v:.2f}" for k, v in qa["figures"].items())
        verdict = "passed" if qa["passed"] else "FAILED: " + "; ".join(qa["failures"])
        print(f"  qa         {verdict} ({figures})")
    if j["error"]:
        print(f"  error      {j['error']}")
    for d in detail.deliveries:
        print(
            f"  delivery {d['id']}: {d['kind']} to {d['destination']}: {d['state']}, "
            f"{d['stored_count']}/{d['instance_count']} stored ({d['warning_count']} with warning), "
            f"attempt {d['attempts']} of {d['max_attempts']}"
            + (f", next {_when(d['next_attempt_at'])}" if d["state"] == "pending" and d["next_attempt_at"] else "")
        )
        if d["error"]:
            print(f"    error    {d['error']}")
    for p in detail.problems:
        status = f"0x{p['status']:04X}" if p["status"] is not None else "no answer"
        print(f"    {p['outcome']:<8} {status:<9} {p['sop_instance_uid']} (delivery {p['delivery_id']}) {p['detail']}")
    return EXIT_OK


def _retry(engine: Any, job_id: int) -> int:
    return _act(engine, job_id, JobQueue(engine).resubmit, "queued again", "resubmitted", "failed to retry")


def _cancel(engine: Any, job_id: int) -> int:
    _act(engine, job_id, JobQueue(engine).cancel, "cancelled", "cancelled", "queued, running or sending to cancel")
    print(f"`enhance-node jobs retry {job_id}` resubmits it")
    return EXIT_OK


def _act(
    engine: Any, job_id: int, act: Callable[[int], tuple[bool, list[int]]], job_done: str, delivery_done: str, what: str
) -> int:
    """An admin's action on a job and its deliveries, said line by line; exit 2 when it did nothing."""
    if not job_exists(engine, job_id):
        raise UsageError(f"no job {job_id}")
    job_changed, deliveries = act(job_id)
    if not job_changed and not deliveries:
        raise UsageError(f"job {job_id} has nothing {what} (see `enhance-node jobs show {job_id}`)")
    if job_changed:
        print(f"job {job_id} {job_done}")
    for delivery_id in deliveries:
        print(f"delivery {delivery_id} of job {job_id} {delivery_done}")
    return EXIT_OK
