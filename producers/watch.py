"""Watch the DAQ buffer: a file-closed event for every file the DAQ closes (`rucio-injector watch`).

Each selected stream's storage_root is watched recursively with inotify (watchdog). A file counts
as closed when the kernel reports IN_CLOSE_WRITE for it, or when it (or a directory holding it) is
renamed or moved into the tree: DAQs write `run42.fits.tmp`, then rename it. Hidden and temporary
names (`.*`, `*.tmp`, `*.part`, plus the caller's globs) are never announced, nor is anything below a
directory with such a name. site, instrument and datatype come from the stream; night, run and
datatype from the path, by the stream's `path_fields` pattern.

Checksums are computed on a small pool of threads (`producers.hashing`), never on watchdog's, and events
published on the caller's thread; see `producers.announcer` for the batching and the retries that never drop
an event. A file whose name alone makes it unannounceable is refused and recorded (`producers.refusals`).

Files closed while no watch saw them: a directory's watch starts a moment after the directory is
created, so the files found in a new directory are announced once unmodified for `found_quiet`
seconds (or at once when their close is seen). Files closed while the watcher was down, or lost to
an inotify queue overflow (watchdog logs it), are announced by a start with `existing`.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from pydantic import ValidationError
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

from injector.checksum import size_and_adler32
from injector.config import PATH_FIELDS, Settings, Stream, template_fields
from injector.errors import ConfigError, InjectorError, PathOutsideRoot
from injector.metrics import Metrics, serve
from injector.signing import Keyring
from injector.streams import canonical_path
from injector.topology import Routes
from producers.announcer import Announcer, daq_publisher
from producers.candidates import Candidate
from producers.edge import Edge
from producers.hashing import HashPool, Result
from producers.outbox import depth_of
from producers.publish import file_closed
from producers.refusals import Refusal, Refusals, refusal

log = logging.getLogger(__name__)

DEFAULT_IGNORE = (".*", "*.tmp", "*.part")
DRAIN = 0.2  # seconds between the stop and the end of the watches
_VALID = {"night": re.compile(r"[0-9]{8}"), "run": re.compile(r"[0-9]+"),
          "datatype": re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")}
_WHAT = {"night": "YYYYMMDD", "run": "a whole number", "datatype": "a word (letters, digits, _ -)"}


@dataclass(frozen=True)
class Options:
    """What `rucio-injector watch` does; every field has the CLI's default."""

    streams: Sequence[str] = ()  # stream names; empty: every configured stream
    existing: bool = False  # also announce the files already present at start
    settle: float = 0.0  # a closed file is announced once unmodified this long
    ignore: Sequence[str] = ()  # globs never announced, besides DEFAULT_IGNORE
    # A file found in a just-created directory (written before inotify watched the directory, its close
    # was never seen) or by --existing is announced once unmodified this long. Long on purpose: a file
    # still being written there will report its close anyway, which announces it at once.
    found_quiet: float = 60.0
    window: float = 0.2  # seconds events are gathered before a publish
    batch_size: int = 500  # ... or until this many are pending
    retry_max_wait: float = 30.0  # longest backoff between publish attempts while the broker is down
    shutdown_timeout: float = 30.0  # after the stop: half to read files closed before it, half to publish
    hash_workers: int = 2  # files read (size, adler32) at once: small files do not wait behind a big one
    metrics_port: int = 0  # serve /metrics (refused files by reason, outbox depth) and /healthz here; 0: off


def ignored(relative: str, patterns: Sequence[str] = ()) -> bool:
    """True for a path (relative to the storage root) never to announce: any name on it, directories
    included, matches DEFAULT_IGNORE or a pattern; a pattern holding a '/' matches the whole path."""
    names = relative.split("/")
    for pattern in (*DEFAULT_IGNORE, *patterns):
        if "/" in pattern:
            if fnmatchcase(relative, pattern):
                return True
        elif any(fnmatchcase(name, pattern) for name in names):
            return True
    return False


def relative_to_root(stream: Stream, path: str) -> str | None:
    """The path below the stream's storage_root, or None when it is not below it."""
    root = stream.storage_root.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) and len(path) > len(root) else None


