"""Cleanup: Rucio's own events (hermes) → verified release of the source replica → file-archived.

`cleanup(events, rucio, settings, failures)` is a plain function returning one Outcome per event.
An event is only a trigger: every decision is taken from Rucio's state. The source replica is
released (epoch tombstone, so the reaper deletes it) only when every destination the stream's
rules require holds an AVAILABLE replica with the registered adler32. Rules are never deleted
to drive cleanup. Duplicates and any order are harmless: each step checks state first.

The archive copy is judged in ONE place, `verify(stream, files, rucio)`, and a source is released only
through `release(rucio, replicas)`: cleanup, the reconciler and `status` all use these two, so they cannot
disagree on when a file is safe. They are, with `cleanup`, this module's whole public API.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from consumers.announcement import archive_times, archived_event, archived_message
from consumers.transfer_failures import transfers_failed
from injector import clock, marks
from injector.config import RUCIO_BULK, Settings, Stream
from injector.errors import Permanent, ReplicaGone, Transient
from injector.events import RucioEvent
from injector.gateway import FileReplicas, RucioGateway, chunks, isolate
from injector.settle import Outcome
from injector.streams import DID_NAME, owner

log = logging.getLogger(__name__)

Did = tuple[str, str]
HANDLED = ("transfer-done", "transfer-failed", "deletion-done", "deletion-failed")
# Rucio's other event types (lower-cased by hermes), counted by name; anything else, which only a foreign or forged
# message carries, is counted as `ignored-other`: an outcome is a metrics label, and labels must stay a bounded set.
_REQUEST_STATES = ("queued", "submitting", "submitted", "failed", "done", "lost", "no_sources", "only_tape_sources",
                   "submission_failed", "mismatch_scheme", "suspend", "waiting", "preparing")
OTHER_RUCIO_EVENTS = frozenset(
    {f"{kind}-{state}" for kind in ("transfer", "stagein") for state in _REQUEST_STATES}
    | {"deletion-not-found", "deletion-planned", "close", "open", "create_cnt", "create_dts", "register_cnt",
       "register_dts", "datasetlock_ok", "erase", "incomplete", "lost", "rule_ok", "rule_progress", "email"})


@dataclass
class _Item:
    index: int
    event: RucioEvent

    @property
    def did(self) -> Did:
        return (str(self.event.get("scope")), str(self.event.get("name")))

    @property
    def label(self) -> str:
        return f"{self.did[0]}:{self.did[1]}"


def cleanup(events: Sequence[RucioEvent | Permanent], rucio: RucioGateway, settings: Settings) -> list[Outcome]:
    """Outcomes for a batch of hermes events (an undecodable one is passed in as its error)."""
    outcomes, work = _triage(events, settings)
    items = [it for group in work.values() for it in group]
    state, refused = _replicas(rucio, sorted({it.did for it in items}))
    if refused:  # an outage fails them all; a DID Rucio refuses to read fails only its own events
        for it in items:
            if it.did in refused:
                outcomes[it.index] = Outcome.failed(refused[it.did], it.label)
        work = defaultdict(list, {kind: [it for it in group if it.did not in refused] for kind, group in work.items()})
    for index, outcome in _transfers_failed(work["transfer-failed"], state, rucio, settings).items():
        outcomes[index] = outcome
    for it in work["deletion-failed"]:
        outcomes[it.index] = _deletion_failed(it, settings)
    for index, outcome in _deletions_done(work["deletion-done"], state, rucio, settings).items():
        outcomes[index] = outcome
    for index, outcome in _transfers_done(work["transfer-done"], state, rucio, settings).items():
        outcomes[index] = outcome
    return outcomes


def _triage(events: Sequence[RucioEvent | Permanent],
            settings: Settings) -> tuple[list[Outcome], dict[str, list[_Item]]]:
    """Settle at once what needs no Rucio call: invalid, other event types, other experiments."""
    outcomes: list[Outcome] = [Outcome.done("ignored")] * len(events)
    scopes = {s.scope for s in settings.streams}
    work: dict[str, list[_Item]] = defaultdict(list)
    for i, ev in enumerate(events):
        if isinstance(ev, Permanent):
            outcomes[i] = Outcome.failed(ev)
        elif ev.event_type not in HANDLED:
            known = ev.event_type in OTHER_RUCIO_EVENTS
            outcomes[i] = Outcome.done(f"ignored-{ev.event_type}" if known else "ignored-other")
        elif ev.get("scope") not in scopes:
            outcomes[i] = _unmanaged(f"{ev.get('scope')}:{ev.get('name')}", ev.event_type, "no stream has its scope",
                                    logging.DEBUG)
        elif not isinstance(ev.get("name"), str) or not DID_NAME.fullmatch(ev.get("name")):
            outcomes[i] = _unmanaged(f"{ev.get('scope')}:{ev.get('name')!r}", ev.event_type,
                                    "its name is not a DID name this project registers")
        else:
            work[ev.event_type].append(_Item(i, ev))
    return outcomes, work


def _replicas(rucio: RucioGateway, dids: list[Did]) -> tuple[dict[Did, FileReplicas], dict[Did, Permanent | Transient]]:
    """Rucio's replicas of the DIDs, and the DIDs it could not be asked about: a bulk read Rucio refuses is split
    until the refused DIDs are isolated (an outage fails every one)."""
    found: dict[Did, FileReplicas] = {}
    refused: dict[Did, Permanent | Transient] = {}

    def read(part: Sequence[Did]) -> None:
        found.update(rucio.replicas(part))

    for part in chunks(dids, RUCIO_BULK):
        refused.update(isolate(part, read))
    return found, refused


def _stream_of(settings: Settings, scope: str, rse: str, pfn: str | None) -> Stream | None:
    """The stream whose source RSE is `rse` and whose storage holds `pfn` (when known)."""
    candidates = [s for s in settings.streams if s.scope == scope and s.source_rse == rse]
    if pfn is not None:
        candidates = [s for s in candidates if pfn.startswith(s.pfn_prefix + s.storage_root.rstrip("/") + "/")]
    return candidates[0] if candidates else None


def _held_source(settings: Settings, files: FileReplicas) -> Stream | None:
    """The stream whose source replica of this file still exists in Rucio, if any."""
    for rse in files.states:
        pfns: list[str | None] = [*files.pfns.get(rse, [])] or [None]
        for pfn in pfns:
            stream = _stream_of(settings, files.scope, rse, pfn)
            if stream is not None:
                return stream
    return None


@dataclass(frozen=True)
class Verdict:
    """Whether a file's archive copies are safe; `lacking` says, in words, what the stream's rules still lack."""

    lacking: tuple[str, ...] = ()

    @property
    def safe(self) -> bool:
        return not self.lacking

    def __str__(self) -> str:
        return "; ".join(self.lacking)


def verify(stream: Stream, files: FileReplicas | None, rucio: RucioGateway) -> Verdict:
    """The one judgement of a file's archive: safe when every destination the stream's rules require (other than
    its source RSE) holds an AVAILABLE replica. `files` None: Rucio has no replica of it at all."""
    if files is None:
        return Verdict(("no replica left at all",))
    lacking = []
    for rule in stream.rules:
        safe = sorted(r for r in rucio.rses(rule.rse_expression) if files.available(r) and r != stream.source_rse)
        if len(safe) < rule.copies:
            lacking.append(f"{rule.rse_expression} has {len(safe)}/{rule.copies} AVAILABLE "
                           f"(states: {files.states})")
    return Verdict(tuple(lacking))


def _unmanaged(label: str, event_type: str, why: str, level: int = logging.WARNING) -> Outcome:
    """An event about a file this configuration does not manage: acked, never settled as if known; counted
    (outcome `unmanaged`) and logged. The reconciler finishes such files once a configuration knows them."""
    log.log(level, "%s: %s not handled, the file is unmanaged here: %s", label, event_type, why)
    return Outcome.done("unmanaged", label)


def _gone_or_unmanaged(items: list[_Item], rucio: RucioGateway, settings: Settings) -> dict[int, Outcome]:
    """transfer-done for files with replicas but no source a stream here holds: `source-gone` only for a file
    a configured stream ingested (its injector_stream mark); else it is another stream's, unknown here."""
    if not items:
        return {}
    try:
        known = rucio.marks(sorted({it.did for it in items}))
    except (Permanent, Transient) as exc:
        return {it.index: Outcome.failed(exc, it.label) for it in items}
    names = {s.name for s in settings.streams}
    out = {}
    for it in items:
        by_name = owner(settings.streams, *it.did)  # a stream whose names no other stream shares records none
        who = known.get(it.did, {}).get(marks.STREAM) or (by_name.name if by_name else None)
        why = (f"ingested by stream {who!r}, which this configuration does not have" if who else
               "no stream of this configuration has its scope and name")
        out[it.index] = Outcome.done("source-gone", it.label) if who in names else _unmanaged(
            it.label, "transfer-done", why)
    return out


