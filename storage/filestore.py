"""The file store: instances as blobs, written so that a kill at any moment leaves either the
whole file under its final name or nothing but a temp file that start-up discards, and made
durable by one file-system sync shared by the writes waiting at that moment (group commit).

Layout under storage_dir:
    tmp/<host>/<random>.part          being written by that host; never an instance
    objects/<study>/<series>/<sop>_<sha256[:12]>.dcm
    outbox/<output series>/<sop>.dcm  the derived instances the worker writes (kept after delivery)
    quarantine/                       files found at start-up that cannot be parsed
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from core.errors import OutOfResources
from core.header import Buffer

TMP_DIR = "tmp"
OBJECTS_DIR = "objects"
OUTBOX_DIR = "outbox"
QUARANTINE_DIR = "quarantine"
TMP_SUFFIX = ".part"
OBJECT_SUFFIX = ".dcm"
SYNCER_IDLE_S = 5.0  # a group commit thread with nothing to sync for this long ends
_SAFE_UID = re.compile(r"^[0-9.]{1,64}$")


def _component(uid: str) -> str:
    """A UID as a path component: itself when it is a well-formed UID, else a hash of it."""
    if _SAFE_UID.match(uid) and not uid.startswith("."):
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


def content_matches_name(rel: str, sha256: str) -> bool:
    """Whether an object file's bytes hash to the sha256 prefix its name carries (object_path):
    not so for a file whose write a power cut interrupted before its sync."""
    stem = Path(rel).name.removesuffix(OBJECT_SUFFIX)
    return stem.rpartition("_")[2] == sha256[:12]


def object_path(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """Relative path of one version of an instance (the hash keeps versions apart)."""
    name = f"{_component(sop_uid)}_{sha256[:12]}{OBJECT_SUFFIX}"
    return f"{OBJECTS_DIR}/{_component(study_uid)}/{_component(series_uid)}/{name}"


def outbox_path(output_series_uid: str, sop_instance_uid: str) -> str:
    """Relative path of a derived instance the worker wrote (both UIDs are the node's own)."""
    return f"{OUTBOX_DIR}/{output_series_uid}/{sop_instance_uid}.dcm"


_LIBC = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush everything written to the file system holding `path` (Linux syncfs(2); os.sync
    where the C library has no syncfs): data, inodes and folder entries, in one journal commit."""
    if not hasattr(_LIBC, "syncfs"):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
    finally:
        os.close(fd)


class SyncBatch:
    """The writes one sync covers: `done` once it has run, `error` what it raised."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: Exception | None = None


class GroupSync:
    """Group commit: a thread of its own runs `sync` once for every write that asked since the
    sync before began; `wait(batch)` returns once that has finished, so N associations writing
    at once pay for about one flush, not N (bench/README.md, "receive.py"), and a writer can do
    other work (its ledger statements) while its flush runs. A failed sync fails every write it
    covered (`wait` raises its OSError); the next request starts another. The thread ends when
    idle for SYNCER_IDLE_S and is started again by the next request. It belongs to the process
    that made it (the node spawns its processes; a forked child would have no such thread)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._pending: SyncBatch | None = None  # asked for, its sync not begun
        self._running = False  # a thread runs the syncs

    def request(self) -> SyncBatch:
        with self._cond:
            if not self._running:
                self._start()
            if self._pending is None:
                self._pending = SyncBatch()
            self._cond.notify_all()
            return self._pending

    def wait(self, batch: SyncBatch) -> None:
        with self._cond:
            while not batch.done:
                self._cond.wait()
        error = batch.error
        if isinstance(error, OSError):
            raise OSError(*error.args)  # one of its own for each writer
        if error is not None:
            raise OSError(f"the sync failed: {type(error).__name__}: {error}")

    def _run(self) -> None:
        batch: SyncBatch | None = None
        try:
            while True:
                with self._cond:
                    while self._pending is None:
                        if not self._cond.wait(SYNCER_IDLE_S) and self._pending is None:
                            return  # idle: the next request starts another thread
                    batch, self._pending = self._pending, None
                try:
                    self._sync()
                except Exception as exc:  # an OSError; anything else is a bug, the writers fail too
                    batch.error = exc
                with self._cond:
                    batch.done = True
                    batch = None
                    self._cond.notify_all()
        finally:  # idle, or this thread failing: no batch is left waiting for it
            with self._cond:
                self._running = False
                if batch is not None:
                    batch.error = batch.error or RuntimeError("the sync thread ended")
                    batch.done = True
                if self._pending is not None:  # asked after the last look: another thread takes it
                    self._start()
                self._cond.notify_all()

    def _start(self) -> None:
        """A thread to run the syncs (with the lock held; `_running` only once it started)."""
        threading.Thread(target=self._run, name="group-sync", daemon=True).start()
        self._running = True


class Durable:
    """A file in place under its name whose shared sync has been requested; `wait` returns once
    the file is durable: that sync, then an fsync of the file itself, cheap once flushed, which
    reports this file's own write-back errors (the kernel reports one to the first caller only).
    OutOfResources on failure. Holds the file open until closed (a context manager)."""

    def __init__(self, fd: int, group: GroupSync) -> None:
        self._fd = fd
        self._group = group
        try:
            self._batch = group.request()
        except BaseException:
            os.close(fd)
            raise
        self._durable = False

    def wait(self) -> None:
        if self._durable:
            return
        try:
            self._group.wait(self._batch)
            os.fsync(self._fd)
        except OSError as exc:
            raise OutOfResources(f"cannot make the instance file durable: {exc.strerror or exc}") from None
        self._durable = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Durable:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def host_component(host: str) -> str:
    """A host id (node.host_id, hostname:port) as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", host) or "_"


class FileStore:
    """The storage directory as one host sees it: `host` (node_id) names its own temp folder, so
    that a host starting on shared storage discards only its own interrupted writes, never
    another host's writes in flight."""

    def __init__(
        self, root: Path, min_free_bytes: int, host: str = "local", sync: Callable[[], None] | None = None
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._tmp = root / TMP_DIR / host_component(host)
        self._sync = GroupSync(sync or functools.partial(syncfs, root))  # `sync`: another flush, for tests
        for folder in (self._tmp, root / OBJECTS_DIR, root / QUARANTINE_DIR):
            folder.mkdir(parents=True, exist_ok=True)

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        """Refuse before writing when the write would take free space below the floor."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise OutOfResources(
                f"free disk {free // 2**20} MiB minus {incoming} bytes is below the "
                f"{self.min_free_bytes // 2**20} MiB floor"
            )

    def write(self, rel: str, *chunks: bytes) -> None:
        """Durably place `chunks` at `rel` (`place`, then wait until durable)."""
        with self.place(rel, *chunks) as durable:
            durable.wait()

    def place(self, rel: str, *chunks: Buffer) -> Durable:
        """Place `chunks` at `rel`: a temp file, renamed to `rel`; then its sync is requested, one
        sync of the file system shared with every write waiting at that moment (`GroupSync`).
        The file is durable once the returned `Durable.wait` returns.

        A process killed at any moment leaves the whole file under `rel` or a temp file (the
        rename comes after the last byte). A power cut before the sync can leave a file under
        `rel` whose bytes did not all reach the disk: it was never acknowledged, and start-up
        recovery quarantines it, its content not matching the sha256 its name carries
        (storage/recovery.py). OutOfResources on any failure: before the rename the temp file
        is removed; after it the file stays (whole, perhaps not durable, never acknowledged:
        a re-send finds it, recovery adopts it), as another writer may be relying on it.
        """
        self.check_space(sum(len(c) for c in chunks))
        final = self.root / rel
        tmp = self._tmp / f"{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise OutOfResources(f"cannot write instance file: {exc.strerror or exc}") from None
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            final.parent.mkdir(parents=True, exist_ok=True)  # its name made durable by the sync
            os.rename(tmp, final)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise OutOfResources(f"cannot write instance file: {exc.strerror or exc}") from None
        return Durable(fd, self._sync)

    def existing(self, rel: str) -> Durable:
        """A file already under its name, to be made durable as `place` does: an identical
        re-send finds the first one's file, which may still be waiting for its sync."""
        try:
            fd = os.open(self.root / rel, os.O_RDONLY)
        except OSError as exc:
            raise OutOfResources(f"cannot make the instance file durable: {exc.strerror or exc}") from None
        return Durable(fd, self._sync)

    def discard_temp_files(self) -> int:
        """Delete this host's leftovers of writes interrupted by a crash (never acknowledged),
        and any loose in tmp/ itself, where versions before per-host folders wrote."""
        leftovers = [*self._tmp.iterdir(), *(p for p in (self.root / TMP_DIR).iterdir() if p.is_file())]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def iter_objects(self) -> Iterator[str]:
        """Relative paths of every instance file (temp files are elsewhere and never listed)."""
        base = self.root / OBJECTS_DIR
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(OBJECT_SUFFIX):
                    yield os.path.relpath(os.path.join(dirpath, name), self.root)

    def quarantine(self, rel: str) -> str:
        target = f"{QUARANTINE_DIR}/{uuid.uuid4().hex}_{Path(rel).name}"
        os.rename(self.root / rel, self.root / target)
        return target
