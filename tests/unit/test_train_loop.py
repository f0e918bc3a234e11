"""train.loop and train.data: a tiny training run learns, writes its artefacts, resumes and
reproduces; Neighbor2Neighbor sub-sampling, the SSIM loss and the patch sampler."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train.loop as loop
from engines.nets import build
from engines.netspec import NetSpec
from tests.dicom_factory import write_ct_series
from train.data import Bank, sample
from train.loop import (
    CHECKPOINT,
    CURVES_PNG,
    LEVEL_FLOOR,
    LOG_CSV,
    MEAN_TOLERANCE,
    RunConfig,
    local_means,
    loss_fn,
    neighbour_pair,
    net_from_checkpoint,
    noise_map_level,
    ssim,
    train,
)
from train.metrics import ROI_SIDE
from train.presets import PRESETS, Preset, with_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = NetSpec("dncnn", depth=3, width=8, unshuffle=2)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(name: str = "mr-denoise", **overrides: Any) -> Preset:
    """A preset small enough for a unit test: 64x64 phantoms, a 3-layer net, a few steps."""
    settings: dict[str, Any] = dict(
        net=TINY, phantoms=2, phantom_size=64, epochs=2, steps_per_epoch=3, batch=2, patch=32
    )
    settings.update(overrides)
    return with_overrides(PRESETS[name], **settings)


def state(run: Path) -> dict[str, Any]:
    return torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupted(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train until the first epoch's checkpoint and log are written, then 'kill' the run.

    Injected rather than a real SIGKILL: the equality tests need the stop exactly at an epoch
    boundary, which a signal from outside can only hit by chance."""
    write_log = loop._write_log

    def stop(out: Path, history: list[dict[str, Any]]) -> None:
        write_log(out, history)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "_write_log", stop)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert state(cfg.out)["epoch"] == 1


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """3 epochs x 15 steps on MR phantoms at lr 3e-3: enough to beat the noisy input. The loop is
    tested at one noise range (3-8%); the preset's full ranges, down to 0.5% noise under up to 3%
    of texture kept in the target, leave a 3-layer net little to win in 45 steps, and are tested
    in test_ranges.py."""
    degradation = replace(PRESETS["mr-denoise"].degradation, sigma_percent=(3.0, 8.0), texture_sd=(0.0, 0.0))
    preset = tiny(phantoms=3, epochs=3, steps_per_epoch=15, batch=4, lr=3e-3, degradation=degradation)
    cfg = RunConfig(preset, tmp_path_factory.mktemp("supervised"), workers=1, command="enhance-node train test")
    train(cfg)
    return cfg


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    cfg = RunConfig(tiny(), tmp_path_factory.mktemp("short"), workers=1)
    train(cfg)
    return cfg


@pytest.fixture(scope="module")
def noisy_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("noisy-ct")
    write_ct_series(folder, 3, rows=64, cols=64)  # a water cylinder with 20 HU of noise
    return folder


def self_supervised(out: Path, data: Path) -> RunConfig:
    return RunConfig(tiny("ct-denoise"), out, data=(data,), self_supervised=True, workers=1)


@pytest.fixture(scope="module")
def self_supervised_run(tmp_path_factory: pytest.TempPathFactory, noisy_series: Path) -> RunConfig:
    cfg = self_supervised(tmp_path_factory.mktemp("self-supervised"), noisy_series)
    train(cfg)
    return cfg


# --- a supervised run -------------------------------------------------------------------------


def test_training_beats_the_noisy_input_on_held_out_phantoms(supervised_run: RunConfig) -> None:
    history = state(supervised_run.out)["history"]
    last = history[-1]
    assert math.isfinite(last["train_loss"])
    assert last["val_psnr"] > last["val_psnr_input"] + 0.5, history


def test_training_lowers_the_loss_on_a_fixed_batch(supervised_run: RunConfig) -> None:
    preset = supervised_run.preset
    bank = Bank.load(supervised_run.out / "bank.npz")
    x, y = sample(bank, np.random.default_rng(123), 16, preset.patch, preset.net.scale)
    torch.manual_seed(supervised_run.seed)
    untrained = build(preset.net).eval()  # the very weights the run started from
    trained = loop.net_from_checkpoint(state(supervised_run.out))
    with torch.no_grad():
        before = float(F.l1_loss(untrained(x), y))
        after = float(F.l1_loss(trained(x), y))
        identity = float(F.l1_loss(x, y))
    assert after < before
    assert after < identity


