"""Read-only views of the ledger for people: `enhance-node jobs list|show` (and the dashboard
to come). Nothing here writes."""

from __future__ import annotations

from collections import Counter
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


def list_skipped(engine: Engine, limit: int = 50) -> list[dict[str, Any]]:
    """Series routing processed none of (issue 18), newest first, with the reason."""
    s = t.series
    query = (
        select(s.c.id, s.c.series_instance_uid, s.c.modality, s.c.calling_ae, s.c.completed_at, s.c.skip_reason)
        .where(s.c.skip_reason != "")
        .order_by(s.c.id.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def job_exists(engine: Engine, job_id: int) -> bool:
    """Whether the ledger has this job (what an admin action checks before it acts)."""
    with engine.connect() as conn:
        return conn.execute(select(t.jobs.c.id).where(t.jobs.c.id == job_id)).first() is not None


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


def overview(engine: Engine, since: Any) -> dict[str, Any]:
    """The dashboard's first page: what arrived, what waits, what failed."""
    i, j, d, s = t.instances, t.jobs, t.deliveries, t.series
    with engine.connect() as conn:
        per_hour = Counter(
            at.strftime("%Y-%m-%d %H:00")
            for at in conn.execute(select(i.c.received_at).where(i.c.received_at >= since)).scalars()
        )
        jobs: dict[str, int] = {k: v for k, v in conn.execute(select(j.c.state, func.count()).group_by(j.c.state))}
        deliveries: dict[str, int] = {
            k: v for k, v in conn.execute(select(d.c.state, func.count()).group_by(d.c.state))
        }
        series: dict[str, int] = {k: v for k, v in conn.execute(select(s.c.state, func.count()).group_by(s.c.state))}
        backends = conn.execute(
            select(j.c.backend).where(j.c.backend.is_not(None)).order_by(j.c.id.desc()).limit(1)
        ).scalar()
    return {
        "per_hour": sorted(per_hour.items()),
        "jobs": jobs,
        "deliveries": deliveries,
        "series": series,
        "queue_depth": jobs.get(t.JOB_QUEUED, 0) + deliveries.get(t.DELIVERY_PENDING, 0),
        "last_backend": backends,
    }


def list_series(engine: Engine, limit: int = 100, study_id: int | None = None) -> list[dict[str, Any]]:
    s, st = t.series, t.studies
    query = select(s, st.c.study_instance_uid).join(st, st.c.id == s.c.study_id).order_by(s.c.id.desc()).limit(limit)
    if study_id is not None:
        query = query.where(s.c.study_id == study_id)
    with engine.connect() as conn:
        rows = conn.execute(query)
        return [dict(r._mapping) for r in rows]


def series_detail(engine: Engine, series_id: int) -> dict[str, Any] | None:
    """A series, its state timeline (its events in order) and its jobs."""
    s, e, j = t.series, t.events, t.jobs
    with engine.connect() as conn:
        row = conn.execute(select(s).where(s.c.id == series_id)).first()
        if row is None:
            return None
        uid = row.series_instance_uid
        outputs = list(conn.execute(select(j.c.output_series_uid).where(j.c.series_id == series_id)).scalars())
        uids = [uid, *[o for o in outputs if o]]
        timeline = [
            dict(r._mapping)
            for r in conn.execute(
                select(e.c.at, e.c.kind, e.c.calling_ae, e.c.status, e.c.detail)
                .where(e.c.series_instance_uid.in_(uids))
                .order_by(e.c.id)
                .limit(500)
            )
        ]
        jobs = [dict(r._mapping) for r in conn.execute(select(j).where(j.c.series_id == series_id).order_by(j.c.id))]
    return {"series": dict(row._mapping), "timeline": timeline, "jobs": jobs}


def delivery_instances(engine: Engine, delivery_id: int) -> list[dict[str, Any]]:
    i = t.delivery_instances
    with engine.connect() as conn:
        return [
            dict(r._mapping) for r in conn.execute(select(i).where(i.c.delivery_id == delivery_id).order_by(i.c.id))
        ]


def source_instances(engine: Engine, series_id: int) -> list[dict[str, Any]]:
    """The series' instances in slice order as received (instance number; those without one
    last, as PostgreSQL sorts NULL and SQLite does not unless told), for the viewer."""
    i = t.instances
    with engine.connect() as conn:
        rows = conn.execute(
            select(i.c.sop_instance_uid, i.c.path, i.c.instance_number)
            .where(i.c.series_id == series_id)
            .order_by(i.c.instance_number.nulls_last(), i.c.id)
        )
        return [dict(r._mapping) for r in rows]


def list_studies(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    """Studies, newest first, with how many series and instances of each arrived."""
    st, s = t.studies, t.series
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                st.c.id,
                st.c.study_instance_uid,
                st.c.first_received_at,
                func.count(s.c.id).label("series"),
                func.coalesce(func.sum(s.c.instance_count), 0).label("instances"),
                func.max(s.c.last_received_at).label("last_received_at"),
            )
            .outerjoin(s, s.c.study_id == st.c.id)
            .group_by(st.c.id)
            .order_by(st.c.id.desc())
            .limit(limit)
        )
        return [dict(r._mapping) for r in rows]
