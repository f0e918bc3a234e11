"""Issue 18: a whole study as a scanner and a PACS send it. Real peers: DCMTK storescu, a
pynetdicom SCU for a private SOP class, Orthanc auto-routing every stored instance back to
the node (a Lua OnStoredInstance), and the shipped ct-denoise.

Bar: every object stored (storescu exit 0), exactly one job (the axial series), no derived
localizer, and after the derived series comes back from the PACS, no new job."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from engines.manifest import load
from node.derive import derived_uid
from tests.dicom_factory import PRIVATE_STORAGE, write_study_mix
from tests.helpers import (
    REPO,
    NodeProcess,
    ct_route,
    dcmtk_env,
    destination_toml,
    pipeline_node,
    require,
    run_cli,
    storescu,
    wait_for,
)
from tests.peers import Orthanc, StoreSCP

VERSION = load(REPO / "models" / "ct-denoise").version


def skip_reasons(node: NodeProcess) -> dict[str, str]:
    return dict(node.query("SELECT series_instance_uid, skip_reason FROM series WHERE skip_reason != ''"))  # type: ignore[arg-type]


def routed(node: NodeProcess) -> int:
    return int(node.query("SELECT count(*) FROM series WHERE state = 'routed'")[0][0])


def test_a_study_mix_is_stored_whole_and_only_the_axial_series_is_processed(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    mix = write_study_mix(tmp_path / "study", slices=4)
    with StoreSCP("PACS").start() as pacs:
        node = pipeline_node(
            node_factory,
            destination_toml("pacs", "PACS", pacs.port) + ct_route('"pacs"'),
            extra_node="accept_unknown_sop_classes = true",
        ).start()
        # -R: propose each file's own SOP class (SEG is not in the list storescu proposes by default)
        sent = storescu(node.port, mix.files, "-R")
        assert sent.returncode == 0, sent.stderr
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(PRIVATE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ENHANCE")
        assert assoc.is_established
        status = assoc.send_c_store(dcmread(mix.private))
        assoc.release()
        assert status.Status == 0x0000

        wait_for(lambda: routed(node) == 6, timeout=120, what="all six series routed")
        wait_for(lambda: len(pacs.received) == 4, timeout=120, what="the derived axial series delivered")

        stored = dict(node.query("SELECT sop_class_uid, count(*) FROM instances GROUP BY sop_class_uid"))
        assert stored == {
            "1.2.840.10008.5.1.4.1.1.2": 6,  # 4 axial + 2 topograms
            "1.2.840.10008.5.1.4.1.1.88.67": 1,
            "1.2.840.10008.5.1.4.1.1.66.4": 1,
            "1.2.840.10008.5.1.4.1.1.7": 1,
            PRIVATE_STORAGE: 1,
        }
        assert [(ae,) for (ae,) in node.query("SELECT calling_ae FROM instances")] == [("STORESCU",)] * 10
        jobs = node.query("SELECT s.series_instance_uid, j.state FROM jobs j JOIN series s ON s.id = j.series_id")
        assert jobs == [(mix.axial, "done")]
        reasons = skip_reasons(node)
        assert set(reasons) == {mix.localizer, mix.dose_screen}
        assert "image type LOCALIZER" in reasons[mix.localizer]
        assert "SOP class 1.2.840.10008.5.1.4.1.1.7 is not one ct-denoise takes" in reasons[mix.dose_screen]
        unrouted = node.query("SELECT series_instance_uid FROM events WHERE kind = 'series.unrouted'")
        assert sorted(u for (u,) in unrouted) == sorted([mix.dose_sr, mix.seg, mix.private_series])
        skipped_events = node.query("SELECT series_instance_uid, detail FROM events WHERE kind = 'series.skipped'")
        assert dict(skipped_events) == reasons  # type: ignore[arg-type]
        assert sorted(pacs.received) == sorted(
            derived_uid(uid, "ct-denoise", VERSION)
            for (uid,) in node.query(
                "SELECT sop_instance_uid FROM instances i JOIN series s ON s.id = i.series_id"
                " WHERE s.series_instance_uid = ?",
                mix.axial,
            )
        )

        listed = run_cli(node.config, "jobs", "list", "--state", "skipped")
        assert listed.returncode == 0, listed.stderr
        assert mix.localizer in listed.stdout and "image type LOCALIZER" in listed.stdout
        assert mix.dose_screen in listed.stdout and mix.axial not in listed.stdout


# Orthanc as a PACS that auto-routes every instance it stores to the node, the node's own
# results included: the loop the node must break.
AUTO_FORWARD = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'enhance')
end
"""


