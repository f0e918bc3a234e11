"""The dashboard app (node/dashboard) through FastAPI's test client on a real SQLite ledger:
log-in (hash, 401 with a message, never a stack trace), sessions, CSRF on every form,
configuration edits with the CLI's validation, /metrics, /healthz, /readyz."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from node.config import load_config
from node.dashboard.app import Deps, create_app
from node.dashboard.auth import LoginThrottle, Sessions, hash_password, verify_password
from node.live import LiveConfig
from storage.filestore import FileStore
from storage.ledger import Ledger
from tests.helpers import REPO, Clock
from tests.unit.test_jobs import add_instance, complete

PASSWORD = "correct horse battery"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    shutil.copy(REPO / "config.toml", path)
    text = path.read_text().replace(
        '# admin_password_hash = "..."', f'admin_password_hash = "{hash_password(PASSWORD, salt=b"0123456789abcdef")}"'
    )
    path.write_text(text)
    return path


@pytest.fixture
def client(config_path: Path, engine: Engine, tmp_path: Path, clock: Clock) -> TestClient:
    live = LiveConfig(load_config(config_path), interval=0.0)
    return TestClient(create_app(Deps(engine, live, FileStore(tmp_path / "storage", 0), now=clock)))


def csrf(client: TestClient, path: str = "/login") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def log_in(client: TestClient) -> None:
    rsp = client.post("/login", data={"password": PASSWORD, "csrf": csrf(client), "next": "/"}, follow_redirects=False)
    assert rsp.status_code == 303


def test_password_hashes_verify_and_a_garbled_hash_is_just_wrong() -> None:
    stored = hash_password("s3cret-enough")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_password("s3cret-enough", stored)
    assert not verify_password("s3cret-enoug", stored)
    assert not verify_password("s3cret-enough", "not-a-hash")
    assert hash_password("x", salt=b"a" * 16) == hash_password("x", salt=b"a" * 16) != hash_password("x")


def test_pages_need_a_log_in(client: TestClient) -> None:
    for path in ("/", "/series", "/jobs", "/jobs/1", "/config"):
        rsp = client.get(path, follow_redirects=False)
        assert rsp.status_code == 303 and rsp.headers["location"].startswith("/login")


def test_a_wrong_password_gets_401_and_a_message(client: TestClient) -> None:
    rsp = client.post("/login", data={"password": "nope", "csrf": csrf(client)})
    assert rsp.status_code == 401
    assert "Wrong password." in rsp.text and "Traceback" not in rsp.text
    assert client.get("/", follow_redirects=False).status_code == 303


def test_a_form_without_its_csrf_token_is_refused(client: TestClient) -> None:
    rsp = client.post("/login", data={"password": PASSWORD, "csrf": "forged"})
    assert rsp.status_code == 403 and "CSRF" in rsp.text
    log_in(client)
    assert client.post("/config/ae/add", data={"ae_title": "CT09", "csrf": "forged"}).status_code == 403
    assert client.post("/jobs/1/retry", data={}).status_code == 403


def test_retry_of_a_job_the_ledger_does_not_have_is_a_404_with_the_reason(client: TestClient) -> None:
    log_in(client)
    rsp = client.post("/jobs/999/retry", data={"csrf": csrf(client, "/config")})
    assert rsp.status_code == 404 and "no job 999" in rsp.text


def test_log_in_then_overview_shows_queue_and_states(
    client: TestClient, ledger: Ledger, engine: Engine, clock: Clock
) -> None:
    add_instance(ledger, "1.2.3.100", "1.2.3.100.1")
    complete(ledger, clock)
    log_in(client)
    page = client.get("/")
    assert page.status_code == 200
    assert 'id="queue-depth">0<' in page.text and "Free disk" in page.text and "onnxruntime" not in page.text
    series = client.get("/series")
    assert "1.2.3.100" in series.text and "complete" in series.text
    studies = client.get("/studies")
    assert "1.2.3</code>" in studies.text and "/series?study=1" in studies.text
    assert "1.2.3.100" in client.get("/series?study=1").text
    assert "1.2.3.100" not in client.get("/series?study=2").text
    timeline = client.get("/series/1")
    assert "series.complete" in timeline.text
    assert client.get("/series/99").status_code == 404
    assert client.get("/jobs/99").status_code == 404


def test_config_edits_validate_like_the_cli_and_keep_comments(client: TestClient, config_path: Path) -> None:
    log_in(client)
    token = csrf(client, "/config")
    ok = client.post(
        "/config/dest/add",
        data={"csrf": token, "name": "pacs", "ae_title": "PACS", "host": "10.0.0.20", "port": "104"},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    assert "PACS" in client.get("/config").text
    bad = client.post("/config/route/add", data={"csrf": token, "name": "r", "model": "m", "destinations": "nowhere"})
    assert bad.status_code == 400 and "no destination named &#39;nowhere&#39;" in bad.text
    used = client.post(
        "/config/route/add", data={"csrf": token, "name": "r2", "model": "ct-sr2", "destinations": "pacs"}
    )
    assert used.status_code == 200  # redirected back to the page
    refused = client.post("/config/dest/remove", data={"csrf": token, "name": "pacs"})
    assert refused.status_code == 400 and "used by route r2" in refused.text
    assert "# enhance-node configuration." in config_path.read_text()
    assert client.post("/config/ae/add", data={"csrf": token, "ae_title": "A" * 17}).status_code == 400


def test_health_readiness_and_metrics_need_no_log_in(client: TestClient, ledger: Ledger, clock: Clock) -> None:
    add_instance(ledger, "1.2.3.100", "1.2.3.100.1")
    assert client.get("/healthz").text == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.text == "ready"
    metrics = client.get("/metrics").text
    assert "enhance_instances_received_total 1.0" in metrics
    assert 'enhance_jobs{state="queued"} 0.0' in metrics
    assert "enhance_free_disk_bytes" in metrics
    assert 'enhance_stage_seconds_count{stage="deliver"} 0.0' in metrics  # nothing delivered yet


def test_readyz_says_why_when_the_disk_is_below_the_floor(config_path: Path, engine: Engine, tmp_path: Path) -> None:
    live = LiveConfig(load_config(config_path))
    full = FileStore(tmp_path / "storage", shutil.disk_usage(tmp_path).free * 2)
    rsp = TestClient(create_app(Deps(engine, live, full))).get("/readyz")
    assert rsp.status_code == 503 and "free disk below node.min_free_disk_mb" in rsp.text


def test_without_a_password_hash_the_ui_answers_401_with_how_to_set_one(engine: Engine, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    shutil.copy(REPO / "config.toml", cfg)
    app = create_app(Deps(engine, LiveConfig(load_config(cfg)), FileStore(tmp_path / "storage", 0)))
    rsp = TestClient(app).get("/login")
    assert rsp.status_code == 401 and "enhance-node dashboard hash-password" in rsp.text


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example", "https://evil.example/", "jobs"])
def test_log_in_never_redirects_off_the_site(client: TestClient, target: str) -> None:
    rsp = client.post(
        "/login", data={"password": PASSWORD, "csrf": csrf(client), "next": target}, follow_redirects=False
    )
    assert rsp.status_code == 303 and rsp.headers["location"] == "/"


def test_the_page_asked_for_is_where_log_in_returns(client: TestClient) -> None:
    first = client.get("/jobs?state=failed", follow_redirects=False)
    assert first.headers["location"] == "/login?next=%2Fjobs%3Fstate%3Dfailed"
    rsp = client.post(
        "/login",
        data={"password": PASSWORD, "csrf": csrf(client), "next": "/jobs?state=failed"},
        follow_redirects=False,
    )
    assert rsp.headers["location"] == "/jobs?state=failed"


def test_bad_paths_and_values_get_an_html_message_not_json(client: TestClient) -> None:
    log_in(client)
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and "<h1>" in missing.text
    bad = client.get("/jobs/abc")
    assert bad.status_code == 400 and "bad value for job_id" in bad.text
    token = csrf(client, "/config")
    port = client.post("/config/dest/add", data={"csrf": token, "name": "p", "ae_title": "P", "host": "h", "port": "x"})
    assert port.status_code == 400 and "port: must be a whole number" in port.text


def test_job_page_and_metrics_show_the_qa_figures(
    client: TestClient, ledger: Ledger, engine: Engine, clock: Clock
) -> None:
    from node.config import RouteConfig
    from node.routing import route_complete_series
    from storage.jobs import JobQueue

    add_instance(ledger, "1.2.3.100", "1.2.3.100.1")
    complete(ledger, clock)
    queue = JobQueue(engine, now=clock)
    route_complete_series(queue, [RouteConfig("r", "ct-denoise", (), strength="medium")], 3)
    job = queue.claim("w")
    assert job is not None
    report = {
        "figures": {"noise_sd": 18.5, "residual_mean": 14.2, "removed_ratio": 0.9},
        "failures": ["residual_mean 14.20 HU > 12"],
        "passed": False,
    }
    queue.record_qa(job.id, "w", report, None)
    queue.fail(job.id, "w", "QA failed: residual_mean 14.20 HU > 12", permanent=True)
    log_in(client)
    page = client.get(f"/jobs/{job.id}").text
    assert 'id="qa-verdict" class="failed">failed<' in page
    assert "<li>residual_mean 14.20 HU &gt; 12</li>" in page and "<td>noise_sd</td><td>18.500</td>" in page
    assert "Strength <b>medium</b>" in page
    metrics = client.get("/metrics").text
    assert 'enhance_qa_jobs_total{verdict="failed"} 1.0' in metrics
    assert 'enhance_qa_jobs_total{verdict="passed"} 0.0' in metrics
    assert 'enhance_qa_figure_count{figure="residual_mean"} 1.0' in metrics
    assert 'enhance_qa_figure_bucket{figure="residual_mean",le="12"} 0.0' in metrics


def test_series_pages_say_why_a_series_was_skipped(
    client: TestClient, ledger: Ledger, engine: Engine, clock: Clock
) -> None:
    from node.config import RouteConfig
    from node.routing import Decision, route_complete_series
    from storage.jobs import JobQueue

    add_instance(ledger, "1.2.3.100", "1.2.3.100.1")
    complete(ledger, clock)
    skip = lambda routes, facts: Decision(None, "own output: made by ct-denoise on this node")  # noqa: E731
    route_complete_series(JobQueue(engine, now=clock), [RouteConfig("r", "ct-denoise", ())], 3, (), skip)
    log_in(client)
    listing = client.get("/series").text
    assert "routed (skipped: own output: made by ct-denoise on this node)" in listing
    page = client.get("/series/1").text
    assert "Not processed (series.skipped): own output: made by ct-denoise on this node" in page
    assert "series.skipped" in page  # the timeline's event


# -- hardening (issue 19) -----------------------------------------------------------------------


def test_log_out_ends_the_session_even_for_a_saved_copy_of_its_cookie(client: TestClient) -> None:
    log_in(client)
    saved = dict(client.cookies)
    assert client.get("/config", follow_redirects=False).status_code == 200
    client.post("/logout", data={"csrf": csrf(client, "/config")}, follow_redirects=False)
    client.cookies.clear()
    client.cookies.update(saved)  # the cookie as it was before log-out
    rsp = client.get("/config", follow_redirects=False)
    assert rsp.status_code == 303 and rsp.headers["location"].startswith("/login")


def test_a_session_ends_when_it_expires() -> None:
    now = [0.0]
    sessions = Sessions(60.0, clock=lambda: now[0])
    sid = sessions.open()
    assert sessions.valid(sid) and not sessions.valid("forged") and not sessions.valid(None)
    now[0] = 61.0
    assert not sessions.valid(sid)


def test_thirty_wrong_passwords_are_throttled_with_retry_after(
    config_path: Path, engine: Engine, tmp_path: Path, clock: Clock
) -> None:
    now = [1000.0]
    throttle = LoginThrottle(attempts=5, window_s=300.0, clock=lambda: now[0])
    live = LiveConfig(load_config(config_path), interval=0.0)
    client = TestClient(
        create_app(Deps(engine, live, FileStore(tmp_path / "storage", 0), now=clock), throttle=throttle)
    )
    token = csrf(client)
    codes = [client.post("/login", data={"password": "wrong", "csrf": token}).status_code for _ in range(30)]
    assert codes == [401] * 5 + [429] * 25
    refused = client.post("/login", data={"password": PASSWORD, "csrf": token}, follow_redirects=False)
    assert refused.status_code == 429  # not even the right password while throttled
    assert refused.headers["Retry-After"] == "301" and "try again in 301 s" in refused.text
    now[0] += 301
    assert client.post("/login", data={"password": PASSWORD, "csrf": token}, follow_redirects=False).status_code == 303


def test_every_answer_carries_the_security_headers(client: TestClient) -> None:
    for path in ("/login", "/healthz", "/static/style.css", "/nowhere"):
        headers = client.get(path).headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no scripts at all
        assert (headers["X-Frame-Options"], headers["Referrer-Policy"]) == ("DENY", "no-referrer"), path
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert "<style" not in client.get("/login").text and "style=" not in client.get("/login").text


def test_the_session_cookie_is_secure_when_the_dashboard_serves_tls(
    config_path: Path, engine: Engine, tmp_path: Path, clock: Clock
) -> None:
    live = LiveConfig(load_config(config_path), interval=0.0)
    deps = Deps(engine, live, FileStore(tmp_path / "storage", 0), now=clock)
    plain = TestClient(create_app(deps)).get("/login").headers["set-cookie"]
    secure = TestClient(create_app(deps, https_only=True), base_url="https://testserver").get("/login")
    assert "secure" not in plain.lower()
    assert (
        "secure" in secure.headers["set-cookie"].lower() and "samesite=strict" in secure.headers["set-cookie"].lower()
    )
