"""The worker: claims a queued job, loads its series, runs it through the route's model and
writes the derived series to the outbox, then marks the job done. One engine per model,
loaded once per process and reused for every job.

Failure handling: a dataset or model that cannot be processed fails the job at once with the
reason (permanent); anything else (out of disk, a crash in the engine) is retried with backoff
up to `worker.max_attempts`. A worker killed mid-job stops heartbeating; after
`stale_after_seconds` any worker re-queues the job, and because output UIDs and paths are
deterministic the re-run overwrites the same files: the job completes once, with the same UIDs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO

from core.clock import Clock, utcnow
from core.errors import EngineFailure, EngineUnavailable, InvalidDataset, ManifestError, QAFailed
from core.geometry import Frame, frames
from core.header import pixel_length_problem
from core.images import image_facts
from engines import qa
from engines.base import Engine
from engines.manifest import ModelManifest
from engines.pipeline import enhance_volume
from engines.qa import apply_strength
from engines.registry import EngineOptions, open_engine
from node.config import STRENGTHS, WorkerConfig
from node.derive import DeriveSettings, Processing, derive_image, derived_uid, device_uid
from node.heartbeat import heartbeating
from node.instance import decode_problem
from node.routing import applicable, summary
from node.series import UnsplittableSeries, stacks
from storage.deliveries import Outgoing
from storage.filestore import FileStore, outbox_path
from storage.jobs import Job, JobQueue

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5


@dataclass(frozen=True)
class QAReport:
    """What the QA gate measured (the worst of each engines.qa figure) and the limits exceeded."""

    figures: dict[str, float]
    failures: list[str]

    def as_dict(self) -> dict[str, object]:
        return {"figures": self.figures, "failures": self.failures, "passed": not self.failures}


@dataclass
class Result:
    output_series_uid: str
    count: int
    model_version: str
    backend: str
    qa: QAReport
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[Outgoing] = field(default_factory=list)  # what the deliveries will send


class Engines:
    """Loaded engines by model name: load once, infer many."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self._loaded: dict[str, Engine] = {}

    def get(self, model: str) -> Engine:
        if model not in self._loaded:
            options = EngineOptions(
                backend=self.cfg.backend,
                device=self.cfg.device,
                threads=self.cfg.threads,
                max_batch=self.cfg.max_batch,
                plan_cache=self.cfg.plan_cache,
            )
            engine = open_engine(self.cfg.models_dir / model, options)
            log.info("loaded %s %s on %s (%s)", model, engine.manifest.version, engine.backend, engine.device)
            self._loaded[model] = engine
        return self._loaded[model]

    def close(self) -> None:
        for engine in self._loaded.values():
            engine.close()
        self._loaded.clear()


def read_frames(store: FileStore, paths: list[str], manifest: ModelManifest, max_decoded: int) -> list[Frame]:
    """The frames of every object in the series that the model applies to (routing checked
    the series; objects it does not apply to, such as a localizer in an axial series, are
    left out); InvalidDataset when none is left, with the reasons."""
    items: list[Frame] = []
    reasons: list[str] = []
    for rel in paths:
        try:
            ds = pydicom.dcmread(store.abspath(rel))
        except (InvalidDicomError, OSError) as exc:
            raise InvalidDataset(0xC000, f"{rel}: cannot read: {exc}") from None
        facts = image_facts(ds)
        why = applicable(manifest, facts, chained=bool(facts.producers))  # routing let only chains through
        if why is None and "PixelData" not in ds:
            why = "no pixel data"
        if why is None:
            broken = decode_problem(ds, max_decoded)
            if not broken and not ds["PixelData"].is_undefined_length:
                broken = pixel_length_problem(ds, len(ds.PixelData))  # stored with a warning (docs/receiving.md)
            if broken:
                raise InvalidDataset(0xC000, f"{ds.SOPInstanceUID}: {broken}")
        if why is not None:
            reasons.append(why)
            continue
        try:
            items.extend(frames(ds))
        except (ValueError, NotImplementedError, RuntimeError) as exc:  # pixel decoding
            raise InvalidDataset(0xC000, f"{ds.SOPInstanceUID}: cannot decode pixel data: {exc}") from None
    if not items:
        raise InvalidDataset(0xC000, f"{manifest.name} applies to none of the series: {summary(reasons) or 'empty'}")
    if reasons:
        log.info("%d object(s) of the series left out: %s", len(reasons), summary(reasons))
    return items


