"""The leased queue that jobs and deliveries both are (DESIGN 3.3; DESIGN 6: one idea in one
place). A row waits, is leased to one holder (a worker, a sender), and ends, goes back to
wait, or fails:

    waiting -> leased -> (the queue's own end state: done, delivered)
                      -> waiting (backoff)     a retryable failure, attempts left
                      -> failed                attempts used up, or a permanent error
             leased -> waiting | failed        its holder stopped heartbeating (stale)
    waiting | leased -> failed                 an admin's cancel; failed -> waiting: resubmit

Claiming is one transaction that takes the write lock first (SQLite: BEGIN IMMEDIATE, see
storage/db.py; PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED), so two holders never lease the
same row. Every later write names what it expects in its WHERE clause (the state, and the
holder or the staleness that allowed it) and writes its event only when that UPDATE moved the
row: on a shared PostgreSQL ledger (READ COMMITTED) two sweepers can read the same stale row,
and a holder can wake up after its lease was taken over; the UPDATE, not the earlier read,
decides who moved it, so a move is made and logged once.

A queue's table has the columns `id`, `state`, `attempts`, `max_attempts`, `started_at`,
`heartbeat_at`, `finished_at` and `error`; `Lease` names the rest (its holder and due-time
columns, states and event kinds). Every operation runs inside the caller's transaction, so a
queue writes its own rows and events in the same one.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Column, ColumnElement, Connection, Row, Table, or_, select, update

from storage.ledger import EventKind, write_event

JITTER = 0.5  # a retry waits between (1 - JITTER) and all of its backoff
ERROR_CHARS = 2000  # what a row keeps of an error; its event keeps EVENT_ERROR_CHARS
EVENT_ERROR_CHARS = 500
MAX_DOUBLINGS = 60  # the backoff stops doubling long before this; it only keeps the float finite


class RandomSource(Protocol):
    """Where jitter comes from: `random.Random` in production, a fixed draw in tests."""

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: the n-th retry waits `base_s * 2^(n-1)`, at most
    `cap_s`, less a random part of up to JITTER of it, so that rows failed together (a PACS
    restart, a full disk) do not all come back at the same moment."""

    base_s: float
    cap_s: float
    rng: RandomSource = field(default_factory=random.Random, compare=False)

    def ceiling(self, attempt: int) -> float:
        """The longest wait after `attempt` (1-based) failed."""
        return min(self.cap_s, self.base_s * 2.0 ** min(MAX_DOUBLINGS, max(0, attempt - 1)))

    def delay(self, attempt: int) -> float:
        """The wait after `attempt` failed: in (ceiling * (1 - JITTER), ceiling]."""
        return self.ceiling(attempt) * (1.0 - JITTER * self.rng.random())


@dataclass(frozen=True)
class Note:
    """An event's text, and the series it is about when the queue's row knows it."""

    detail: str
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class Moved:
    """A row a transition moved: as it was read before the move (its id, holder, attempts and
    max_attempts, and the columns the queue asked for), its new state and why (a failure's
    error, a requeue's reason), and the backoff before its next attempt."""

    row: Row[Any]
    state: str
    why: str = ""
    delay: float | None = None


Describe = Callable[[Moved], Note]


