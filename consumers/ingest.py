"""Ingest: register closed files in place at their stream's source RSE and attach them to their dataset, in ONE
Rucio transaction per bulk call, and make sure the dataset carries the stream's rules — in bulk, idempotently.

Registration and attachment are one call (Rucio's attach with an RSE, `RucioGateway.register`): the dataset is
made (with its rules) first, and Rucio refuses the whole call for a closed or missing dataset, or a name it holds
with another size or adler32. So a file is never registered without its dataset: no orphan, nothing for the
reconciler to repair. Nothing per file is written besides the replica: a file's stream follows from its dataset
and its path from its name (`injector.streams.path_of`); only a stream whose names another stream can share
records `injector_stream`, and one with `did_name = "basename"` records `injector_path` (`_replica`).
Every batch first reads whether its datasets are open (one bulk call): a file whose dataset is closed is
dead-lettered `dataset-closed`, or with the stream's `on_closed_dataset = "next"` goes to the next open dataset
(`consumers.closed_datasets`).

`ingest(events, rucio, settings)` is a plain function returning one Outcome per event, in order.
It never acks; `consumers.ingest_worker` (the run loop) settles the outcomes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from consumers.closed_datasets import next_open
from injector import marks
from injector.config import RUCIO_BULK, Settings, Stream
from injector.errors import ChecksumConflict, DatasetClosed, Permanent, RucioFailed, Transient
from injector.events import FileClosed
from injector.gateway import FileMeta, NewReplica, Registration, RucioGateway, chunks, isolate
from injector.settle import Outcome
from injector.streams import Placement, place, shares_names

log = logging.getLogger(__name__)

Did = tuple[str, str]


@dataclass
class _File:
    """One distinct file of the batch and every event that announced it."""

    placement: Placement
    event: FileClosed
    indexes: list[int] = field(default_factory=list)
    existed: bool = False
    settled: bool = False  # nothing left to do: attached to its closed dataset, or its source already gone
    label: str | None = None  # the outcome when settled otherwise than already-registered
    rolled: bool = False  # its dataset was closed: it goes to the next open one
    error: Permanent | Transient | None = None

    @property
    def key(self) -> Did:
        return (self.placement.scope, self.placement.name)


class DatasetMemo:
    """Datasets whose rules we have already ensured in this process (saves a call per batch)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._done: dict[Did, None] = {}
        self._limit = limit

    def __contains__(self, key: Did) -> bool:
        return key in self._done

    def add(self, key: Did) -> None:
        self._done[key] = None
        if len(self._done) > self._limit:
            self._done.pop(next(iter(self._done)))


def ingest(events: Sequence[FileClosed | Permanent], rucio: RucioGateway, settings: Settings,
           memo: DatasetMemo | None = None) -> list[Outcome]:
    """Outcomes for a batch of decoded events (an undecodable one is passed in as its error)."""
    outcomes: list[Outcome | None] = [None] * len(events)
    files: dict[Did, _File] = {}
    for i, ev in enumerate(events):
        if isinstance(ev, Permanent):
            outcomes[i] = Outcome.failed(ev)
            continue
        try:
            _collect(files, i, ev, place(settings.streams, ev), outcomes)
        except Permanent as exc:
            outcomes[i] = Outcome.failed(exc)
    live = list(files.values())
    _check_against_rucio(live, rucio)
    _sources_gone(live, rucio)
    _closed_datasets(live, rucio)
    _ensure_datasets(live, rucio, memo if memo is not None else DatasetMemo())
    _register(live, rucio, {s.name for s in settings.streams if shares_names(s, settings.streams)})
    _remark(live, rucio)
    for f in live:
        for i in f.indexes:
            outcomes[i] = Outcome.failed(f.error, f.placement.did) if f.error else Outcome.done(
                f.label or ("already-registered" if f.existed or i != f.indexes[0] else "registered"),
                f.placement.did)
    return [o if o is not None else Outcome.done("unreachable") for o in outcomes]


def _collect(files: dict[Did, _File], i: int, ev: FileClosed, p: Placement,
             outcomes: list[Outcome | None]) -> None:
    """Fold events naming the same file; the same name with other bytes is a conflict."""
    known = files.get((p.scope, p.name))
    if known is None:
        files[(p.scope, p.name)] = _File(p, ev, [i])
    elif (known.event.size, known.event.adler32) == (ev.size, ev.adler32) and known.placement == p:
        known.indexes.append(i)
    else:
        outcomes[i] = Outcome.failed(ChecksumConflict(
            f"{p.did} announced twice in one batch with different content: {_content(known.event)} "
            f"(event {known.event.event_id}) vs {_content(ev)}", event_id=str(ev.event_id)), p.did)


def _content(ev: FileClosed) -> str:
    return f"size {ev.size} adler32 {ev.adler32} path {ev.path}"


