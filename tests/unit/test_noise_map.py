"""A denoiser with a noise map (DESIGN 3.4): the manifest declares it and the ONNX graph must
take the extra channel; the pipeline fills it with the series' noise level (estimated, or
given), scaled by the route's strength."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import ManifestError
from engines import qa
from engines.manifest import ModelManifest, load
from engines.pipeline import enhance_volume
from engines.registry import EngineOptions, open_engine
from tests.onnx_models import HU, identity, pick_channel

SPAN = HU.hi - HU.lo


def _series(sd: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128] - 63.5
    body = np.where(np.hypot(yy, xx) < 55, 40.0, -1000.0)
    return (body + rng.normal(0.0, sd, (3, 128, 128))).astype(np.float32)


@pytest.fixture
def level_model(tmp_path: Path) -> Path:
    """output = the noise-map channel: the pipeline's level comes back as the image."""
    return pick_channel(tmp_path / "level", 2, 1, context_slices=1, noise_map=True)


def _engine(package: Path):  # type: ignore[no-untyped-def]
    return open_engine(package, EngineOptions(backend="onnxruntime", device="cpu", threads=1))


def test_the_pipeline_fills_the_map_with_the_estimated_level(level_model: Path) -> None:
    engine = _engine(level_model)
    assert engine.manifest.input_channels == 2
    series = _series(20.0)
    out = enhance_volume(engine, series)
    estimated = qa.series_noise_sd(series, ct=True)
    assert estimated == pytest.approx(20.0, rel=0.1)
    body = np.abs(series[0] - 40) < 200
    assert np.allclose(out[0][body], estimated + HU.lo, atol=0.05)  # the level, de-normalised like an image


def test_strength_scales_the_level_and_a_known_sd_replaces_the_estimate(level_model: Path) -> None:
    engine = _engine(level_model)
    series = _series(20.0)
    body = np.abs(series[0] - 40) < 200
    half = enhance_volume(engine, series, noise_scale=0.5)
    assert np.allclose(half[0][body], 0.5 * qa.series_noise_sd(series, ct=True) + HU.lo, atol=0.05)
    told = enhance_volume(engine, series, noise_sd=7.0)
    assert np.allclose(told[0][body], 7.0 + HU.lo, atol=0.05)


def test_the_manifest_and_the_graph_must_agree_on_the_map(tmp_path: Path) -> None:
    blind_graph = identity(tmp_path / "blind")
    toml = blind_graph / "model.toml"
    toml.write_text(toml.read_text().replace("noise_map = false", "noise_map = true"))
    with pytest.raises(ManifestError, match="plus a noise map, the ONNX input has 1 channels"):
        _engine(blind_graph)
    data = load(tmp_path / "blind").as_dict()
    with pytest.raises(ManifestError, match="clamp_to_input is for sr"):
        ModelManifest.from_dict({**data, "clamp_to_input": True})
    with pytest.raises(ManifestError, match="true or false"):
        ModelManifest.from_dict({**data, "noise_map": "yes"})


def test_restore_mean_puts_back_a_regional_shift_and_leaves_noise_removal_alone() -> None:
    from engines.pipeline import restore_mean

    rng = np.random.default_rng(0)
    clean = _series(0.0)
    noisy = clean + rng.normal(0.0, 30.0, clean.shape).astype(np.float32)
    inside = clean > -900
    shifted = restore_mean(noisy, clean - 10.0, inside, 16.0)  # a denoiser that also moved HU by -10
    assert abs(float((shifted - clean)[inside].mean())) < 0.5
    kept = restore_mean(noisy, clean, inside, 16.0)  # one that removed only the noise
    assert float(np.abs(kept - clean)[inside].std()) < 1.5  # what comes back is the noise's regional mean
    assert np.array_equal(kept[~inside], clean[~inside])  # air is left alone
    with pytest.raises(ManifestError, match="restore_mean_px"):
        ModelManifest.from_dict(
            {**load(Path(__file__).resolve().parents[2] / "models" / "ct-sr2").as_dict(), "restore_mean_px": 8}
        )


