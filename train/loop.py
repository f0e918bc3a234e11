"""The training loop: AdamW, cosine schedule, L1/L2 (+ optional SSIM), AMP on CUDA, a checkpoint
every epoch, --resume, seeds, a progress bar, a CSV log and a PNG of the curves."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from core.errors import ManifestError
from engines import qdq
from engines.manifest import ModelManifest
from engines.manifest import load as load_manifest
from engines.nets import build, parameter_count
from engines.netspec import ACTIVATION_STEPS, NetSpec
from train.data import Bank, build_bank, load_volumes, noisy_bank, phantom_slabs, sample, volume_slabs
from train.metrics import ROI_SIDE
from train.presets import HU, Preset
from train.prune import narrow_dncnn

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG_CSV = "train_log.csv"
CURVES_PNG = "curves.png"


@dataclass(frozen=True)
class RunConfig:
    preset: Preset
    out: Path
    data: tuple[Path, ...] = ()  # DICOM files/folders; empty = procedural phantoms
    self_supervised: bool = False
    seed: int = 0
    device: str = "cpu"
    ssim_weight: float = 0.0
    mean_weight: float = 0.0  # weight of the local-mean term (ROI_SIDE): keeps mean HU in uniform regions
    # the power of each pair's noise level its pixel loss is divided by (loss_fn: 0 = off,
    # 2 = every level alike); needs a noise map
    loss_per_level: float = 0.0
    workers: int = 2
    command: str = ""
    init_from: Path | None = None  # fine-tune: start from this checkpoint's or package's weights (same net)
    add_banks: tuple[Path, ...] = ()  # earlier runs' bank.npz added to this run's (Bank.merged)

    def describe(self) -> dict[str, Any]:
        p = self.preset
        return {
            "preset": p.name,
            "net": p.net.as_dict(),
            "degradation": asdict(p.degradation),
            "normalization": p.normalization.as_dict(),
            "epochs": p.epochs,
            "steps_per_epoch": p.steps_per_epoch,
            "batch": p.batch,
            "draws": p.draws,
            "patch": p.patch,
            "lr": p.lr,
            "loss": p.loss,
            "ssim_weight": self.ssim_weight,
            "mean_weight": self.mean_weight,
            "loss_per_level": self.loss_per_level,
            "seed": self.seed,
            "self_supervised": self.self_supervised,
            "data": [str(d) for d in self.data] or f"procedural {p.modality} phantoms x{p.phantoms}",
            **({"natural_sd": list(p.natural_sd)} if p.natural_sd else {}),
            **({"phantom_blur": list(p.phantom_blur)} if p.modality == "CT" else {}),
            "command": self.command,
            **({"init_from": str(self.init_from)} if self.init_from else {}),  # TOML has no null
            **({"add_banks": [str(b) for b in self.add_banks]} if self.add_banks else {}),
            # where the run trained (export may happen elsewhere)
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {self.device}",
        }


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM with an 11x11 Gaussian window (Wang et al. 2004), differentiable."""
    coords = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = (g / g.sum())[None, None]
    c = x.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, g[..., None].expand(c, 1, 11, 1), groups=c)
        return F.conv2d(t, g[:, :, None].expand(c, 1, 1, 11), groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean()


def local_means(x: torch.Tensor, size: int = ROI_SIDE) -> torch.Tensor:
    return F.avg_pool2d(x, size, stride=1)


# --loss-per-level: the floor of the level a pair's loss is divided by, in normalised units (1 HU
# of the CT window), so that nearly noise-free pairs do not take over the loss
LEVEL_FLOOR = 2.5e-4
# --loss-per-level: what the local-mean term is divided by instead of each pair's level: the 2 HU
# a uniform region may move (issue 17's bar) in normalised units, whatever the noise. A region's
# mean HU is read in absolute terms; divided by the level, the term would let a noisy pair's
# regions drift (a run so made moved ROI means by up to 6.5 HU)
MEAN_TOLERANCE = 2.0 / (HU.hi - HU.lo)


def loss_fn(kind: str, ssim_weight: float, mean_weight: float = 0.0, per_level: float = 0.0) -> Any:
    """The pixel loss, plus w * (1 - SSIM), plus w * the squared error of 15x15 local means: the
    pixel loss barely sees a shift of 2 HU spread over a region (noise dominates it pixel by
    pixel), which is what a radiologist's ROI measures.

    `per_level` = P > 0: each pair's L2 pixel term is divided by its noise level to the power P, an
    L1 pixel term by the level to P / 2 (the level is the noise map's channel, the input's last).
    With P = 2 an error of a tenth of the noise costs the same at 1 HU as at 300 HU: the loss
    weighs every noise level alike, as the dB gain does, instead of being ruled by the noisiest
    pairs; P = 1 goes half way. The local-mean term is divided by MEAN_TOLERANCE to the power P
    at every level: with P = 2, a mean error of 2 HU costs what a pixel error of the noise's size does."""
    base = F.l1_loss if kind == "l1" else F.mse_loss

    def per_pair(pred: torch.Tensor, target: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        if not per_level:
            return base(pred, target)
        if level is None:
            raise ValueError("a per-level loss needs each pair's noise level")
        weight = level.clamp_min(LEVEL_FLOOR) ** -(per_level / 2 if kind == "l1" else per_level)
        return torch.mean(base(pred, target, reduction="none").flatten(1).mean(1) * weight)

    def loss(pred: torch.Tensor, target: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        value = per_pair(pred, target, level)
        if ssim_weight > 0:
            value = value + ssim_weight * (1 - ssim(pred, target, data_range=float(target.max() - target.min()) or 1.0))
        if mean_weight > 0:
            means = F.mse_loss(local_means(pred), local_means(target)) / MEAN_TOLERANCE**per_level
            value = value + mean_weight * means
        return value

    return loss


def noise_map_level(x: torch.Tensor) -> torch.Tensor:
    """Each input's noise level (N,): the constant last channel `train.data.sample` appends."""
    return x[:, -1, 0, 0]


def neighbour_pair(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbor2Neighbor sub-sampling: from every 2x2 cell take two different random pixels,
    giving two half-size images with independent noise and (nearly) the same signal."""
    n, c, h, w = x.shape
    cells = F.pixel_unshuffle(x[..., : h // 2 * 2, : w // 2 * 2], 2).view(n, c, 4, h // 2, w // 2)
    first = torch.randint(0, 4, (n, 1, 1, h // 2, w // 2), generator=gen)
    second = ((first + torch.randint(1, 4, first.shape, generator=gen)) % 4).to(x.device)
    first = first.to(x.device)  # drawn on the CPU generator so runs are reproducible on any device
    pick = lambda idx: cells.gather(2, idx.expand(n, c, 1, h // 2, w // 2)).squeeze(2)  # noqa: E731
    return pick(first), pick(second)


def _centre(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1] // 2
    return x[:, c : c + 1]


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Trains and returns the checkpoint path; the checkpoint carries everything export needs."""
    preset = cfg.preset
    if cfg.loss_per_level and not preset.net.noise_map:
        raise ValueError("--loss-per-level divides by the noise map's level: add --noise-map")
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    model = build(preset.net).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=1e-4)
    total = preset.epochs * preset.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start_epoch, history, gen_state = 0, [], None
    ckpt_path = cfg.out / CHECKPOINT
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"], state["history"]
        gen_state = state.get("pair_rng")
        log.info("resuming %s at epoch %d", preset.name, start_epoch + 1)
    initial = None
    if not start_epoch and cfg.init_from is not None:  # checked before the bank is built: a wrong source fails fast
        initial = _source_weights(model, cfg.init_from, preset.net, device)
    bank, val = _banks(cfg, reuse=resume)
    steps_given = bool(start_epoch)  # a quantised net's activation steps: resumed, or from its source
    if initial is not None:
        weights = _narrowed(*initial, preset, device, bank)
        steps_given = ACTIVATION_STEPS in weights
        model.load_state_dict(weights, strict=steps_given or preset.net.quantize == "none")
        log.info("starting from the weights in %s", cfg.init_from)
    if preset.net.quantize != "none" and not steps_given:
        _calibrate(model, bank, preset, device)
    log.info(
        "%s: %d training slices, %d validation slices, %d parameters",
        preset.name,
        len(bank),
        len(val),
        parameter_count(model),
    )
    criterion = loss_fn(preset.loss, cfg.ssim_weight, cfg.mean_weight, cfg.loss_per_level)
    gen = torch.Generator().manual_seed(cfg.seed)
    if start_epoch and gen_state is not None:
        gen.set_state(gen_state)
    scale = preset.net.scale
    for epoch in range(start_epoch, preset.epochs):
        model.train()
        started, losses = time.monotonic(), []
        bar = tqdm(
            range(preset.steps_per_epoch),
            desc=f"{preset.name} epoch {epoch + 1}/{preset.epochs}",
            unit="step",
            dynamic_ncols=True,
        )
        for _ in bar:
            x, y = sample(bank, rng, preset.batch, preset.patch, scale, preset.net.noise_map)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                if cfg.self_supervised:
                    loss = _neighbour_loss(model, x, gen)
                else:
                    level = noise_map_level(x) if preset.net.noise_map else None
                    loss = criterion(model(x), y, level)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.5f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        bar.close()
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            **_validate(model, val, cfg, device),
            "lr": sched.get_last_lr()[0],
            "seconds": round(time.monotonic() - started, 1),
        }
        history.append(row)
        log.info("epoch %d: %s", epoch + 1, json.dumps(row))
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "pair_rng": gen.get_state(),
                "epoch": epoch + 1,
                "history": history,
                "net": preset.net.as_dict(),
                "run": cfg.describe(),
                "preset": preset.name,
            },
            ckpt_path.with_suffix(".tmp"),
        )
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # a kill mid-save keeps the previous epoch
        _write_log(cfg.out, history)
    return ckpt_path


