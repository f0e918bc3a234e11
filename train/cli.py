"""`enhance-node train | evaluate | export`: argument parsing here (no torch import, so the
node's own commands stay fast), the work in train.loop / train.evaluate / train.export."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from core.errors import UsageError
from engines.netspec import QUANTIZE, TRANSFORMS
from train.presets import PRESETS

COMMANDS = ("train", "evaluate", "export")

TRAIN_HELP = """\
Train a model from a preset. Without --data the net learns from procedural phantoms (nothing
is downloaded); with --data it degrades your own clean DICOM series with the preset's physics
(low-dose CT simulation, Rician MR noise, or x2 resolution loss); with --self-supervised it
learns from your noisy series alone (Neighbor2Neighbor), no clean images needed.
The run folder gets checkpoint.pt (every epoch), train_log.csv and curves.png; then
`enhance-node export RUN --out models/NAME` makes the model package."""

EVALUATE_HELP = """\
Measure a model package against classical filters on held-out images: PSNR and SSIM (CT in
the soft-tissue window -160..240 HU, MR in the 0.5-99.5 percentile window), RMSE in HU,
mean-HU bias and noise SD in uniform regions, seconds per slice. Baselines: non-local means
(sigma passed explicitly) and total variation for denoising, BM3D with --bm3d; bicubic and
Lanczos for x2. Writes report.md and panel.png (input / baseline / model / target / difference).

A bias is what a method does to mean HU on average: with --realisations 8 it is measured on
the outputs averaged over 8 noise draws; with one draw the figure includes the noise left in
a small ROI's mean (about 1-2 HU at 25% dose), which no filter removes."""

EXPORT_HELP = """\
Export a training run's checkpoint to a model package: model.onnx (opset 17, dynamic batch,
height and width) and model.toml (normalisation, tiling, training provenance, metrics).
Checks that ONNX Runtime reproduces torch's output before writing.
Given several runs of one net (fine-tunes from one --init-from), exports the average of their
weights (a model soup), recorded in model.toml as averaged_from."""


# Degradation ranges `train` takes as --NAME LO HI, each a field of train.presets.Degradation
DEGRADATION_RANGES = (
    ("dose", "low-dose CT: dose fraction range, e.g. 0.25 0.25"),
    ("sigma_percent", "MR: Rician noise SD range, %% of the bright signal"),
    ("noise_sd", "low-dose CT: the added noise's SD range in HU (log-uniform); 0 0 = as the physics gives it"),
    ("texture_sd", "denoisers: the scan's own noise kept in the target (HU for CT, %% for MR); 0 0 = none"),
    ("sharpen", "low-dose CT: edge enhancement after reconstruction (bone kernels), amount range; 0 0 = none"),
    ("white_fraction", "low-dose CT: share of the added noise's variance that is pixel-independent, range"),
    ("white_slope", "low-dose CT: that share's power rises as |f|^slope to the grid's corners, range; 0 0 = white"),
    ("post_smooth_px", "low-dose CT: Gaussian smoothing after reconstruction, both images, sigma range in px"),
)


