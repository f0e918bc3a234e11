"""Read-only views of the ledger for people: `enhance-node jobs list|show` (and the dashboard
to come). Nothing here writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, case, func, select

from storage import schema as t


@dataclass(frozen=True)
class JobDetail:
    job: dict[str, Any]
    deliveries: list[dict[str, Any]]
    problems: list[dict[str, Any]]  # instances not stored, with their last status


def list_jobs(engine: Engine, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest jobs first, each with its source series and a summary of its deliveries."""
    j, s, d = t.jobs, t.series, t.deliveries
    summary = (
        select(
            d.c.job_id,
            func.count().label("deliveries"),
            func.sum(case((d.c.state == t.DELIVERY_DELIVERED, 1), else_=0)).label("delivered"),
            func.sum(case((d.c.state == t.DELIVERY_FAILED, 1), else_=0)).label("delivery_failed"),
        )
        .group_by(d.c.job_id)
        .subquery()
    )
    query = (
        select(
            j.c.id,
            j.c.state,
            j.c.route,
            j.c.model,
            j.c.attempts,
            j.c.queued_at,
            j.c.output_count,
            j.c.error,
            s.c.series_instance_uid,
            s.c.modality,
            func.coalesce(summary.c.deliveries, 0).label("deliveries"),
            func.coalesce(summary.c.delivered, 0).label("delivered"),
            func.coalesce(summary.c.delivery_failed, 0).label("delivery_failed"),
        )
        .join(s, s.c.id == j.c.series_id)
        .outerjoin(summary, summary.c.job_id == j.c.id)
        .order_by(j.c.id.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(j.c.state == state)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def job_detail(engine: Engine, job_id: int) -> JobDetail | None:
    j, s, d, i = t.jobs, t.series, t.deliveries, t.delivery_instances
    with engine.connect() as conn:
        job = conn.execute(
            select(j, s.c.series_instance_uid, s.c.modality, s.c.calling_ae)
            .join(s, s.c.id == j.c.series_id)
            .where(j.c.id == job_id)
        ).first()
        if job is None:
            return None
        deliveries = [dict(r._mapping) for r in conn.execute(select(d).where(d.c.job_id == job_id).order_by(d.c.id))]
        problems = [
            dict(r._mapping)
            for r in conn.execute(
                select(i.c.delivery_id, i.c.sop_instance_uid, i.c.outcome, i.c.status, i.c.detail)
                .join(d, d.c.id == i.c.delivery_id)
                .where(d.c.job_id == job_id, i.c.outcome.in_((t.INSTANCE_FAILED, t.INSTANCE_WARNING)))
                .order_by(i.c.id)
            )
        ]
    return JobDetail(dict(job._mapping), deliveries, problems)