def _ok(files: Sequence[_File]) -> list[_File]:
    return [f for f in files if f.error is None and not f.settled]


def _sources_gone(files: Sequence[_File], rucio: RucioGateway) -> None:
    """A file Rucio held before this batch whose source replica is gone was released and reaped (or lost): a late
    duplicate of its file-closed must not register the source again, over bytes the reaper deleted."""
    existed = [f for f in _ok(files) if f.existed]
    for part in chunks(existed, RUCIO_BULK):
        try:
            held = rucio.replicas([f.key for f in part])
        except (Permanent, Transient) as exc:
            _fail(part, exc)
            continue
        for f in part:
            found = held.get(f.key)
            if found is None or f.placement.stream.source_rse not in found.states:
                f.settled, f.label = True, "source-gone"
                log.info("%s: its source replica is gone from Rucio (released and deleted); not registered again",
                         f.placement.did, extra={"event_id": str(f.event.event_id)})


def _closed_datasets(files: Sequence[_File], rucio: RucioGateway) -> None:
    """Read, once per batch (ops may close a dataset at any time), whether the datasets are open; route the
    files of a closed one before anything is registered."""
    groups: dict[Did, list[_File]] = defaultdict(list)
    for f in _ok(files):
        groups[(f.placement.scope, f.placement.dataset)].append(f)
    try:
        is_open = rucio.datasets_open(list(groups))
    except (Permanent, Transient) as exc:
        _fail(_ok(files), exc)
        return
    for (scope, dataset), group in groups.items():
        if not is_open.get((scope, dataset), True):  # absent: ingest creates it
            try:
                _closed(scope, dataset, group, rucio)
            except (Permanent, Transient) as exc:
                _fail(group, exc)


def _closed(scope: str, dataset: str, group: list[_File], rucio: RucioGateway) -> None:
    """A redelivered file already attached (to the dataset, or along its chain of closed successors) is done;
    the others roll on to the next open dataset, or are dead-lettered without being registered."""
    stream = group[0].placement.stream
    chain, target = next_open(rucio, scope, dataset) if stream.on_closed_dataset == "next" else ([dataset], None)
    if any(f.existed for f in group):
        attached = set().union(*(rucio.content(scope, name) for name in chain))
        for f in group:
            f.settled = f.existed and f.key in attached
    for f in group:
        if f.settled:
            continue
        if target is not None:
            f.placement, f.rolled = replace(f.placement, dataset=target), True
        else:
            f.error = DatasetClosed(
                f"{f.placement.did}: dataset {scope}:{dataset} is closed, so the file was not registered "
                f"(stream {stream.name!r}, on_closed_dataset = \"dead-letter\"). Reopen the dataset and replay, or "
                f"set on_closed_dataset = \"next\" and replay", event_id=str(f.event.event_id))


def _check_against_rucio(files: Sequence[_File], rucio: RucioGateway) -> None:
    """Mark files Rucio already holds; the same name with other size/adler32 is a conflict (Rucio would refuse the
    registration too, but this names both contents)."""
    for part in chunks(_ok(files), RUCIO_BULK):
        meta: dict[Did, FileMeta] = {}

        def lookup(fs: Sequence[_File], meta: dict[Did, FileMeta] = meta) -> None:
            meta.update(rucio.file_metadata([f.key for f in fs]))

        _bisect(part, lookup)  # a name Rucio chokes on fails alone
        for f in _ok(part):
            m = meta.get(f.key)
            if m is None:
                continue
            if (m.bytes, (m.adler32 or "").lower()) != (f.event.size, f.event.adler32):
                f.error = ChecksumConflict(
                    f"{f.placement.did} already in Rucio with size {m.bytes} adler32 {m.adler32}; this event "
                    f"says size {f.event.size} adler32 {f.event.adler32} ({f.event.path}); not overwritten",
                    event_id=str(f.event.event_id))
            else:
                f.existed = True


def _ensure_datasets(files: Sequence[_File], rucio: RucioGateway, memo: DatasetMemo) -> None:
    by_dataset: dict[tuple[str, str, str], list[_File]] = defaultdict(list)
    for f in _ok(files):
        p = f.placement
        by_dataset[(p.scope, p.dataset, p.stream.name)].append(f)
    for (scope, dataset, _), group in by_dataset.items():
        if (scope, dataset) in memo:
            continue
        try:
            _ensure_dataset(scope, dataset, group[0].placement.stream, rucio)
            memo.add((scope, dataset))
        except (Permanent, Transient) as exc:
            _fail(group, exc)


def _ensure_dataset(scope: str, dataset: str, stream: Stream, rucio: RucioGateway) -> None:
    """Create the dataset with its rules in one call; if it existed, add any rule it lacks."""
    if rucio.add_dataset(scope, dataset, stream.rules):
        log.info("created dataset %s:%s with %d rule(s)", scope, dataset, len(stream.rules))
        return
    have = set(rucio.dataset_rules(scope, dataset))
    for rule in stream.rules:
        if (rule.rse_expression, rule.copies) not in have and rucio.add_rule(scope, dataset, rule):
            log.info("added missing rule %s x%d to %s:%s", rule.rse_expression, rule.copies, scope, dataset)