def _holders(items: list[_Item], state: dict[Did, FileReplicas], settings: Settings
             ) -> Iterator[tuple[_Item, FileReplicas | None, Stream | None]]:
    """Each event with Rucio's replicas of its file and the stream whose source replica of it still exists."""
    for it in items:
        files = state.get(it.did)
        yield it, files, _held_source(settings, files) if files else None


def _transfers_failed(items: list[_Item], state: dict[Did, FileReplicas], rucio: RucioGateway,
                      settings: Settings) -> dict[int, Outcome]:
    out: dict[int, Outcome] = {}
    managed = []
    for it, _, held in _holders(items, state, settings):
        if held is None:
            out[it.index] = _unmanaged(it.label, "transfer-failed", "no configured stream holds its source")
        else:
            managed.append((it, held.failure_limit))
    return {**out, **transfers_failed(managed, rucio)}


def _transfers_done(items: list[_Item], state: dict[Did, FileReplicas], rucio: RucioGateway,
                    settings: Settings) -> dict[int, Outcome]:
    out: dict[int, Outcome] = {}
    releasable: dict[tuple[str, str, str], list[_Item]] = defaultdict(list)
    sourceless = []
    for it, files, held in _holders(items, state, settings):
        if files is None:
            out[it.index] = _unmanaged(it.label, "transfer-done", "Rucio has no replica of it")
            continue
        if held is None:
            sourceless.append(it)
            continue
        stream = held
        reported = (it.event.get("checksum-adler") or "").lower()
        if reported and files.adler32 and reported.zfill(8) != files.adler32.lower():
            out[it.index] = Outcome.failed(Permanent(
                f"{it.label}: transfer to {it.event.get('dst-rse')} reports adler32 {reported}, Rucio holds "
                f"{files.adler32}; source kept", reason="checksum-mismatch"), it.label)
            continue
        try:
            verdict = verify(stream, files, rucio)
        except (Permanent, Transient) as exc:
            out[it.index] = Outcome.failed(exc, it.label)
            continue
        if not verdict.safe:
            out[it.index] = Outcome.done("not-yet-safe", it.label)
            log.info("%s not released yet: %s", it.label, verdict)
        elif not stream.release_source:
            out[it.index] = Outcome.done("source-kept", it.label)
        else:
            releasable[(it.did[0], it.did[1], stream.source_rse)].append(it)
    out.update(_gone_or_unmanaged(sourceless, rucio, settings))
    out.update(_release_sources(rucio, releasable))
    return out


