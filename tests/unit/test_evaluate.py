"""train.evaluate: a model package against classical filters on degraded synthetic series."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid

from engines.manifest import ModelManifest, dump, load, sha256_file
from engines.netspec import NetSpec
from tests.dicom_factory import UID_ROOT, ct_slice
from train.evaluate import evaluate, record_metrics
from train.export import export
from train.loop import RunConfig, train
from train.presets import PRESETS, with_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = {"psnr", "ssim", "rmse", "seconds"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def write_ct(folder: Path, hu: np.ndarray) -> Path:
    """A CT series (slices, rows, cols) in HU, through the test factory's header."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    for i, image in enumerate(hu):
        ds = ct_slice(study, series, i, rows=image.shape[0], cols=image.shape[1])
        ds.PixelData = np.clip(np.round(image + 1024), 0, 4095).astype(np.int16).tobytes()
        ds.save_as(folder / f"ct{i:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 128x128 slices of a noise-free water cylinder (0 HU) with a 60 HU insert, in air."""
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 64, xx - 64)
    image = np.where(r < 52, 0.0, -1000.0) + np.where(np.hypot(yy - 50, xx - 70) < 10, 60.0, 0.0)
    return write_ct(tmp_path_factory.mktemp("ct"), np.stack([image, image]))


def _package(root: Path, name: str, net: NetSpec) -> Path:
    preset = with_overrides(
        PRESETS[name], net=net, phantoms=2, phantom_size=64, epochs=1, steps_per_epoch=2, batch=2, patch=32
    )
    export(train(RunConfig(preset, root / "run", workers=1)), root / "pkg")
    return root / "pkg"


@pytest.fixture(scope="module")
def ct_denoiser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _package(tmp_path_factory.mktemp("ct-denoise"), "ct-denoise", NetSpec("dncnn", depth=3, width=8))


