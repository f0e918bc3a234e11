"""What group commit buys on this disk (issue 19, item 9): the time per instance file to make N
files durable, written one after another by storage.filestore.FileStore.write (temp file,
rename, one syncfs: a group of one; concurrent associations share that sync) and as other
group commits would (N temp files written, then one durability point for all of them: each
fsynced and one folder fsync, or one syncfs(2) before and one after the renames). Also the page cache alone
(no sync), which is what DCMTK storescp does. Printed, never asserted (DESIGN.md 5).

    .venv/bin/python bench/durable_write.py [--size 525000] [--batches 1 4 8] [--repeat 3] [--dir var/bench]

Run it on the disk the node's storage_dir is on, with the machine quiet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.filestore import FileStore, syncfs  # noqa: E402


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temps(root: Path, data: bytes, n: int) -> list[Path]:
    temps = []
    for _ in range(n):
        path = root / "tmp" / uuid.uuid4().hex
        path.write_bytes(data)
        temps.append(path)
    return temps


def node_today(store: FileStore, root: Path, folder: Path, data: bytes, n: int) -> None:
    for _ in range(n):
        store.write(str((folder / uuid.uuid4().hex).relative_to(root)), data)


def group_fsync(store: FileStore, root: Path, folder: Path, data: bytes, n: int) -> None:
    temps = _write_temps(root, data, n)
    for path in temps:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    for path in temps:
        os.rename(path, folder / uuid.uuid4().hex)
    fsync_dir(folder)


def group_syncfs(store: FileStore, root: Path, folder: Path, data: bytes, n: int) -> None:
    temps = _write_temps(root, data, n)
    syncfs(root)
    for path in temps:
        os.rename(path, folder / uuid.uuid4().hex)
    syncfs(root)


def page_cache(store: FileStore, root: Path, folder: Path, data: bytes, n: int) -> None:
    for _ in range(n):
        (folder / uuid.uuid4().hex).write_bytes(data)


WAYS: dict[str, Callable[[FileStore, Path, Path, bytes, int], None]] = {
    "node, one write at a time": node_today,
    "group: fsync each, 1 folder fsync": group_fsync,
    "group: syncfs, rename, syncfs": group_syncfs,
    "page cache only (storescp)": page_cache,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=525_000, help="bytes per file (a 512x512 CT instance)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="files per durability point")
    p.add_argument("--files", type=int, default=48, help="files per measurement")
    p.add_argument("--repeat", type=int, default=3, help="measurements per way, interleaved; the median is shown")
    p.add_argument("--dir", type=Path, default=REPO / "var" / "bench")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    data = os.urandom(args.size)
    root = Path(tempfile.mkdtemp(prefix="durable-", dir=args.dir))
    try:
        store = FileStore(root, min_free_bytes=0)
        (root / "tmp").mkdir(exist_ok=True)
        print(f"{args.size} bytes a file, {args.files} files a measurement, median of {args.repeat}, under {root}")
        print(f"{'way':36} {'batch':>5} {'ms/file':>8} {'files/s':>8} {'ratio':>6}")
        for batch in args.batches:
            times: dict[str, list[float]] = {name: [] for name in WAYS}
            for _ in range(args.repeat):
                for name, way in WAYS.items():  # interleaved: drift hits every way alike
                    folder = root / "objects" / uuid.uuid4().hex
                    folder.mkdir(parents=True)
                    started = time.perf_counter()
                    for _ in range(max(1, args.files // batch)):
                        way(store, root, folder, data, batch)
                    times[name].append((time.perf_counter() - started) / (max(1, args.files // batch) * batch))
                    shutil.rmtree(folder)
            base = statistics.median(times["node, one write at a time"])
            for name, values in times.items():
                ms = statistics.median(values)
                print(f"{name:36} {batch:5d} {ms * 1e3:8.2f} {1 / ms:8.0f} {base / ms:6.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