def _release_sources(rucio: RucioGateway, releasable: dict[tuple[str, str, str], list[_Item]]) -> dict[int, Outcome]:
    """Epoch tombstones in bulk; a replica Rucio refuses (e.g. locked by a rule) is isolated."""
    out = {it.index: Outcome.done("released", it.label) for items in releasable.values() for it in items}
    for key, exc in release(rucio, list(releasable)).items():
        for it in releasable[key]:
            if isinstance(exc, Transient):
                out[it.index] = Outcome.failed(exc, it.label)
            elif isinstance(exc, ReplicaGone):  # deleted meanwhile (a late duplicate of its transfer-done)
                out[it.index] = Outcome.done("source-gone", it.label)
            else:
                log.warning("%s: source not released: %s", it.label, exc)
                out[it.index] = Outcome.done("release-refused", it.label)
    return out


def release(rucio: RucioGateway, replicas: Sequence[tuple[str, str, str]]
            ) -> dict[tuple[str, str, str], Permanent | Transient]:
    """Release (scope, name, source RSE) replicas whose files `verify` judged safe (cleanup and the reconciler
    both release only through this): epoch tombstones in bulk, then note when. Returns the refused ones."""
    refused: dict[tuple[str, str, str], Permanent | Transient] = {}
    for part in chunks(replicas, RUCIO_BULK):
        refused.update(isolate(part, rucio.set_tombstones))
    now = datetime.now(UTC).isoformat()
    noted = [(key[0], key[1], {marks.RELEASED_AT: now}) for key in replicas if key not in refused]
    try:  # when: so the reconciler can tell a source the reaper should have deleted by now
        for batch in chunks(noted, RUCIO_BULK):
            rucio.mark(batch)
    except (Permanent, Transient) as exc:
        log.warning("released %d source(s) but could not note when: %s", len(noted), exc)
    return refused


