"""What Rucio holds for a stream, read for the reconciler and `status`: its datasets (the template with `*` for each
field), and the files a sweep must look at, with their replicas and the project's marks.

A sweep costs what is still open, not what the stream ever ingested. A dataset whose every file is finished
(announced archived; for a stream that keeps its sources, archive verified) carries the mark `injector_finished`
(the number of files it held then), set by the reconciler; a sweep (`open_work`) reads:
  * every dataset's name and state: one listing, one bulk metadata call per 1000 datasets (a dataset per night);
  * the content of the datasets not finished, and of those created within the window (a finished one that gained
    a file since it was marked, as its content count shows, is open again);
  * the files created within the window (`created_after`, names only) that no dataset read above holds: files
    registered but never attached, and late files attached to an older finished dataset (which is then open again);
    and the files a sweep found unattached before, which their dataset names (`injector_unattached`) until they are
    attached, so they stay in view after the window;
  * marks of those files, and replicas only of the files not yet announced.
A dataset with unattached files is never marked finished. A file registered but unattached that no sweep saw within
the window (a reconciler stopped that long) is found by `everything` (`reconcile --full`), which lists every file
of the stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from injector import marks
from injector.config import RUCIO_BULK, Stream
from injector.gateway import DatasetState, FileReplicas, RucioInspector, chunks
from injector.streams import name_pattern

Did = tuple[str, str]
WINDOW = timedelta(hours=24)  # default: files registered this recently are looked at whatever their dataset
SLACK = timedelta(hours=1)  # a dataset created this long before the window may still gain files within it


def recorded_dataset(file_marks: dict[str, Any]) -> Did | None:
    """The dataset recorded on a file (`injector_dataset`: files registered before ingest attached in the same
    transaction, and files rolled on from a closed dataset), if any."""
    scope, sep, name = str(file_marks.get(marks.DATASET) or "").partition(":")
    return (scope, name) if sep else None


@dataclass
class FileState:
    did: Did
    replicas: FileReplicas  # no replica anywhere, or not read (an announced file): empty states
    marks: dict[str, Any]
    dataset: Did | None = None  # the stream's dataset it is attached to, as read

    @property
    def recorded(self) -> Did | None:
        return recorded_dataset(self.marks)

    @property
    def label(self) -> str:
        return f"{self.did[0]}:{self.did[1]}"

    @property
    def announced(self) -> bool:
        return bool(self.marks.get(marks.ANNOUNCED))


@dataclass
class Inventory:
    """What one sweep read of a stream. `files`: the files to look at (all of them, or only the unannounced ones);
    `open`: the datasets not finished (their rules are checked, and the reconciler may mark them finished);
    `contents`: the content of every dataset read (for the attachment checks); `finished`: the finished datasets
    left unread, with the number of files each held."""

    stream: Stream
    datasets: dict[Did, DatasetState]
    files: list[FileState] = field(default_factory=list)
    open: list[Did] = field(default_factory=list)
    contents: dict[Did, set[Did]] = field(default_factory=dict)
    finished: dict[Did, int] = field(default_factory=dict)
    where: dict[Did, Did] = field(default_factory=dict)  # file → the stream's dataset whose content holds it
    parentless: set[Did] = field(default_factory=set)  # files in no dataset at all, none recorded on them

    def content(self, dataset: Did, rucio: RucioInspector) -> set[Did]:
        if dataset not in self.contents:
            self.contents[dataset] = rucio.content(*dataset)
            if dataset in self.datasets:
                for f in self.contents[dataset]:
                    self.where.setdefault(f, dataset)
        return self.contents[dataset]


def dataset_pattern(stream: Stream) -> str:
    """The dataset template with every field as a wildcard, and a trailing one for the successors of closed
    datasets (`consumers.closed_datasets`): LST1_{night}_raw → LST1_*_raw*."""
    return re.sub(r"\{[^}]*\}", "*", stream.dataset) + "*"


def dataset_regex(stream: Stream) -> re.Pattern[str]:
    """The names the stream's datasets can have: the template's, optionally followed by .2, .3, ..."""
    parts = re.split(r"\{[^}]*\}", stream.dataset)
    return re.compile(".+".join(re.escape(p) for p in parts) + r"(\.[0-9]+)?")


def datasets_of(stream: Stream, rucio: RucioInspector) -> list[str]:
    """The stream's datasets in Rucio, successors of closed ones included."""
    regex = dataset_regex(stream)
    return [n for n in rucio.list_datasets(stream.scope, dataset_pattern(stream)) if regex.fullmatch(n)]


def dataset_states(stream: Stream, rucio: RucioInspector) -> dict[Did, DatasetState]:
    """Every dataset of the stream with its state (open, created, finished mark), in bulk."""
    dids = [(stream.scope, n) for n in datasets_of(stream, rucio)]
    out: dict[Did, DatasetState] = {}
    for part in chunks(dids, RUCIO_BULK):
        out.update(rucio.dataset_states(part))
    return out


def is_finished(stream: Stream, f: FileState, safe: bool) -> bool:
    """Nothing is left to do for the file: announced archived, or (a stream that keeps its sources) its archive
    verified (`safe`, cleanup's verdict)."""
    return f.announced or (not stream.release_source and safe)


