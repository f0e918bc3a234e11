"""engines/: the backend protocol, registry, graph checks, tiling and the series pipeline, with
hand-built ONNX models whose output is known and with the shipped models."""

from __future__ import annotations

import importlib.util
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomlkit

from core.errors import ConfigError, EngineUnavailable, ManifestError
from engines.base import check_signature
from engines.manifest import Tile, load
from engines.pipeline import context_indices, enhance_volume
from engines.registry import EngineOptions, open_engine
from engines.tiling import ramp, run_tiled, starts
from tests.onnx_models import identity, nearest_upscale, pick_channel

MODELS = Path(__file__).resolve().parents[2] / "models"
HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnx") is not None


def ct_volume(seed: int = 0, shape: tuple[int, int, int] = (3, 40, 50)) -> np.ndarray:
    """Integer HU with pixel padding (-3024) in one corner, as scanners write outside the FOV."""
    v = np.random.default_rng(seed).integers(-1024, 3000, shape).astype(np.float32)
    v[:, :5, :5] = -3024.0
    return v


def edit_manifest(package: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(package, dest)
    doc = tomlkit.parse((dest / "model.toml").read_text())
    for key, value in changes.items():
        doc[key] = value
    (dest / "model.toml").write_text(tomlkit.dumps(doc))
    return dest


# --- registry and backends --------------------------------------------------------------------


def test_auto_on_a_cpu_picks_onnxruntime(tmp_path: Path) -> None:
    engine = open_engine(identity(tmp_path / "id"), EngineOptions(device="cpu"))
    assert (engine.backend, engine.device) == ("onnxruntime", "cpu")
    engine.close()


def test_unknown_backend_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"worker\.backend"):
        open_engine(identity(tmp_path / "id"), EngineOptions(backend="openvino"))


def test_tensorrt_without_a_gpu_says_why(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match=r"CUDA device|tensorrt extra"):
        open_engine(identity(tmp_path / "id"), EngineOptions(backend="tensorrt", device="cpu"))