def test_run_writes_checkpoint_log_and_curves(supervised_run: RunConfig) -> None:
    out, preset = supervised_run.out, supervised_run.preset
    ckpt = state(out)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "torch_rng", "history"} <= ckpt.keys()
    assert ckpt["epoch"] == preset.epochs == 3
    assert ckpt["preset"] == "mr-denoise"
    assert ckpt["net"] == preset.net.as_dict()
    assert ckpt["run"] == supervised_run.describe()
    assert ckpt["run"]["command"] == "enhance-node train test"
    assert not (out / "checkpoint.tmp").exists()

    with (out / LOG_CSV).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row, hist in zip(rows, ckpt["history"], strict=True):
        assert {"train_loss", "val_mse", "val_psnr", "val_psnr_input", "lr", "seconds"} <= row.keys()
        assert float(row["train_loss"]) == pytest.approx(hist["train_loss"])
        assert float(row["val_psnr"]) == pytest.approx(hist["val_psnr"])
        assert float(row["seconds"]) >= 0
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < preset.lr and lrs == sorted(lrs, reverse=True)  # cosine decay...
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # ...to zero at the last step

    assert (out / CURVES_PNG).read_bytes()[:8] == PNG_MAGIC


def test_checkpoint_rebuilds_the_trained_net(supervised_run: RunConfig) -> None:
    ckpt = state(supervised_run.out)
    model = loop.net_from_checkpoint(ckpt)
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][name])


# --- resume and seeds -------------------------------------------------------------------------