def fields_from_path(stream: Stream, relative: str) -> tuple[dict[str, Any], list[str]]:
    """Event fields for a file: datatype from the stream when it has one (it decides which stream
    the event belongs to), else night, run and datatype by `path_fields`; plus what went wrong."""
    fields: dict[str, Any] = {"datatype": stream.datatype} if stream.datatype else {}
    if stream.path_fields is None:
        return fields, []
    found = re.search(stream.path_fields, relative)
    if found is None:
        return fields, [f"does not match path_fields '{stream.path_fields}'"]
    problems = []
    for name, value in found.groupdict().items():
        if value is None or name in fields:  # an optional group that did not take part; the stream's datatype
            continue
        if not _VALID[name].fullmatch(value):
            problems.append(f"{name} {value!r} (path_fields '{stream.path_fields}') is not {_WHAT[name]}")
            continue
        fields[name] = int(value) if name == "run" else value
    return fields, problems


def announcement(candidate: Candidate, cancelled: Callable[[], bool] = lambda: False) -> Result:
    """The file-closed event of a file by its canonical path (size and adler32 read now, `cancelled` asked
    between chunks); None when it cannot be read; a Refusal when no valid event can be made of it."""
    stream = candidate.stream
    try:
        path = canonical_path(stream, candidate.path)
    except PathOutsideRoot as exc:
        return Refusal(stream, candidate.path, "path-outside-root", str(exc))
    if path != candidate.path and (refused := refusal(stream, path)) is not None:
        return refused
    fields, problems = fields_from_path(stream, relative_to_root(stream, path) or "")
    for problem in problems:
        log.warning("%s %s; announced anyway: if its dataset name needs a missing field, ingest dead-letters it "
                    "(template-field-missing) to be fixed and replayed", path, problem)
    try:
        size, adler32 = size_and_adler32(path, cancelled)
        return file_closed(path, site=stream.site, instrument=stream.instrument, size=size, adler32=adler32,
                           **fields)
    except ValidationError as exc:  # refusal() checked the name: this is a field no check foresaw
        return Refusal(stream, path, "invalid-event", f"no valid file-closed event: {exc}",
                       field=".".join(str(x) for x in exc.errors()[0]["loc"]))
    except FileNotFoundError:
        log.warning("%s vanished before it could be announced", path)
    except OSError as exc:
        log.error("%s NOT announced: cannot read it: %s", path, exc)
    return None


class EventHandler(FileSystemEventHandler):
    """Runs on watchdog's thread: turns inotify events into candidates, nothing slower."""

    def __init__(self, watcher: Watcher, stream: Stream) -> None:
        self._watcher = watcher
        self._stream = stream

    def on_closed(self, event: FileClosedEvent) -> None:
        self._watcher.offer(self._stream, os.fsdecode(event.src_path), self._watcher.options.settle)

    def on_moved(self, event: DirMovedEvent | FileMovedEvent) -> None:
        # A moved directory is walked whole, so its synthetic per-file events are not needed.
        if not event.is_synthetic and event.dest_path:
            self._watcher.offer(self._stream, os.fsdecode(event.dest_path), self._watcher.options.settle,
                                tree=event.is_directory)

    def on_created(self, event: DirCreatedEvent | FileCreatedEvent) -> None:
        if event.is_directory and not event.is_synthetic:
            self._watcher.offer(self._stream, os.fsdecode(event.src_path), self._watcher.found_quiet, tree=True)


class Watcher:
    """inotify watches over the streams' storage roots, feeding a queue of candidate files."""

    def __init__(self, streams: Sequence[Stream], options: Options) -> None:
        self.options = options
        self.found_quiet = max(options.settle, options.found_quiet)
        self.candidates: queue.Queue[Candidate] = queue.Queue()
        self._streams = list(streams)
        self._observer: InotifyObserver | None = None

    def owner(self, path: str) -> Stream | None:
        """The stream whose root holds the path. Roots never overlap (the config refuses it) but in the datatype
        split of one stream, whose streams share one root: the first of them selected announces the file."""
        return next((s for s in self._streams if relative_to_root(s, path) is not None), None)

    def offer(self, stream: Stream, path: str, quiet: float, tree: bool = False) -> None:
        relative = relative_to_root(stream, path)
        if relative is None or ignored(relative, self.options.ignore) or self.owner(path) is not stream:
            return
        self.candidates.put(Candidate(stream, path, quiet, tree))

    def start(self) -> None:
        event_types = [FileClosedEvent, FileMovedEvent, DirMovedEvent, DirCreatedEvent]
        self._observer = InotifyObserver(generate_full_events=True)  # moves from outside keep their dest
        for stream in self._streams:
            try:
                self._observer.schedule(EventHandler(self, stream), stream.storage_root, recursive=True,
                                        event_filter=event_types)
            except OSError as exc:
                raise InjectorError(f"cannot watch stream {stream.name!r} storage_root {stream.storage_root}: "
                                    f"{exc} (inotify limits: sysctl fs.inotify.max_user_watches)") from exc
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(10)

    def offer_existing(self) -> None:
        for stream in self._streams:
            self.candidates.put(Candidate(stream, stream.storage_root.rstrip("/"), self.found_quiet, tree=True))

    def files(self, candidate: Candidate) -> Iterator[Candidate]:
        """The file itself, or every announceable file below a directory candidate."""
        if not candidate.tree:
            yield candidate
            return
        for top, _dirs, names in os.walk(candidate.path):
            for name in names:
                path = os.path.join(top, name)
                if not os.path.islink(path):
                    relative = relative_to_root(candidate.stream, path)
                    if relative and not ignored(relative, self.options.ignore) and self.owner(path) is candidate.stream:
                        yield Candidate(candidate.stream, path, candidate.quiet)


