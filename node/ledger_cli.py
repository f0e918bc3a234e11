"""`enhance-node ledger migrate --to URL`: move the configured SQLite ledger into an empty
database (normally PostgreSQL) with the node stopped; storage/transfer.py does the work and
says what it refuses. docs/deployment.md has the procedure around it."""

from __future__ import annotations

import argparse

from node.config import ENV_LEDGER_URL, Config
from storage.transfer import TransferReport, copy_ledger

EXIT_OK = 0


def run_ledger(args: argparse.Namespace, cfg: Config) -> int:
    report = copy_ledger(cfg.node.ledger_url, args.to)
    print(summary(report))
    return EXIT_OK


def summary(report: TransferReport) -> str:
    lines = [f"copied {report.source} -> {report.target} (schema revision {report.revision})"]
    width = max(len(c.name) for c in report.tables)
    lines += [f"  {c.name:<{width}} {c.rows:>10}" for c in report.tables]
    lines.append(
        f"{report.rows} rows in {len(report.tables)} tables in {report.seconds:.1f} s; "
        "row counts verified, id sequences set past the copied ids"
    )
    left = report.leftovers
    if left.running_jobs or left.sending_deliveries or left.open_associations:
        lines.append(
            f"note: the node was not stopped cleanly ({left.running_jobs} jobs running, {left.sending_deliveries} "
            f"deliveries sending, {left.open_associations} associations open); copied as they are: workers and "
            "senders re-queue them once their heartbeat is stale, and a receiving node closes its own "
            "associations as lost when it starts"
        )
    lines.append(
        f"next: set node.ledger_url (or {ENV_LEDGER_URL}) to the --to URL ({report.target}) on every host, "
        "start the node and check `enhance-node jobs list`; keep the SQLite file as a backup and start no node on it"
    )
    return "\n".join(lines)