def test_resume_continues_where_the_last_run_stopped(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(RunConfig(tiny(epochs=1), out, workers=1))
    first = state(out)
    assert first["epoch"] == 1 and len(first["history"]) == 1

    train(RunConfig(tiny(epochs=2), out, workers=1), resume=True)
    resumed = state(out)
    assert resumed["epoch"] == 2
    assert len(resumed["history"]) == 2
    assert resumed["history"][0] == first["history"][0]
    assert resumed["history"][1]["epoch"] == 2
    with (out / LOG_CSV).open(newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]

    train(RunConfig(tiny(epochs=1), out, workers=1))  # no --resume: a fresh run from epoch 1
    fresh = state(out)
    assert fresh["epoch"] == 1 and len(fresh["history"]) == 1
    assert same_weights(fresh["model"], first["model"])


def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    train(RunConfig(tiny(epochs=1), tmp_path, workers=1), resume=True)
    assert state(tmp_path)["epoch"] == 1


def test_resumed_run_equals_an_uninterrupted_one(
    short_run: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RunConfig(short_run.preset, tmp_path, workers=1)
    interrupted(cfg, monkeypatch)
    train(cfg, resume=True)
    resumed, full = state(tmp_path), state(short_run.out)
    assert resumed["epoch"] == full["epoch"] == 2
    assert same_weights(resumed["model"], full["model"])
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]


def test_same_seed_same_weights_other_seed_other_weights(short_run: RunConfig, tmp_path: Path) -> None:
    again = RunConfig(short_run.preset, tmp_path / "again", workers=1)
    other = RunConfig(short_run.preset, tmp_path / "other", workers=1, seed=1)
    train(again)
    train(other)
    assert same_weights(state(again.out)["model"], state(short_run.out)["model"])
    assert not same_weights(state(other.out)["model"], state(short_run.out)["model"])


def test_fresh_run_does_not_reuse_another_runs_training_data(tmp_path: Path) -> None:
    """bank.npz is a cache for --resume; a new run in the same folder (e.g. the default
    runs/PRESET, now with --data, another dose or more phantoms) must not train on the old bank."""
    train(RunConfig(tiny(epochs=1, phantoms=2), tmp_path, workers=1))
    assert len(Bank.load(tmp_path / "bank.npz")) == 2
    train(RunConfig(tiny(epochs=1, phantoms=3), tmp_path, workers=1))
    assert len(Bank.load(tmp_path / "bank.npz")) == 3


def test_init_from_starts_at_the_earlier_runs_weights(short_run: RunConfig, tmp_path: Path) -> None:
    """Fine-tuning: with a zero learning rate the new run keeps exactly the weights it started from."""
    source = short_run.out / CHECKPOINT
    frozen = with_overrides(short_run.preset, lr=0.0, epochs=1)
    cfg = RunConfig(frozen, tmp_path / "tuned", workers=1, seed=5, init_from=source)
    train(cfg)
    assert same_weights(state(cfg.out)["model"], state(short_run.out)["model"])
    assert state(cfg.out)["run"]["init_from"] == str(source)
    fresh = RunConfig(frozen, tmp_path / "fresh", workers=1, seed=5)
    train(fresh)
    assert not same_weights(state(fresh.out)["model"], state(short_run.out)["model"])


def test_init_from_refuses_a_checkpoint_of_another_net(short_run: RunConfig, tmp_path: Path) -> None:
    wider = with_overrides(short_run.preset, net=with_overrides(TINY, width=16))
    with pytest.raises(ValueError, match="differs"):
        train(RunConfig(wider, tmp_path, workers=1, init_from=short_run.out / CHECKPOINT))


def test_init_from_a_wider_dncnn_narrows_it(short_run: RunConfig, tmp_path: Path) -> None:
    """--width below the source's: the run starts from the wide net narrowed on its bank's
    patches (train.prune), which predicts like the wide net far better than a fresh start."""
    narrow = with_overrides(short_run.preset, lr=0.0, epochs=1, net=with_overrides(TINY, width=5))
    cfg = RunConfig(narrow, tmp_path / "narrow", workers=1, init_from=short_run.out / CHECKPOINT)
    train(cfg)
    fresh = RunConfig(narrow, tmp_path / "fresh", workers=1)
    train(fresh)
    assert state(cfg.out)["net"]["width"] == 5 and state(cfg.out)["model"]["body.0.weight"].shape[0] == 5
    wide, small, new = (net_from_checkpoint(state(run.out)) for run in (short_run, cfg, fresh))
    x, _ = sample(Bank.load(cfg.out / "bank.npz"), np.random.default_rng(9), 4, 32, 1)
    with torch.no_grad():
        target = wide(x)
        assert float(((small(x) - target) ** 2).mean()) < 0.25 * float(((new(x) - target) ** 2).mean())


def test_init_from_a_model_package_starts_at_its_weights(short_run: RunConfig, tmp_path: Path) -> None:
    """Shipped models carry no checkpoint: their ONNX file's weights are the starting point."""
    from train.export import export

    export(short_run.out / CHECKPOINT, tmp_path / "package")
    frozen = with_overrides(short_run.preset, lr=0.0, epochs=1)
    cfg = RunConfig(frozen, tmp_path / "tuned", workers=1, init_from=tmp_path / "package")
    train(cfg)
    assert same_weights(state(cfg.out)["model"], state(short_run.out)["model"])
    wider = with_overrides(frozen, net=with_overrides(TINY, width=16))
    with pytest.raises(ValueError, match="differs"):
        train(RunConfig(wider, tmp_path / "wider", workers=1, init_from=tmp_path / "package"))
    (tmp_path / "package" / "model.onnx").write_bytes(b"not the exported file")
    with pytest.raises(ValueError, match="sha256"):
        train(RunConfig(frozen, tmp_path / "broken", workers=1, init_from=tmp_path / "package"))


def test_init_from_may_change_only_an_sr_nets_base(tmp_path: Path) -> None:
    """The base interpolation has no weights: a bilinear-based SR net's weights start a
    Lanczos-based one; anything else about the net must match (a denoiser's transform: next test)."""
    sr = tiny("mr-sr2", net=NetSpec("srnet", depth=1, width=8, unshuffle=1, scale=2), epochs=1)
    train(RunConfig(sr, tmp_path / "bilinear", workers=1))
    source = tmp_path / "bilinear" / CHECKPOINT
    lanczos = with_overrides(sr, lr=0.0, net=with_overrides(sr.net, base_taps=3))
    cfg = RunConfig(lanczos, tmp_path / "lanczos", workers=1, init_from=source)
    train(cfg)
    assert same_weights(state(cfg.out)["model"], state(tmp_path / "bilinear")["model"])
    assert state(cfg.out)["net"]["base_taps"] == 3
    deeper = with_overrides(lanczos, net=with_overrides(lanczos.net, depth=2))
    with pytest.raises(ValueError, match="differs"):
        train(RunConfig(deeper, tmp_path / "deeper", workers=1, init_from=source))


def test_init_from_may_change_a_denoisers_transform(tmp_path: Path) -> None:
    """A linear denoiser's weights start an asinh one (the transform has no weights)."""
    dn = tiny("mr-denoise", net=NetSpec("dncnn", depth=3, width=8, unshuffle=2), epochs=1)
    train(RunConfig(dn, tmp_path / "linear", workers=1))
    asinh = with_overrides(dn, lr=0.0, net=with_overrides(dn.net, transform="asinh"))
    cfg = RunConfig(asinh, tmp_path / "asinh", workers=1, init_from=tmp_path / "linear" / CHECKPOINT)
    train(cfg)
    assert same_weights(state(cfg.out)["model"], state(tmp_path / "linear")["model"])
    assert state(cfg.out)["net"]["transform"] == "asinh"


# --- self-supervised (Neighbor2Neighbor) ------------------------------------------------------


def test_neighbour_pair_picks_two_different_pixels_of_each_cell() -> None:
    first = torch.arange(8 * 10, dtype=torch.float32).view(1, 1, 8, 10)
    x = torch.cat([first, first + 1000], dim=1)  # a second context slice
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = neighbour_pair(x, gen)
        assert a.shape == b.shape == (1, 2, 4, 5)
        assert torch.equal(a[:, 1], a[:, 0] + 1000) and torch.equal(b[:, 1], b[:, 0] + 1000)  # same picks per slice
        for i in range(4):
            for j in range(5):
                cell = {float(v) for v in x[0, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten()}
                pa, pb = float(a[0, 0, i, j]), float(b[0, 0, i, j])
                assert pa in cell and pb in cell
                assert pa != pb


def test_neighbour_pair_draws_every_position_and_crops_odd_sizes() -> None:
    x = torch.arange(64 * 64, dtype=torch.float32).view(1, 1, 64, 64)
    a, b = neighbour_pair(x, torch.Generator().manual_seed(1))
    # offset of the picked pixel inside its 2x2 cell: 0, 1, 64 or 65
    base = x[0, 0, ::2, ::2]
    offsets = set((a[0, 0] - base).unique().tolist()) | set((b[0, 0] - base).unique().tolist())
    assert offsets == {0.0, 1.0, 64.0, 65.0}
    odd = torch.rand(3, 1, 7, 9)
    a, b = neighbour_pair(odd, torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (3, 1, 3, 4)


def test_neighbour_pair_is_reproducible_from_the_generator() -> None:
    x = torch.rand(2, 1, 16, 16)
    a1, b1 = neighbour_pair(x, torch.Generator().manual_seed(7))
    a2, b2 = neighbour_pair(x, torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_neighbour_pair_on_cuda() -> None:
    """Self-supervised training on --device cuda: the batch lives on the GPU, the sub-sampling
    generator on the CPU."""
    x = torch.rand(2, 1, 16, 16, device="cuda")
    a, b = neighbour_pair(x, torch.Generator().manual_seed(0))
    assert a.device == b.device == x.device and a.shape == (2, 1, 8, 8)


def test_self_supervised_run_on_noisy_dicom(self_supervised_run: RunConfig) -> None:
    out = self_supervised_run.out
    ckpt = state(out)
    assert ckpt["epoch"] == 2
    assert ckpt["run"]["self_supervised"] is True
    assert ckpt["run"]["data"] == [str(p) for p in self_supervised_run.data]
    for row in ckpt["history"]:
        assert math.isfinite(row["train_loss"])
        assert not any(k.startswith("val") for k in row)  # no clean targets, nothing to validate on
    bank = Bank.load(out / "bank.npz")
    assert bank.inputs.shape == (3, 1, 64, 64) and bank.targets.shape[0] == 0
    assert (out / LOG_CSV).is_file()
    assert (out / CURVES_PNG).read_bytes()[:8] == PNG_MAGIC


def test_self_supervised_needs_images_of_the_presets_modality(tmp_path: Path, noisy_series: Path) -> None:
    cfg = RunConfig(tiny("mr-denoise"), tmp_path, data=(noisy_series,), self_supervised=True, workers=1)
    with pytest.raises(ValueError, match="no MR series"):
        train(cfg)


def test_self_supervised_resume_equals_an_uninterrupted_run(
    self_supervised_run: RunConfig, noisy_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = self_supervised(tmp_path, noisy_series)
    interrupted(cfg, monkeypatch)
    train(cfg, resume=True)
    resumed, full = state(tmp_path), state(self_supervised_run.out)
    assert resumed["epoch"] == 2
    assert resumed["history"][0]["train_loss"] == full["history"][0]["train_loss"]  # same first epoch...
    # ...and the same second one: the sub-sampling generator must continue, not restart
    assert resumed["history"][1]["train_loss"] == full["history"][1]["train_loss"]
    assert same_weights(resumed["model"], full["model"])


# --- SSIM and the loss ------------------------------------------------------------------------


def test_ssim_is_one_for_identical_images_and_falls_with_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    x = ((xx**2 + yy**2) < 0.5).float()[None, None].repeat(2, 1, 1, 1) * 0.8 + 0.1
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    values = [float(ssim(x + sd * torch.randn(x.shape, generator=gen), x)) for sd in (0.01, 0.05, 0.2)]
    assert 1.0 > values[0] > values[1] > values[2]
    assert float(ssim(x, x + 0.1 * torch.randn(x.shape, generator=gen))) == pytest.approx(
        float(ssim(x + 0.1 * torch.randn(x.shape, generator=gen), x)), abs=0.05
    )


def test_ssim_handles_several_channels() -> None:
    x = torch.rand(2, 3, 32, 32)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim(x, torch.rand(2, 3, 32, 32))) < 0.5


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_with_ssim_term_is_differentiable(kind: str) -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 1, 32, 32)
    pred = (target + 0.1 * torch.randn_like(target)).requires_grad_()
    plain = loss_fn(kind, 0.0)(pred, target)
    expected = F.l1_loss(pred, target) if kind == "l1" else F.mse_loss(pred, target)
    assert float(plain) == pytest.approx(float(expected))
    value = loss_fn(kind, 0.5)(pred, target)
    assert float(value) > float(plain)
    value.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and float(pred.grad.abs().sum()) > 0
    flat = torch.full((1, 1, 16, 16), 0.3)  # a constant target: SSIM's data range falls back to 1
    assert math.isfinite(float(loss_fn(kind, 1.0)(flat + 0.01, flat)))


def test_mean_term_penalises_a_regional_shift_not_noise_of_the_same_size() -> None:
    """Equal pixel MSE, two kinds of error: a uniform 0.01 offset (what moves an ROI's mean HU)
    costs the mean term its full square; a +-0.01 checkerboard (noise) averages out in a 15x15 box."""
    target = torch.rand(2, 1, 48, 48)
    shifted = target + 0.01
    checker = target + 0.01 * (1 - 2 * ((torch.arange(48)[:, None] + torch.arange(48)[None, :]) % 2)).float()
    plain, with_mean = loss_fn("l2", 0.0), loss_fn("l2", 0.0, mean_weight=10.0)
    assert float(plain(shifted, target)) == pytest.approx(1e-4, rel=1e-3)
    assert float(plain(checker, target)) == pytest.approx(1e-4, rel=1e-3)
    assert float(with_mean(shifted, target)) == pytest.approx(11e-4, rel=1e-3)
    assert float(with_mean(checker, target)) == pytest.approx(1e-4, rel=1e-3)  # 1/225 of 0.01 left, squared
    assert local_means(target).shape == (2, 1, 48 - ROI_SIDE + 1, 48 - ROI_SIDE + 1)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_per_level_weighs_every_noise_level_alike(kind: str) -> None:
    """Two pairs, one with 100x the noise level and 100x the error (the same error relative to
    its noise): divided by the level, each costs the same; undivided, the noisy pair is
    10^4 (l2) or 10^2 (l1) times the other and rules the loss."""
    torch.manual_seed(0)
    target = torch.rand(2, 1, 32, 32)
    error = torch.randn(1, 1, 32, 32)
    pred = target + torch.cat([0.001 * error, 0.1 * error])
    level = torch.tensor([0.002, 0.2])
    per_pair = [loss_fn(kind, 0.0, per_level=2.0)(pred[i : i + 1], target[i : i + 1], level[i : i + 1]) for i in (0, 1)]
    assert float(per_pair[0]) == pytest.approx(float(per_pair[1]), rel=1e-4)
    both = loss_fn(kind, 0.0, per_level=2.0)(pred, target, level)
    assert float(both) == pytest.approx(float(per_pair[0]), rel=1e-4)
    plain = [float(loss_fn(kind, 0.0)(pred[i : i + 1], target[i : i + 1])) for i in (0, 1)]
    assert plain[1] / plain[0] == pytest.approx(1e4 if kind == "l2" else 1e2, rel=1e-3)
    half = [
        float(loss_fn(kind, 0.0, per_level=1.0)(pred[i : i + 1], target[i : i + 1], level[i : i + 1])) for i in (0, 1)
    ]
    assert half[1] / half[0] == pytest.approx(1e2 if kind == "l2" else 1e1, rel=1e-3)  # half way, in log terms
    # the local-mean term is absolute (2 HU is 2 HU at any noise): a uniform offset of
    # MEAN_TOLERANCE costs mean_weight at every level; a level under the floor counts as the floor
    with_mean, without = loss_fn(kind, 0.0, mean_weight=1.0, per_level=2.0), loss_fn(kind, 0.0, per_level=2.0)
    for i in (0, 1):
        shifted = target[i : i + 1] + MEAN_TOLERANCE
        extra = with_mean(shifted, target[i : i + 1], level[i : i + 1]) - without(
            shifted, target[i : i + 1], level[i : i + 1]
        )
        assert float(extra) == pytest.approx(1.0, rel=1e-3)
    tiny = loss_fn(kind, 0.0, per_level=2.0)(pred[:1], target[:1], torch.tensor([1e-9]))
    floor = loss_fn(kind, 0.0, per_level=2.0)(pred[:1], target[:1], torch.tensor([LEVEL_FLOOR]))
    assert float(tiny) == pytest.approx(float(floor))
    with pytest.raises(ValueError, match="noise level"):
        loss_fn(kind, 0.0, per_level=2.0)(pred, target)


def test_the_level_is_read_from_the_noise_map_channel() -> None:
    rng = np.random.default_rng(0)
    bank = Bank(
        rng.uniform(0.2, 1.0, (3, 1, 40, 40)).astype(np.float32),
        rng.uniform(0.2, 1.0, (3, 1, 40, 40)).astype(np.float32),
        np.array([0.01, 0.02, 0.03], np.float32),
    )
    x, _ = sample(bank, rng, 6, 16, 1, noise_map=True)
    assert {round(v, 6) for v in noise_map_level(x).tolist()} <= {0.01, 0.02, 0.03}
    assert torch.allclose(noise_map_level(x), x[:, 1].mean(dim=(-2, -1)))


# --- the patch sampler ------------------------------------------------------------------------


def test_sample_denoise_shapes() -> None:
    rng = np.random.default_rng(0)
    bank = Bank(
        rng.uniform(0.2, 1.0, (4, 3, 40, 50)).astype(np.float32),
        rng.uniform(0.2, 1.0, (4, 1, 40, 50)).astype(np.float32),
    )
    x, y = sample(bank, rng, 5, 16, 1)
    assert x.shape == (5, 3, 16, 16) and y.shape == (5, 1, 16, 16)
    assert x.dtype == y.dtype == torch.float32


def test_sample_denoise_target_is_aligned_with_the_input() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 1.0, (3, 1, 40, 40)).astype(np.float32)
    bank = Bank(np.concatenate([image - 0.1, image, image + 0.1], axis=1), image.copy())
    for _ in range(10):
        x, y = sample(bank, rng, 4, 16, 1)
        assert torch.equal(x[:, 1:2], y)
        assert torch.allclose(x[:, 0:1], y - 0.1) and torch.allclose(x[:, 2:3], y + 0.1)


def test_sample_sr_patches_are_aligned() -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(0.1, 1.0, (3, 1, 64, 48)).astype(np.float32)
    blocks = target.reshape(3, 1, 32, 2, 24, 2).mean(axis=(3, 5))
    bank = Bank(blocks.astype(np.float32), target)
    for _ in range(10):
        x, y = sample(bank, rng, 4, 16, 2)
        assert x.shape == (4, 1, 8, 8) and y.shape == (4, 1, 16, 16)
        means = y.view(4, 1, 8, 2, 8, 2).mean(dim=(3, 5))
        assert torch.allclose(x, means, atol=1e-6)


def test_sample_self_supervised_returns_the_input_twice() -> None:
    rng = np.random.default_rng(0)
    bank = Bank(rng.uniform(0.2, 1.0, (2, 1, 32, 32)).astype(np.float32), np.zeros((0, 1, 1, 1), np.float32))
    x, y = sample(bank, rng, 3, 16, 1)
    assert x.shape == y.shape == (3, 1, 16, 16)
    assert torch.equal(x, y)


def test_sample_prefers_patches_with_signal() -> None:
    """Mostly-air patches (near 0 after normalisation) are redrawn: a 16x16 patch of a
    64x64 slice that is air except for a 24x24 bright corner holds signal at 23% of the positions,
    and in 87% of the draws when up to 8 tries are allowed."""
    inputs = np.zeros((1, 1, 64, 64), np.float32)
    inputs[..., :24, :24] = 1.0
    bank = Bank(inputs, inputs.copy())
    x, _ = sample(bank, np.random.default_rng(0), 200, 16, 1)
    bright = (x.mean(dim=(1, 2, 3)) > 0.05).float().mean()
    assert float(bright) > 0.7


def test_a_blind_denoiser_gains_a_noise_map_that_starts_unused(short_run: RunConfig, tmp_path: Path) -> None:
    """--noise-map on a blind net's weights: the map's inputs start at weight 0, so the new net
    gives the blind net's output whatever level it is told; training then learns to use it,
    and export writes a package whose ONNX input has the extra channel."""
    from engines.manifest import load
    from train.export import export

    mapped = with_overrides(short_run.preset, lr=0.0, epochs=1, net=with_overrides(TINY, noise_map=True))
    cfg = RunConfig(mapped, tmp_path / "mapped", workers=1, init_from=short_run.out / CHECKPOINT)
    train(cfg)
    weights = state(cfg.out)["model"]
    blind = state(short_run.out)["model"]
    first = weights["body.0.weight"]
    assert first.shape[1] == blind["body.0.weight"].shape[1] + TINY.unshuffle**2
    assert torch.equal(first[:, : blind["body.0.weight"].shape[1]], blind["body.0.weight"])
    assert not first[:, blind["body.0.weight"].shape[1] :].any()
    net = loop.net_from_checkpoint(state(cfg.out)).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        quiet = net(torch.cat([x, torch.full_like(x, 0.001)], 1))
        loud = net(torch.cat([x, torch.full_like(x, 0.05)], 1))
        assert torch.equal(quiet, loud)
        assert torch.allclose(quiet, loop.net_from_checkpoint(state(short_run.out)).eval()(x))
    bank = Bank.load(cfg.out / "bank.npz")
    assert len(bank.levels) == len(bank) and (bank.levels > 0).all()
    # validation compares with the noisy input, not with the map channel (same validation phantoms)
    val_input = state(cfg.out)["history"][-1]["val_psnr_input"]
    assert val_input == pytest.approx(state(short_run.out)["history"][-1]["val_psnr_input"])
    manifest = export(cfg.out / CHECKPOINT, tmp_path / "package")
    assert manifest.noise_map and load(tmp_path / "package").input_channels == 2
    with pytest.raises(ValueError, match="noise map"):  # and back: a mapped net's weights fit no blind net
        train(RunConfig(short_run.preset, tmp_path / "blind", workers=1, init_from=cfg.out / CHECKPOINT))


def test_a_blind_sr_net_gains_a_noise_map_told_the_nodes_estimate(tmp_path: Path) -> None:
    """An SR net with a noise map (its first convolution, `head`, gains one input weighted 0:
    the blind net's output whatever it is told); its bank's levels are what the node estimates
    from each low-resolution input (the target is another grid, so no added noise can be
    measured), and the export declares the extra channel."""
    from engines import qa
    from engines.manifest import load
    from train.export import export

    # unshuffle is a dncnn's: an srnet ignores it, so the map is one channel whatever it says
    sr = tiny("mr-sr2", net=NetSpec("srnet", depth=1, width=8, unshuffle=2, scale=2), epochs=1)
    train(RunConfig(sr, tmp_path / "blind", workers=1))
    mapped = with_overrides(sr, lr=0.0, net=with_overrides(sr.net, noise_map=True))
    cfg = RunConfig(mapped, tmp_path / "mapped", workers=1, init_from=tmp_path / "blind" / CHECKPOINT)
    train(cfg)
    blind, head = state(tmp_path / "blind")["model"]["head.weight"], state(cfg.out)["model"]["head.weight"]
    assert head.shape[1] == blind.shape[1] + 1 and torch.equal(head[:, :-1], blind) and not head[:, -1].any()
    net = loop.net_from_checkpoint(state(cfg.out)).eval()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        told = [net(torch.cat([x, torch.full_like(x, level)], 1)) for level in (0.001, 0.05)]
        assert torch.equal(told[0], told[1])
        assert torch.allclose(told[0], loop.net_from_checkpoint(state(tmp_path / "blind")).eval()(x))
    bank = Bank.load(cfg.out / "bank.npz")
    estimated = [qa.noise_level(x, sr.normalization) for x in bank.inputs]
    assert np.allclose(bank.levels, estimated) and (bank.levels > 0).all()
    manifest = export(cfg.out / CHECKPOINT, tmp_path / "package")
    assert manifest.noise_map and manifest.task == "sr" and load(tmp_path / "package").input_channels == 2


def test_sampled_patches_carry_their_slices_noise_level() -> None:
    rng = np.random.default_rng(0)
    inputs = rng.uniform(0.2, 0.4, (3, 1, 48, 48)).astype(np.float32)
    bank = Bank(inputs, inputs[:, :1].copy(), np.array([0.01, 0.02, 0.03], np.float32))
    x, _ = sample(bank, rng, 6, 16, 1, noise_map=True)
    assert x.shape == (6, 2, 16, 16)
    for patch in x.numpy():
        level = patch[1, 0, 0]
        assert np.all(patch[1] == level) and np.isclose(level, [0.01, 0.02, 0.03]).any()


def test_the_run_records_the_phantoms_texture_and_blur(tmp_path: Path) -> None:
    """--natural-sd and --phantom-blur change the phantoms, so the run's description (model.toml's
    training) says so."""
    assert "natural_sd" not in RunConfig(tiny("ct-denoise"), tmp_path).describe()
    cfg = RunConfig(tiny("ct-denoise", natural_sd=(1.0, 40.0), phantom_blur=(0.3, 2.5)), tmp_path)
    assert cfg.describe()["natural_sd"] == [1.0, 40.0] and cfg.describe()["phantom_blur"] == [0.3, 2.5]


# --- banks added to a run (--add-bank) -----------------------------------------------------


def test_a_merged_bank_centres_other_sizes_and_keeps_levels() -> None:
    ones = np.ones((1, 1, 8, 8), np.float32)
    own = Bank(ones, 2 * ones, np.array([0.1], np.float32))
    small = Bank(np.full((2, 1, 4, 4), 3, np.float32), np.full((2, 1, 4, 4), 4, np.float32), np.array([0.2, 0.3]))
    large = Bank(np.arange(144, dtype=np.float32).reshape(1, 1, 12, 12), np.zeros((1, 1, 12, 12), np.float32))
    merged = own.merged([small, large])
    assert merged.inputs.shape == (4, 1, 8, 8) and merged.targets.shape == (4, 1, 8, 8)
    assert merged.inputs[1, 0, 2:6, 2:6].tolist() == [[3.0] * 4] * 4  # centred
    assert float(merged.inputs[1].sum()) == 3 * 16 and float(merged.targets[2].sum()) == 4 * 16  # padded with 0
    np.testing.assert_array_equal(merged.inputs[3, 0], large.inputs[0, 0, 2:10, 2:10])  # cropped about the centre
    assert len(merged.levels) == 0  # one bank had none: with_levels computes them all
    assert own.merged([small]).levels.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_a_merged_sr_bank_keeps_each_target_on_its_input() -> None:
    own = Bank(np.zeros((1, 1, 8, 8), np.float32), np.zeros((1, 1, 16, 16), np.float32))
    low = np.zeros((1, 1, 5, 5), np.float32)
    low[0, 0, 2, 2] = 1.0
    high = np.zeros((1, 1, 10, 10), np.float32)
    high[0, 0, 4:6, 4:6] = 1.0  # the same point, upscaled x2
    merged = own.merged([Bank(low, high)])
    (r,), (c,) = np.nonzero(merged.inputs[1, 0])
    assert merged.targets[1, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert float(merged.targets[1].sum()) == 4.0


def test_add_bank_trains_on_both_and_a_resume_does_not_add_it_twice(short_run: RunConfig, tmp_path: Path) -> None:
    added = short_run.out / "bank.npz"
    cfg = RunConfig(tiny(epochs=1, phantoms=3), tmp_path, workers=1, add_banks=(added,))
    train(cfg)
    assert len(Bank.load(tmp_path / "bank.npz")) == 3 + len(Bank.load(added))
    assert state(tmp_path)["run"]["add_banks"] == [str(added)]
    train(replace(cfg, preset=tiny(epochs=2, phantoms=3)), resume=True)
    assert len(Bank.load(tmp_path / "bank.npz")) == 3 + len(Bank.load(added))


def test_banks_of_another_shape_of_input_are_refused() -> None:
    own = Bank(np.zeros((1, 1, 8, 8), np.float32), np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="3-slice inputs at x1 cannot join one of 1-slice inputs at x1"):
        own.merged([Bank(np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 1, 8, 8), np.float32))])
    with pytest.raises(ValueError, match="at x2 cannot join"):
        own.merged([Bank(np.zeros((1, 1, 8, 8), np.float32), np.zeros((1, 1, 16, 16), np.float32))])


def test_a_resumed_bank_must_hold_the_banks_named(short_run: RunConfig, tmp_path: Path) -> None:
    """--resume reuses bank.npz as it is: naming other --add-bank banks than it was built with
    (or naming some when it was built without) is refused, not silently recorded."""
    added = short_run.out / "bank.npz"
    train(RunConfig(tiny(epochs=1), tmp_path / "plain", workers=1))
    with pytest.raises(ValueError, match="not built with these --add-bank banks"):
        train(RunConfig(tiny(epochs=2), tmp_path / "plain", workers=1, add_banks=(added,)), resume=True)
    train(RunConfig(tiny(epochs=1), tmp_path / "mixed", workers=1, add_banks=(added,)))
    with pytest.raises(ValueError, match="not built with these --add-bank banks"):
        train(RunConfig(tiny(epochs=2), tmp_path / "mixed", workers=1), resume=True)
