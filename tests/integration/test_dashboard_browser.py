"""The dashboard in a real browser (Debian chromium driven by Playwright) against a running
node: a wrong password is refused with a message, the admin logs in, finds the processed
series, opens its before/after view, and retries a failed delivery, which then arrives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node.dashboard.auth import hash_password
from tests.dicom_factory import write_ct_series
from tests.helpers import REPO, ct_route, destination_toml, free_port, pipeline_node, storescu, wait_for
from tests.peers import StoreSCP

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "radiology-physics"
# as root in a sandbox without a network: no sandboxing, no background connections
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium not found: `make test` installs the Debian package chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_admin_logs_in_views_before_after_and_retries_a_failed_delivery(
    browser,  # type: ignore[no-untyped-def]
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    with StoreSCP("PACS").start() as peer:
        peer.answer = lambda _ds: 0xA700  # out of resources until the admin has freed space
        port = free_port()
        node = pipeline_node(
            node_factory,
            destination_toml("pacs", "PACS", peer.port, max_attempts=1) + ct_route('"pacs"'),
            dashboard_port=port,
            dashboard=f'admin_password_hash = "{hash_password(PASSWORD)}"',
        ).start()
        _, series_uid, files = write_ct_series(tmp_path / "series", 4, rows=128, cols=128)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: node.query("SELECT state FROM deliveries") == [("failed",)], timeout=120, what="failed")

        page = browser.new_page()
        base = f"http://127.0.0.1:{port}"
        page.goto(f"{base}/")
        assert "/login" in page.url
        page.fill("input[name=password]", "not the password")
        answer = page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST")
        with answer as info:
            page.click("button[type=submit]")
        assert info.value.status == 401
        assert page.locator("[role=alert]").inner_text() == "Wrong password."
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        assert page.locator("#failed-deliveries").inner_text() == "1"

        page.click("text=Series")
        page.click(f"text={series_uid}")
        page.click("a[href^='/jobs/']")
        # polled from Python: the page's Content-Security-Policy forbids the eval that
        # wait_for_function's string predicates need (no script may run in the dashboard)
        for img in ("#before", "#after", "#difference"):
            wait_for(lambda img=img: page.locator(img).evaluate("e => e.naturalWidth") == 128, what=f"{img} loaded")
        header = page.locator("header").evaluate("e => getComputedStyle(e).backgroundColor")
        assert header == "rgb(29, 53, 87)"  # the style sheet applies under the CSP
        noise = page.locator("#noise").inner_text()
        assert "before" in noise and "after" in noise
        sd_before, sd_after = (float(b) for b in page.locator("#noise b").all_inner_texts())
        assert sd_after < sd_before  # the denoiser lowered the noise where it is measured
        assert "0xA700" in page.content()

        peer.answer = lambda _ds: 0x0000
        page.click("#retry")
        wait_for(lambda: node.query("SELECT state FROM deliveries") == [("delivered",)], timeout=60, what="delivered")
        page.reload()
        assert page.locator("h3 .delivered").count() == 1
        shot = tmp_path / "dashboard-job.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        artifacts = REPO / "var" / "test-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / shot.name)
        assert len(set(peer.received)) == 4
