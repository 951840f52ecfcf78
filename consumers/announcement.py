"""A file's file-archived and its archive time: built and decided only here, so cleanup (on deletion-done) and the
reconciler (for a lost one) announce a file with byte-identical events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from injector import clock, marks
from injector.config import RUCIO_BULK, Settings, Stream
from injector.errors import Transient
from injector.events import FileArchived, encode
from injector.gateway import FileReplicas, RucioGateway, chunks
from injector.messages import Outgoing

Did = tuple[str, str]


def archived_event(stream: Stream, files: FileReplicas, path: str, archived_at: datetime,
                   rucio: RucioGateway) -> FileArchived:
    """A file's file-archived, built only here: cleanup and the reconciler announce a file identically. Size and
    adler32 are the ones Rucio holds (list_replicas gives them with the replicas' states)."""
    if files.bytes is None or files.adler32 is None:
        raise Transient(f"{files.scope}:{files.name} has no size/adler32 in Rucio")
    destinations = sorted(r for rule in stream.rules for r in rucio.rses(rule.rse_expression) if files.available(r))
    return FileArchived.create(
        site=stream.site, instrument=stream.instrument, path=path, size=files.bytes, adler32=files.adler32,
        scope=files.scope, name=files.name, destinations=destinations, archived_at=archived_at)


def archive_times(rucio: RucioGateway, known: dict[Did, dict[str, Any]], proposed: dict[Did, datetime],
                  announced: bool = False) -> dict[Did, datetime]:
    """Each file's archive time, decided once and kept on the file in Rucio (`injector_archived_at`): whoever
    announces the file (cleanup, its duplicates, the reconciler) publishes a byte-identical file-archived. `known`:
    the files' marks as read; `proposed`: the time to decide for a file that has none yet. In bulk. `announced` also
    notes (injector_announced) that the caller now owns the announcement: cleanup says so before it emits, because
    its unacked deletion-done keeps the obligation until the broker confirmed the file-archived."""
    out: dict[Did, datetime] = {}
    updates = []
    for did, m in known.items():
        decided = m.get(marks.ARCHIVED_AT)
        out[did] = clock.parse(str(decided), f"{did[0]}:{did[1]} {marks.ARCHIVED_AT}") if decided else proposed[did]
        update = {} if decided else {marks.ARCHIVED_AT: proposed[did].isoformat()}
        if announced and not m.get(marks.ANNOUNCED):
            update[marks.ANNOUNCED] = datetime.now(UTC).isoformat()
        if update:
            updates.append((did[0], did[1], update))
    for batch in chunks(updates, RUCIO_BULK):
        rucio.mark(batch)
    return out


def archived_message(event: FileArchived, settings: Settings) -> Outgoing:
    return Outgoing(settings.broker.daq_exchange, event.routing_key, encode(event),
                    {"schema": "file-archived/1", "event-id": str(event.event_id)}, str(event.event_id))