def test_restore_mean_by_class_keeps_an_edge_smoothed_by_the_denoiser_out_of_the_tissue_beside_it() -> None:
    """Soft tissue (40 HU) beside bone (1000 HU), the edge smoothed over ~1 px by a denoiser:
    what that moved is a +/- pair of residuals at the edge whose regional mean, taken over the
    body, shifts the soft tissue within a few sigma of the edge by ~10 HU. Split at 200 HU, the
    soft tissue's regional mean is taken over soft tissue only, and the shift halves."""
    from scipy import ndimage

    from engines.pipeline import restore_mean

    rng = np.random.default_rng(1)
    clean = np.full((1, 96, 96), 40.0, np.float32)
    clean[:, :, 48:] = 1000.0
    noisy = clean + rng.normal(0.0, 20.0, clean.shape).astype(np.float32)
    smoothed = ndimage.gaussian_filter(clean, (0, 0, 1.0)).astype(np.float32)  # noise removed, edge blurred
    inside = np.ones(clean.shape, bool)
    near = (slice(None), slice(8, 88), slice(36, 45))  # soft tissue 3-12 px from the edge, untouched by the blur
    assert float(np.abs(smoothed - clean)[near].max()) < 0.5
    one_class = float((restore_mean(noisy, smoothed, inside, 6.0) - clean)[near].mean())
    by_class = float((restore_mean(noisy, smoothed, inside, 6.0, (200.0,)) - clean)[near].mean())
    assert one_class < -5.0
    assert abs(by_class) < 0.6 * abs(one_class)
    data = load(Path(__file__).resolve().parents[2] / "models" / "ct-denoise").as_dict()
    assert ModelManifest.from_dict({**data, "restore_mean_bounds": [-300, 200]}).restore_mean_bounds == (-300.0, 200.0)
    for wrong in ({"restore_mean_bounds": [200, -300]}, {"restore_mean_px": 0, "restore_mean_bounds": [200]}):
        with pytest.raises(ManifestError, match="restore_mean_bounds"):
            ModelManifest.from_dict({**data, **wrong})