def _source_weights(
    model: nn.Module, path: Path, net: NetSpec, device: torch.device
) -> tuple[dict[str, torch.Tensor], int]:
    """Weights of an earlier run's checkpoint, or of a model package (a shipped model's, or a
    site's), as the starting point, and the source's width. The net must be the same, except for
    an SR net's base interpolation and a denoiser's transform (and its relax), which have no
    weights (training then adapts the weights to the new base or domain), and a dncnn's width,
    which may be narrower (_narrowed)."""
    source, weights = _package_weights(path, model) if path.is_dir() else _checkpoint_weights(path, device)
    narrower = net.kind == "dncnn" and net.width < source.width
    same = replace(
        source,
        base_taps=net.base_taps,
        transform=net.transform,
        noise_map=net.noise_map,
        relax=net.relax,
        quantize=net.quantize,  # a float source quantised: its activation steps are calibrated
        width=net.width if narrower else source.width,
    )
    if same != net:
        raise ValueError(f"{path}: its net {source.as_dict()} differs from this run's {net.as_dict()}")
    if net.noise_map and not source.noise_map:  # a blind net gains the map's inputs, weighted 0 to start
        srnet = net.kind == "srnet"  # its head sees the map as one channel; a dncnn's, unshuffled
        first, channels = ("head.weight", 1) if srnet else ("body.0.weight", net.unshuffle**2)
        old = weights[first]
        extra = torch.zeros(old.shape[0], channels, *old.shape[2:], dtype=old.dtype, device=old.device)
        weights = {**weights, first: torch.cat([old, extra], dim=1)}
    elif source.noise_map and not net.noise_map:
        raise ValueError(f"{path}: its net takes a noise map; this run's does not (add --noise-map)")
    if net.quantize == "none":  # an int8 source's weights, trained on: its activation steps go
        weights = {k: v for k, v in weights.items() if k != ACTIVATION_STEPS}
    return weights, source.width