def _register(files: Sequence[_File], rucio: RucioGateway, shared: set[str]) -> None:
    """Register and attach, one transaction per call: every dataset of the batch in one call while that stays within
    the bulk limit. A call Rucio refuses changed nothing: a dataset closed since the batch checked it fails its
    files `dataset-closed`, the rest is bisected down to the file Rucio refuses."""
    by_dataset: dict[tuple[str, str, str], list[_File]] = defaultdict(list)
    for f in _ok(files):
        p = f.placement
        by_dataset[(p.scope, p.dataset, p.stream.source_rse)].append(f)
    work = [(key, part) for key, group in by_dataset.items() for part in chunks(group, RUCIO_BULK)]
    for batch in _pack(work):
        fs = [f for _, part in batch for f in part]
        try:
            rucio.register(_registrations(fs, shared))
            continue
        except RucioFailed:
            pass  # refused while Rucio answers: bisected below, like a refusal
        except Transient as exc:
            _fail(fs, exc)
            continue
        except Permanent:
            _closed_meanwhile(fs, rucio)
        _bisect([f for f in fs if f.error is None], lambda part: rucio.register(_registrations(part, shared)))


def _registrations(files: Sequence[_File], shared: set[str]) -> list[Registration]:
    """New files: registered at their source RSE and attached. Files Rucio held before the batch: attached only,
    never registered again (if the reaper deleted the released source since `_sources_gone` looked, adding the
    replica again would put it back over deleted bytes)."""
    grouped: dict[tuple[str, str, str | None], list[NewReplica]] = defaultdict(list)
    for f in files:
        p = f.placement
        grouped[(p.scope, p.dataset, None if f.existed else p.stream.source_rse)].append(_replica(f, shared))
    return [Registration(scope, ds, rse, tuple(reps)) for (scope, ds, rse), reps in grouped.items()]


def _replica(f: _File, shared: set[str]) -> NewReplica:
    ev, p = f.event, f.placement
    meta = []
    if p.stream.name in shared:  # another stream's files can have names like these
        meta.append((marks.STREAM, p.stream.name))
    if p.stream.did_name == "basename":  # the name does not hold the path
        meta.append((marks.PATH, ev.path))
    # A file Rucio holds already: its md5 (if Rucio has none) must not make the call a mismatch.
    return NewReplica(p.scope, p.name, ev.size, ev.adler32, p.pfn, None if f.existed else ev.md5, tuple(meta))


def _closed_meanwhile(files: Sequence[_File], rucio: RucioGateway) -> None:
    """Registering was refused: a dataset closed since this batch checked it. Nothing was registered (one
    transaction); say so, naming file and dataset."""
    try:
        is_open = rucio.datasets_open(list({(f.placement.scope, f.placement.dataset) for f in files}))
    except (Permanent, Transient):
        return  # bisection names whatever Rucio refuses
    for f in files:
        p = f.placement
        if not is_open.get((p.scope, p.dataset), True):
            f.error = DatasetClosed(
                f"{p.did}: dataset {p.scope}:{p.dataset} was closed after this batch checked it, so the file was not "
                f"registered (stream {p.stream.name!r}). Reopen the dataset and replay, or set on_closed_dataset = "
                f"\"next\" and replay", event_id=str(f.event.event_id))


def _remark(files: Sequence[_File], rucio: RucioGateway) -> None:
    """A file registered earlier (its mark names the closed dataset) that rolled on: record where it went."""
    moved = [f for f in _ok(files) if f.rolled and f.existed]
    if not moved:
        return
    try:
        rucio.mark([(*f.key, {marks.DATASET: f"{f.placement.scope}:{f.placement.dataset}"}) for f in moved])
    except (Permanent, Transient) as exc:
        _fail(moved, exc)


def _pack(work: list[tuple[tuple[str, str, str], Sequence[_File]]]
          ) -> list[list[tuple[tuple[str, str, str], Sequence[_File]]]]:
    packs: list[list[tuple[tuple[str, str, str], Sequence[_File]]]] = [[]]
    count = 0
    for ds, part in work:
        if count + len(part) > RUCIO_BULK and packs[-1]:
            packs.append([])
            count = 0
        packs[-1].append((ds, part))
        count += len(part)
    return [p for p in packs if p]


def _bisect(files: Sequence[_File], call: Callable[[Sequence[_File]], None]) -> None:
    for f, exc in isolate(files, call):
        if f.error is None:
            f.error = exc


def _fail(files: Sequence[_File], exc: Permanent | Transient) -> None:
    for f in files:
        if f.error is None:
            f.error = exc
