"""`enhance-node ae|dest|route list|add|remove` and `models list`: the configuration an admin
edits (config.toml, comments kept, validated as a whole before it is written; a running node
applies allowed AEs, destinations and routes within seconds, node/live.py) and the models
installed."""

from __future__ import annotations

import argparse
from pathlib import Path

from node import admin
from node.config import Config, load_config

EXIT_OK = 0
APPLIED = "a running node applies it within seconds"


def run_admin(args: argparse.Namespace, path: Path) -> int:
    if args.action == "list":
        cfg = load_config(args.config)
        {"ae": _list_aes, "dest": _list_destinations, "route": _list_routes, "models": _list_models}[args.command](cfg)
        return EXIT_OK
    if args.command == "ae":
        if args.action == "add":
            admin.add_allowed_ae(path, args.ae_title, args.host)
            print(f"allowed {args.ae_title} in {path}; {APPLIED}")
        else:
            admin.remove_allowed_ae(path, args.ae_title)
            print(f"removed {args.ae_title} from {path}; {APPLIED}")
    elif args.command == "dest":
        if args.action == "add":
            admin.add_destination(path, args.name, args.ae_title, args.host, args.port, args.max_attempts)
            print(f"added destination {args.name} ({args.ae_title}@{args.host}:{args.port}) to {path}; {APPLIED}")
        else:
            admin.remove_destination(path, args.name)
            print(f"removed destination {args.name} from {path}; {APPLIED}")
    elif args.action == "add":
        match = {
            key: value
            for key, value in (
                ("modality", args.modality),
                ("calling_ae", args.calling_ae),
                ("series_description", args.description),
                ("image_type", args.image_type or None),
                ("sop_classes", args.sop_class or None),
            )
            if value is not None
        }
        admin.add_route(
            path,
            args.name,
            args.model,
            args.dest,
            match,
            send_back=args.send_back,
            forward_original=args.forward_original,
            chain_from=args.chain_from,
            position=args.position,
        )
        print(f"added route {args.name} to {path}; {APPLIED}")
    else:
        admin.remove_route(path, args.name)
        print(f"removed route {args.name} from {path}; {APPLIED}")
    return EXIT_OK


def _list_aes(cfg: Config) -> None:
    if not cfg.node.allowed:
        print("(no calling AE allowed: every association is rejected)")
    for a in cfg.node.allowed:
        print(f"{a.ae_title:<16}  {a.host or 'any host'}")


def _list_destinations(cfg: Config) -> None:
    if not cfg.destinations:
        print("(no destinations: results stay in the outbox)")
    for d in cfg.destinations:
        print(f"{d.name:<16} {d.ae_title}@{d.host}:{d.port}  max_attempts {d.max_attempts}")


def _list_routes(cfg: Config) -> None:
    if not cfg.routes:
        print("(no routes: completed series are recorded and left alone)")
    for n, r in enumerate(cfg.routes):
        m = r.match
        to = ", ".join(r.destinations) or "outbox only"
        extras = "".join(
            [
                ", send back" if r.send_back else "",
                ", forward original" if r.forward_original else "",
                f", strength {r.strength}, on QA failure {r.on_qa_fail}",
                f", image type {'/'.join(m.image_type)}" if m.image_type else "",
                f", SOP classes {', '.join(m.sop_classes)}" if m.sop_classes else "",
                f", chain from {', '.join(r.chain_from)}" if r.chain_from else "",
            ]
        )
        print(
            f"{n}: {r.name:<16} modality {m.modality}, calling AE {m.calling_ae}, description /{m.series_description}/"
            f" -> {r.model} -> {to}{extras}"
        )


def _list_models(cfg: Config) -> None:
    from engines.manifest import load

    packages = sorted(p.parent for p in cfg.worker.models_dir.glob("*/model.toml"))
    if not packages:
        print(f"(no models under {cfg.worker.models_dir})")
    for package in packages:
        m = load(package)
        noise_map = ", told the noise level" if m.noise_map else ""
        print(f"{m.name} {m.version}: {m.task} x{m.scale} {'/'.join(m.modalities)}{noise_map} ({package})")
        a = m.applies_to
        print(
            f"  applies to: {a.plane} planes, {a.min_matrix}..{a.max_matrix} matrix, "
            f"{a.pixel_spacing_mm[0]:g}..{a.pixel_spacing_mm[1]:g} mm pixels, {'/'.join(a.photometric)}, "
            f"not {'/'.join(a.exclude_image_types) or '-'}"
            + (f", SOP classes {', '.join(a.sop_classes)}" if a.sop_classes else "")
        )
        matrix = m.metrics.get("robustness")
        if matrix:
            bias = f", largest ROI bias {matrix['max_bias']:.2f} HU" if "max_bias" in matrix else ""
            print(
                f"  robustness ({len(matrix['cells'])} conditions, {matrix['simulator']}): worst "
                f"{matrix['worst_cell']} {matrix['worst_gain']:+.2f} dB, mean {matrix['mean_gain']:+.2f} dB{bias}"
            )
        results = m.metrics.get("results", {})
        if results:
            where = ", ".join(str(m.metrics.get(k)) for k in ("degradation", "window") if m.metrics.get(k))
            draws = int(m.metrics.get("realisations", 1))
            noise = f" x {draws} noise draws" if draws > 1 else ""
            print(f"  held-out: {m.metrics.get('slices', '?')} slices{noise} ({where})")
        for method, r in results.items():
            figures = [f"PSNR {r['psnr']:.2f} dB", f"SSIM {r['ssim']:.3f}"]
            if "roi_bias" in r:
                figures.append(f"ROI bias {r['roi_bias']:.2f} HU")
            figures.append(f"{r['seconds']:.3f} s/slice")
            print(f"  {method:<10} {', '.join(figures)}")