def add_parsers(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser(
        "train", help="train a denoising or super-resolution model", description=TRAIN_HELP, formatter_class=fmt
    )
    t.add_argument("--preset", required=True, choices=sorted(PRESETS), help="what to train (the shipped models)")
    t.add_argument("--out", type=Path, help="run folder (default: runs/PRESET)")
    t.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[],
        metavar="PATH",
        help="DICOM files or folders (any layout) to train on instead of phantoms",
    )
    t.add_argument(
        "--add-bank",
        type=Path,
        nargs="+",
        default=[],
        metavar="BANK",
        help="training pairs of earlier runs (their bank.npz) added to this run's, each slice centred "
        "in this run's size (padded with air or cropped): e.g. phantoms and your own series together",
    )
    t.add_argument("--self-supervised", action="store_true", help="train on noisy --data without clean targets")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument(
        "--init-from",
        type=Path,
        metavar="CHECKPOINT|PACKAGE",
        help="fine-tune: start from the weights of an earlier run's checkpoint.pt or of a model package "
        "such as models/ct-denoise (same net; it keeps the source's --base-taps and --transform unless given; "
        "a denoiser given a smaller --width starts from the source narrowed to it, train.prune)",
    )
    t.add_argument("--epochs", type=int)
    t.add_argument("--steps-per-epoch", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--patch", type=int, help="target patch side in pixels")
    t.add_argument("--lr", type=float, help="peak learning rate (AdamW, cosine decay)")
    t.add_argument("--loss", choices=["l1", "l2"])
    t.add_argument("--ssim-weight", type=float, default=0.0, help="add w * (1 - SSIM) to the loss")
    t.add_argument(
        "--mean-weight",
        type=float,
        default=0.0,
        help="add w * the squared error of 15x15 local means (mean HU in uniform regions) to the loss",
    )
    t.add_argument(
        "--loss-per-level",
        type=float,
        nargs="?",
        const=2.0,
        default=0.0,
        metavar="POWER",
        help="divide each pair's pixel loss by its noise level to POWER (default 2: every noise level "
        "counts alike; 1: half way; the local-mean term by a fixed 2 HU tolerance); needs --noise-map",
    )
    t.add_argument("--phantoms", type=int, help="number of phantom slabs when no --data is given")
    for flag, what in (
        (
            "--natural-sd",
            "CT phantoms: the photograph texture's SD in HU, drawn log-uniformly (default: uniformly 5-40)",
        ),
        ("--phantom-blur", "CT phantoms: the PSF sigma in pixels of the half that is blurred (default 0.3 1)"),
    ):
        t.add_argument(flag, type=float, nargs=2, metavar=("LO", "HI"), help=what)
    t.add_argument(
        "--noise-map",
        action="store_true",
        help="give the net each series' noise level as an extra input (FFDNet-style); SR nets are told the "
        "level the node estimates from the low-resolution input",
    )
    t.add_argument("--draws", type=int, help="degraded versions (acquisition conditions) of each clean slab")
    t.add_argument("--depth", type=int, help="convolutions (denoiser) or residual blocks (SR)")
    t.add_argument("--width", type=int, help="feature channels")
    t.add_argument("--context-slices", type=int, choices=[1, 3, 5], help="1 = 2-D, 3 or 5 = 2.5-D")
    t.add_argument(
        "--base-taps",
        type=int,
        help="SR: the interpolation the net adds its residual to: 0 = bilinear, A = Lanczos-A windowed sinc",
    )
    t.add_argument(
        "--transform",
        choices=TRANSFORMS,
        help="denoiser: remove the noise from the linear image or from its asinh (which compresses "
        "air and bone so strong edges stay small beside the noise)",
    )
    t.add_argument(
        "--relax",
        type=float,
        help="denoiser with asinh and a noise map: divide the transform's gain by 1 + RELAX x gain x "
        "the noise level, so it is nearly linear where the noise is large (0 = fixed gain)",
    )
    t.add_argument(
        "--quantize",
        choices=QUANTIZE,
        help="denoiser: int8 trains the convolutions between the first and the last on 8-bit "
        "activations and weights (quantisation-aware), exported as a QDQ graph ONNX Runtime runs "
        "~2.5x faster (its convolutions) on a CPU with VNNI; a fine-tune keeps its source's unless given",
    )
    for name, text in DEGRADATION_RANGES:
        t.add_argument(f"--{name.replace('_', '-')}", type=float, nargs=2, metavar=("LO", "HI"), help=text)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    t.add_argument("--workers", type=int, default=2, help="processes that simulate the training data")

    e = sub.add_parser(
        "evaluate",
        help="compare a model with classical filters on held-out images",
        description=EVALUATE_HELP,
        formatter_class=fmt,
    )
    e.add_argument("model", type=Path, help="model package folder (model.onnx + model.toml)")
    e.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[],
        metavar="PATH",
        help="clean DICOM series to degrade and restore (default: pydicom-data's test images)",
    )
    e.add_argument("--dose", type=float, default=0.25, help="low-dose CT: simulated dose fraction")
    e.add_argument("--sigma-percent", type=float, default=5.0, help="MR: Rician noise SD, %% of the bright signal")
    e.add_argument("--out", type=Path, help="report folder (default: MODEL/evaluation)")
    e.add_argument("--max-slices", type=int, default=8, help="evaluate at most this many slices")
    e.add_argument("--update-manifest", action="store_true", help="record the metrics in the model's model.toml")
    e.add_argument("--seed", type=int, default=0, help="seed of the first noise realisation")
    e.add_argument(
        "--realisations",
        type=int,
        default=1,
        metavar="N",
        help="denoising: N independent noise draws per slice (seeds SEED..SEED+N-1); mean HU bias is "
        "measured on each method's output averaged over them, apart from the noise in one draw",
    )
    e.add_argument(
        "--bm3d",
        action="store_true",
        help="denoising: add BM3D (correlated-noise profile, given the noise spectrum) as a baseline; "
        "needs 'pip install bm3d', licensed for non-commercial use only, ~10 s a 512x512 slice",
    )

    x = sub.add_parser(
        "export", help="turn a training run into a model package", description=EXPORT_HELP, formatter_class=fmt
    )
    x.add_argument(
        "run",
        type=Path,
        nargs="+",
        help="training run folder (or its checkpoint.pt); several: averaged, a model package among them "
        "(e.g. the one the last run was fine-tuned from)",
    )
    x.add_argument("--out", type=Path, required=True, help="model package folder, e.g. models/ct-denoise")
    x.add_argument("--name", help="model name (default: the preset's)")
    x.add_argument("--version", default="1.0.0")


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("needs the training extra: pip install 'enhance-node[train]'") from None
    if args.command == "train":
        return _train(args)
    if args.command == "evaluate":
        from train.evaluate import evaluate_cli

        return evaluate_cli(args)
    from train.export import export_cli

    return export_cli(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from train.loop import RunConfig, source_net, train
    from train.metrics import ROI_SIDE
    from train.presets import Degradation, with_overrides

    preset = PRESETS[args.preset]
    if args.self_supervised and not args.data:
        raise UsageError("--self-supervised needs --data (your noisy series)")
    if args.self_supervised and preset.task != "denoise":
        raise UsageError("--self-supervised trains denoisers only")
    missing = [str(b) for b in args.add_bank if not b.is_file()]
    if missing:
        raise UsageError(f"--add-bank: no bank at {', '.join(missing)} (a run folder's bank.npz)")
    if args.add_bank and args.self_supervised:
        raise UsageError("--add-bank adds supervised pairs; --self-supervised has no targets")
    if args.init_from is not None and not (args.init_from.is_file() or (args.init_from / "model.toml").is_file()):
        raise UsageError(f"--init-from {args.init_from}: neither a checkpoint nor a model package")
    base_taps, transform, noise_map, relax = args.base_taps, args.transform, args.noise_map, args.relax
    quantize = args.quantize
    if args.init_from is not None:  # a fine-tune keeps the base and transform it was trained with unless told
        try:
            source = source_net(args.init_from)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        base_taps = source.base_taps if base_taps is None else base_taps
        transform = source.transform if transform is None else transform
        noise_map = noise_map or source.noise_map
        quantize = source.quantize if quantize is None else quantize
        if relax is None:  # part of the source's asinh transform: kept with it, not with another
            relax = source.relax if transform == source.transform else 0.0
    net = with_overrides(
        preset.net,
        depth=args.depth,
        width=args.width,
        context_slices=args.context_slices,
        base_taps=base_taps,
        transform=transform,
        noise_map=noise_map or None,
        relax=relax,
        quantize=quantize,
    )
    ranges = {name: getattr(args, name) for name, _ in DEGRADATION_RANGES}
    deg: Degradation = with_overrides(
        preset.degradation, **{name: tuple(value) if value else None for name, value in ranges.items()}
    )
    preset = with_overrides(
        preset,
        net=net,
        degradation=deg,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch=args.batch,
        patch=args.patch,
        lr=args.lr,
        loss=args.loss,
        phantoms=args.phantoms,
        draws=args.draws,
        natural_sd=tuple(args.natural_sd) if args.natural_sd else None,
        phantom_blur=tuple(args.phantom_blur) if args.phantom_blur else None,
    )
    counts = {
        "--epochs": preset.epochs,
        "--steps-per-epoch": preset.steps_per_epoch,
        "--batch": preset.batch,
        "--phantoms": preset.phantoms,
        "--draws": preset.draws,
        "--workers": args.workers,
    }
    for flag, count in counts.items():
        if count < 1:
            raise UsageError(f"{flag} must be at least 1")
    if (args.natural_sd or args.phantom_blur) and preset.modality != "CT":
        raise UsageError("--natural-sd and --phantom-blur shape the CT phantoms")
    if args.natural_sd and not 0 < args.natural_sd[0] <= args.natural_sd[1]:
        raise UsageError("--natural-sd LO HI needs 0 < LO <= HI")
    if args.phantom_blur and not 0 <= args.phantom_blur[0] <= args.phantom_blur[1]:
        raise UsageError("--phantom-blur LO HI needs 0 <= LO <= HI")
    if preset.patch % max(1, preset.net.scale * preset.net.unshuffle) != 0:
        raise UsageError("--patch must be a multiple of the scale and unshuffle factor")
    if args.mean_weight < 0 or args.ssim_weight < 0:
        raise UsageError("--mean-weight and --ssim-weight must be >= 0")
    if args.mean_weight > 0 and preset.patch < ROI_SIDE:
        raise UsageError(
            f"--mean-weight compares {ROI_SIDE}x{ROI_SIDE} local means: --patch must be at least {ROI_SIDE}"
        )
    if not 0.0 <= args.loss_per_level <= 2.0:
        raise UsageError("--loss-per-level POWER must be between 0 and 2")
    if args.self_supervised and (args.mean_weight or args.ssim_weight or args.loss_per_level):
        raise UsageError(
            "--mean-weight, --ssim-weight and --loss-per-level apply to supervised training (no clean targets here)"
        )
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = RunConfig(
        preset=preset,
        out=args.out or Path("runs") / preset.name,
        data=tuple(args.data),
        self_supervised=args.self_supervised,
        seed=args.seed,
        device=device,
        ssim_weight=args.ssim_weight,
        mean_weight=args.mean_weight,
        loss_per_level=args.loss_per_level,
        workers=args.workers,
        command=shlex.join(["enhance-node", *args.argv]),
        init_from=args.init_from,
        add_banks=tuple(args.add_bank),
    )
    try:
        path = train(cfg, resume=args.resume)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(path)
    return 0