@dataclass(frozen=True)
class Lease:
    """One queue table and its names for what every leased queue has."""

    table: Table
    holder: Column[Any]  # who holds the lease (jobs.worker, deliveries.sender)
    due: Column[Any]  # a waiting row is claimable once this has passed; NULL: at once
    waiting: str
    leased: str
    failed: str
    retry_event: EventKind
    failed_event: EventKind
    requeued_event: EventKind
    resubmitted_event: EventKind

    # -- the holder's operations -----------------------------------------------------------
    def claim(
        self, conn: Connection, holder: str, now: dt.datetime, /, *where: ColumnElement[bool], **values: Any
    ) -> int | None:
        """The id of the oldest waiting row that is due (and matches `where`), now leased to
        `holder` with one more attempt and `values` set; None when there is none."""
        c = self.table.c
        query = (
            select(c.id)
            .where(c.state == self.waiting, or_(self.due.is_(None), self.due <= now), *where)
            .order_by(c.id)
            .limit(1)
        )
        if conn.dialect.name == "postgresql":  # rows other claimers hold are skipped, not waited for
            query = query.with_for_update(skip_locked=True)
        row_id = conn.execute(query).scalar()
        if row_id is None:
            return None
        taken = conn.execute(
            update(self.table)
            .where(c.id == row_id, c.state == self.waiting)
            .values(
                {
                    "state": self.leased,
                    self.holder.name: holder,
                    "attempts": c.attempts + 1,
                    "started_at": now,
                    "heartbeat_at": now,
                    **values,
                }
            )
        ).rowcount
        return int(row_id) if taken == 1 else None

    def heartbeat(self, conn: Connection, row_id: int, holder: str, now: dt.datetime) -> bool:
        """Renews the lease; False when the row is no longer `holder`'s (re-queued as stale,
        cancelled), and then nothing changes."""
        return self.update_held(conn, row_id, holder, heartbeat_at=now)

    def update_held(self, conn: Connection, row_id: int, holder: str, /, **values: Any) -> bool:
        """Sets `values` only while `holder` holds the row's lease; False (nothing changed)
        when it lost it."""
        c = self.table.c
        changed = conn.execute(
            update(self.table).where(c.id == row_id, self.holder == holder, c.state == self.leased).values(**values)
        ).rowcount
        return changed == 1

    def finish(
        self,
        conn: Connection,
        row_id: int,
        holder: str,
        now: dt.datetime,
        state: str,
        kind: EventKind,
        note: Note,
        /,
        **values: Any,
    ) -> bool:
        """Ends `holder`'s lease in the queue's own end `state` (done, delivered) with `values`
        set, and logs it; False (nothing changed, nothing logged) when it lost the lease."""
        if not self.update_held(conn, row_id, holder, state=state, finished_at=now, **values):
            return False
        write_event(conn, now, kind, detail=note.detail, series_instance_uid=note.series_instance_uid)
        return True

    def held(self, conn: Connection, row_id: int, holder: str, *columns: Column[Any]) -> Row[Any] | None:
        """The row's id, holder, attempts, max_attempts and `columns` while `holder` holds it,
        else None."""
        c = self.table.c
        return conn.execute(
            select(c.id, self.holder, c.attempts, c.max_attempts, *columns).where(
                c.id == row_id, self.holder == holder, c.state == self.leased
            )
        ).first()

    def fail(
        self,
        conn: Connection,
        row: Row[Any],
        holder: str,
        now: dt.datetime,
        error: str,
        backoff: Backoff,
        describe: Describe,
        permanent: bool = False,
    ) -> str | None:
        """Ends `holder`'s attempt on `row` (as `held` read it) with `error`: waiting again
        after `backoff` while attempts are left, else (or when `permanent`) failed; the retry
        or failed event says so. Returns the new state, or None when `holder` no longer held
        the row: then nothing changes and nothing is logged."""
        retry = not permanent and row.attempts < row.max_attempts
        delay = backoff.delay(row.attempts) if retry else None
        state = self.waiting if retry else self.failed
        moved = self.update_held(
            conn,
            row.id,
            holder,
            **{
                "state": state,
                "error": error[:ERROR_CHARS],
                self.holder.name: None,
                self.due.name: None if delay is None else now + dt.timedelta(seconds=delay),
                "finished_at": None if retry else now,
            },
        )
        if not moved:
            return None
        self._log(
            conn, now, self.retry_event if retry else self.failed_event, Moved(row, state, error, delay), describe
        )
        return state

    # -- sweeping ----------------------------------------------------------------------------
    def stale(self, now: dt.datetime, after_s: float) -> ColumnElement[bool]:
        """A lease whose holder sent no heartbeat for `after_s` (killed, hung)."""
        return self.table.c.heartbeat_at < now - dt.timedelta(seconds=after_s)

    def leased_rows(
        self, conn: Connection, where: Sequence[ColumnElement[bool]], columns: Sequence[Column[Any]] = ()
    ) -> list[Row[Any]]:
        """The leased rows matching `where`: id, holder, attempts, max_attempts and `columns`."""
        c = self.table.c
        query = select(c.id, self.holder, c.attempts, c.max_attempts, *columns)
        return list(conn.execute(query.where(c.state == self.leased, *where).order_by(c.id)).all())

    def requeue(
        self,
        conn: Connection,
        now: dt.datetime,
        where: Sequence[ColumnElement[bool]],
        why: Callable[[Row[Any]], str],
        describe: Describe,
        refund: bool = False,
        columns: Sequence[Column[Any]] = (),
    ) -> list[int]:
        """Leased rows matching `where` back to waiting, due at once; one on its last attempt
        fails instead (a row that kills its holder every time must not loop), unless `refund`
        gives the attempt back (the node failed, not the row: it was not an attempt). Returns
        the ids re-queued (not those failed)."""
        requeued = []
        for row in self.leased_rows(conn, where, columns):
            state = self.requeue_row(conn, now, row, where, why(row), describe, refund)
            if state == self.waiting:
                requeued.append(int(row.id))
        return requeued

    def requeue_row(
        self,
        conn: Connection,
        now: dt.datetime,
        row: Row[Any],
        where: Sequence[ColumnElement[bool]],
        why: str,
        describe: Describe,
        refund: bool = False,
    ) -> str | None:
        """One row `leased_rows` read, moved only if it still matches: leased, by the same
        holder, and `where` (still stale) now. Returns its new state, or None when another
        sweeper, its holder or an admin moved it since the read: then nothing is logged."""
        c = self.table.c
        last = not refund and row.attempts >= row.max_attempts
        state = self.failed if last else self.waiting
        moved = conn.execute(
            update(self.table)
            .where(c.id == row.id, c.state == self.leased, self.holder == row._mapping[self.holder.name], *where)
            .values(
                {
                    "state": state,
                    self.holder.name: None,
                    self.due.name: None,
                    "attempts": c.attempts - 1 if refund else c.attempts,
                    "error": why[:ERROR_CHARS] if last else "",
                    "finished_at": now if last else None,
                }
            )
        ).rowcount
        if moved != 1:
            return None
        self._log(conn, now, self.failed_event if last else self.requeued_event, Moved(row, state, why), describe)
        return state

    # -- an admin's operations ---------------------------------------------------------------
    def cancel(
        self,
        conn: Connection,
        now: dt.datetime,
        where: Sequence[ColumnElement[bool]],
        why: str,
        describe: Describe,
        columns: Sequence[Column[Any]] = (),
    ) -> list[int]:
        """Waiting and leased rows matching `where` end failed with `why`; a holder finds the
        row no longer its own. Returns the ids cancelled."""
        unfinished = (self.waiting, self.leased)
        values = {"state": self.failed, "error": why, self.holder.name: None, self.due.name: None, "finished_at": now}
        return self._move_all(conn, now, where, unfinished, values, self.failed_event, why, describe, columns)

    def resubmit(
        self,
        conn: Connection,
        now: dt.datetime,
        where: Sequence[ColumnElement[bool]],
        describe: Describe,
        columns: Sequence[Column[Any]] = (),
    ) -> list[int]:
        """Failed rows matching `where` waiting again with fresh attempts, due at once.
        Returns the ids resubmitted."""
        values = {
            "state": self.waiting,
            "attempts": 0,
            self.holder.name: None,
            self.due.name: None,
            "finished_at": None,
        }
        return self._move_all(conn, now, where, (self.failed,), values, self.resubmitted_event, "", describe, columns)

    # -- internals -----------------------------------------------------------------------------
    def _move_all(
        self,
        conn: Connection,
        now: dt.datetime,
        where: Sequence[ColumnElement[bool]],
        states: Collection[str],
        values: dict[str, Any],
        kind: EventKind,
        why: str,
        describe: Describe,
        columns: Sequence[Column[Any]],
    ) -> list[int]:
        c = self.table.c
        query = select(c.id, self.holder, c.attempts, c.max_attempts, *columns)
        rows = conn.execute(query.where(c.state.in_(states), *where).order_by(c.id)).all()
        moved = []
        for row in rows:
            changed = conn.execute(
                update(self.table).where(c.id == row.id, c.state.in_(states), *where).values(values)
            ).rowcount
            if changed == 1:
                self._log(conn, now, kind, Moved(row, str(values["state"]), why), describe)
                moved.append(int(row.id))
        return moved

    def _log(self, conn: Connection, now: dt.datetime, kind: EventKind, moved: Moved, describe: Describe) -> None:
        note = describe(moved)
        write_event(conn, now, kind, detail=note.detail, series_instance_uid=note.series_instance_uid)
