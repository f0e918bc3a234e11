"""Issue 18: what a node processes. Header facts (core/images.py), a model's [applies_to]
(engines/manifest.py), the routing rules (node/routing.py: never its own output, only what a
model is for) and their record in a real SQLite ledger (storage/jobs.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from sqlalchemy import Engine, select

from core.errors import ManifestError
from core.header import InstanceHeader, parse_header
from core.images import ImageFacts, Producer, image_facts
from engines.manifest import AppliesTo, ModelManifest, load
from node.config import RouteConfig, RouteMatch
from node.derive import Processing, derive_image, device_uid
from node.routing import (
    Decision,
    ManifestCache,
    Router,
    applicable,
    own_output,
    route_complete_series,
    route_for,
    summary,
)
from storage import schema as t
from storage.jobs import JobQueue, SeriesFacts
from storage.ledger import EventKind, Ledger, Received, StoredFile
from tests.dicom_factory import ct_slice, encode_explicit_le, mr_slice
from tests.helpers import REPO, Clock
from train.presets import APPLIES_TO

AT = dt.datetime(2026, 12, 6, 8, 0, tzinfo=dt.UTC)
CT_AXIAL = ImageFacts(
    CTImageStorage,
    "CT",
    ("ORIGINAL", "PRIMARY", "AXIAL"),
    "MONOCHROME2",
    512,
    512,
    orientation=(1, 0, 0, 0, 1, 0),
    pixel_spacing=(0.7, 0.7),
)
CT_APPLIES = AppliesTo(
    exclude_image_types=("LOCALIZER", "DERIVED"),
    plane="axial",
    min_matrix=64,
    pixel_spacing_mm=(0.1, 2.0),
    sop_classes=(CTImageStorage, "1.2.840.10008.5.1.4.1.1.2.1"),
)


def manifest(name: str = "ct-denoise", applies: AppliesTo = CT_APPLIES, modalities: tuple[str, ...] = ("CT",)) -> Any:
    shipped = load(REPO / "models" / "ct-denoise")
    return dataclasses.replace(shipped, name=name, modalities=modalities, applies_to=applies)


def derived(ds: Dataset, model: str = "ct-denoise", device: str | None = None) -> Dataset:
    proc = Processing(model, "2.0.0", "denoise", 1, "onnxruntime", AT, device or device_uid())
    out = derive_image(ds, ds.pixel_array.astype(np.float32) - 1024.0, proc)
    return out


def ct(index: int = 0, **changes: Any) -> Dataset:
    ds = ct_slice("1.2.3", "1.2.3.4", index, rows=64, cols=64)
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


# -- header facts ----------------------------------------------------------------------------


def test_facts_of_an_axial_ct_slice() -> None:
    f = image_facts(ct())
    assert (f.sop_class_uid, f.modality, f.image_type) == (CTImageStorage, "CT", ("ORIGINAL", "PRIMARY", "AXIAL"))
    assert (f.photometric, f.rows, f.columns, f.frames) == ("MONOCHROME2", 64, 64, 1)
    assert f.orientation == (1, 0, 0, 0, 1, 0) and f.normal == (0, 0, 1)
    assert (f.pixel_spacing, f.slice_thickness, f.producers) == ((0.7, 0.7), 1.0, ())
    assert f.is_image


def test_facts_are_read_by_the_scp_from_the_header_without_pixels() -> None:
    ds = ct()
    header = parse_header(b"\x00" * 128 + b"DICM" + _meta(ds) + encode_explicit_le(ds))
    assert header.facts == image_facts(ds)


def _meta(ds: Dataset) -> bytes:
    from node.instance import file_meta

    return file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "X")[132:]


def test_facts_of_a_non_image_object() -> None:
    sr = Dataset()
    sr.SOPClassUID, sr.Modality = BasicTextSRStorage, "SR"
    f = image_facts(sr)
    assert not f.is_image and (f.rows, f.orientation, f.pixel_spacing) == (0, None, None)


def test_facts_of_an_enhanced_object_come_from_the_shared_functional_groups() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.4.1", "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 128, 128, 3
    plane, measures, shared = Dataset(), Dataset(), Dataset()
    plane.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.8], 4.0
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    f = image_facts(ds)
    assert (f.frames, f.orientation, f.pixel_spacing, f.slice_thickness) == (3, (0, 1, 0, 0, 0, -1), (0.9, 0.8), 4.0)
    assert f.normal == (-1, 0, 0)


def test_malformed_values_are_unknown_facts_not_errors() -> None:
    ds = ct()
    ds.ImageOrientationPatient = [1, 0, 0]  # three values, not six
    ds.PixelSpacing = ["0.7"]
    ds.Rows = None
    f = image_facts(ds)
    assert (f.orientation, f.normal, f.pixel_spacing, f.rows, f.is_image) == (None, None, None, 0, False)


def test_an_enhance_node_output_names_its_producer() -> None:
    out = derived(ct(), "ct-denoise", "1.2.3.999")
    assert image_facts(out).producers == (Producer("ct-denoise", "1.2.3.999"),)
    twice = derived(out, "ct-sr2", "1.2.3.888")
    assert image_facts(twice).producers == (Producer("ct-denoise", "1.2.3.999"), Producer("ct-sr2", "1.2.3.888"))


def test_other_contributing_equipment_is_not_a_producer() -> None:
    ds = ct()
    item = Dataset()
    item.Manufacturer, item.ManufacturerModelName = "ACME PACS", "router"
    ds.ContributingEquipmentSequence = Sequence([item])
    assert image_facts(ds).producers == ()


def test_facts_survive_the_ledger_json() -> None:
    f = image_facts(derived(ct()))
    assert ImageFacts.from_json(f.to_json()) == f
    assert ImageFacts.from_json(ImageFacts(SegmentationStorage).to_json()) == ImageFacts(SegmentationStorage)


# -- applies_to ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rows": 0}, "not an image"),
        ({"modality": "MR"}, "modality MR is not CT (ct-denoise)"),
        ({"sop_class_uid": SecondaryCaptureImageStorage}, f"SOP class {SecondaryCaptureImageStorage} is not one"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "image type LOCALIZER (ct-denoise excludes"),
        ({"image_type": ("DERIVED", "SECONDARY", "AXIAL")}, "image type DERIVED"),
        ({"photometric": "RGB"}, "photometric interpretation RGB is not MONOCHROME1/MONOCHROME2"),
        ({"rows": 32}, "matrix 32x512 outside 64..4096"),
        ({"orientation": (1, 0, 0, 0, 0, -1)}, "not axial (slice normal 0.00, 1.00, 0.00)"),
        ({"orientation": None}, "no image orientation"),
        ({"pixel_spacing": (3.0, 3.0)}, "pixel spacing 3x3 mm outside 0.1..2 mm"),
        ({"pixel_spacing": None}, "no pixel spacing"),
    ],
)
def test_applies_to_says_why_a_model_does_not_apply(change: dict[str, Any], reason: str) -> None:
    m = manifest()
    assert m.refusal(CT_AXIAL) is None
    refusal = m.refusal(dataclasses.replace(CT_AXIAL, **change))
    assert refusal is not None and refusal.startswith(reason), refusal


def test_a_tilted_axial_slice_is_still_axial() -> None:
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))  # a 25 degree gantry tilt
    assert manifest().refusal(dataclasses.replace(CT_AXIAL, orientation=(1, 0, 0, 0, c, s))) is None


def test_the_default_applies_to_excludes_localizers_and_colour_only() -> None:
    m = manifest(applies=AppliesTo())
    assert m.refusal(dataclasses.replace(CT_AXIAL, orientation=None, pixel_spacing=None)) is None
    assert m.refusal(dataclasses.replace(CT_AXIAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))) is not None
    assert m.refusal(dataclasses.replace(CT_AXIAL, photometric="YBR_FULL")) is not None


def test_every_shipped_model_declares_what_it_applies_to_as_the_trainer_exports_it() -> None:
    for name in ("ct-denoise", "ct-sr2", "mr-denoise", "mr-sr2"):
        shipped = load(REPO / "models" / name)
        applies = shipped.applies_to
        assert {"LOCALIZER", "DERIVED"} <= set(applies.exclude_image_types), name
        assert applies.sop_classes, name
        assert applies.plane == ("axial" if name.startswith("ct") else "any"), name
        assert applies == APPLIES_TO[shipped.modalities[0]], name  # train/export.py writes the same


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"plane": "coronal"}, "applies_to.plane must be one of"),
        ({"min_matrix": 0}, "min_matrix"),
        ({"pixel_spacing_mm": [2.0, 1.0]}, "pixel_spacing_mm"),
        ({"pixel_spacing_mm": 1.0}, "pixel_spacing_mm must be [low, high]"),
        ({"photometric": "MONOCHROME2"}, "applies_to.photometric must be a list"),
        ({"exclude_image_type": ["LOCALIZER"]}, "unknown key(s) exclude_image_type"),
    ],
)
def test_a_bad_applies_to_table_is_refused_with_the_reason(table: dict[str, Any], message: str) -> None:
    data = load(REPO / "models" / "ct-denoise").as_dict()
    data["applies_to"] = table
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ModelManifest.from_dict(data)


def test_applies_to_round_trips_through_the_manifest_dict() -> None:
    m = load(REPO / "models" / "mr-sr2")
    assert ModelManifest.from_dict(m.as_dict()).applies_to == m.applies_to


# -- route match on image type and SOP class -------------------------------------------------


def series(*images: ImageFacts, modality: str = "CT") -> SeriesFacts:
    return SeriesFacts(modality, "CT01", "Head", images)


def test_route_match_on_image_type_needs_every_image_to_hold_the_values() -> None:
    axial = RouteConfig("axial", "ct-denoise", (), RouteMatch(image_type=("ORIGINAL", "AXIAL")))
    localizer = dataclasses.replace(CT_AXIAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert route_for([axial], series(CT_AXIAL, CT_AXIAL)) is axial
    assert route_for([axial], series(CT_AXIAL, localizer)) is None
    assert route_for([axial], series(ImageFacts(BasicTextSRStorage))) is None  # no image holds them


def test_route_match_on_sop_classes_needs_every_instance_in_the_list() -> None:
    ct_only = RouteConfig("ct", "ct-denoise", (), RouteMatch(sop_classes=(CTImageStorage,)))
    assert route_for([ct_only], series(CT_AXIAL)) is ct_only
    assert route_for([ct_only], series(CT_AXIAL, ImageFacts(BasicTextSRStorage))) is None


# -- the routing rules -----------------------------------------------------------------------

CT_ROUTE = RouteConfig("ct", "ct-denoise", (), RouteMatch(modality="CT"))
ME = "1.2.826.0.1.3680043.8.498.1"


def router(m: Any = None) -> Router:
    m = m or manifest()
    return Router(lambda name: m if name == m.name else None, ME)


def test_a_series_the_model_applies_to_gets_its_route() -> None:
    assert router().decide([CT_ROUTE], series(CT_AXIAL)) == Decision(CT_ROUTE)


def test_a_localizer_series_is_skipped_with_the_reason() -> None:
    topogram = dataclasses.replace(CT_AXIAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    decision = router().decide([CT_ROUTE], series(topogram, topogram))
    assert decision.route is None
    assert decision.skipped.startswith("ct-denoise applies to none of it: 2 x image type LOCALIZER")


def test_a_series_with_some_images_the_model_applies_to_is_processed() -> None:
    topogram = dataclasses.replace(CT_AXIAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert router().decide([CT_ROUTE], series(topogram, CT_AXIAL)).route is CT_ROUTE


def test_no_matching_route_is_unrouted_not_skipped() -> None:
    assert router().decide([CT_ROUTE], series(ImageFacts(BasicTextSRStorage, "SR"), modality="SR")) == Decision(None)


def test_a_model_that_cannot_be_loaded_still_gets_its_job_so_the_worker_says_why() -> None:
    missing = RouteConfig("x", "no-such-model", (), RouteMatch())
    assert router().decide([missing], series(CT_AXIAL)) == Decision(missing)


def test_this_nodes_output_is_skipped_as_own_output() -> None:
    mine = dataclasses.replace(CT_AXIAL, producers=(Producer("ct-denoise", ME),))
    decision = router().decide([CT_ROUTE], series(mine))
    assert decision == Decision(None, "own output: made by ct-denoise on this node")


def test_another_enhance_nodes_output_is_skipped_too() -> None:
    theirs = dataclasses.replace(CT_AXIAL, producers=(Producer("ct-sr2", "1.2.3.77"),))
    decision = router().decide([CT_ROUTE], series(CT_AXIAL, theirs))
    assert decision == Decision(None, "own output: made by ct-sr2 on another enhance-node (device 1.2.3.77)")


def test_own_output_is_skipped_even_when_no_route_matches() -> None:
    mine = dataclasses.replace(CT_AXIAL, producers=(Producer("ct-denoise", ME),))
    assert router().decide([], series(mine)).skipped.startswith("own output")


def test_a_deliberate_chain_processes_the_named_models_output() -> None:
    sr = manifest("ct-sr2")
    chain = RouteConfig("chain", "ct-sr2", (), RouteMatch(modality="CT"), chain_from=("ct-denoise",))
    denoised = dataclasses.replace(
        CT_AXIAL, image_type=("DERIVED", "SECONDARY", "AXIAL"), producers=(Producer("ct-denoise", ME),)
    )
    assert router(sr).decide([chain], series(denoised)) == Decision(chain)  # DERIVED of the chain is waived
    other = dataclasses.replace(denoised, producers=(Producer("mr-denoise", ME),))
    assert router(sr).decide([chain], series(other)).skipped.startswith("own output")
    rerun = dataclasses.replace(denoised, producers=(Producer("ct-denoise", ME), Producer("ct-sr2", ME)))
    assert router(sr).decide([chain], series(rerun)).skipped.startswith("own output")  # never its own output


def test_a_chain_still_refuses_derived_images_of_other_origin() -> None:
    mpr = dataclasses.replace(CT_AXIAL, image_type=("DERIVED", "SECONDARY", "MPR"))
    assert applicable(manifest(), mpr, chained=False) is not None
    assert applicable(manifest(), mpr, chained=True) is None  # waived only for enhance-node output


def test_own_output_reason_names_the_last_producer() -> None:
    f = dataclasses.replace(CT_AXIAL, producers=(Producer("a", "1.1"), Producer("b", ME)))
    assert own_output(f, ME) == "own output: made by b on this node"
    assert own_output(CT_AXIAL, ME) == ""


def test_summary_counts_reasons_most_frequent_first() -> None:
    assert summary(["x", "y", "y"]) == "2 x y; x"


def test_manifest_cache_reloads_a_changed_package(tmp_path: Path) -> None:
    package = tmp_path / "m"
    package.mkdir()
    for name in ("model.toml", "model.onnx"):
        (package / name).write_bytes((REPO / "models" / "ct-denoise" / name).read_bytes())
    cache = ManifestCache(tmp_path)
    first = cache("m")
    assert first is not None and cache("m") is first  # cached
    toml = package / "model.toml"
    toml.write_text(toml.read_text().replace('plane = "axial"', 'plane = "any"'))
    import os

    os.utime(toml, (toml.stat().st_atime, toml.stat().st_mtime + 5))
    second = cache("m")
    assert second is not None and second.applies_to.plane == "any"
    toml.write_text("garbage = ")
    os.utime(toml, (toml.stat().st_atime, toml.stat().st_mtime + 10))
    assert cache("m") is None
    assert cache("absent") is None


# -- in the ledger ---------------------------------------------------------------------------


def record(ledger: Ledger, series_uid: str, sop: str, facts: ImageFacts) -> None:
    path = f"objects/1.2.3/{series_uid}/{sop}.dcm"
    h = InstanceHeader(facts.sop_class_uid, sop, "1.2.3", series_uid, ExplicitVRLittleEndian, facts.modality, "", 1)
    h = dataclasses.replace(h, facts=facts)
    ledger.record_instance(h, Received(StoredFile(path, hashlib.sha256(path.encode()).hexdigest(), 1), "CT01", "x"))


def test_routing_records_a_skipped_series_with_its_reason(engine: Engine, ledger: Ledger, clock: Clock) -> None:
    topogram = dataclasses.replace(CT_AXIAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    record(ledger, "1.2.3.1", "1.2.3.1.1", topogram)
    record(ledger, "1.2.3.2", "1.2.3.2.1", CT_AXIAL)
    record(ledger, "1.2.3.2", "1.2.3.2.2", CT_AXIAL)
    clock.advance(60)
    ledger.complete_idle_series(30, 120)

    routed = route_complete_series(JobQueue(engine, now=clock), [CT_ROUTE], 3, (), router().decide)

    jobs = {r.series_instance_uid: r.job_id for r in routed}
    assert jobs["1.2.3.1"] is None and jobs["1.2.3.2"] is not None
    with engine.connect() as conn:
        rows = dict(conn.execute(select(t.series.c.series_instance_uid, t.series.c.skip_reason)).all())
        events = conn.execute(
            select(t.events.c.series_instance_uid, t.events.c.detail).where(
                t.events.c.kind == str(EventKind.SERIES_SKIPPED)
            )
        ).all()
        job_count = len(conn.execute(select(t.jobs.c.id)).all())
    assert rows["1.2.3.1"].startswith("ct-denoise applies to none of it: image type LOCALIZER")
    assert rows["1.2.3.2"] == ""
    assert [(uid, detail) for uid, detail in events] == [("1.2.3.1", rows["1.2.3.1"])]
    assert job_count == 1


def test_the_ledger_keeps_each_instances_facts(engine: Engine, ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", "1.2.3.1.1", CT_AXIAL)
    with engine.connect() as conn:
        text = conn.execute(select(t.instances.c.facts)).scalar_one()
    assert ImageFacts.from_json(text) == CT_AXIAL


def test_mr_images_in_any_plane_are_for_the_mr_models() -> None:
    mr = load(REPO / "models" / "mr-denoise")
    sagittal = image_facts(mr_slice("1.2", "1.2.1", 0, rows=128, cols=128))
    sagittal = dataclasses.replace(sagittal, orientation=(0, 1, 0, 0, 0, -1))
    assert mr.refusal(sagittal) is None