def process(
    job: Job,
    queue: JobQueue,
    store: FileStore,
    engines: Engines,
    settings: DeriveSettings,
    now: Clock = utcnow,
) -> Result:
    """The job's series through its model, written to the outbox; raises on failure."""
    timings: dict[str, float] = defaultdict(float)
    with _timed(timings, "load"):
        engine = engines.get(job.model)
    manifest = engine.manifest
    with _timed(timings, "decode"):
        items = read_frames(store, queue.instance_paths(job.series_id), manifest, engines.cfg.max_decoded_mb << 20)
    modality = str(items[0].dataset.get("Modality", ""))
    output_uid = derived_uid(job.series_instance_uid, manifest.name, manifest.version)
    try:
        groups = stacks(items)  # parallel slices, one per position, no gap (docs/processing.md)
    except UnsplittableSeries as exc:
        raise InvalidDataset(0xC000, f"series {job.series_instance_uid}: {exc}") from None
    denoise, ct = manifest.task == "denoise", modality == "CT"
    strength = STRENGTHS[job.strength] if denoise else 1.0
    enhanced: dict[tuple[int, int], NDArray[np.float32]] = {}  # (object, frame) -> pixels
    figures: dict[str, float] = {}  # the worst of each QA figure over the groups
    for group in groups:
        source = np.stack([f.pixels for f in group])
        with _timed(timings, "qa"):  # once a series: the noise map's level and the QA gate's
            sd = qa.series_noise_sd(source, ct)
        with _timed(timings, "infer"):
            volume = _infer(engine, source, strength, sd, engines.cfg.max_batch)
        with _timed(timings, "qa"):
            for name, value in qa.measure(source, volume, manifest.task, manifest.scale, ct, sd).items():
                figures[name] = max(figures.get(name, value), value)
        enhanced.update({(id(f.dataset), f.index): v for f, v in zip(group, volume, strict=True)})
    report = QAReport(figures, engines.cfg.qa.failures(figures, ct))
    warning = "; ".join(report.failures)
    if warning and job.on_qa_fail == "fail":
        raise QAFailed(f"QA failed: {warning}", report.as_dict())
    proc = Processing(
        manifest.name,
        manifest.version,
        manifest.task,
        manifest.scale,
        engine.backend,
        now(),
        device_uid(),
        job.strength if denoise else "",
        warning,
    )
    if warning:
        settings = replace(settings, description_suffix=settings.description_suffix + engines.cfg.qa_warning_suffix)
    written: list[Outgoing] = []
    for ds in {id(f.dataset): f.dataset for f in items}.values():  # one output object per source object
        frame_count = int(ds.get("NumberOfFrames", 1) or 1)
        values = np.stack([enhanced[(id(ds), i)] for i in range(frame_count)])
        with _timed(timings, "encode"):
            out = derive_image(ds, values if frame_count > 1 else values[0], proc, settings)
            buffer = DicomBytesIO()
            out.save_as(buffer, enforce_file_format=True)
        path = outbox_path(output_uid, out.SOPInstanceUID)
        with _timed(timings, "write"):
            store.write(path, buffer.getvalue())
        written.append(Outgoing(out.SOPInstanceUID, out.SOPClassUID, out.file_meta.TransferSyntaxUID, path))
    return Result(output_uid, len(written), manifest.version, engine.backend, report, dict(timings), written)


def _infer(
    engine: Engine, source: NDArray[np.float32], strength: float, noise_sd: float, max_batch: int
) -> NDArray[np.float32]:
    """The engine's output at the route's strength: a noise-map model is told a lower noise
    level (`noise_sd`, the series' estimate, times the strength: it removes less by its own
    judgement); a blind one's removal is scaled."""
    if engine.manifest.noise_map:
        return enhance_volume(engine, source, max_batch, noise_scale=strength, noise_sd=noise_sd)
    volume = enhance_volume(engine, source, max_batch)
    return apply_strength(source, volume, strength) if strength < 1.0 else volume


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] += time.perf_counter() - started


PERMANENT = (InvalidDataset, ManifestError, EngineUnavailable, EngineFailure, QAFailed)


class Worker:
    """Claims and runs jobs until stopped; the ledger is the only coordination between workers."""

    def __init__(self, cfg: WorkerConfig, queue: JobQueue, store: FileStore, ident: str) -> None:
        self.cfg = cfg
        self.queue = queue
        self.store = store
        self.ident = ident
        self.engines = Engines(cfg)
        self.settings = DeriveSettings(cfg.series_number_offset, cfg.series_description_suffix)
        self._next_stale_check = 0.0

    def run_once(self) -> bool:
        """Runs one job if there is one; False when the queue had nothing runnable."""
        # every ledger transaction takes SQLite's write lock, which the SCPs need per instance:
        # look for stale jobs once per heartbeat period, not on every idle poll
        if time.monotonic() >= self._next_stale_check:
            self._next_stale_check = time.monotonic() + self.cfg.heartbeat_seconds
            for job_id in self.queue.requeue_stale(self.cfg.stale_after_seconds):
                log.warning("job %d had no heartbeat for %.0f s; re-queued", job_id, self.cfg.stale_after_seconds)
        job = self.queue.claim(self.ident)
        if job is None:
            return False
        log.info("job %d: series %s through %s (attempt %d)", job.id, job.series_instance_uid, job.model, job.attempts)
        beat = lambda: self.queue.heartbeat(job.id, self.ident)  # noqa: E731
        try:
            with heartbeating(beat, self.cfg.heartbeat_seconds, f"job {job.id}"):
                result = process(job, self.queue, self.store, self.engines, self.settings)
        except PERMANENT as exc:
            if isinstance(exc, QAFailed):
                self.queue.record_qa(job.id, self.ident, exc.figures, None)
            self.queue.fail(job.id, self.ident, str(exc), permanent=True)
            log.error("job %d failed: %s", job.id, exc)
            return True
        except Exception as exc:  # anything else may pass on a retry (disk, memory, engine)
            state = self.queue.fail(job.id, self.ident, f"{type(exc).__name__}: {exc}", permanent=False)
            log.exception("job %d error (now %s)", job.id, state or "no longer ours")
            return True
        warning = "; ".join(result.qa.failures)
        note = f"delivered with a QA warning: {warning}" if warning else None
        self.queue.record_qa(job.id, self.ident, result.qa.as_dict(), note)
        if self.queue.finish(
            job.id,
            self.ident,
            result.output_series_uid,
            result.count,
            result.model_version,
            result.backend,
            result.timings,
            result.outputs,
        ):
            log.info(
                "job %d done: %d instances of series %s (%s)",
                job.id,
                result.count,
                result.output_series_uid,
                ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()),
            )
        else:
            log.warning("job %d finished after it was re-queued; the other run will rewrite the same files", job.id)
        return True

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if not self.run_once():
                    stop.wait(IDLE_POLL_S)
        finally:
            self.engines.close()
