"""The worker in a running node (issue: engines and worker): a series pushed with DCMTK storescu
completes, is routed, goes through a model in a worker process and lands in the outbox as a
derived series; identity round trip, the shipped denoiser, super-resolution geometry, and a
worker killed mid-series."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.pixels import apply_rescale
from pydicom.uid import JPEG2000Lossless, generate_uid

from engines.manifest import load
from engines.normalization import Normalization
from node.derive import derived_uid
from tests.dicom_factory import UID_ROOT, ct_slice, mr_slice, write_ct_series
from tests.helpers import REPO, NodeProcess, storescu, wait_for
from tests.onnx_models import identity, nearest_upscale, pick_channel

DCIODVFY = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "dciodvfy"
WORKER = "heartbeat_seconds = 0.2\nstale_after_seconds = 1.5\nthreads = 1\nmax_batch = 4"


def route(name: str, model: str, modality: str = "CT") -> str:
    return f'[[routes]]\nname = "{name}"\nmodel = "{model}"\ndestinations = []\nmatch = {{ modality = "{modality}" }}\n'


def start_node(node_factory, models: Path, routes: str) -> NodeProcess:  # type: ignore[no-untyped-def]
    node: NodeProcess = node_factory(
        idle_seconds=0.5, worker_processes=1, worker=f'models_dir = "{models}"\n{WORKER}', extra=routes
    )
    return node.start()


def wait_job_done(node: NodeProcess, timeout: float = 120) -> tuple[str, int, int]:
    """(output series UID, output count, attempts) of the only job, once it is done."""

    def done() -> tuple[str, int, int] | None:
        rows = node.query("SELECT state, output_series_uid, output_count, attempts, error FROM jobs")
        if rows and rows[0][0] == "failed":
            raise AssertionError(f"job failed: {rows[0][4]}\n{node.log_text()}")
        return (rows[0][1], rows[0][2], rows[0][3]) if len(rows) == 1 and rows[0][0] == "done" else None

    return wait_for(done, timeout=timeout, interval=0.1, what="the job to be done")


def outputs(node: NodeProcess, series_uid: str) -> list[Path]:
    return sorted((node.storage / "outbox" / series_uid).glob("*.dcm"))


def derived_and_sources(node: NodeProcess, output_uid: str, files: list[Path]) -> list[tuple[Path, Dataset, Dataset]]:
    """(path, derived image, its source image) for every output of the series."""
    sources = {str(ds.SOPInstanceUID): ds for ds in (dcmread(f) for f in files)}
    pairs = []
    for path in outputs(node, output_uid):
        out = dcmread(path)
        pairs.append((path, out, sources[out.SourceImageSequence[0].ReferencedSOPInstanceUID]))
    return pairs


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def round_trips(path: Path) -> bool:
    ds = dcmread(path)
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    again = dcmread(DicomBytesIO(buffer.getvalue()))
    return again == ds and np.array_equal(again.pixel_array, ds.pixel_array)


def test_identity_model_round_trips_hounsfield_units_bit_for_bit(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    identity(tmp_path / "models" / "identity")
    _, series_uid, files = write_ct_series(tmp_path / "series", 6, rows=64, cols=64)
    node = start_node(node_factory, tmp_path / "models", route("ct", "identity"))
    assert storescu(node.port, files).returncode == 0
    output_uid, count, attempts = wait_job_done(node)
    assert (count, attempts) == (6, 1)
    assert output_uid == derived_uid(series_uid, "identity", "1.0.0")
    derived = derived_and_sources(node, output_uid, files)
    assert len(derived) == 6
    for path, out, src in derived:
        assert out.SOPInstanceUID == derived_uid(src.SOPInstanceUID, "identity", "1.0.0")
        assert np.array_equal(out.pixel_array, src.pixel_array)  # bit-identical stored values
        assert np.array_equal(apply_rescale(out.pixel_array, out), apply_rescale(src.pixel_array, src))
        assert list(out.ImageType)[:3] == ["DERIVED", "SECONDARY", "AXIAL"]
        assert out.StudyInstanceUID == src.StudyInstanceUID and out.SeriesInstanceUID == output_uid
        assert dciodvfy_errors(path) == []
        assert round_trips(path)
    states = node.query("SELECT state FROM series")
    assert states == [("routed",)]


def test_shipped_denoiser_lowers_noise_and_keeps_hounsfield_units(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Water cylinder with 20 HU noise: the noise SD in a central uniform region falls by >= 30%
    and the mean HU moves by <= 2 HU (DESIGN: images better without moving Hounsfield units)."""
    _, _, files = write_ct_series(tmp_path / "series", 4, rows=256, cols=256)
    node = start_node(node_factory, REPO / "models", route("ct", "ct-denoise"))
    assert storescu(node.port, files).returncode == 0
    output_uid, count, _ = wait_job_done(node)
    assert count == 4
    roi = (slice(98, 158), slice(98, 158))
    for path, out, src in derived_and_sources(node, output_uid, files):
        before, after = apply_rescale(src.pixel_array, src)[roi], apply_rescale(out.pixel_array, out)[roi]
        assert after.std() <= 0.7 * before.std(), (before.std(), after.std())
        assert abs(after.mean() - before.mean()) <= 2.0
        assert out.DerivationCodeSequence[0].CodeValue == "113087"
        assert "ct-denoise" in out.DerivationDescription and "onnxruntime" in out.DerivationDescription
        assert dciodvfy_errors(path) == []


