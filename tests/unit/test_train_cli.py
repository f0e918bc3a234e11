"""`enhance-node train | evaluate | export`: help, usage errors (exit 2, one line), the lazy
torch import, and an end-to-end train -> export through the command line."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cli import main
from tests.helpers import REPO
from train.cli import DEGRADATION_RANGES

TINY_SR = [
    "--preset",
    "mr-sr2",
    "--epochs",
    "1",
    "--steps-per-epoch",
    "3",
    "--batch",
    "2",
    "--patch",
    "32",
    "--phantoms",
    "2",
    "--depth",
    "1",
    "--width",
    "8",
    "--workers",
    "1",
    "--device",
    "cpu",
]
TINY_DN = ["--preset", "mr-denoise", *TINY_SR[2:], "--depth", "3"]  # a DnCNN: input, middle, output layer


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("train", "Train a model from a preset"),
        ("evaluate", "Measure a model package against classical filters"),
        ("export", "Export a training run's checkpoint to a model package"),
    ],
)
def test_help(command: str, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: enhance-node {command}" in out
    assert text in out


def test_train_help_lists_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("ct-denoise", "mr-denoise", "ct-sr2", "mr-sr2"):
        assert name in out


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Runs argv, expects exit status 2 (returned or raised) and one line on stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(capsys, ["train", "--preset", "pet-denoise", "--out", str(tmp_path)])
    assert "pet-denoise" in err and "--preset" in err


def test_self_supervised_needs_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(capsys, ["train", "--preset", "ct-denoise", "--self-supervised", "--out", str(tmp_path)])
    assert "--data" in err
    assert not any(tmp_path.iterdir())


def test_self_supervised_denoisers_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(
        capsys,
        ["train", "--preset", "mr-sr2", "--self-supervised", "--data", str(tmp_path), "--out", str(tmp_path / "run")],
    )
    assert "denois" in err
    assert not (tmp_path / "run").exists()


def test_self_supervised_refuses_loss_terms_that_need_targets(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _usage_error(
        capsys,
        [
            "train",
            "--preset",
            "ct-denoise",
            "--self-supervised",
            "--data",
            str(tmp_path),
            "--mean-weight",
            "20",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert "supervised training" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("preset", "patch"), [("mr-sr2", "33"), ("ct-denoise", "31")])
def test_patch_must_be_a_multiple_of_the_scale(
    preset: str, patch: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _usage_error(capsys, ["train", "--preset", preset, "--patch", patch, "--out", str(tmp_path / "run")])
    assert "--patch" in err
    assert not (tmp_path / "run").exists()


def test_init_from_neither_checkpoint_nor_package(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(
        capsys, ["train", "--preset", "ct-denoise", "--init-from", str(tmp_path), "--out", str(tmp_path / "run")]
    )
    assert "neither a checkpoint nor a model package" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("preset", "bounds", "reason"),
    [
        ("ct-denoise", ["0", "40"], "0 < LO <= HI"),
        ("ct-denoise", ["9", "3"], "0 < LO <= HI"),
        ("mr-denoise", ["1", "4"], "CT"),
    ],
)
def test_natural_sd_out_of_range_or_not_ct(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, preset: str, bounds: list[str], reason: str
) -> None:
    err = _usage_error(capsys, ["train", "--preset", preset, "--natural-sd", *bounds, "--out", str(tmp_path / "run")])
    assert "--natural-sd" in err and reason in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("preset", "bounds"), [("ct-denoise", ["2", "1"]), ("ct-denoise", ["-1", "1"]), ("mr-sr2", ["0", "1"])]
)
def test_phantom_blur_out_of_range_or_not_ct(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, preset: str, bounds: list[str]
) -> None:
    err = _usage_error(capsys, ["train", "--preset", preset, "--phantom-blur", *bounds, "--out", str(tmp_path / "run")])
    assert "--phantom-blur" in err
    assert not (tmp_path / "run").exists()


def test_export_without_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "pkg")])
    assert "checkpoint" in err
    assert not (tmp_path / "pkg").exists()


def test_evaluate_of_a_folder_that_is_no_model_package(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(capsys, ["evaluate", str(tmp_path), "--out", str(tmp_path / "report")])
    assert "model.toml" in err
    assert not (tmp_path / "report").exists()


def test_missing_required_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--preset" in _usage_error(capsys, ["train"])
    assert "--out" in _usage_error(capsys, ["export", "somewhere"])


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import node.cli, sys; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_train_then_export_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, pkg = tmp_path / "run", tmp_path / "pkg"
    train_argv = ["train", *TINY_SR, "--out", str(run)]
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", *train_argv],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("checkpoint.pt")
    assert {"checkpoint.pt", "train_log.csv", "curves.png"} <= {p.name for p in run.iterdir()}

    assert main(["export", str(run), "--out", str(pkg), "--name", "site-sr", "--version", "0.2.0"]) == 0
    assert "site-sr 0.2.0" in capsys.readouterr().out
    manifest = tomllib.loads((pkg / "model.toml").read_text())
    assert manifest["name"] == "site-sr" and manifest["version"] == "0.2.0"
    assert manifest["task"] == "sr" and manifest["scale"] == 2
    assert manifest["net"]["depth"] == 1 and manifest["net"]["width"] == 8
    assert manifest["training"]["command"] == shlex.join(["enhance-node", *train_argv])
    assert manifest["training"]["epochs_done"] == 1
    assert (pkg / "model.onnx").is_file()


def test_in_process_train_records_the_command_it_was_given(tmp_path: Path) -> None:
    """`main(argv)` is the entry point's API: the provenance must be argv, not the host
    process's sys.argv (here pytest's)."""
    import torch

    argv = ["train", *TINY_SR, "--mean-weight", "5", "--out", str(tmp_path)]
    assert main(argv) == 0
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["run"]["command"] == shlex.join(["enhance-node", *argv])
    assert state["run"]["mean_weight"] == 5.0  # export copies the run's description into model.toml


def test_degradation_ranges_from_the_command_line_reach_the_run(tmp_path: Path) -> None:
    """Every --NAME LO HI of train.cli.DEGRADATION_RANGES overrides that field of the preset's
    degradation, and the run records what it trained with."""
    import torch

    extra = ["--sigma-percent", "3", "4", "--texture-sd", "1", "2", "--post-smooth-px", "0.5", "2"]
    assert main(["train", *TINY_DN, *extra, "--out", str(tmp_path)]) == 0
    run = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)["run"]
    assert tuple(run["degradation"]["sigma_percent"]) == (3.0, 4.0)
    assert tuple(run["degradation"]["texture_sd"]) == (1.0, 2.0)
    assert tuple(run["degradation"]["post_smooth_px"]) == (0.5, 2.0)
    assert {name for name, _ in DEGRADATION_RANGES} <= set(run["degradation"])


def test_loss_per_level_reaches_the_loop_and_is_recorded(tmp_path: Path) -> None:
    """The same tiny run with and without --loss-per-level: divided by each pair's noise level
    (squared, l2), the training loss is of the order of (error / noise)^2, hundreds of times the
    plain loss, which is of the order of the noise's square in normalised units."""
    import torch

    def run(name: str, *extra: str) -> dict[str, object]:
        assert main(["train", *TINY_DN, "--noise-map", "--loss", "l2", *extra, "--out", str(tmp_path / name)]) == 0
        return dict(torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=False))

    plain, per_level = run("plain"), run("per-level", "--loss-per-level")
    assert per_level["run"]["loss_per_level"] == 2.0 and plain["run"]["loss_per_level"] == 0.0  # type: ignore[index]
    assert per_level["history"][0]["train_loss"] > 100 * plain["history"][0]["train_loss"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--mean-weight", "-1"], "--mean-weight and --ssim-weight must be >= 0"),
        (["--ssim-weight", "-0.5"], "--mean-weight and --ssim-weight must be >= 0"),
        (["--mean-weight", "1", "--patch", "8"], "--patch must be at least 15"),
        (["--loss-per-level"], "add --noise-map"),
        (["--loss-per-level", "3"], "between 0 and 2"),
        (["--epochs", "0"], "--epochs must be at least 1"),  # was a ZeroDivisionError traceback
        (["--steps-per-epoch", "0"], "--steps-per-epoch must be at least 1"),
        (["--draws", "0"], "--draws must be at least 1"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_loss_weights_are_checked(
    extra: list[str], reason: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert reason in _usage_error(capsys, ["train", *TINY_SR, *extra, "--out", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_fine_tune_keeps_the_sources_transform_and_base_unless_told(tmp_path: Path) -> None:
    """Fine-tuning the shipped asinh `ct-denoise` with the linear preset must not silently
    become a linear fine-tune: --init-from carries the source's --transform (and an SR net's
    --base-taps) over; an explicit option still wins."""
    import torch

    def net_of(run: Path) -> dict[str, object]:
        return dict(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["net"])

    relaxed = ["--transform", "asinh", "--noise-map", "--relax", "2"]
    assert main(["train", *TINY_DN, *relaxed, "--out", str(tmp_path / "asinh")]) == 0
    source = str(tmp_path / "asinh" / "checkpoint.pt")
    assert main(["train", *TINY_DN, "--init-from", source, "--out", str(tmp_path / "kept")]) == 0
    assert net_of(tmp_path / "kept")["transform"] == "asinh" and net_of(tmp_path / "kept")["relax"] == 2.0
    told = ["--transform", "linear", "--init-from", source, "--out", str(tmp_path / "told")]
    assert main(["train", *TINY_DN, *told]) == 0  # relax belongs to asinh: it goes with it
    assert net_of(tmp_path / "told")["transform"] == "linear" and net_of(tmp_path / "told")["relax"] == 0.0

    assert main(["train", *TINY_SR, "--base-taps", "3", "--out", str(tmp_path / "lanczos")]) == 0
    sr_source = str(tmp_path / "lanczos" / "checkpoint.pt")
    assert main(["train", *TINY_SR, "--init-from", sr_source, "--out", str(tmp_path / "sr-kept")]) == 0
    assert net_of(tmp_path / "sr-kept")["base_taps"] == 3


def test_int8_is_for_denoisers_and_a_fine_tune_keeps_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import torch

    err = _usage_error(capsys, ["train", *TINY_SR, "--quantize", "int8", "--out", str(tmp_path / "sr")])
    assert "srnet" in err
    assert main(["train", *TINY_DN, "--quantize", "int8", "--out", str(tmp_path / "q")]) == 0
    source = str(tmp_path / "q" / "checkpoint.pt")
    scratch = torch.load(source, map_location="cpu", weights_only=False)["model"]["act_log_scale"]
    assert bool((scratch < -1).all())  # calibrated from random weights' activations, not left at step 1
    assert main(["train", *TINY_DN, "--init-from", source, "--out", str(tmp_path / "kept")]) == 0
    kept = torch.load(tmp_path / "kept" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert kept["net"]["quantize"] == "int8" and "act_log_scale" in kept["model"]


def test_add_bank_must_exist_and_needs_targets(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(capsys, ["train", *TINY_DN, "--add-bank", str(tmp_path / "none.npz"), "--out", str(tmp_path)])
    assert "--add-bank" in err and "none.npz" in err
    (tmp_path / "bank.npz").write_bytes(b"")
    argv = ["train", *TINY_DN, "--add-bank", str(tmp_path / "bank.npz"), "--self-supervised", "--data", str(tmp_path)]
    assert "--self-supervised" in _usage_error(capsys, argv)
