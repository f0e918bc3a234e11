"""The dashboard's FastAPI app, server-rendered (Jinja2), no build step.

Every page but /login, /healthz, /readyz and /metrics needs the admin's session; every form
carries the session's CSRF token. Handlers get their dependencies from the `Deps` the app was
made with (ledger engine, live configuration, file store), never from module globals.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from core.clock import Clock, utcnow
from core.errors import ConfigError
from node import admin
from node.config import ENV_ADMIN_PASSWORD_HASH, Config
from node.dashboard import images
from node.dashboard.auth import LoginThrottle, Sessions, csrf_ok, new_csrf_token, verify_password
from node.dashboard.metrics import LedgerCollector
from node.derive import derived_uid
from node.live import LiveConfig
from storage import reports
from storage.filestore import FileStore, outbox_path
from storage.jobs import JobQueue

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
STYLE = Path(__file__).parent / "static" / "style.css"
SESSION_HOURS = 8
# Every answer: no scripts at all, styles and images only from here, never inside a frame.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True)
class Deps:
    engine: Engine
    live: LiveConfig
    store: FileStore
    now: Clock = utcnow


class NotLoggedIn(Exception):
    pass


def create_app(
    deps: Deps,
    secret_key: str | None = None,
    *,
    https_only: bool = False,
    sessions: Sessions | None = None,
    throttle: LoginThrottle | None = None,
) -> FastAPI:
    """The dashboard. `https_only` marks the session cookie Secure (the dashboard serves TLS);
    `sessions` and `throttle` are injectable for tests (their clocks)."""
    app = FastAPI(title="enhance-node", docs_url=None, redoc_url=None, openapi_url=None)
    sessions = sessions or Sessions(SESSION_HOURS * 3600)
    throttle = throttle or LoginThrottle()
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key or secrets.token_hex(32),  # sessions end when the node restarts
        max_age=SESSION_HOURS * 3600,
        same_site="strict",
        https_only=https_only,
    )

    @app.middleware("http")
    async def _security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    registry = CollectorRegistry()
    registry.register(LedgerCollector(deps.engine, deps.store.root))

    def config() -> Config:
        return deps.live.current()

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        token = request.session.setdefault("csrf", new_csrf_token())
        return TEMPLATES.TemplateResponse(
            request,
            name,
            {"csrf": token, "logged_in": sessions.valid(request.session.get("sid")), **context},
            status_code=status,
        )

    def require_login(request: Request) -> None:
        if not sessions.valid(request.session.get("sid")):
            raise NotLoggedIn

    def require_csrf(request: Request, token: str) -> None:
        if not csrf_ok(request.session.get("csrf"), token):
            raise HTTPException(403, "the form is stale or not ours (CSRF token mismatch): reload the page")

    @app.exception_handler(NotLoggedIn)
    async def _to_login(request: Request, _exc: NotLoggedIn) -> Response:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': here})}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return page(request, "message.html", exc.status_code, title=f"Error {exc.status_code}", message=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Response:
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())[1:]) or "request" for e in exc.errors())
        return page(request, "message.html", 400, title="Bad request", message=f"bad value for {fields}")

    # -- no login ------------------------------------------------------------------------
    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse)
    def readyz() -> Response:
        problems = []
        try:
            with deps.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any failure means not ready; the reason is the answer
            problems.append(f"ledger unavailable: {type(exc).__name__}")
        try:
            if shutil.disk_usage(deps.store.root).free < deps.store.min_free_bytes:
                problems.append("free disk below node.min_free_disk_mb")
        except OSError as exc:
            problems.append(f"storage directory unavailable: {exc.strerror}")
        if problems:
            return PlainTextResponse("\n".join(problems), status_code=503)
        return PlainTextResponse("ready")

    @app.get("/static/style.css")
    def style() -> Response:
        return Response(STYLE.read_text(), media_type="text/css")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> Response:
        if not config().dashboard.admin_password_hash:
            return page(request, "message.html", 401, title="Log-in not set up", message=NO_PASSWORD)
        return page(request, "login.html", next=_local(next))

    @app.post("/login", response_class=HTMLResponse)
    def login(request: Request, password: str = Form(""), csrf: str = Form(""), next: str = Form("/")) -> Response:
        stored = config().dashboard.admin_password_hash
        if not stored:
            return page(request, "message.html", 401, title="Log-in not set up", message=NO_PASSWORD)
        require_csrf(request, csrf)
        client = request.client.host if request.client else "unknown"
        wait = throttle.retry_after(client)
        if wait:
            message = f"Too many wrong passwords from {client}: try again in {wait} s."
            rsp = page(request, "login.html", 429, next=next, error=message)
            rsp.headers["Retry-After"] = str(wait)
            return rsp
        throttle.failed(client)  # counted before the (slow) check: parallel tries cannot pass the limit
        if not verify_password(password, stored):
            return page(request, "login.html", 401, next=next, error="Wrong password.")
        throttle.succeeded(client)
        request.session.clear()
        request.session["sid"] = sessions.open()
        request.session["csrf"] = new_csrf_token()  # a new token once logged in
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        require_csrf(request, csrf)
        sessions.close(request.session.get("sid"))  # a saved copy of the cookie is no longer a session
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- pages -------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        require_login(request)
        cfg = config()
        figures = reports.overview(deps.engine, deps.now() - dt.timedelta(hours=24))
        free = shutil.disk_usage(deps.store.root).free
        engine = f"{cfg.worker.backend} on {cfg.worker.device}"
        if figures["last_backend"]:
            engine += f" (last job ran on {figures['last_backend']})"
        return page(request, "overview.html", o=figures, free_gb=free / 1e9, engine=engine)

    @app.get("/studies", response_class=HTMLResponse)
    def studies(request: Request) -> Response:
        require_login(request)
        return page(request, "studies.html", rows=reports.list_studies(deps.engine))

    @app.get("/series", response_class=HTMLResponse)
    def series_list(request: Request, study: int | None = None) -> Response:
        require_login(request)
        return page(request, "series_list.html", rows=reports.list_series(deps.engine, study_id=study), study=study)

    @app.get("/series/{series_id}", response_class=HTMLResponse)
    def series_page(request: Request, series_id: int) -> Response:
        require_login(request)
        detail = reports.series_detail(deps.engine, series_id)
        if detail is None:
            raise HTTPException(404, f"no series {series_id}")
        return page(request, "series.html", d=detail)

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs_list(request: Request, state: str | None = None) -> Response:
        require_login(request)
        return page(request, "jobs.html", rows=reports.list_jobs(deps.engine, state, 200), state=state)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(
        request: Request, job_id: int, slice: int = 0, top: int | None = None, left: int | None = None
    ) -> Response:
        require_login(request)
        detail = reports.job_detail(deps.engine, job_id)
        if detail is None:
            raise HTTPException(404, f"no job {job_id}")
        sources = reports.source_instances(deps.engine, detail.job["series_id"])
        region, unavailable = None, None
        if detail.job["state"] == "done" and sources:
            try:
                region = images.region(_pair(detail.job, sources, slice), top, left)
            except HTTPException as exc:  # the rest of the page (deliveries, retry) still matters
                unavailable = str(exc.detail)
        per_delivery = {d["id"]: reports.delivery_instances(deps.engine, d["id"]) for d in detail.deliveries}
        return page(
            request,
            "job.html",
            d=detail,
            slice=min(max(0, slice), max(0, len(sources) - 1)),
            slices=len(sources),
            region=region,
            unavailable=unavailable,
            per_delivery=per_delivery,
            qa=json.loads(detail.job["qa"]) if detail.job["qa"] else None,
        )

    @app.get("/jobs/{job_id}/{kind}.png")
    def job_image(request: Request, job_id: int, kind: str, slice: int = 0) -> Response:
        require_login(request)
        if kind not in ("before", "after", "difference"):
            raise HTTPException(404, f"no image {kind}")
        detail = reports.job_detail(deps.engine, job_id)
        if detail is None or detail.job["state"] != "done":
            raise HTTPException(404, f"job {job_id} has no output to show")
        pair = _pair(detail.job, reports.source_instances(deps.engine, detail.job["series_id"]), slice)
        data = (
            images.difference_png(pair)
            if kind == "difference"
            else images.png(pair.before if kind == "before" else pair.after, pair.window)
        )
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    def _pair(job: dict[str, Any], sources: list[dict[str, Any]], index: int) -> images.Pair:
        if not sources:
            raise HTTPException(404, "the job's series has no instances")
        src = sources[min(max(0, index), len(sources) - 1)]
        out = derived_uid(src["sop_instance_uid"], job["model"], job["model_version"])
        derived = deps.store.abspath(outbox_path(job["output_series_uid"], out))
        if not derived.exists():
            raise HTTPException(404, f"derived instance {out} is no longer in the outbox")
        return images.load_pair(str(deps.store.abspath(src["path"])), str(derived))

    @app.post("/jobs/{job_id}/retry")
    def retry(request: Request, job_id: int, csrf: str = Form("")) -> Response:
        require_login(request)
        require_csrf(request, csrf)
        if not reports.job_exists(deps.engine, job_id):
            raise HTTPException(404, f"no job {job_id}")
        requeued, deliveries = JobQueue(deps.engine, now=deps.now).resubmit(job_id)
        if not requeued and not deliveries:
            raise HTTPException(409, f"job {job_id} has nothing failed to retry")
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    @app.get("/config", response_class=HTMLResponse)
    def config_page(request: Request, error: str | None = None) -> Response:
        require_login(request)
        return page(request, "config.html", cfg=config(), error=error)

    @app.post("/config/{what}/{action}")
    async def config_edit(request: Request, what: str, action: str) -> Response:
        """The CLI's edits (node/admin.py): the same validation, the same file."""
        require_login(request)
        form = dict(await request.form())
        require_csrf(request, str(form.get("csrf", "")))
        path = config().source
        if path is None:
            raise HTTPException(409, "this node runs on built-in defaults: there is no config.toml to edit")
        try:
            await run_in_threadpool(_apply, path, what, action, form)  # file lock and I/O
        except ConfigError as exc:
            return page(request, "config.html", 400, cfg=config(), error=str(exc))
        deps.live.refresh()
        return RedirectResponse("/config", status_code=303)

    return app