def _calibrate(model: nn.Module, bank: Bank, preset: Preset, device: torch.device) -> None:
    """A quantised net from float (or random) weights: its activation steps from 8 batches of the bank."""
    rng = np.random.default_rng(1)  # apart from the training's random state
    batches = [sample(bank, rng, preset.batch, preset.patch, 1, preset.net.noise_map)[0].to(device) for _ in range(8)]
    steps = model.calibrate(batches)  # type: ignore[operator]  # DnCNN.calibrate
    log.info("activation steps calibrated: %s", ", ".join(f"{s:.4f}" for s in steps))


def _narrowed(
    weights: dict[str, torch.Tensor], width: int, preset: Preset, device: torch.device, bank: Bank
) -> dict[str, torch.Tensor]:
    """`weights` of a net `width` channels wide, narrowed to the preset's width when that is less,
    on 256 patches of the training bank (train.prune). The channels are chosen on the float
    net's activations; a quantised net's steps are then calibrated again (train)."""
    net = preset.net
    if net.width == width:
        return weights
    wide = build(replace(net, width=width, quantize="none")).to(device)
    wide.load_state_dict({k: v for k, v in weights.items() if k != ACTIVATION_STEPS})
    rng = np.random.default_rng(0)  # apart from the training's random state
    patches = [sample(bank, rng, 16, preset.patch, net.scale, net.noise_map)[0] for _ in range(16)]
    log.info("narrowing the source from %d to %d channels", width, net.width)
    return narrow_dncnn(wide, net.width, (p.to(device) for p in patches))