def selected(settings: Settings, names: Sequence[str]) -> list[Stream]:
    streams = [settings.stream_named(n) for n in names] if names else list(settings.streams)
    if not streams:
        raise ConfigError("no streams configured: nothing to watch")
    for s in streams:
        if not os.path.isdir(s.storage_root):
            raise ConfigError(f"stream {s.name!r}: storage_root {s.storage_root} is not a directory here")
        missing = sorted(template_fields(s.dataset) & PATH_FIELDS - set(fields_watch_provides(s)))
        if missing:
            raise ConfigError(f"stream {s.name!r}: dataset template {s.dataset!r} needs {missing}, which watch "
                              f"cannot provide: add (?P<{missing[0]}>...) to its path_fields (or set its datatype), "
                              "else every file would be dead-lettered template-field-missing")
    return streams


def fields_watch_provides(stream: Stream) -> frozenset[str]:
    """Event fields watch can fill for a stream's files: its datatype, and the groups of its path_fields."""
    groups = set(re.compile(stream.path_fields).groupindex) if stream.path_fields else set()
    return frozenset(groups | ({"datatype"} if stream.datatype else set()))


def run(settings: Settings, options: Options, stop: threading.Event, ready: threading.Event | None = None) -> int:
    """Watch until `stop` is set, then announce what is pending. Exit code: 0, or 1 when events could not be
    published before the shutdown timeout (they stay in the outbox: the next `watch` or `publish --flush` sends
    them; an event the outbox could not take is named, and `--existing` announces its file)."""
    streams = selected(settings, options.streams)
    metrics = Metrics("watch")
    server = serve(metrics, options.metrics_port, settings.metrics.host) if options.metrics_port else None
    connect = functools.partial(daq_publisher, outbox=settings.outbox, max_wait=options.retry_max_wait,
                                routes=Routes(settings), keyring=Keyring.load(settings.signing))
    edge = Edge(Watcher(streams, options), Refusals(settings, metrics), HashPool(options.hash_workers, announcement),
                 Announcer(settings.broker, batch_size=options.batch_size, window=options.window,
                           max_wait=options.retry_max_wait, connect=connect))
    edge.announcer.open()  # the outbox: its drainer sends at once what an earlier watch left
    metrics.track_outbox(lambda: float(depth_of(settings.outbox) or 0))
    edge.watcher.start()
    try:
        if options.existing:
            edge.watcher.offer_existing()
        for s in streams:
            log.info("watching stream %s: %s (settle %.1f s, ignoring %s, %d hashing threads)", s.name,
                     s.storage_root, options.settle, ", ".join((*DEFAULT_IGNORE, *options.ignore)),
                     options.hash_workers)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            edge.step(lambda: edge.announcer.flush(stop), stop.is_set, timeout=min(options.window, 0.1))
            if edge.announcer.due():
                edge.announcer.flush(stop)
            edge.refusals.flush()
            metrics.heartbeat()
        time.sleep(DRAIN)  # let watchdog hand over what the kernel reported just before the stop
    finally:
        edge.watcher.stop()
        if server is not None:
            server.shutdown()
    try:
        return edge.finish(options.shutdown_timeout)
    finally:
        edge.pool.close()
        edge.announcer.close()
