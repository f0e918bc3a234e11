"""The `enhance-node` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad usage/config."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import NoReturn

from core.errors import ConfigError, EnhanceNodeError, UsageError
from node import __version__
from node.config import default_config_path, load_config
from node.logs import FORMATS, LogSettings, configure_logging
from train.cli import COMMANDS as TRAIN_COMMANDS
from train.cli import add_parsers as add_training_parsers
from train.cli import run as run_training_command

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 2 (argparse prints the whole usage otherwise)."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="enhance-node", description="DICOM node that enhances low-dose and fast scans.")
    p.add_argument("--version", action="version", version=f"enhance-node {__version__}")
    p.add_argument(
        "--config",
        type=Path,
        help="configuration file (default: $ENHANCE_NODE_CONFIG, then ./config.toml, else built-in defaults)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=FORMATS, help="text lines, or one JSON object per line")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from node.serve import ROLES

    s = sub.add_parser("serve", help="run the node: receive, process and deliver")
    s.add_argument(
        "--role",
        default="all",
        help=f"what this process runs: all (default), or a comma-separated set of {', '.join(ROLES)} "
        "(completion runs with scp; the dashboard only where named)",
    )

    e = sub.add_parser("echo", help="C-ECHO a peer: exit 0 when it answers success")
    e.add_argument("peer", help="AE@HOST:PORT, e.g. PACS@127.0.0.1:4242")
    e.add_argument("--calling-ae", help="our AE title (default: node.ae_title)")
    e.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the peer")

    ae = sub.add_parser("ae", help="calling AE titles allowed to store to this node")
    ae_sub = ae.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ae_sub.add_parser("list", help="list allowed calling AEs")
    add = ae_sub.add_parser("add", help="allow a calling AE (optionally only from one IP address)")
    add.add_argument("ae_title")
    add.add_argument("--host", help="the only IP address this AE may connect from")
    ae_sub.add_parser("remove", help="stop allowing a calling AE").add_argument("ae_title")

    dest = sub.add_parser("dest", help="destinations: the PACS (and other AEs) results are stored to")
    dest_sub = dest.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dest_sub.add_parser("list", help="list destinations")
    dadd = dest_sub.add_parser("add", help="add a destination")
    dadd.add_argument("name", help="what routes call it, e.g. pacs")
    dadd.add_argument("ae_title", help="its AE title (the called AE)")
    dadd.add_argument("host", help="its IP address or host name")
    dadd.add_argument("port", type=int)
    dadd.add_argument("--max-attempts", type=int, help="tries before a delivery is failed (default 8)")
    dest_sub.add_parser("remove", help="remove a destination no route uses").add_argument("name")

    route = sub.add_parser("route", help="routes: which series go through which model to which destinations")
    route_sub = route.add_subparsers(dest="action", required=True, parser_class=_Parser)
    route_sub.add_parser("list", help="list routes in the order they are tried (first match wins)")
    radd = route_sub.add_parser("add", help="add a route (last, or at --position)")
    radd.add_argument("name")
    radd.add_argument("--model", required=True, help="a model folder under worker.models_dir")
    radd.add_argument("--modality", help="match this modality (e.g. CT); default any")
    radd.add_argument("--calling-ae", help="match calling AEs with this glob (e.g. CT*); default any")
    radd.add_argument("--description", help="match series descriptions with this regular expression")
    radd.add_argument("--image-type", action="append", default=[], help="a value every image's ImageType has (repeat)")
    radd.add_argument("--sop-class", action="append", default=[], help="a SOP class UID or keyword to match (repeat)")
    radd.add_argument("--chain-from", action="append", default=[], help="a model whose output this route may process")
    radd.add_argument("--dest", action="append", default=[], help="destination name (repeat for several)")
    radd.add_argument("--send-back", action="store_true", help="also send results back to the calling AE")
    radd.add_argument("--forward-original", action="store_true", help="also forward the source series")
    radd.add_argument("--position", type=int, help="0 = tried first")
    route_sub.add_parser("remove", help="remove a route").add_argument("name")

    dash = sub.add_parser("dashboard", help="the web dashboard's admin password")
    dash.add_subparsers(dest="action", required=True, parser_class=_Parser).add_parser(
        "hash-password",
        help="read a password (prompt, or stdin) and print the hash for dashboard.admin_password_hash",
    )

    models = sub.add_parser("models", help="installed model packages")
    models.add_subparsers(dest="action", required=True, parser_class=_Parser).add_parser(
        "list", help="each model with its task, version and held-out metrics"
    )

    jobs = sub.add_parser("jobs", help="processing jobs and their deliveries, from the ledger")
    jobs_sub = jobs.add_subparsers(dest="action", required=True, parser_class=_Parser)
    jl = jobs_sub.add_parser("list", help="the newest jobs with the state of their deliveries")
    jl.add_argument(
        "--state",
        choices=["queued", "running", "done", "failed", "skipped"],
        help="only jobs in this state; skipped: the series routing processed none of, with the reason",
    )
    jl.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    jobs_sub.add_parser("show", help="one job: timings, error, each delivery, instances not stored").add_argument(
        "id", type=int
    )
    jobs_sub.add_parser(
        "retry", help="queue a failed job again and resubmit its failed deliveries (fresh attempts)"
    ).add_argument("id", type=int)
    jobs_sub.add_parser("cancel", help="stop a queued or running job and its unfinished deliveries").add_argument(
        "id", type=int
    )

    led = sub.add_parser("ledger", help="the ledger database")
    led_sub = led.add_subparsers(dest="action", required=True, parser_class=_Parser)
    mig = led_sub.add_parser(
        "migrate",
        help="copy this node's SQLite ledger (node.ledger_url) into an empty database, with the node stopped",
    )
    mig.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="the new ledger, e.g. postgresql+psycopg://enhance@db.example/enhance (the password may come from "
        "PGPASSWORD or ~/.pgpass); it is brought to the newest schema first",
    )

    en = sub.add_parser("engines", help="inference backends and TensorRT plans")
    en_sub = en.add_subparsers(dest="action", required=True, parser_class=_Parser)
    en_sub.add_parser("list", help="which backends can run here, and the models they would load")
    build = en_sub.add_parser("build", help="pre-build TensorRT plans (default: every model a route uses)")
    build.add_argument("models", nargs="*", help="model names under worker.models_dir")

    add_training_parsers(sub)
    return p


GLOBAL_OPTIONS = ("--config", "--log-level", "--log-format")  # each takes one value


def globals_first(argv: list[str]) -> list[str]:
    """The global options moved in front of the subcommand, so `enhance-node serve --config
    PATH` (DESIGN 3.1) means `enhance-node --config PATH serve`. Everything else keeps its
    order; `--` ends the options as usual."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS and "=" in arg:
            front.append(arg)
        elif arg in GLOBAL_OPTIONS and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(globals_first(given))
    args.argv = given  # recorded by `train` as its provenance
    configure_logging(LogSettings(logging.getLevelName(args.log_level), args.log_format))
    try:
        if args.command == "serve":
            from node.serve import parse_roles, serve

            try:
                roles = parse_roles(args.role)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            return serve(load_config(args.config), roles)
        if args.command == "echo":
            return _echo(args)
        if args.command in TRAIN_COMMANDS:
            return run_training_command(args)
        if args.command == "engines":
            return _engines(args)
        if args.command == "jobs":
            from node.jobs_cli import run_jobs

            return run_jobs(args, load_config(args.config))
        if args.command == "ledger":
            from node.ledger_cli import run_ledger

            return run_ledger(args, load_config(args.config))
        if args.command == "dashboard":
            return _hash_password()
        from node.admin_cli import run_admin

        return run_admin(args, args.config or default_config_path())
    except ConfigError as exc:
        print(f"enhance-node: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"enhance-node {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EnhanceNodeError as exc:
        print(f"enhance-node: {exc}", file=sys.stderr)
        return EXIT_FAILURE


_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[0-9a-fA-F:]+\]|[^:@]+):(?P<port>\d{1,5})$")