def test_orthanc_auto_forwarding_everything_back_to_the_node_makes_no_loop(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    mix = write_study_mix(tmp_path / "study", slices=4)
    orthanc = Orthanc(tmp_path / "orthanc", lua=AUTO_FORWARD)
    node = pipeline_node(
        node_factory,
        destination_toml("pacs", orthanc.aet, orthanc.dicom_port) + ct_route('"pacs"'),
        allowed=(("STORESCU", "127.0.0.1"), (orthanc.aet, "127.0.0.1")),
        idle_seconds=2,  # Orthanc forwards one association per instance: let a series gather
    )
    orthanc.modalities = {"enhance": ("ENHANCE", node.port)}
    with orthanc.start():
        node.start()
        # the scanner sends to the PACS, which routes it on to the node
        sent = storescu(orthanc.dicom_port, mix.files, "-R", called=orthanc.aet)
        assert sent.returncode == 0, sent.stderr

        output_uid = derived_uid(mix.axial, "ct-denoise", VERSION)
        wait_for(lambda: orthanc.instance_count(output_uid) == 4, timeout=180, what="the derived series in Orthanc")
        # ...and Orthanc sends it back: the node stores it and skips it as its own output
        wait_for(
            lambda: skip_reasons(node).get(output_uid, "").startswith("own output"),
            timeout=120,
            what="the derived series back at the node, skipped",
        )
        assert skip_reasons(node)[output_uid] == "own output: made by ct-denoise on this node"
        assert node.query("SELECT instance_count FROM series WHERE series_instance_uid = ?", output_uid) == [(4,)]
        wait_for(lambda: routed(node) == 6, timeout=60, what="all six series the node holds routed")

        jobs = node.query("SELECT s.series_instance_uid, j.generation FROM jobs j JOIN series s ON s.id = j.series_id")
        assert jobs == [(mix.axial, 0)]  # one job, no second generation
        study = orthanc.get(f"/series/{orthanc.series(output_uid)['ID']}/study")  # type: ignore[index]
        tags = [orthanc.get(f"/series/{s}")["MainDicomTags"] for s in study["Series"]]
        descriptions = sorted(t.get("SeriesDescription", "") for t in tags)
        derived = [d for d in descriptions if d.endswith(" enhanced")]
        assert derived == ["Synthetic phantom enhanced"]  # exactly one derived series: the axial one's
        assert orthanc.series(derived_uid(output_uid, "ct-denoise", VERSION)) is None  # no second generation
        assert orthanc.series(derived_uid(mix.localizer, "ct-denoise", VERSION)) is None  # no derived topogram
        assert len(study["Series"]) == 6  # the five series sent, and one derived


def test_a_whole_study_moved_from_orthanc_is_stored_whole_with_one_job(
    node_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """A radiologist's PACS sends a whole study: DCMTK movescu asks Orthanc to C-MOVE it to the
    node, and Orthanc C-STOREs every object (localizer, axial, dose SR, SEG, dose screen)."""
    mix = write_study_mix(tmp_path / "study", slices=4)
    orthanc = Orthanc(tmp_path / "orthanc")
    node = pipeline_node(
        node_factory,
        ct_route(""),
        allowed=((orthanc.aet, "127.0.0.1"),),
        idle_seconds=1,
    )
    orthanc.modalities = {"enhance": ("ENHANCE", node.port), "reader": ("MOVESCU", 1)}
    with orthanc.start():
        node.start()
        assert storescu(orthanc.dicom_port, mix.files, "-R", called=orthanc.aet).returncode == 0
        move = subprocess.run(
            [
                require("movescu"),
                *("-aet", "MOVESCU", "-aec", orthanc.aet, "-aem", "ENHANCE", "-S"),
                *("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={mix.study_uid}"),
                *("127.0.0.1", str(orthanc.dicom_port)),
            ],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=120,
        )
        assert move.returncode == 0, move.stderr
        wait_for(lambda: routed(node) == 5, timeout=120, what="the study's five series routed")
        assert node.query("SELECT count(*) FROM instances") == [(len(mix.files),)]
        assert node.query("SELECT DISTINCT calling_ae FROM instances") == [(orthanc.aet,)]
        jobs = node.query("SELECT s.series_instance_uid FROM jobs j JOIN series s ON s.id = j.series_id")
        assert jobs == [(mix.axial,)]
        assert set(skip_reasons(node)) == {mix.localizer, mix.dose_screen}
