"""Start-up reconciliation of the file store with the ledger after a crash.

A file is renamed into objects/ after its last byte is written, made durable by a file-system
sync, then its ledger row is committed, and the C-STORE is answered after the commit. So a
crash can leave: temp files (discarded: never acknowledged); a file without a row (adopted:
its bytes are whole, and the sender, never answered, will re-send identical bytes), unless a
power cut came before its sync and left bytes that are not the ones written (quarantined: its
content does not hash to the sha256 in its name); a row without a file only if something
outside the node deleted it (reported, kept).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from core.errors import InvalidDataset
from core.header import meta_source_ae, parse_header
from storage.filestore import FileStore, content_matches_name
from storage.ledger import EventKind, Ledger, Received, StoredFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    temp_discarded: int
    adopted: int
    quarantined: int
    missing: int


def reconcile(store: FileStore, ledger: Ledger) -> RecoveryReport:
    discarded = store.discard_temp_files()
    if discarded:
        ledger.add_events(EventKind.TEMP_DISCARDED, [f"{discarded} interrupted writes"])
    known = ledger.known_paths()
    on_disk = set(store.iter_objects())
    adopted = quarantined = 0
    for rel in sorted(on_disk - known):
        data = store.abspath(rel).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        try:
            header = parse_header(data)
            why = "" if content_matches_name(rel, sha) else "content is not what was written (cut before its sync)"
        except InvalidDataset as exc:
            why = str(exc)
        if why:
            target = store.quarantine(rel)
            ledger.add_events(EventKind.FILE_QUARANTINED, [f"{rel} -> {target}: {why}"])
            quarantined += 1
            continue
        meta_ae = meta_source_ae(data) or "UNKNOWN"  # the node's own file meta, never the data set
        received = Received(StoredFile(rel, sha, len(data)), calling_ae=meta_ae)
        ledger.record_instance(header, received)
        ledger.add_event(
            EventKind.INSTANCE_RECOVERED,
            calling_ae=meta_ae,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            detail=rel,
        )
        adopted += 1
    missing = sorted(known - on_disk)
    if missing:
        ledger.add_events(EventKind.INSTANCE_MISSING, missing)
        log.error("%d ledger rows point at missing files (see events 'instance.missing')", len(missing))
    report = RecoveryReport(discarded, adopted, quarantined, len(missing))
    log.info(
        "start-up reconciliation: %d temp files discarded, %d files adopted, %d quarantined, %d missing",
        *report.__dict__.values(),
    )
    return report