def _apply(path: Path, what: str, action: str, form: dict[str, Any]) -> None:
    def field(name: str) -> str:
        return str(form.get(name, "")).strip()

    if (what, action) == ("ae", "add"):
        admin.add_allowed_ae(path, field("ae_title"), field("host") or None)
    elif (what, action) == ("ae", "remove"):
        admin.remove_allowed_ae(path, field("ae_title"))
    elif (what, action) == ("dest", "add"):
        attempts = field("max_attempts")
        admin.add_destination(
            path,
            field("name"),
            field("ae_title"),
            field("host"),
            _number(field("port"), "port"),
            _number(attempts, "max_attempts") if attempts else None,
        )
    elif (what, action) == ("dest", "remove"):
        admin.remove_destination(path, field("name"))
    elif (what, action) == ("route", "add"):
        match = {k: field(k) for k in ("modality", "calling_ae", "series_description") if field(k)}
        dests = [d.strip() for d in field("destinations").split(",") if d.strip()]
        admin.add_route(
            path,
            field("name"),
            field("model"),
            dests,
            match,
            send_back=bool(form.get("send_back")),
            forward_original=bool(form.get("forward_original")),
        )
    elif (what, action) == ("route", "remove"):
        admin.remove_route(path, field("name"))
    else:
        raise HTTPException(404, f"no such edit: {what} {action}")


def _number(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, not {value!r}") from None


def _local(target: str) -> str:
    """Where to go after log-in: a path on this site only (no //host or /\\host redirect)."""
    parts = urlsplit(target)
    if not target.startswith("/") or target.startswith(("//", "/\\")) or parts.scheme or parts.netloc:
        return "/"
    return target


NO_PASSWORD = (
    "No admin password is set. Make a hash with `enhance-node dashboard hash-password`, put it in "
    f"config.toml as dashboard.admin_password_hash (or the environment variable {ENV_ADMIN_PASSWORD_HASH}), "
    "and restart the node. /healthz, /readyz and /metrics are served without log-in."
)