def _deletions_done(items: list[_Item], state: dict[Did, FileReplicas], rucio: RucioGateway,
                    settings: Settings) -> dict[int, Outcome]:
    """deletion-done → file-archived for every file whose source is gone and whose archive is verified: the files'
    marks read in bulk (size and adler32 came with the replicas), their archive times decided and noted announced
    in one bulk write."""
    out, gone = _deleted_sources(items, state, settings)
    known: dict[Did, dict[str, Any]] = {}
    try:
        for part in chunks(sorted({it.did for it, _ in gone}), RUCIO_BULK):
            known.update(rucio.marks(part))
    except (Permanent, Transient) as exc:
        return {**out, **{it.index: Outcome.failed(exc, it.label) for it, _ in gone}}
    safe: list[tuple[_Item, Stream, FileReplicas]] = []
    proposed: dict[Did, datetime] = {}
    for it, stream in gone:
        try:
            files = _archive_checked(it, stream, state.get(it.did), rucio)
            proposed.setdefault(it.did, _created_at(it))  # duplicates in one batch: the first one's time
        except (Permanent, Transient) as exc:
            out[it.index] = Outcome.failed(exc, it.label)
            continue
        safe.append((it, stream, files))
    try:  # announced: from here the unacked deletion-done carries the announcement, so the reconciler leaves it
        times = archive_times(rucio, {did: known.get(did, {}) for did in proposed}, proposed, announced=True)
    except (Permanent, Transient) as exc:
        return {**out, **{it.index: Outcome.failed(exc, it.label) for it, _, _ in safe}}
    for it, stream, files in safe:
        url = it.event.get("url")
        path = url[len(stream.pfn_prefix):] if isinstance(url, str) and url.startswith(stream.pfn_prefix) else it.did[1]
        archived = archived_event(stream, files, path, times[it.did], rucio)
        out[it.index] = Outcome.done("archived", it.label, emit=(archived_message(archived, settings),))
    return out


def _deleted_sources(items: list[_Item], state: dict[Did, FileReplicas], settings: Settings
                     ) -> tuple[dict[int, Outcome], list[tuple[_Item, Stream]]]:
    """Settle the deletion-done events of files no stream here manages, or whose source Rucio still lists; the
    others, with their stream, go on."""
    out: dict[int, Outcome] = {}
    gone: list[tuple[_Item, Stream]] = []
    for it in items:
        rse, url = str(it.event.get("rse")), it.event.get("url")
        stream = _stream_of(settings, it.did[0], rse, url)
        if stream is None:
            out[it.index] = _unmanaged(it.label, "deletion-done", f"no configured stream has source RSE {rse} "
                                       f"holding {url}")
        elif it.did in state and rse in state[it.did].states:
            out[it.index] = Outcome.done("source-still-present", it.label)
        else:
            gone.append((it, stream))
    return out, gone


def _archive_checked(it: _Item, stream: Stream, files: FileReplicas | None, rucio: RucioGateway) -> FileReplicas:
    """The file's replicas when the file, its source gone, may be announced: Rucio holds its size and adler32 and
    its archive is verified; raises what says why not."""
    if files is None or files.bytes is None or files.adler32 is None:
        raise Transient(f"{it.label} has no size/adler32 in Rucio")
    verdict = verify(stream, files, rucio)
    if not verdict.safe:  # the source is gone without a safe copy: never announce that as archived
        raise Permanent(f"{it.label}: deleted at {it.event.get('rse')} but not safe elsewhere: {verdict}",
                        reason="source-lost")
    return files


def _created_at(it: _Item) -> datetime:
    """hermes' created_at (naive = UTC, offsets honoured): duplicates of one message carry the same value. One
    running ahead of this host's clock is clamped to the receive time; none at all is the receive time."""
    if it.event.created_at is None:
        return datetime.now(UTC)
    return clock.received(it.event.created_at, f"{it.event.event_type} of {it.label}: hermes created_at")


def _deletion_failed(it: _Item, settings: Settings) -> Outcome:
    stream = _stream_of(settings, it.did[0], str(it.event.get("rse")), it.event.get("url"))
    if stream is None:
        return _unmanaged(it.label, "deletion-failed", f"no configured stream has source RSE {it.event.get('rse')}")
    why = f"{it.label}: deletion at {it.event.get('rse')} failed: {it.event.get('reason')}"
    return Outcome("retry", "deletion-failed", it.label, "deletion-failed", why)