def open_work(stream: Stream, rucio: RucioInspector, now: datetime, window: timedelta = WINDOW,
              announced: bool = False) -> Inventory:
    """The stream's open work (see the module's docstring). `announced`: also return the announced files of the
    open datasets (`status` counts them), without reading their replicas."""
    inv = Inventory(stream, dataset_states(stream, rucio))
    since = now - window
    young = since - SLACK
    for did, ds in inv.datasets.items():
        if ds.finished is None:
            inv.open.append(did)
            inv.content(did, rucio)
        elif ds.created_at is not None and ds.created_at >= young:
            if len(inv.content(did, rucio)) != ds.finished:  # gained (or lost) files since it was marked
                inv.open.append(did)
            else:
                inv.finished[did] = ds.finished
        else:
            inv.finished[did] = ds.finished
    held = {f for did in inv.open for f in inv.contents[did]}
    listed = held | {f for did in inv.finished if did in inv.contents for f in inv.contents[did]}
    pending = {(stream.scope, n) for ds in inv.datasets.values() for n in ds.unattached}
    recent = set(rucio.list_files(stream.scope, name_pattern(stream), since))
    newcomers = sorted({(stream.scope, n) for n in recent} - listed | pending)
    files = {did: None for did in sorted(held)}
    files.update(_late_files(inv, newcomers, rucio))
    inv.files = list(_states(inv, rucio, list(files), announced))
    return inv


def _late_files(inv: Inventory, newcomers: list[Did], rucio: RucioInspector) -> dict[Did, None]:
    """Recent files no open dataset holds: late ones in a finished dataset, which opens it again (its content is
    read and swept), and files in no dataset at all. Their dataset is the one recorded on them or, for a file without
    marks, its parent (asked per file: such files are rare). Returns the files to look at."""
    out: dict[Did, None] = {}
    for part in chunks(newcomers, RUCIO_BULK):
        meta = rucio.marks(part)
        for did in part:
            m = meta.get(did, {})
            if m.get(marks.STREAM, inv.stream.name) != inv.stream.name or m.get(marks.ANNOUNCED):
                continue
            recorded = recorded_dataset(m)
            if recorded is not None:
                ds = recorded if did in inv.content(recorded, rucio) else None
            else:
                parents = rucio.parents(*did)
                ours = [p for p in parents if p in inv.datasets]
                if parents and not ours:
                    continue  # another stream's file: it is attached to a dataset that is not this stream's
                if not parents:
                    inv.parentless.add(did)
                ds = ours[0] if ours else None
            out[did] = None
            if ds is not None and ds in inv.finished:
                del inv.finished[ds]
                inv.open.append(ds)
                out.update({f: None for f in sorted(inv.content(ds, rucio))})
    return out


def everything(stream: Stream, rucio: RucioInspector, announced: bool = False) -> Inventory:
    """Every file of the stream known to Rucio, whatever its dataset's mark (`reconcile --full`, `status --full`):
    an audit that costs what the stream ever ingested."""
    inv = Inventory(stream, dataset_states(stream, rucio))
    inv.open = list(inv.datasets)
    for did in inv.open:
        inv.content(did, rucio)
    names = rucio.list_files(stream.scope, name_pattern(stream))
    dids = [(stream.scope, n) for n in names]
    inv.parentless = {d for d in dids if d not in inv.where}  # or in another stream's dataset: see _states
    inv.files = list(_states(inv, rucio, dids, announced))
    return inv


def _states(inv: Inventory, rucio: RucioInspector, dids: Sequence[Did], announced: bool) -> Iterable[FileState]:
    """The files of this stream among `dids` with their marks and dataset; replicas read only for the files not
    announced (an announced file is finished), which are left out unless `announced`."""
    stream = inv.stream
    for part in chunks(dids, RUCIO_BULK):
        meta = rucio.marks(part)
        ours = [did for did in part if did in meta  # gone from Rucio meanwhile: nothing to look at
                and meta[did].get(marks.STREAM, stream.name) == stream.name]  # another stream may share the scope
        wanted = [did for did in ours if not meta[did].get(marks.ANNOUNCED)]
        reps = rucio.replicas(wanted) if wanted else {}
        for did in ours:
            if did in reps or did in wanted:
                yield FileState(did, reps.get(did) or _none(did), meta[did], inv.where.get(did))
            elif announced:
                yield FileState(did, _none(did), meta[did], inv.where.get(did))


def _none(did: Did) -> FileReplicas:
    return FileReplicas(did[0], did[1], None, None, {}, {})


def record(rucio: RucioInspector, inv: Inventory, unfinished: set[Did], unattached: dict[Did, set[Did]]) -> list[Did]:
    """After a sweep, on each dataset read: `injector_finished` when none of its files is in `unfinished` (as this
    sweep read them) and none recorded for it is unattached, cleared when it is open again; `injector_unattached`
    the files recorded for it that are not attached. Returns the datasets newly marked finished."""
    todo: list[tuple[str, str, dict[str, Any]]] = []
    done: list[Did] = []
    for did, ds in inv.datasets.items():
        update: dict[str, Any] = {}
        loose = sorted(n for _, n in unattached.get(did, ()))[:RUCIO_BULK]
        if tuple(loose) != ds.unattached:
            update[marks.UNATTACHED] = loose or None
        content = inv.contents.get(did)
        if did in inv.open and content is not None:
            if content and not content & unfinished and not loose:
                if ds.finished != len(content):  # marked already (a --full sweep reads finished ones too)
                    update[marks.FINISHED] = len(content)
                    done.append(did)
            elif ds.finished is not None:
                update[marks.FINISHED] = None
        if update:
            todo.append((did[0], did[1], update))
    for batch in chunks(todo, RUCIO_BULK):
        rucio.mark(batch)
    return done