def test_onnxruntime_refuses_a_cuda_device(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="CPU"):
        open_engine(identity(tmp_path / "id"), EngineOptions(backend="onnxruntime", device="cuda:0"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_is_optional() -> None:
    """TensorRT cannot be installed on the build machines (its wheel fetches from NVIDIA's
    index); its backend must import lazily and answer with the reason."""
    from engines.tensorrt_backend import Profile, plan_key

    key = plan_key("ab" * 32, "10.0", "H100", "9.0", "fp16", Profile(1, 8, 512))
    assert key != plan_key("ab" * 32, "10.0", "H100", "9.0", "fp32", Profile(1, 8, 512))
    assert key != plan_key("ab" * 32, "10.1", "H100", "9.0", "fp16", Profile(1, 8, 512))
    assert key != plan_key("ab" * 32, "10.0", "H100", "9.0", "fp16", Profile(1, 8, 256))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not importable (optional extra)")
def test_tensorrt_matches_onnxruntime() -> None:  # pragma: no cover - needs TensorRT and a GPU
    x = np.random.default_rng(0).uniform(0.2, 0.3, (2, 1, 64, 64)).astype(np.float32)
    trt = open_engine(MODELS / "ct-denoise", EngineOptions(backend="tensorrt", device="cuda:0"))
    cpu = open_engine(MODELS / "ct-denoise", EngineOptions(backend="onnxruntime", device="cpu"))
    np.testing.assert_allclose(trt.infer(x), cpu.infer(x), atol=2e-3)  # FP16


@pytest.mark.skipif(not HAS_TORCH, reason="torch/onnx not installed (gpu extra)")
@pytest.mark.parametrize("name", ["ct-denoise", "mr-sr2"])
def test_torch_backend_runs_the_onnx_weights(name: str) -> None:
    torch_engine = open_engine(MODELS / name, EngineOptions(backend="torch", device="cpu"))
    ort_engine = open_engine(MODELS / name, EngineOptions(backend="onnxruntime", device="cpu"))
    channels = ort_engine.manifest.input_channels  # ct-denoise: its slice and the noise map
    x = np.random.default_rng(1).uniform(0.0, 0.6, (2, channels, 48, 40)).astype(np.float32)
    np.testing.assert_allclose(torch_engine.infer(x), ort_engine.infer(x), atol=1e-4)
    assert torch_engine.infer(x).shape == (2, 1, 48 * ort_engine.manifest.scale, 40 * ort_engine.manifest.scale)


@pytest.mark.skipif(not HAS_TORCH, reason="torch/onnx not installed (gpu extra)")
def test_torch_backend_needs_the_net_table(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match=r"\[net\]"):
        open_engine(identity(tmp_path / "id"), EngineOptions(backend="torch", device="cpu"))


# --- the manifest checked against the graph ---------------------------------------------------


def test_context_slices_must_match_the_graph(tmp_path: Path) -> None:
    package = edit_manifest(MODELS / "ct-sr2", tmp_path / "pkg", context_slices=3)
    with pytest.raises(ManifestError, match=r"context_slices = 3.*1 channels"):
        open_engine(package)


def test_scale_must_match_the_graph(tmp_path: Path) -> None:
    package = identity(tmp_path / "pkg", task="sr", scale=2)  # a graph that keeps the size
    with pytest.raises(ManifestError, match="sr x2"):
        open_engine(package)


def test_a_fixed_size_graph_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="fixed at 1; it must be dynamic"):
        open_engine(identity(tmp_path / "static", static=64))


def test_tensor_names_are_checked() -> None:
    manifest = load(MODELS / "ct-denoise")
    c = manifest.input_channels
    with pytest.raises(ManifestError, match="'input'"):
        check_signature(manifest, [("x", ["n", c, "h", "w"])], [("output", ["n", 1, "h", "w"])])
    with pytest.raises(ManifestError, match="1 channel"):
        check_signature(manifest, [("input", ["n", c, "h", "w"])], [("output", ["n", 3, "h", "w"])])
    check_signature(manifest, [("input", ["n", c, "h", "w"])], [("output", ["n", 1, "h", "w"])])


# --- tiling ------------------------------------------------------------------------------------


def test_tile_starts_cover_the_axis_and_end_flush() -> None:
    assert starts(100, 128, 16) == [0]
    assert starts(300, 128, 32) == [0, 96, 172]
    for length, size, overlap in [(513, 128, 32), (1024, 512, 32), (130, 64, 8)]:
        s = starts(length, size, overlap)
        assert s[-1] + size == length
        assert all(b - a <= size - overlap for a, b in itertools.pairwise(s))


def test_ramp_rises_only_on_shared_sides() -> None:
    assert np.all(ramp(100, 0, 100, 16) == 1)
    inner = ramp(300, 96, 128, 32)
    assert inner[0] < 0.01 and inner[-1] < 0.01 and np.all(inner[32:-32] == 1)
    assert np.all(np.diff(inner[:32]) > 0)
    assert ramp(300, 0, 128, 32)[0] == 1 and ramp(300, 172, 128, 32)[-1] == 1


def test_tiling_an_identity_gives_the_input_back() -> None:
    x = np.random.default_rng(0).random((3, 1, 300, 200)).astype(np.float32)
    calls: list[tuple[int, ...]] = []

    def infer(b: np.ndarray) -> np.ndarray:
        calls.append(b.shape)
        return b

    out = run_tiled(infer, x, Tile(128, 16), 1, max_batch=4)
    np.testing.assert_allclose(out, x, atol=1e-6)
    assert all(shape[0] <= 4 and shape[2:] == (128, 128) for shape in calls)
    assert len(calls) > 1


def test_an_image_that_fits_is_not_tiled() -> None:
    x = np.zeros((5, 1, 64, 48), np.float32)
    shapes: list[tuple[int, ...]] = []
    run_tiled(lambda b: shapes.append(b.shape) or b, x, Tile(64, 8), 1, max_batch=2)
    assert shapes == [(2, 1, 64, 48), (2, 1, 64, 48), (1, 1, 64, 48)]


def test_tiled_super_resolution_equals_the_whole_image(tmp_path: Path) -> None:
    engine = open_engine(nearest_upscale(tmp_path / "up", tile=Tile(32, 8)))
    x = np.random.default_rng(2).random((2, 1, 70, 45)).astype(np.float32)
    np.testing.assert_allclose(run_tiled(engine.infer, x, Tile(32, 8), 2, 3), engine.infer(x), atol=1e-6)


def test_tiled_denoiser_matches_the_whole_slice() -> None:
    """The shipped CT denoiser, tiled 128/32 against whole: the blended seams stay well below
    the noise it removes (HU = normalised * 4095)."""
    engine = open_engine(MODELS / "ct-denoise")
    rng = np.random.default_rng(3)
    x = (0.25 + 0.005 * rng.standard_normal((1, 1, 256, 256))).astype(np.float32)
    x = np.concatenate([x, np.full_like(x, 0.005)], axis=1)  # the noise map: 20 HU
    whole = engine.infer(x)
    tiled = run_tiled(engine.infer, x, Tile(128, 32), 1, 4)
    assert float(np.abs(tiled - whole).max()) * 4095 < 2.0
    assert float(np.std(whole - x[:, :1])) * 4095 > 10.0


# --- the series pipeline ----------------------------------------------------------------------


def test_identity_round_trip_keeps_hounsfield_units_and_padding(tmp_path: Path) -> None:
    engine = open_engine(identity(tmp_path / "id"))
    v = ct_volume()
    out = enhance_volume(engine, v)
    assert out.dtype == np.float32 and out.shape == v.shape
    np.testing.assert_array_equal(np.round(out), v)
    assert np.all(out[:, :5, :5] == -3024.0)


def test_noisy_air_below_lo_is_enhanced_not_restored(tmp_path: Path) -> None:
    """Only pixel padding (< -1500 HU) is put back; air noise that dips below -1024 HU is
    clipped for the net and takes its output like any other pixel."""
    engine = open_engine(identity(tmp_path / "id"))
    v = np.full((1, 32, 32), 100.0, np.float32)
    v[0, 10, 10], v[0, 0, 0] = -1100.0, -3024.0
    out = enhance_volume(engine, v)
    assert out[0, 10, 10] == pytest.approx(-1024.0, abs=1e-3) and out[0, 0, 0] == -3024.0


def test_a_window_whose_lo_is_above_air_runs_the_whole_slice(tmp_path: Path) -> None:
    """The content box leaves air (<= -900 HU) out of the net; a CT denoiser whose window starts
    above that (lo = -800) sees air clipped to lo as content, so the whole slice goes through it:
    a model that adds 10 HU adds them to the air too."""
    from tests.onnx_models import shift

    package = shift(tmp_path / "shift", 10.0)
    doc = tomlkit.parse((package / "model.toml").read_text())
    doc["normalization"]["lo"] = -800.0
    (package / "model.toml").write_text(tomlkit.dumps(doc))
    v = np.full((1, 96, 96), -1000.0, np.float32)
    v[0, 40:56, 40:56] = 40.0
    out = enhance_volume(open_engine(package), v)
    assert float(out[0, 0, 0]) == pytest.approx(-800.0 + 10.0 * 3871.0 / 4095.0, abs=0.05)
    assert float(out[0, 48, 48]) == pytest.approx(40.0 + 10.0 * 3871.0 / 4095.0, abs=0.05)


def test_padding_is_hidden_from_the_model(tmp_path: Path) -> None:
    """The net sees lo (-1024) where the series has padding; the padding comes back unchanged."""
    engine = open_engine(identity(tmp_path / "id"))
    seen: list[np.ndarray] = []
    infer = engine.infer
    engine.infer = lambda b: seen.append(b.copy()) or infer(b)  # type: ignore[method-assign]
    enhance_volume(engine, ct_volume())
    assert float(min(b.min() for b in seen)) == pytest.approx(0.0)


def test_context_slices_are_neighbours_with_edges_repeated(tmp_path: Path) -> None:
    assert context_indices(0, 4, 3).tolist() == [0, 0, 1]
    assert context_indices(3, 4, 5).tolist() == [1, 2, 3, 3, 3]
    previous = open_engine(pick_channel(tmp_path / "prev", context=3, channel=0))
    v = ct_volume(shape=(4, 16, 16))
    v[:, :5, :5] = 0.0
    out = enhance_volume(previous, v, max_batch=3)
    np.testing.assert_array_equal(np.round(out), v[[0, 0, 1, 2]])


def test_super_resolution_pipeline_scales_and_keeps_padding(tmp_path: Path) -> None:
    engine = open_engine(nearest_upscale(tmp_path / "up"))
    v = ct_volume(shape=(2, 20, 30))
    out = enhance_volume(engine, v)
    assert out.shape == (2, 40, 60)
    np.testing.assert_array_equal(np.round(out), np.repeat(np.repeat(v, 2, axis=1), 2, axis=2))


def test_percentile_window_is_per_series(tmp_path: Path) -> None:
    """MR: the same image in a series twice as bright comes out twice as bright (the window
    follows the series), so the model sees the same normalised input."""
    from engines.normalization import Normalization

    engine = open_engine(identity(tmp_path / "id", normalization=Normalization("percentile", 0.5, 99.5)))
    v = np.random.default_rng(4).uniform(0, 1000, (2, 24, 24)).astype(np.float32)
    np.testing.assert_allclose(enhance_volume(engine, v), v, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(enhance_volume(engine, 2 * v), 2 * v, rtol=1e-5, atol=2e-3)


# --- enhance-node engines ---------------------------------------------------------------------


def _config(tmp_path: Path, models: Path, routes: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[worker]\nmodels_dir = "{models}"\ndevice = "cpu"\n[[destinations]]\nname = "pacs"\n'
        f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n{routes}'
    )
    return path


def test_engines_list_names_backends_and_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    identity(tmp_path / "models" / "identity")
    assert main(["--config", str(_config(tmp_path, tmp_path / "models")), "engines", "list"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime  available" in out
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt     unavailable: not installed (extra: tensorrt)" in out
    if not HAS_TORCH:
        assert "torch        unavailable: not installed (extra: gpu)" in out
    assert "model identity 1.0.0: denoise x1 CT" in out


def test_engines_build_needs_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    identity(tmp_path / "models" / "identity")
    cfg = _config(tmp_path, tmp_path / "models")
    assert main(["--config", str(cfg), "engines", "build", "identity"]) == 1
    assert "CUDA device" in capsys.readouterr().err


def test_engines_build_without_models_or_routes_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main

    assert main(["--config", str(_config(tmp_path, tmp_path / "models")), "engines", "build"]) == 2
    assert "no models named and no routes" in capsys.readouterr().err


# --- content box: CT air outside the body is not run through the net --------------------------


def body_in_air(slices: int = 3, side: int = 256, seed: int = 5) -> np.ndarray:
    """A noisy 40 HU disc of radius 50 in noisy air, centred off-centre, padding in a corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    body = np.hypot(yy - 110, xx - 140) < 50
    v = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, (slices, side, side))
    v[:, :6, :6] = -3024.0
    return v.astype(np.float32)


def test_content_box_is_the_body_plus_margin() -> None:
    from engines.normalization import Normalization
    from engines.pipeline import ALIGN, MARGIN, content_box

    hu = Normalization("hu", -1024.0, 3071.0)
    rows, cols = content_box(body_in_air(), hu)  # body rows 61..159, columns 91..189
    assert (rows.start, rows.stop) == ((61 - MARGIN) // ALIGN * ALIGN, 160 + MARGIN)
    assert (cols.start, cols.stop) == ((91 - MARGIN) // ALIGN * ALIGN, 190 + MARGIN)
    assert content_box(np.full((2, 40, 40), -1000.0, np.float32), hu) == (slice(0, 0), slice(0, 0))
    assert content_box(body_in_air(), Normalization("percentile", 0.5, 99.5)) == (slice(0, 256), slice(0, 256))


def test_denoising_only_the_content_box_changes_nothing_inside_it() -> None:
    """The shipped denoiser on the cropped box gives, inside the body, what it gives on the
    whole slice (the margin is wider than its receptive field); air outside is passed through,
    and the net saw the smaller box."""
    from engines.pipeline import content_box, restore_mean
    from engines.qa import noise_level
    from engines.tiling import run_tiled as whole_slice

    engine = open_engine(MODELS / "ct-denoise")
    v = body_in_air()
    seen: list[tuple[int, ...]] = []
    infer = engine.infer
    engine.infer = lambda b: seen.append(b.shape) or infer(b)  # type: ignore[method-assign]
    out = enhance_volume(engine, v)
    engine.infer = infer  # type: ignore[method-assign]
    rows, cols = content_box(v, engine.manifest.normalization)
    assert seen and all(shape[2:] == (rows.stop - rows.start, cols.stop - cols.start) for shape in seen)
    clipped = np.maximum(v, -1024).astype(np.float32)
    x = ((clipped + 1024) / 4095).astype(np.float32)[:, None]
    level = noise_level(x[:, 0], engine.manifest.normalization)  # the noise map, as the pipeline fills it
    x = np.concatenate([x, np.full_like(x, level)], axis=1)
    reference = whole_slice(engine.infer, x, engine.manifest.tile, 1, 8)[:, 0] * 4095 - 1024
    m = engine.manifest
    reference = restore_mean(clipped, reference, clipped > -900, m.restore_mean_px, m.restore_mean_bounds)
    inside = (slice(None), slice(rows.start + 32, rows.stop - 32), slice(cols.start + 32, cols.stop - 32))
    assert float(np.abs(out[inside] - reference[inside]).max()) < 0.01
    outside = np.ones(v.shape[1:], bool)
    outside[rows, cols] = False
    passed = np.where(v < -1500, v, np.maximum(v, -1024))  # padding kept, air clipped at the window's lo
    np.testing.assert_allclose(out[:, outside], passed[:, outside], atol=1e-3)
    assert float(out[:, 85:135, 115:165].std()) < 0.5 * float(v[:, 85:135, 115:165].std())


def test_an_all_air_series_is_passed_through(tmp_path: Path) -> None:
    engine = open_engine(identity(tmp_path / "id"))
    engine.infer = lambda b: pytest.fail("nothing to denoise in air")  # type: ignore[method-assign]
    v = np.full((2, 16, 20), -1000.0, np.float32)
    np.testing.assert_allclose(enhance_volume(engine, v), v, atol=1e-3)


def test_super_resolution_runs_on_air_too(tmp_path: Path) -> None:
    """No content box for SR: the model, not pixel repetition, upsamples the air."""
    engine = open_engine(nearest_upscale(tmp_path / "up"))
    shapes: list[tuple[int, ...]] = []
    infer = engine.infer
    engine.infer = lambda b: shapes.append(b.shape) or infer(b)  # type: ignore[method-assign]
    enhance_volume(engine, body_in_air(slices=1, side=128))
    assert shapes == [(1, 1, 128, 128)]