def test_restore_mean_is_the_regional_mean_of_each_class_zoomed_back_linearly() -> None:
    """restore_mean computes, per slice and class, block sums, a Gaussian and a linear zoom with
    gathers of its own (no BLAS, no whole-volume copies); it must equal the plain computation:
    4x4 block sums of the residual and of the pixel count, ndimage's Gaussian over them
    (mode "constant"), their ratio zoomed back with ndimage.zoom (linear, grid mode), each pixel
    given its own class's, nothing outside the body. At sizes not divisible by 4 too."""
    from scipy import ndimage

    from engines.pipeline import restore_mean

    rng = np.random.default_rng(3)
    shapes = (((2, 64, 64), (-300.0, -30.0, 200.0)), ((2, 97, 130), (200.0,)), ((1, 5, 7), ()), ((1, 3, 4), (0.0,)))
    for (z, h, w), bounds in shapes:
        before = rng.normal(40.0, 400.0, (z, h, w)).astype(np.float32)
        after = (before + rng.normal(0.0, 30.0, before.shape)).astype(np.float32)
        inside = rng.random(before.shape) > 0.2
        labels = (after[..., None] > np.asarray(bounds)).sum(axis=-1)  # a value equal to a bound is below it
        ch, cw = -(-h // 4), -(-w // 4)
        expected = after.copy()
        for k in range(len(bounds) + 1):
            member = (labels == k) & inside
            pad = ((0, 0), (0, ch * 4 - h), (0, cw * 4 - w))
            sums = np.pad(np.where(member, before - after, 0.0), pad).reshape(z, ch, 4, cw, 4).sum(axis=(2, 4))
            counts = np.pad(member, pad).reshape(z, ch, 4, cw, 4).sum(axis=(2, 4)).astype(np.float64)
            sums, counts = (ndimage.gaussian_filter(a, (0, 1.5, 1.5), mode="constant") for a in (sums, counts))
            mean = sums / np.maximum(counts, 1e-3 * 16)
            zoomed = ndimage.zoom(mean, (1, 4, 4), order=1, mode="nearest", grid_mode=True)[:, :h, :w]
            expected[member] += zoomed[member].astype(np.float32)
        restored = restore_mean(before, after, inside, 6.0, bounds)
        assert restored.shape == after.shape and restored.dtype == np.float32
        assert np.abs(restored - expected).max() < 1e-3


def test_clamp_to_input_removes_halos_and_keeps_what_lies_within_the_input(tmp_path: Path) -> None:
    from engines.pipeline import clamp_to_input

    low = np.zeros((1, 8, 8), np.float32)
    low[:, :, 4:] = 100.0
    high = np.kron(low, np.ones((1, 2, 2), np.float32))
    ringing = high.copy()
    ringing[:, :, 7] = -30.0  # undershoot before the edge
    ringing[:, :, 8] = 130.0  # overshoot after it
    ringing[:, :, 2] = 50.0  # inside a flat region: beyond the range of its neighbours
    clamped = clamp_to_input(low, ringing, 2)
    assert clamped[0, 0, 7] == 0.0 and clamped[0, 0, 8] == 100.0 and clamped[0, 0, 2] == 0.0
    smooth_edge = high.copy()
    smooth_edge[:, :, 7:9] = 50.0  # an edge drawn at half height: within the input's range there
    assert np.array_equal(clamp_to_input(low, smooth_edge, 2), smooth_edge)


def test_enforce_consistency_makes_the_block_means_reproduce_the_input() -> None:
    from engines.pipeline import enforce_consistency

    rng = np.random.default_rng(3)
    low = rng.normal(0.0, 50.0, (2, 16, 12)).astype(np.float32)
    high = rng.normal(0.0, 50.0, (2, 32, 24)).astype(np.float32)  # a net's output unrelated to the input

    def block_means(a: np.ndarray) -> np.ndarray:
        return a.reshape(*a.shape[:-2], 16, 2, 12, 2).mean(axis=(-3, -1))

    exact = enforce_consistency(low, high, 2, 1.0)
    assert np.allclose(block_means(exact), low, atol=1e-4)
    # within each block the net's detail is kept: only the block's mean moves
    assert np.allclose(exact - high, np.kron(low - block_means(high), np.ones((1, 2, 2))), atol=1e-4)
    half = enforce_consistency(low, high, 2, 0.5)
    assert np.allclose(block_means(half), (low + block_means(high)) / 2, atol=1e-4)
    assert np.array_equal(enforce_consistency(low, high, 2, 0.0), high)
    assert np.allclose(block_means(enforce_consistency(low[0], high[0], 2, 1.0)), low[0], atol=1e-4)  # one slice


def test_the_shipped_ct_sr2_output_reproduces_its_input_and_consistency_is_checked() -> None:
    package = Path(__file__).resolve().parents[2] / "models" / "ct-sr2"
    engine = _engine(package)
    assert engine.manifest.consistency == 1.0
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:64, :64] - 31.5
    low = np.where(np.hypot(yy, xx) < 25, 60.0, -1000.0) + rng.normal(0.0, 8.0, (1, 64, 64))
    high = enhance_volume(engine, low.astype(np.float32))
    assert high.shape == (1, 128, 128)
    assert np.allclose(high.reshape(1, 64, 2, 64, 2).mean(axis=(2, 4)), low, atol=0.05)
    data = engine.manifest.as_dict()
    for bad in (1.5, -0.1):
        with pytest.raises(ManifestError, match="consistency is for sr models, between 0 and 1"):
            ModelManifest.from_dict({**data, "consistency": bad})
    denoiser = load(package.parent / "ct-denoise").as_dict()
    with pytest.raises(ManifestError, match="consistency is for sr models"):
        ModelManifest.from_dict({**denoiser, "consistency": 0.5})