@pytest.fixture(scope="module")
def ct_upscaler(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = NetSpec("srnet", depth=1, width=8, unshuffle=1, scale=2)
    return _package(tmp_path_factory.mktemp("ct-sr2"), "ct-sr2", net)


@pytest.fixture(scope="module")
def denoise_result(ct_denoiser: Path, ct_series: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return evaluate(ct_denoiser, [ct_series], tmp_path_factory.mktemp("report"), dose=0.1, max_slices=2)


def _table_rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("method", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_ct_denoise_evaluation(denoise_result: dict[str, Any]) -> None:
    result = denoise_result
    assert result["task"] == "denoise"
    assert result["slices"] == 2
    assert result["images"] == ["Synthetic phantom"]
    assert result["model"] == "ct-denoise 1.0.0"
    assert "10% dose" in result["degradation"]
    assert set(result["results"]) == {"input", "nlm", "tv", "model"}
    for name, m in result["results"].items():
        assert METRICS | {"roi_bias", "roi_error", "roi_sd"} <= m.keys(), name
        assert m["roi_error"] == m["roi_bias"], name  # one draw: the bias is that draw's error
        assert all(np.isfinite(v) for v in m.values()), (name, m)
        assert 0 < m["ssim"] <= 1 and m["rmse"] > 0 and m["seconds"] >= 0


def test_report_and_panel_are_written(ct_denoiser: Path, ct_series: Path, tmp_path: Path) -> None:
    result = evaluate(ct_denoiser, [ct_series], tmp_path, dose=0.1, max_slices=1)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Evaluation of ct-denoise 1.0.0")
    rows = _table_rows(report)
    assert list(rows) == ["input", "nlm", "tv", "model"]
    for name, cells in rows.items():
        assert len(cells) == 7
        assert float(cells[0]) == pytest.approx(result["results"][name]["psnr"], abs=0.006)
        assert float(cells[2]) == pytest.approx(result["results"][name]["rmse"], abs=0.006)
    assert (tmp_path / "panel.png").read_bytes()[:8] == PNG_MAGIC


def test_nlm_baseline_lowers_the_noise(denoise_result: dict[str, Any]) -> None:
    r = denoise_result["results"]
    assert r["nlm"]["rmse"] < r["input"]["rmse"]
    assert r["nlm"]["psnr"] > r["input"]["psnr"]
    assert r["nlm"]["roi_sd"] < r["input"]["roi_sd"]
    assert r["tv"]["roi_sd"] < r["input"]["roi_sd"]


def test_lower_dose_means_a_noisier_input(
    ct_denoiser: Path, ct_series: Path, tmp_path: Path, denoise_result: dict[str, Any]
) -> None:
    full = evaluate(ct_denoiser, [ct_series], tmp_path, dose=1.0, max_slices=1)
    assert full["results"]["input"]["rmse"] < denoise_result["results"]["input"]["rmse"]


def test_sr_evaluation(ct_upscaler: Path, ct_series: Path, tmp_path: Path) -> None:
    result = evaluate(ct_upscaler, [ct_series], tmp_path, max_slices=2)
    assert result["task"] == "sr"
    assert result["degradation"].startswith("x2")
    assert set(result["results"]) == {"bicubic", "lanczos", "model"}
    for m in result["results"].values():
        assert m.keys() == METRICS  # no ROI columns for SR
    assert list(_table_rows((tmp_path / "report.md").read_text())) == ["bicubic", "lanczos", "model"]
    assert (tmp_path / "panel.png").read_bytes()[:8] == PNG_MAGIC


def test_record_metrics_keeps_the_package_loadable(
    ct_denoiser: Path, denoise_result: dict[str, Any], tmp_path: Path
) -> None:
    package = tmp_path / "pkg"
    shutil.copytree(ct_denoiser, package)
    before = load(package)
    record_metrics(package, denoise_result)
    after = load(package)  # the sha256 still matches model.onnx
    assert after.onnx_sha256 == before.onnx_sha256 == sha256_file(package / "model.onnx")
    assert after.training == before.training
    assert after.metrics["slices"] == 2
    assert after.metrics["task"] == "denoise"
    for name, m in denoise_result["results"].items():
        for key, value in m.items():
            assert after.metrics["results"][name][key] == pytest.approx(value, abs=1e-4)
    record_metrics(package, denoise_result)  # recording twice replaces, does not nest
    assert load(package).metrics == after.metrics
    # bench/robustness.py's matrix is kept beside the held-out figures
    data = load(package).as_dict()
    data["metrics"] = {**data["metrics"], "robustness": {"worst_gain": -1.0}}
    dump(ModelManifest.from_dict(data), package / "model.toml")
    record_metrics(package, denoise_result)
    assert load(package).metrics["robustness"] == {"worst_gain": -1.0} and load(package).metrics["slices"] == 2


def test_no_image_of_the_models_modality(ct_series: Path, tmp_path: Path) -> None:
    mr = _package(tmp_path, "mr-denoise", NetSpec("dncnn", depth=3, width=8))
    with pytest.raises(ValueError, match="no MR images"):
        evaluate(mr, [ct_series], tmp_path / "report")
    assert not (tmp_path / "report" / "report.md").exists()


def test_evaluate_command_prints_the_report_and_updates_the_manifest(
    ct_upscaler: Path, ct_series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main

    package = tmp_path / "pkg"
    shutil.copytree(ct_upscaler, package)
    argv = ["evaluate", str(package), "--data", str(ct_series), "--max-slices", "1", "--update-manifest"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Evaluation of ct-sr2 1.0.0")
    assert (package / "evaluation" / "report.md").read_text().strip() == out.strip()
    metrics = load(package).metrics
    assert metrics["slices"] == 1
    assert set(metrics["results"]) == {"bicubic", "lanczos", "model"}


def test_classical_filters_get_their_best_strength(ct_denoiser: Path, ct_series: Path) -> None:
    """The NLM and TV baselines are the best of their strength grids against the target (the
    oracle), timed as a single run; the strength matters on this image, so the choice is real."""
    from train import metrics
    from train.evaluate import NLM_H, TV_WEIGHT, _tv, baselines, degradation_for, make_cases, nlm
    from train.volumes import read_series

    manifest = load(ct_denoiser)
    (case,) = make_cases(read_series([ct_series]), manifest, degradation_for(manifest, 0.1, 5.0), 1, seed=3)
    noisy = case.degraded[0]
    for name, grid, run in (("nlm", NLM_H, nlm), ("tv", TV_WEIGHT, _tv)):
        scores = [metrics.psnr(run(noisy, case.sigma, k), case.target, metrics.CT_WINDOW) for k in grid]
        pred, seconds = baselines(manifest)[name](case)
        assert metrics.psnr(pred, case.target, metrics.CT_WINDOW) == pytest.approx(max(scores))
        assert max(scores) - min(scores) > 0.1
        assert seconds > 0


def test_bias_is_measured_on_the_mean_over_noise_draws(ct_denoiser: Path, ct_series: Path, tmp_path: Path) -> None:
    """With three draws, the input's bias is that of the three noisy slices averaged (recomputed
    here from the same seeds), its one-draw error the mean of each draw's worst ROI error; the
    noise averages out, so the bias is the smaller. PSNR is the mean over the draws."""
    from train import metrics
    from train.evaluate import SOFT_TISSUE, degradation_for, make_cases
    from train.volumes import read_series

    result = evaluate(ct_denoiser, [ct_series], tmp_path, dose=0.1, max_slices=1, seed=5, realisations=3)
    assert result["realisations"] == 3
    manifest = load(ct_denoiser)
    deg = degradation_for(manifest, 0.1, 5.0)
    draws = [make_cases(read_series([ct_series]), manifest, deg, 1, seed)[0] for seed in (5, 6, 7)]
    target = draws[0].target
    rois = metrics.uniform_rois(target, SOFT_TISSUE)
    noisy = [c.degraded[0] for c in draws]
    mean = np.mean(noisy, axis=0).astype(np.float32)
    errors = [metrics.roi_bias_and_sd(n, target, rois)[0] for n in noisy]
    r = result["results"]["input"]
    assert r["roi_bias"] == pytest.approx(metrics.roi_bias_and_sd(mean, target, rois)[0], abs=1e-4)
    assert r["roi_error"] == pytest.approx(np.mean(errors), abs=1e-4)
    assert r["roi_bias"] < r["roi_error"]
    assert r["psnr"] == pytest.approx(np.mean([metrics.psnr(n, target, metrics.CT_WINDOW) for n in noisy]), abs=1e-4)
    assert "Noise realisations per slice: 3" in (tmp_path / "report.md").read_text()


def test_sr_degradations_are_drawn_once(ct_upscaler: Path, ct_series: Path, tmp_path: Path) -> None:
    assert evaluate(ct_upscaler, [ct_series], tmp_path, max_slices=1, realisations=4)["realisations"] == 1
    with pytest.raises(ValueError, match="BM3D is a denoising baseline; ct-sr2 is a sr model"):
        evaluate(ct_upscaler, [ct_series], tmp_path, max_slices=1, bm3d=True)


def test_realisations_must_be_positive(ct_denoiser: Path, ct_series: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="realisations must be at least 1"):
        evaluate(ct_denoiser, [ct_series], tmp_path, realisations=0)


def test_noise_psd_of_white_noise_is_its_variance_times_the_pixels() -> None:
    from train.evaluate import noise_psd

    noise = np.random.default_rng(0).normal(0.0, 3.0, (128, 96))
    psd = noise_psd(noise)
    assert psd.shape == noise.shape
    assert psd.mean() == pytest.approx(np.mean(noise**2) * noise.size, rel=1e-6)  # Parseval
    assert psd.std() / psd.mean() < 0.2  # white: flat once smoothed (a raw periodogram varies ~100%)


def test_bm3d_baseline(ct_denoiser: Path, ct_series: Path, tmp_path: Path) -> None:
    pytest.importorskip("bm3d", reason="bm3d is not installed (make test installs it; non-commercial licence)")
    result = evaluate(ct_denoiser, [ct_series], tmp_path, dose=0.1, max_slices=1, bm3d=True)
    r = result["results"]
    assert list(r) == ["input", "nlm", "tv", "bm3d", "model"]
    assert r["bm3d"]["psnr"] > r["input"]["psnr"] + 3
    assert r["bm3d"]["roi_sd"] < r["input"]["roi_sd"] / 2
    assert r["bm3d"]["seconds"] > 0
    assert "bm3d" in _table_rows((tmp_path / "report.md").read_text())


def test_bm3d_baseline_not_installed(
    ct_denoiser: Path, ct_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A None entry in sys.modules is how Python itself makes an import fail: the package
    cannot be uninstalled for one test."""
    import sys

    from node.cli import main

    monkeypatch.setitem(sys.modules, "bm3d", None)
    with pytest.raises(ValueError, match="pip install bm3d"):
        evaluate(ct_denoiser, [ct_series], tmp_path, max_slices=1, bm3d=True)
    assert main(["evaluate", str(ct_denoiser), "--data", str(ct_series), "--bm3d", "--out", str(tmp_path)]) == 2
