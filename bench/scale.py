"""Worker scaling: series per minute with 1, 2 and 4 worker processes on a PostgreSQL ledger,
side by side with 1 worker on the embedded SQLite ledger, on the same data (issue 20 item 5).

N synthetic CT series (tests/dicom_factory.py, written once) go through each configuration in
turn, each with a fresh ledger and storage directory:

1. `enhance-node serve --role worker` starts with K worker processes, each single-threaded
   (`worker.threads = 1`, the default `--threads`), and waits for jobs.
2. `enhance-node serve --role scp` receives every series over one DCMTK storescu association;
   its series completion routes them, all at once, to one job each on the shipped ct-denoise.
   It is stopped once the N jobs are queued, so the workers run alone.
3. Series per minute is N over the time from the first job started to the last job done, by
   the ledger's own timestamps: process start-up and receiving are left out, each worker's
   model load (in its first job) is in.

PostgreSQL is a throw-away server started for the run (tests/postgres.py: initdb and pg_ctl
into a temp dir on a free loopback port, fsync off), with a new database per configuration.
Figures are printed, never asserted (DESIGN 5): take them on a quiet machine (the load average
is printed with them; a busy machine hides what a second worker adds).

    .venv/bin/python bench/scale.py [--series 24] [--slices 16] [--size 256] [--workers 1,2,4]
                                    [--threads 1] [--repeat 1] [--json PATH]
    .venv/bin/python bench/scale.py --series 4 --slices 4 --size 64     # a quick check that it runs

Exit status: 0 when every configuration processed every series, 1 otherwise, 2 when DCMTK, the
PostgreSQL server or psycopg is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from storage import schema as t  # noqa: E402
from storage.db import make_engine  # noqa: E402
from tests.dicom_factory import write_ct_series  # noqa: E402
from tests.helpers import NodeProcess, ct_route, free_port, storescu, toml_config, wait_for  # noqa: E402
from tests.postgres import PostgresServer, PostgresUnavailable, find_bindir  # noqa: E402

SQLITE, POSTGRESQL = "sqlite", "postgresql"


@dataclass
class Run:
    ledger: str
    workers: int
    series: int  # jobs done
    seconds: float  # first job started -> last job done
    job_seconds: float  # mean time of one job (started -> done)
    error: str = ""

    @property
    def per_minute(self) -> float:
        return 60.0 * self.series / self.seconds if self.seconds > 0 else 0.0


def _config(folder: Path, port: int, workers: int, threads: int) -> Path:
    return toml_config(
        folder,
        port,
        idle_seconds=0.5,
        receive_processes=1,
        worker_processes=workers,
        worker=f'models_dir = "{REPO / "models"}"\nthreads = {threads}',
        extra=ct_route(""),  # every CT series a job on ct-denoise, delivered nowhere
    )


def run_one(ledger: str, url: str | None, workers: int, threads: int, files: list[Path], series: int, tmp: Path) -> Run:
    """One configuration on a fresh ledger (`url`, or a new SQLite file) and storage directory.
    The workers start first and wait: the jobs appear at once (the series complete together,
    routed in one transaction), so every worker starts on them within its idle poll."""
    folder = Path(tempfile.mkdtemp(prefix=f"{ledger}-{workers}-", dir=tmp))
    port = free_port()
    config = _config(folder, port, workers, threads)
    env = {"ENHANCE_NODE_LEDGER_URL": url} if url else {}  # else the SQLite file in `folder`
    engine = make_engine(url or f"sqlite:///{folder / 'ledger.db'}")
    nodes = {role: NodeProcess(config, port, folder / role, roles=role, env=env) for role in ("worker", "scp")}
    jobs = t.jobs

    def count(*where: Any) -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(jobs).where(*where)).scalar_one())

    try:
        for node in nodes.values():
            node.tmp.mkdir()
            node.start()
        sent = storescu(port, files)
        if sent.returncode != 0:
            return Run(ledger, workers, 0, 0.0, 0.0, f"storescu failed: {sent.stderr[-300:]}")
        wait_for(lambda: count() == series, timeout=120, interval=0.1, what=f"{series} jobs to be queued")
        nodes["scp"].stop()  # the workers run alone
        wait_for(
            lambda: count(jobs.c.state.in_((t.JOB_QUEUED, t.JOB_RUNNING))) == 0,
            timeout=300 + 120 * series,
            interval=0.1,
            what="every job to end",
        )
        with engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, jobs.c.started_at, jobs.c.finished_at, jobs.c.error)).all()
    except AssertionError as exc:  # a node that would not start, or a wait that timed out
        return Run(ledger, workers, 0, 0.0, 0.0, str(exc).splitlines()[0])
    finally:
        for node in nodes.values():
            node.stop()
        engine.dispose()
        shutil.rmtree(folder, ignore_errors=True)
    done = [r for r in rows if r.state == t.JOB_DONE]
    failed = [r.error for r in rows if r.state != t.JOB_DONE]
    if not done:
        return Run(ledger, workers, 0, 0.0, 0.0, f"no job done: {failed[:1]}")
    seconds = (max(r.finished_at for r in done) - min(r.started_at for r in done)).total_seconds()
    mean_job = statistics.fmean((r.finished_at - r.started_at).total_seconds() for r in done)
    error = f"{len(failed)} jobs failed: {failed[0]}" if failed else ""
    return Run(ledger, workers, len(done), seconds, mean_job, error)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", type=int, default=24, help="series per configuration (default 24)")
    p.add_argument("--slices", type=int, default=16, help="slices per series (default 16)")
    p.add_argument("--size", type=int, default=256, help="rows and columns of each slice (default 256)")
    p.add_argument("--workers", default="1,2,4", help="worker process counts on PostgreSQL (default 1,2,4)")
    p.add_argument("--threads", type=int, default=1, help="worker.threads of each worker process (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration, interleaved; the median")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    missing = [what for what, ok in (("storescu (Debian package dcmtk)", shutil.which("storescu")),) if not ok]
    bindir = find_bindir()
    if bindir is None:
        missing.append("the PostgreSQL server (Debian package postgresql)")
    if importlib.util.find_spec("psycopg") is None:
        missing.append("psycopg (pip install -e '.[postgres]')")
    if missing:
        print(f"bench/scale.py: {' and '.join(missing)} not found", file=sys.stderr)
        return 2
    assert bindir is not None
    configurations = [(SQLITE, 1), *((POSTGRESQL, n) for n in counts)]
    load = os.getloadavg()[0]
    print(
        f"{args.series} series x {args.slices} slices {args.size}x{args.size} CT through ct-denoise, "
        f"workers of {args.threads} thread(s); {os.cpu_count()} cores, load average {load:.2f} at start",
        flush=True,
    )
    if load > 0.5:
        print("  the machine is busy: these figures are not the ones to quote (take them on a quiet machine)")
    server = PostgresServer(bindir)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="enhance-scale-") as tmp_name:
        tmp = Path(tmp_name)
        files = []
        for k in range(args.series):  # the same data for every configuration
            files += write_ct_series(tmp / "data" / str(k), args.slices, rows=args.size, cols=args.size)[2]
        try:
            server.start()
            for repeat in range(args.repeat):
                for ledger, workers in configurations:
                    url = server.url(server.create_database()) if ledger == POSTGRESQL else None
                    started = time.monotonic()
                    run = run_one(ledger, url, workers, args.threads, files, args.series, tmp)
                    runs.append(run)
                    took = time.monotonic() - started
                    print(
                        f"  run {repeat + 1}: {ledger} x{workers}: {run.series} series in {run.seconds:.1f} s"
                        f" ({took:.0f} s with receiving and start-up){' ' + run.error if run.error else ''}",
                        flush=True,
                    )
        except PostgresUnavailable as exc:
            print(f"bench/scale.py: PostgreSQL would not start: {exc}", file=sys.stderr)
            return 2
        finally:
            server.stop()
    rows = []
    for ledger, workers in configurations:
        mine = [r for r in runs if (r.ledger, r.workers) == (ledger, workers)]
        rows.append((ledger, workers, statistics.median(r.per_minute for r in mine), mine))
    base = next((rate for ledger, workers, rate, _ in rows if (ledger, workers) == (POSTGRESQL, 1)), 0.0)
    print(f"\n{'ledger':<12}{'workers':>8}{'series':>8}{'seconds':>9}{'s/job':>7}{'series/min':>12}  vs 1 worker")
    for ledger, workers, rate, mine in rows:
        run = sorted(mine, key=lambda r: r.per_minute)[len(mine) // 2]
        ratio = f"{rate / base:.2f}" if base else "-"
        print(
            f"{ledger:<12}{workers:>8}{run.series:>8}{run.seconds:>9.1f}{run.job_seconds:>7.2f}{rate:>12.1f}  {ratio}"
        )
    print("(vs 1 worker: series/min over that of 1 worker on PostgreSQL, measured in the same run)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "host": platform.node(),
            "cores": os.cpu_count(),
            "load_average_at_start": load,
            "runs": [asdict(r) | {"per_minute": r.per_minute} for r in runs],
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    ok = all(r.series == args.series and not r.error for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
