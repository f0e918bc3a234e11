"""The file store: instances as blobs, written so that a kill at any moment leaves either the
whole file under its final name or nothing but a temp file that start-up discards.

Layout under storage_dir:
    tmp/<host>/<random>.part          being written by that host; never an instance
    objects/<study>/<series>/<sop>_<sha256[:12]>.dcm
    outbox/<output series>/<sop>.dcm  the derived instances the worker writes (kept after delivery)
    quarantine/                       files found at start-up that cannot be parsed
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from core.errors import OutOfResources

TMP_DIR = "tmp"
OBJECTS_DIR = "objects"
OUTBOX_DIR = "outbox"
QUARANTINE_DIR = "quarantine"
TMP_SUFFIX = ".part"
OBJECT_SUFFIX = ".dcm"
_SAFE_UID = re.compile(r"^[0-9.]{1,64}$")


def _component(uid: str) -> str:
    """A UID as a path component: itself when it is a well-formed UID, else a hash of it."""
    if _SAFE_UID.match(uid) and not uid.startswith("."):
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


def object_path(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """Relative path of one version of an instance (the hash keeps versions apart)."""
    name = f"{_component(sop_uid)}_{sha256[:12]}{OBJECT_SUFFIX}"
    return f"{OBJECTS_DIR}/{_component(study_uid)}/{_component(series_uid)}/{name}"


def outbox_path(output_series_uid: str, sop_instance_uid: str) -> str:
    """Relative path of a derived instance the worker wrote (both UIDs are the node's own)."""
    return f"{OUTBOX_DIR}/{output_series_uid}/{sop_instance_uid}.dcm"


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new file, a rename) durable; bench/durable_write.py times it too."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p that makes each new folder's name durable (fsync of its parent): a file fsynced
    into a new series folder is lost with the folder if only the file was synced."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)  # another thread or host may have made it first
        fsync_dir(folder.parent)


def host_component(host: str) -> str:
    """A host id (node.host_id, hostname:port) as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", host) or "_"


class FileStore:
    """The storage directory as one host sees it: `host` (node_id) names its own temp folder, so
    that a host starting on shared storage discards only its own interrupted writes, never
    another host's writes in flight."""

    def __init__(self, root: Path, min_free_bytes: int, host: str = "local") -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._tmp = root / TMP_DIR / host_component(host)
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
        """Durably place `chunks` at `rel`: temp file, fsync, rename, fsync of the folder.

        On any failure the temp file is removed and OutOfResources raised; nothing is
        half-written under the final name.
        """
        self.check_space(sum(len(c) for c in chunks))
        final = self.root / rel
        tmp = self._tmp / f"{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            _make_dirs(final.parent)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutOfResources(f"cannot write instance file: {exc.strerror or exc}") from None

    def remove(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

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
