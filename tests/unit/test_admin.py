"""The admin CLI's configuration edits (node/admin.py through `enhance-node dest|route|models`)
on a copy of the shipped config.toml, and the live configuration a running node re-reads
(node/live.py) with an injected clock."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node.config import load_config
from node.live import RESTART_NEEDED, LiveConfig, changes
from tests.helpers import REPO, run_cli


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    shutil.copy(REPO / "config.toml", path)
    return path


def test_dest_and_route_edits_keep_every_comment_and_validate(cfg: Path) -> None:
    original = cfg.read_text()
    assert run_cli(cfg, "dest", "add", "pacs", "PACS", "10.0.0.20", "104", "--max-attempts", "5").returncode == 0
    added = run_cli(cfg, "route", "add", "ct-sr", "--model", "ct-sr2", "--modality", "CT", "--calling-ae", "CT*",
                    "--dest", "pacs", "--send-back", "--position", "0")  # fmt: skip
    assert added.returncode == 0, added.stderr
    loaded = load_config(cfg)
    assert [r.name for r in loaded.routes] == ["ct-sr", "ct-denoise", "mr-denoise"]  # first match wins: first
    first = loaded.routes[0]
    assert (first.model, first.destinations, first.send_back, first.match.calling_ae) == (
        "ct-sr2",
        ("pacs",),
        True,
        "CT*",
    )
    assert [(d.name, d.max_attempts) for d in loaded.destinations] == [("pacs", 5)]
    listed = run_cli(cfg, "route", "list").stdout
    assert listed.splitlines()[0].startswith("0: ct-sr") and "-> ct-sr2 -> pacs, send back" in listed
    assert "strength high, on QA failure fail" in listed.splitlines()[0]
    assert "PACS@10.0.0.20:104" in run_cli(cfg, "dest", "list").stdout

    in_use = run_cli(cfg, "dest", "remove", "pacs")
    assert in_use.returncode == 2 and "used by route ct-sr" in in_use.stderr
    assert len(in_use.stderr.strip().splitlines()) == 1
    assert run_cli(cfg, "route", "remove", "ct-sr").returncode == 0
    assert run_cli(cfg, "dest", "remove", "pacs").returncode == 0
    assert cfg.read_text() == original  # every comment and blank line where it was


def test_route_add_with_image_type_sop_classes_and_a_chain(cfg: Path) -> None:
    added = run_cli(cfg, "route", "add", "sr", "--model", "ct-sr2", "--image-type", "AXIAL", "--sop-class",
                    "CTImageStorage", "--chain-from", "ct-denoise", "--position", "0")  # fmt: skip
    assert added.returncode == 0, added.stderr
    first = load_config(cfg).routes[0]
    assert (first.match.image_type, first.match.sop_classes) == (("AXIAL",), ("1.2.840.10008.5.1.4.1.1.2",))
    assert first.chain_from == ("ct-denoise",)
    listed = run_cli(cfg, "route", "list").stdout.splitlines()[0]
    assert "image type AXIAL, SOP classes 1.2.840.10008.5.1.4.1.1.2, chain from ct-denoise" in listed
    own = run_cli(cfg, "route", "add", "loop", "--model", "ct-sr2", "--chain-from", "ct-sr2")
    assert own.returncode == 2 and "never processes its own output" in own.stderr


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("dest", "add", "pacs", "WAY_TOO_LONG_AE_TITLE", "10.0.0.1", "104"), "ae_title"),
        (("dest", "add", "pacs", "PACS", "10.0.0.1", "70000"), "port"),
        (("route", "add", "r", "--model", "m", "--dest", "nowhere"), "no destination named 'nowhere'"),
        (("route", "add", "r", "--model", "m", "--description", "("), "not a regular expression"),
        (("route", "add", "ct-denoise", "--model", "m"), "already exists"),
        (("route", "remove", "nope"), "no entry named 'nope'"),
        (("dest", "remove", "nope"), "none configured"),
        (("route", "add", "r", "--model", "m", "--forward-original"), "needs destinations or send_back"),
    ],
)
def test_a_bad_edit_exits_2_with_one_line_and_leaves_the_file_alone(
    cfg: Path, args: tuple[str, ...], reason: str
) -> None:
    before = cfg.read_text()
    out = run_cli(cfg, *args)
    assert out.returncode == 2
    assert reason in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert cfg.read_text() == before


def test_models_list_shows_each_shipped_model_with_its_held_out_metrics() -> None:
    out = run_cli(REPO / "config.toml", "models", "list")  # read only: models_dir is the repository's
    assert out.returncode == 0
    for name in ("ct-denoise", "ct-sr2", "mr-denoise", "mr-sr2"):
        assert any(line.startswith(f"{name} ") for line in out.stdout.splitlines())
    assert "lanczos    PSNR" in out.stdout and "ROI bias" in out.stdout
    assert "held-out: 5 slices x 8 noise draws (simulated 25% dose" in out.stdout  # ct-denoise's manifest
    assert "robustness (16 conditions, bench/acquisition.py): worst" in out.stdout
    assert "ct-denoise 2.7.0: denoise x1 CT, told the noise level" in out.stdout
    assert (
        "applies to: axial planes, 64..2048 matrix, 0.1..2 mm pixels, MONOCHROME1/MONOCHROME2, not LOCALIZER/DERIVED"
        in out.stdout
    )


class Ticks:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_live_config_applies_a_valid_change_and_keeps_the_last_good_one(cfg: Path) -> None:
    ticks = Ticks()
    live = LiveConfig(load_config(cfg), interval=1.0, clock=ticks)
    assert [a.ae_title for a in live.current().node.allowed] == ["STORESCU"]
    assert run_cli(cfg, "ae", "add", "CT01", "--host", "10.0.0.5").returncode == 0
    assert [a.ae_title for a in live.current().node.allowed] == ["STORESCU"]  # not checked before the interval
    ticks.t = 1.5
    assert [a.ae_title for a in live.current().node.allowed] == ["STORESCU", "CT01"]

    cfg.write_text(cfg.read_text().replace("port = 11112", "port = 99999"))  # invalid: not applied
    ticks.t = 3.0
    assert [a.ae_title for a in live.current().node.allowed] == ["STORESCU", "CT01"]
    cfg.write_text(cfg.read_text().replace("port = 99999", "port = 11113").replace('"CT01"', '"CT02"'))
    ticks.t = 4.5
    now = live.current()
    assert [a.ae_title for a in now.node.allowed] == ["STORESCU", "CT02"]
    assert now.node.port == 11112  # needs a restart: the running node keeps what it started with


def test_changes_name_what_moved_and_what_needs_a_restart(cfg: Path, tmp_path: Path) -> None:
    old = load_config(cfg)
    assert run_cli(cfg, "dest", "add", "pacs", "PACS", "10.0.0.20", "104").returncode == 0
    assert run_cli(cfg, "route", "remove", "mr-denoise").returncode == 0
    lines = changes(old, load_config(cfg))
    assert lines == ["destination pacs added", "route mr-denoise removed"]  # nothing needs a restart
    cfg.write_text(cfg.read_text().replace("idle_seconds = 30", "idle_seconds = 10"))
    lines = changes(old, load_config(cfg))
    assert RESTART_NEEDED in lines and RESTART_NEEDED == "other settings changed: restart the node to apply them"


def test_a_process_started_after_an_edit_still_applies_it(cfg: Path) -> None:
    """A respawned process gets the configuration the node started with: its first check
    compares the file with that, not with the file as it found it."""
    started_with = load_config(cfg)
    assert run_cli(cfg, "ae", "remove", "STORESCU").returncode == 0
    ticks = Ticks()
    live = LiveConfig(started_with, interval=1.0, clock=ticks)
    ticks.t = 1.5
    assert live.current().node.allowed == ()


def test_removing_an_entry_keeps_the_comments_that_follow_it(cfg: Path) -> None:
    assert run_cli(cfg, "ae", "remove", "STORESCU").returncode == 0
    text = cfg.read_text()
    assert "# DICOM TLS (example)" in text and "# [node.tls]" in text and 'ae_title = "STORESCU"' not in text


def test_an_edit_keeps_the_files_permissions(cfg: Path) -> None:
    cfg.chmod(0o600)
    assert run_cli(cfg, "ae", "add", "CT01").returncode == 0
    assert cfg.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("text", "reason"),
    [("[node]\nallowed = [{ae_title = 'A'}]\n", "edit it by hand"), ("node = 3\n", "node: must be a table")],
)
def test_a_layout_the_cli_cannot_edit_is_refused_not_corrupted(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    out = run_cli(path, "ae", "add", "B")
    assert out.returncode == 2 and reason in out.stderr
    assert path.read_text() == text


def test_jobs_on_a_ledger_no_node_has_created_yet_exit_2_with_the_reason(cfg: Path) -> None:
    out = run_cli(cfg, "jobs", "list")
    assert out.returncode == 2 and "start the node once" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