def test_super_resolution_has_the_golden_geometry(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """64x64 at 0.7 mm, first pixel at (-22.4, -22.4, z) -> 128x128 at 0.35 mm, first pixel
    at (-22.575, -22.575, z): same field of view, pixel centres of the finer grid."""
    nearest_upscale(tmp_path / "models" / "upscale", scale=2)
    _, _, files = write_ct_series(tmp_path / "series", 3, rows=64, cols=64)
    node = start_node(node_factory, tmp_path / "models", route("sr", "upscale"))
    assert storescu(node.port, files).returncode == 0
    output_uid, count, _ = wait_job_done(node)
    assert count == 3
    for path, out, src in derived_and_sources(node, output_uid, files):
        assert (out.Rows, out.Columns) == (128, 128)
        assert [float(v) for v in out.PixelSpacing] == pytest.approx([0.35, 0.35])
        z = float(src.ImagePositionPatient[2])
        assert [float(v) for v in out.ImagePositionPatient] == pytest.approx([-22.575, -22.575, z])
        assert np.array_equal(out.pixel_array, np.kron(src.pixel_array, np.ones((2, 2), src.pixel_array.dtype)))
        assert out.DerivationCodeSequence[0].CodeValue == "113085"
        assert dciodvfy_errors(path) == []


def test_worker_killed_mid_series_completes_once_with_the_same_uids(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL of the worker process while it writes the derived series: the supervisor starts a
    new one, the job is re-queued when its heartbeat stops, and it completes exactly once, every
    output at its deterministic UID, one file per source instance."""
    _, series_uid, files = write_ct_series(tmp_path / "series", 40, rows=512, cols=512)
    node = start_node(node_factory, REPO / "models", route("ct", "ct-denoise"))
    assert storescu(node.port, files).returncode == 0
    version = load(REPO / "models" / "ct-denoise").version
    expected_series = derived_uid(series_uid, "ct-denoise", version)

    def running_worker() -> int | None:
        rows = node.query("SELECT worker FROM jobs WHERE state = 'running'")
        return int(rows[0][0].rsplit("/", 1)[1]) if rows and outputs(node, expected_series) else None

    pid = wait_for(running_worker, timeout=120, interval=0.02, what="the worker to be writing outputs")
    written_before_kill = len(outputs(node, expected_series))
    os.kill(pid, signal.SIGKILL)
    output_uid, count, attempts = wait_job_done(node, timeout=180)
    assert written_before_kill < 40, "the kill came too late to interrupt the job"
    assert (output_uid, count, attempts) == (expected_series, 40, 2)
    assert node.query("SELECT count(*) FROM jobs") == [(1,)]
    assert node.query("SELECT count(*) FROM events WHERE kind = 'job.requeued'") == [(1,)]
    sops = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    expected = {derived_uid(sop, "ct-denoise", version) for sop in sops}
    derived = outputs(node, expected_series)
    assert {p.stem for p in derived} == expected
    assert all(dcmread(p).pixel_array.shape == (512, 512) for p in derived)
    assert "restarting it" in node.log_text()


def test_mr_series_through_a_percentile_model(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """MR in stored values with per-series percentile normalisation: an identity model gives
    the stored values back, and the derived MR images pass dciodvfy."""
    identity(
        tmp_path / "models" / "mr-identity", modalities=("MR",), normalization=Normalization("percentile", 0.5, 99.5)
    )
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    files = []
    for i in range(4):
        files.append(tmp_path / f"mr{i}.dcm")
        mr_slice(study, series, i, rows=64, cols=64).save_as(files[-1], enforce_file_format=True)
    node = start_node(node_factory, tmp_path / "models", route("ct", "identity") + route("mr", "mr-identity", "MR"))
    assert storescu(node.port, files).returncode == 0
    output_uid, count, _ = wait_job_done(node)
    assert count == 4
    assert node.query("SELECT route, model FROM jobs") == [("mr", "mr-identity")]
    for path, out, src in derived_and_sources(node, output_uid, files):
        assert out.SOPClassUID == src.SOPClassUID and out.Modality == "MR"
        assert np.array_equal(out.pixel_array, src.pixel_array)
        assert dciodvfy_errors(path) == []
        assert round_trips(path)


def test_jpeg2000_input_is_decoded_and_written_uncompressed(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A JPEG 2000 (lossless) series, stored as received, is decoded by the worker; the derived
    images are native Explicit VR Little Endian with the same Hounsfield units, and pass dciodvfy."""
    identity(tmp_path / "models" / "identity")
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    files = []
    for i in range(3):
        ds = ct_slice(study, series, i, rows=64, cols=64)
        ds.compress(JPEG2000Lossless)
        files.append(tmp_path / f"j2k{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    node = start_node(node_factory, tmp_path / "models", route("ct", "identity"))
    assert storescu(node.port, files, "-xv").returncode == 0  # propose JPEG 2000 lossless
    stored = node.query("SELECT DISTINCT transfer_syntax_uid FROM instances")
    assert stored == [(JPEG2000Lossless,)]  # kept as the scanner sent it
    output_uid, count, _ = wait_job_done(node)
    assert count == 3
    for path, out, src in derived_and_sources(node, output_uid, files):
        assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert np.array_equal(apply_rescale(out.pixel_array, out), apply_rescale(src.pixel_array, src))
        assert "LossyImageCompression" not in out or out.LossyImageCompression == "00"
        assert dciodvfy_errors(path) == []


def enhanced(kind: str, tmp_path: Path, frames: int = 4) -> Path:
    """A Legacy Converted Enhanced MR or CT multi-frame object (highdicom) from single frames."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage

    make, cls = (
        (mr_slice, LegacyConvertedEnhancedMRImage) if kind == "MR" else (ct_slice, LegacyConvertedEnhancedCTImage)
    )
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    singles = [make(study, series, i, rows=64, cols=64) for i in reversed(range(frames))]  # frames out of order
    obj = cls(
        singles,
        series_instance_uid=generate_uid(UID_ROOT),
        series_number=7,
        sop_instance_uid=generate_uid(UID_ROOT),
        instance_number=1,
    )
    path = tmp_path / f"enhanced-{kind}.dcm"
    obj.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    return path


def frame_positions(ds: Dataset) -> list[list[float]]:
    return [
        [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in ds.PerFrameFunctionalGroupsSequence
    ]


def test_enhanced_multiframe_mr_gives_one_enhanced_multiframe_output(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    identity(
        tmp_path / "models" / "mr-identity", modalities=("MR",), normalization=Normalization("percentile", 0.5, 99.5)
    )
    source_path = enhanced("MR", tmp_path)
    node = start_node(node_factory, tmp_path / "models", route("mr", "mr-identity", "MR"))
    assert storescu(node.port, [source_path], "-R").returncode == 0  # propose the file's own SOP class
    output_uid, count, _ = wait_job_done(node)
    assert count == 1
    (path,) = outputs(node, output_uid)
    out, src = dcmread(path), dcmread(source_path)
    assert (out.SOPClassUID, out.NumberOfFrames) == (src.SOPClassUID, src.NumberOfFrames)
    assert np.array_equal(out.pixel_array, src.pixel_array)  # every frame back in its own place
    assert frame_positions(out) == frame_positions(src)
    frame_type = out.SharedFunctionalGroupsSequence[0].MRImageFrameTypeSequence[0].FrameType
    assert list(frame_type)[:2] == list(out.ImageType)[:2] == ["DERIVED", "PRIMARY"]  # enhanced IODs: PRIMARY only
    assert dciodvfy_errors(path) == []
    assert round_trips(path)


def test_enhanced_multiframe_ct_super_resolution_moves_every_frame(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nearest_upscale(tmp_path / "models" / "upscale", scale=2)
    source_path = enhanced("CT", tmp_path)
    node = start_node(node_factory, tmp_path / "models", route("sr", "upscale"))
    assert storescu(node.port, [source_path], "-R").returncode == 0  # propose the file's own SOP class
    output_uid, count, _ = wait_job_done(node)
    assert count == 1
    (path,) = outputs(node, output_uid)
    out, src = dcmread(path), dcmread(source_path)
    assert (out.Rows, out.Columns, out.NumberOfFrames) == (128, 128, src.NumberOfFrames)
    measures = out.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([0.35, 0.35])
    for before, after in zip(frame_positions(src), frame_positions(out), strict=True):
        assert after == pytest.approx([before[0] - 0.175, before[1] - 0.175, before[2]])
    assert np.array_equal(out.pixel_array, np.kron(src.pixel_array, np.ones((1, 2, 2), src.pixel_array.dtype)))
    assert dciodvfy_errors(path) == []


def test_a_job_that_cannot_run_fails_with_the_reason(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A route naming a model that is not installed: the job fails at once (no retries: it
    cannot pass later) with the reason in the ledger, and the received series is untouched."""
    (tmp_path / "models").mkdir()
    _, _, files = write_ct_series(tmp_path / "series", 2, rows=64, cols=64)
    node = start_node(node_factory, tmp_path / "models", route("ct", "not-installed"))
    assert storescu(node.port, files).returncode == 0
    rows = wait_for(lambda: node.query("SELECT state, attempts, error FROM jobs WHERE state = 'failed'"), timeout=60)
    (_, attempts, error) = rows[0]
    assert attempts == 1
    assert "not-installed" in error and "model.toml" in error
    assert node.query("SELECT kind FROM events WHERE kind LIKE 'job.%' ORDER BY id") == [
        ("job.queued",),
        ("job.started",),
        ("job.failed",),
    ]
    assert node.query("SELECT count(*) FROM instances") == [(2,)]


def test_a_mixed_series_is_processed_stack_by_stack_without_its_localizer(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 18: one series holding a localizer, axial slices with a missing one (z = 3) and
    two thicker slices (a reformat put in the same series). A 3-slice model that outputs the
    slice before each one shows the neighbours: no slice gets one across the gap or from the
    other thickness, and the localizer is stored but not processed."""
    pick_channel(tmp_path / "models" / "prev", context=3, channel=0)
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    folder = tmp_path / "series"
    folder.mkdir()
    datasets = {}
    for n, z in enumerate((0, 1, 2, 4, 5)):
        datasets[f"thin{z}"] = ct_slice(study, series, n, rows=64, cols=64, seed=10 * n)
        datasets[f"thin{z}"].ImagePositionPatient = [0, 0, float(z)]
    for n, z in enumerate((10, 15)):
        ds = ct_slice(study, series, 10 + n, rows=64, cols=64, seed=100 + n)
        ds.ImagePositionPatient, ds.SliceThickness = [0, 0, float(z)], 5.0
        datasets[f"thick{z}"] = ds
    topogram = ct_slice(study, series, 20, rows=64, cols=64)
    topogram.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    datasets["topogram"] = topogram
    files = []
    for name, ds in datasets.items():
        files.append(folder / f"{name}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    node = start_node(node_factory, tmp_path / "models", route("ct", "prev"))
    assert storescu(node.port, files).returncode == 0
    output_uid, count, _ = wait_job_done(node)
    assert count == 7  # every slice but the localizer
    out = {str(o.SourceImageSequence[0].ReferencedSOPInstanceUID): o for o in map(dcmread, outputs(node, output_uid))}
    assert str(topogram.SOPInstanceUID) not in out

    def became(name: str) -> np.ndarray:  # type: ignore[type-arg]
        return out[str(datasets[name].SOPInstanceUID)].pixel_array

    def pixels(name: str) -> np.ndarray:  # type: ignore[type-arg]
        return datasets[name].pixel_array

    assert np.array_equal(became("thin1"), pixels("thin0"))  # its neighbour before
    assert np.array_equal(became("thin2"), pixels("thin1"))
    assert np.array_equal(became("thin4"), pixels("thin4"))  # first after the gap: an edge, not thin2
    assert np.array_equal(became("thin5"), pixels("thin4"))
    assert np.array_equal(became("thick10"), pixels("thick10"))  # its own stack's edge, not thin5
    assert np.array_equal(became("thick15"), pixels("thick10"))
    assert "left out: image type LOCALIZER" in node.log_text()


def test_images_at_one_position_nothing_tells_apart_fail_the_job(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    identity(tmp_path / "models" / "identity")
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    files = []
    for n in range(3):
        ds = ct_slice(study, series, n, rows=64, cols=64)
        ds.ImagePositionPatient = [0, 0, 0.0 if n < 2 else 1.0]  # two at z = 0, one scanner fault
        files.append(tmp_path / f"s{n}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    node = start_node(node_factory, tmp_path / "models", route("ct", "identity"))
    assert storescu(node.port, files).returncode == 0
    rows = wait_for(lambda: node.query("SELECT attempts, error FROM jobs WHERE state = 'failed'"), timeout=60)
    assert rows[0][0] == 1  # permanent: not retried
    assert "several images at one position" in rows[0][1]
