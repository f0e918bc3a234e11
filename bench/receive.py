"""Receive benchmark: DCMTK storescp vs `enhance-node serve`, side by side in one run.

Sends N synthetic 512x512 CT instances with DCMTK storescu (TCP_NODELAY=1) over one
association, then over 4 concurrent associations, to each receiver in turn, and prints
files/s, MB/s, the ratio enhance-node / storescp, and the CPU time per file of the receiver's
processes and of the whole machine (senders and kernel included) while it ran. Printed,
never asserted (DESIGN.md 5).

    .venv/bin/python bench/receive.py [--count 300] [--repeat 1] [--stat best|median] [--json PATH]

Exit status: 0 when every receiver stored every file in every run, 1 otherwise,
2 when DCMTK is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dicom_factory import write_ct_series  # noqa: E402
from tests.helpers import NodeProcess, dcmtk_env, free_port, toml_config, wait_for  # noqa: E402

STORESCP = "dcmtk storescp"
NODE = "enhance-node"
RECEIVERS = (STORESCP, NODE)
CONCURRENT = 4
MB = 1e6  # MB/s is decimal megabytes (10^6 bytes) of DICOM files sent, per second


@dataclass
class Run:
    receiver: str
    assoc: int
    files: int  # files the receiver holds after the send
    expected: int
    seconds: float | None  # None when the run raised before or during the send
    ok: bool
    error: str = ""
    cpu_seconds: float | None = None  # the receiver's processes, user + system, during the send
    machine_cpu_seconds: float | None = None  # every CPU of the machine busy, during the send


@dataclass
class Row:
    receiver: str
    assoc: int
    files: int
    seconds: float
    files_per_s: float
    mb_per_s: float
    ratio: float | None  # files/s relative to storescp at the same association count
    ok: bool
    runs_seconds: list[float] = field(default_factory=list)
    cpu_ms_per_file: float | None = None  # the receiver's, median over the runs
    machine_cpu_ms_per_file: float | None = None


# -- helpers ------------------------------------------------------------------------------


def which(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        sys.exit(f"{cmd} not found: install DCMTK (Debian package `dcmtk`)")
    return path


def split(files: list[Path], groups: int) -> list[list[Path]]:
    """`groups` contiguous chunks of near-equal size (none empty when len(files) >= groups)."""
    size, extra = divmod(len(files), groups)
    chunks, start = [], 0
    for i in range(groups):
        end = start + size + (1 if i < extra else 0)
        chunks.append(files[start:end])
        start = end
    return [c for c in chunks if c]


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of `root` and every live process under it, with the children each has
    reaped (a storescp --fork child that ended is counted in its parent's cutime)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)"
            pid = int(stat.parent.name)
            children.setdefault(int(fields[1]), []).append(pid)
            ticks[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total * TICK_S


def machine_cpu_seconds() -> float:
    """CPU time every core of the machine has spent busy since boot (/proc/stat; not the time
    a virtual machine's host gave its cores to others, `steal`)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) * TICK_S


@dataclass
class Sent:
    seconds: float
    errors: str
    cpu_seconds: float  # the receiver's (`root` and its processes)
    machine_cpu_seconds: float


def send(port: int, called: str, groups: list[list[Path]], root: int) -> Sent:
    """Start one storescu per group at once (each one association); the wall time, the errors,
    and the CPU the receiver (process `root` and those under it) and the machine spent."""
    storescu = which("storescu")
    env = dcmtk_env()
    with tempfile.TemporaryDirectory(prefix="bench-storescu-") as logdir:
        logs = [Path(logdir) / f"storescu-{i}.log" for i in range(len(groups))]
        procs: list[subprocess.Popen[bytes]] = []
        # every timed run starts with nothing waiting to be written back: without this, what the
        # previous run left in the page cache is flushed during the next one, and the node's
        # syncs (which flush it) made the storescp run after them look faster
        os.sync()
        try:
            cpu0, machine0 = tree_cpu_seconds(root), machine_cpu_seconds()
            t0 = time.perf_counter()
            for group, log in zip(groups, logs, strict=True):
                cmd = [storescu, "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), *map(str, group)]
                with log.open("wb") as out:
                    procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
            codes = [p.wait(timeout=600) for p in procs]
            seconds = time.perf_counter() - t0
            cpu, machine = tree_cpu_seconds(root) - cpu0, machine_cpu_seconds() - machine0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        errors = [
            f"storescu #{i} exited {rc}: {log.read_text(errors='replace')[-800:]}"
            for i, (rc, log) in enumerate(zip(codes, logs, strict=True))
            if rc != 0
        ]
    return Sent(seconds, "\n".join(errors), cpu, machine)


# -- receivers ----------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], group: bool = False) -> None:
    """Stop a receiver; with group=True (storescp --fork) also any children it forked."""
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    elif proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(timeout=30)


def echo_ok(port: int, called: str) -> bool:
    cmd = [which("echoscu"), "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, env=dcmtk_env(), timeout=30).returncode == 0


def run_storescp(files: list[Path], assoc: int, work: Path) -> Run:
    out = work / "received"
    out.mkdir()
    port = free_port()
    cmd = [which("storescp"), *(["--fork"] if assoc > 1 else []), "-aet", "STORESCP", "-od", str(out), str(port)]
    log = work / "storescp.log"
    with log.open("wb") as logf:
        # own process group, so that --fork children are stopped along with the listener
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"storescp exited {proc.returncode}: {log.read_text(errors='replace')}")
            return echo_ok(port, "STORESCP")

        wait_for(ready, 30, what="storescp to listen")
        sent = send(port, "STORESCP", split(files, assoc), proc.pid)
        # storescp writes each file before it answers the C-STORE, so the count is final here
        stored = sum(1 for p in out.iterdir() if p.is_file())
    finally:
        stop_process(proc, group=True)
    return finished(STORESCP, assoc, stored, files, sent)


def finished(receiver: str, assoc: int, stored: int, files: list[Path], sent: Sent, error: str = "") -> Run:
    ok = stored == len(files) and not sent.errors and not error
    error = sent.errors or error
    return Run(receiver, assoc, stored, len(files), sent.seconds, ok, error, sent.cpu_seconds, sent.machine_cpu_seconds)


def run_node(files: list[Path], assoc: int, work: Path) -> Run:
    port = free_port()
    cfg = toml_config(work, port, allowed=[("STORESCU", "127.0.0.1")], receive_processes=0)  # 0: one per core
    node = NodeProcess(cfg, port, work)
    try:
        node.start()  # waits for "enhance-node ready" in its log
        assert node.proc is not None
        sent = send(port, "ENHANCE", split(files, assoc), node.proc.pid)
        # the ledger row is committed before the C-STORE response, so the count is final here
        stored = int(node.query("SELECT count(*) FROM instances")[0][0])
    finally:
        if node.proc is not None:
            try:
                node.stop()
            except subprocess.TimeoutExpired:
                node.kill()
    missing = f"ledger has {stored} instances; node log tail:\n{node.log_text()[-800:]}" if stored != len(files) else ""
    return finished(NODE, assoc, stored, files, sent, missing)


RUNNERS: dict[str, Callable[[list[Path], int, Path], Run]] = {STORESCP: run_storescp, NODE: run_node}


# -- report -------------------------------------------------------------------------------


def summarise(runs: list[Run], total_bytes: int, stat: str) -> list[Row]:
    rows: list[Row] = []
    for assoc in sorted({r.assoc for r in runs}):
        base: float | None = None
        for receiver in RECEIVERS:
            mine = [r for r in runs if r.receiver == receiver and r.assoc == assoc]
            secs = [r.seconds for r in mine if r.seconds is not None]
            if not secs:  # every run raised: nothing to time
                continue
            seconds = min(secs) if stat == "best" else statistics.median(secs)
            files = min(r.files for r in mine)
            fps = mine[0].expected / seconds
            mbps = total_bytes / MB / seconds
            if receiver == STORESCP:
                base = fps
            ratio = fps / base if base else None
            ok = all(r.ok for r in mine)
            cpu = [r.cpu_seconds * 1e3 / r.expected for r in mine if r.cpu_seconds is not None]
            machine = [r.machine_cpu_seconds * 1e3 / r.expected for r in mine if r.machine_cpu_seconds is not None]
            row = Row(receiver, assoc, files, seconds, fps, mbps, ratio, ok, secs)
            row.cpu_ms_per_file = statistics.median(cpu) if cpu else None
            row.machine_cpu_ms_per_file = statistics.median(machine) if machine else None
            rows.append(row)
    return rows


def print_table(rows: list[Row], stat: str, repeat: int) -> None:
    print()
    print(f"seconds = {stat} of {repeat} run(s); ratio = files/s relative to dcmtk storescp at the same assoc")
    print("CPU ms/file (medians): the receiver's processes; the whole machine's (senders, kernel) during the send")
    print(
        f"{'receiver':<18}{'assoc':>6}{'files':>7}{'seconds':>9}{'files/s':>9}{'MB/s':>7}{'ratio':>7}"
        f"{'CPU ms':>8}{'machine':>9}"
    )
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        cpu = f"{r.cpu_ms_per_file:.2f}" if r.cpu_ms_per_file is not None else "-"
        machine = f"{r.machine_cpu_ms_per_file:.2f}" if r.machine_cpu_ms_per_file is not None else "-"
        flag = "" if r.ok else "  INCOMPLETE"
        print(
            f"{r.receiver:<18}{r.assoc:>6}{r.files:>7}{r.seconds:>9.2f}{r.files_per_s:>9.0f}"
            f"{r.mb_per_s:>7.0f}{ratio:>7}{cpu:>8}{machine:>9}{flag}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300, help="instances to send (default 300)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per receiver and association count (default 1)")
    ap.add_argument(
        "--stat",
        choices=("best", "median"),
        default="best",
        help="which of the --repeat runs to report (default best = fastest)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        ap.error("--count and --repeat must be at least 1")
    for cmd in ("storescu", "storescp", "echoscu"):
        if shutil.which(cmd) is None:
            print(f"{cmd} not found: install DCMTK (Debian package `dcmtk`)", file=sys.stderr)
            return 2

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        _, _, files = write_ct_series(tmp / "source", args.count)
        total_bytes = sum(p.stat().st_size for p in files)
        print(
            f"generated {len(files)} CT instances, {total_bytes / MB:.1f} MB "
            f"({total_bytes / len(files) / 1e3:.0f} kB each) in {time.perf_counter() - t0:.1f}s"
        )
        n = 0
        for rep in range(args.repeat):
            for assoc in (1, CONCURRENT):
                for receiver in RECEIVERS:
                    n += 1
                    work = tmp / f"run{n:03d}"  # fresh receiver storage for every run
                    work.mkdir()
                    try:
                        run = RUNNERS[receiver](files, assoc, work)
                    except Exception as exc:  # report and carry on with the other receivers
                        run = Run(receiver, assoc, 0, len(files), None, False, f"{type(exc).__name__}: {exc}")
                    runs.append(run)
                    state = "ok" if run.ok else f"FAILED ({run.files}/{run.expected} stored)"
                    secs = f"{run.seconds:6.2f}s" if run.seconds is not None else "     -"
                    print(f"  run {rep + 1}/{args.repeat} {receiver:<15} assoc={assoc}  {secs}  {state}")
                    if run.error:
                        print("    " + run.error.replace("\n", "\n    "), file=sys.stderr)
                    shutil.rmtree(work, ignore_errors=True)

    rows = summarise(runs, total_bytes, args.stat)
    print_table(rows, args.stat, args.repeat)
    all_ok = all(r.ok for r in runs)
    if not all_ok:
        print("\nSOME RECEIVER DID NOT STORE EVERY FILE (see above)", file=sys.stderr)

    if args.json:
        report = {
            "benchmark": "receive",
            "count": len(files),
            "bytes": total_bytes,
            "mb_unit_bytes": MB,
            "repeat": args.repeat,
            "stat": args.stat,
            "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "ok": all_ok,
            "rows": [asdict(r) for r in rows],
            "runs": [asdict(r) for r in runs],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
