"""The worker's QA gate and a route's strength in a running node (issue 17): a series whose
output fails the gate is failed or delivered with a warning, as its route says, never silently;
the figures reach the ledger and `jobs show`; a lower strength keeps part of what the model
removed. The faulty model is a real ONNX graph that moves every pixel by a fixed number of HU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels import apply_rescale

from tests.dicom_factory import write_ct_series
from tests.helpers import REPO, storescu, wait_for
from tests.integration.test_worker import derived_and_sources, start_node, wait_job_done
from tests.onnx_models import HU, pick_channel, shift


def ct_route(model: str, **options: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
    return f'[[routes]]\nname = "ct"\nmodel = "{model}"\ndestinations = []\nmatch = {{ modality = "CT" }}\n{extra}'


def jobs_show(node, job_id: int) -> str:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(node.config), "jobs", "show", str(job_id)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_series_that_fails_qa_fails_its_job_with_the_figures(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shift(tmp_path / "models" / "shift", 30.0)
    _, _, files = write_ct_series(tmp_path / "series", 3, rows=128, cols=128)
    node = start_node(node_factory, tmp_path / "models", ct_route("shift"))
    assert storescu(node.port, files).returncode == 0

    def failed() -> tuple[str, str] | None:
        rows = node.query("SELECT state, error, qa FROM jobs")
        return (rows[0][1], rows[0][2]) if rows and rows[0][0] == "failed" else None

    error, qa_text = wait_for(failed, timeout=120, interval=0.1, what="the job to fail QA")
    assert error.startswith("QA failed: residual_mean")
    report = json.loads(qa_text)
    assert report["passed"] is False and report["figures"]["residual_mean"] > 25.0
    assert not (node.storage / "outbox").exists() or not any((node.storage / "outbox").rglob("*.dcm"))
    shown = jobs_show(node, 1)
    assert "qa         FAILED: residual_mean" in shown and "on QA failure: fail" in shown


def test_deliver_with_warning_marks_the_series_and_leaves_an_event(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shift(tmp_path / "models" / "shift", 30.0)
    _, _, files = write_ct_series(tmp_path / "series", 3, rows=128, cols=128)
    node = start_node(node_factory, tmp_path / "models", ct_route("shift", on_qa_fail="deliver-with-warning"))
    assert storescu(node.port, files).returncode == 0
    output_uid, count, _ = wait_job_done(node)
    assert count == 3
    for _, out, _ in derived_and_sources(node, output_uid, files):
        assert out.SeriesDescription.endswith(" enhanced QA WARNING")
        assert "QA WARNING: residual_mean" in out.DerivationDescription
    events = node.query("SELECT detail FROM events WHERE kind = 'job.qa_warning'")
    assert len(events) == 1 and "residual_mean" in events[0][0]
    assert json.loads(node.query("SELECT qa FROM jobs")[0][0])["passed"] is False


def test_strength_scales_what_the_model_removes_and_is_recorded(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shift(tmp_path / "models" / "shift", 8.0)  # within the QA limits
    _, _, files = write_ct_series(tmp_path / "series", 2, rows=128, cols=128)
    node = start_node(node_factory, tmp_path / "models", ct_route("shift", strength="low"))
    assert storescu(node.port, files).returncode == 0
    output_uid, _, _ = wait_job_done(node)
    for path, out, src in derived_and_sources(node, output_uid, files):
        moved = apply_rescale(dcmread(path).pixel_array, out) - apply_rescale(src.pixel_array, src)
        assert np.abs(np.median(moved) - 4.0) <= 1.0  # half of 8 HU at strength low (0.5)
        assert "strength low" in out.DerivationDescription
    assert node.query("SELECT strength, on_qa_fail FROM jobs") == [("low", "fail")]
    report = json.loads(node.query("SELECT qa FROM jobs")[0][0])
    assert report["passed"] is True and set(report["figures"]) >= {"noise_sd", "residual_mean", "edge_ratio"}


def test_a_noise_map_model_is_told_the_series_noise_level_scaled_by_strength(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A stand-in model whose output is its noise-map channel: the derived pixels are the level
    the worker gave it, the series' estimated noise SD (20 HU in these phantoms) times 0.5 at
    strength low, in HU above the window's floor. (Its output fails the QA gate, so the route
    delivers with a warning.)"""
    pick_channel(tmp_path / "models" / "level", 2, 1, context_slices=1, noise_map=True)
    _, _, files = write_ct_series(tmp_path / "series", 2, rows=128, cols=128)
    routes = ct_route("level", strength="low", on_qa_fail="deliver-with-warning")
    node = start_node(node_factory, tmp_path / "models", routes)
    assert storescu(node.port, files).returncode == 0
    output_uid, _, _ = wait_job_done(node)
    for path, out, _ in derived_and_sources(node, output_uid, files):
        told = apply_rescale(dcmread(path).pixel_array, out)[40:88, 40:88] - HU.lo
        assert np.abs(np.median(told) - 10.0) <= 2.0  # half of ~20 HU
        assert "strength low" in out.DerivationDescription