def _echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.sender import association_failure

    m = _PEER.match(args.peer)
    if not m or not 0 < int(m["port"]) < 65536:
        print(f"enhance-node: error: peer must be AE@HOST:PORT, not {args.peer!r}", file=sys.stderr)
        return EXIT_USAGE
    calling = args.calling_ae or load_config(args.config).node.ae_title
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(m["host"].strip("[]"), int(m["port"]), ae_title=m["ae"])
    if not assoc.is_established:
        print(f"echo {args.peer}: {association_failure(assoc, args.peer)}", file=sys.stderr)
        return EXIT_FAILURE
    rsp = assoc.send_c_echo()
    assoc.release()
    code = getattr(rsp, "Status", None)
    if code != 0x0000:
        print(f"echo {args.peer}: failed (status {code})", file=sys.stderr)
        return EXIT_FAILURE
    print(f"echo {args.peer}: success")
    return EXIT_OK


def _engines(args: argparse.Namespace) -> int:
    from engines.manifest import load
    from engines.registry import EngineOptions, backend_status, build_plans

    cfg = load_config(args.config)
    if args.action == "list":
        for name, reason in backend_status(cfg.worker.device).items():
            print(f"{name:<12} {'available' if reason is None else 'unavailable: ' + reason}")
        for package in sorted(p.parent for p in cfg.worker.models_dir.glob("*/model.toml")):
            m = load(package)
            print(f"model {m.name} {m.version}: {m.task} x{m.scale} {'/'.join(m.modalities)} ({package})")
        return EXIT_OK
    names = args.models or sorted({r.model for r in cfg.routes})
    if not names:
        raise UsageError("no models named and no routes configured")
    w = cfg.worker
    options = EngineOptions("tensorrt", w.device, w.threads, w.max_batch, w.plan_cache)
    for name, plan in build_plans([w.models_dir / n for n in names], options):
        print(f"{name}: {plan}")
    return EXIT_OK


def _hash_password() -> int:
    import getpass

    from node.dashboard.auth import hash_password

    password = getpass.getpass("admin password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise UsageError("the password must have at least 8 characters")
    print(hash_password(password))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