def source_net(path: Path) -> NetSpec:
    """The net of the checkpoint or model package a fine-tune starts from."""
    if path.is_dir():
        return NetSpec(**_manifest(path).net)
    return NetSpec(**torch.load(path, map_location="cpu", weights_only=False)["net"])


def _manifest(path: Path) -> ModelManifest:
    """A model package's manifest (its load checks model.onnx against its sha256); ValueError if bad."""
    try:
        return load_manifest(path)
    except ManifestError as exc:
        raise ValueError(str(exc)) from None


def _checkpoint_weights(path: Path, device: torch.device) -> tuple[NetSpec, dict[str, torch.Tensor]]:
    state = torch.load(path, map_location=device, weights_only=False)
    return NetSpec(**state["net"]), state["model"]


def _package_weights(path: Path, model: nn.Module) -> tuple[NetSpec, dict[str, torch.Tensor]]:
    """A model package's weights: export keeps the parameters' names as the ONNX initialisers'
    (a quantised net's dequantised, engines.qdq)."""
    return source_net(path), _onnx_weights(path, model)


def _onnx_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights from a package's model.onnx (a float source has no activation steps:
    they are calibrated)."""
    state = qdq.state_of(onnx.load(str(path / "model.onnx")).graph)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state) - {ACTIVATION_STEPS})
    if missing:
        raise ValueError(f"{path}: model.onnx lacks the weights {', '.join(missing[:3])}")
    return {k: torch.from_numpy(state[k]) for k in wanted if k in state}


def _neighbour_loss(model: nn.Module, x: torch.Tensor, gen: torch.Generator, gamma: float = 1.0) -> torch.Tensor:
    g1, g2 = neighbour_pair(x, gen)
    out1 = model(g1)
    with torch.no_grad():
        full = model(x)
    f1, f2 = neighbour_pair(full, gen)  # a different draw: only the regulariser's expectation matters
    diff = out1 - _centre(g2)
    return torch.mean(diff**2) + gamma * torch.mean((diff - (f1 - f2)) ** 2)


def _banks(cfg: RunConfig, reuse: bool) -> tuple[Bank, Bank]:
    """The training bank (saved in the run folder, reused by --resume only) and a small held-out
    validation bank."""
    preset, cache = cfg.preset, cfg.out / ".cache"
    path = cfg.out / "bank.npz"
    added_list = cfg.out / "bank-added.txt"  # the banks bank.npz holds besides the run's own
    names = "".join(f"{b}\n" for b in cfg.add_banks)
    if reuse and path.exists():
        if (added_list.read_text() if added_list.exists() else "") != names:
            raise ValueError(
                f"{path} was not built with these --add-bank banks: drop --resume to build it again, "
                "or name the banks it was built with"
            )
        bank = Bank.load(path)
    else:
        if cfg.self_supervised:
            bank = noisy_bank(preset, load_volumes(list(cfg.data), preset.modality))
        elif cfg.data:
            slabs = list(volume_slabs(load_volumes(list(cfg.data), preset.modality), preset.net.context_slices))
            bank = build_bank(preset, slabs, cfg.seed, cfg.workers, cache)
        else:
            slabs = list(phantom_slabs(preset, preset.phantoms, cfg.seed))
            bank = build_bank(preset, slabs, cfg.seed, cfg.workers, cache)
        if cfg.add_banks:  # each bank's levels taken on its own slices, before any padding
            added = [Bank.load(p) for p in cfg.add_banks]
            if preset.net.noise_map:
                bank, added = (
                    bank.with_levels(preset.normalization),
                    [b.with_levels(preset.normalization) for b in added],
                )
            bank = bank.merged(added)
        added_list.write_text(names)
    if preset.net.noise_map:
        bank = bank.with_levels(preset.normalization)
    bank.save(path)
    if cfg.self_supervised:
        return bank, bank
    val_slabs = list(phantom_slabs(preset, 4, seed=cfg.seed + 10_000))  # phantoms never seen in training
    val = build_bank(preset, val_slabs, cfg.seed + 10_000, cfg.workers, cache)
    return bank, val.with_levels(preset.normalization) if preset.net.noise_map else val


@torch.no_grad()
def _validate(model: nn.Module, val: Bank, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    if cfg.self_supervised:
        return {}
    model.eval()
    mse, base = [], []
    for i in range(len(val)):
        x = torch.from_numpy(val.inputs[i : i + 1]).to(device)
        y = torch.from_numpy(val.targets[i : i + 1]).to(device)
        ref = F.interpolate(_centre(x), size=y.shape[-2:], mode="bicubic") if cfg.preset.net.scale > 1 else _centre(x)
        if cfg.preset.net.noise_map:
            x = torch.cat([x, torch.full_like(x[:, :1], float(val.levels[i]))], dim=1)
        pred = model(x)
        mse.append(float(F.mse_loss(pred, y)))
        base.append(float(F.mse_loss(ref, y)))
    psnr = lambda m: 10 * math.log10(1.0 / max(m, 1e-12))  # noqa: E731
    return {
        "val_mse": float(np.mean(mse)),
        "val_psnr": psnr(float(np.mean(mse))),
        "val_psnr_input": psnr(float(np.mean(base))),
    }


def _write_log(out: Path, history: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with (out / LOG_CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_yscale("log")
    ax1.legend()
    if "val_psnr" in history[0]:
        ax2.plot(epochs, [r["val_psnr"] for r in history], "o-", label="model")
        ax2.plot(epochs, [r["val_psnr_input"] for r in history], "--", label="input / bicubic")
        ax2.set_ylabel("validation PSNR (dB, normalised units)")
        ax2.set_xlabel("epoch")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(out / CURVES_PNG, dpi=80)
    plt.close(fig)


def package_state(path: Path) -> dict[str, Any]:
    """A model package's weights as a checkpoint's state (the model, its net and preset), so a
    package can be averaged with runs fine-tuned from it (train.export.averaged)."""
    manifest = _manifest(path)  # read (and model.onnx hashed) once
    spec = NetSpec(**manifest.net)
    return {
        "model": _onnx_weights(path, build(spec)),
        "net": spec.as_dict(),
        "preset": manifest.training.get("preset", ""),
    }


def net_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    model = build(NetSpec(**state["net"]))
    model.load_state_dict(state["model"])
    return model.eval()
