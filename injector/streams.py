"""Streams: which stream an event belongs to, and where its file goes in Rucio.

One file is one DID: `canonical_path` is the one rule that turns any spelling of a file into the path it is
announced and registered under (producers apply it before announcing, ingest checks it when it sees the disk).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from injector.config import Stream, template_fields
from injector.errors import NoStream, PathNotCanonical, PathOutsideRoot, RucioRefused, TemplateFieldMissing
from injector.events import FileClosed

# Rucio's generic schema: names ≤ 250 characters of this form.
DID_NAME = re.compile(r"^[/A-Za-z0-9][/A-Za-z0-9.\-_]{0,249}$")


@dataclass(frozen=True, slots=True)
class Placement:
    """The Rucio identity of one event's file."""

    stream: Stream
    scope: str
    name: str
    pfn: str
    dataset: str

    @property
    def did(self) -> str:
        return f"{self.scope}:{self.name}"


def match(streams: Sequence[Stream], site: str, instrument: str, datatype: str | None = None) -> Stream:
    """The stream for (site, instrument[, datatype]); a datatype-specific stream beats a generic one."""
    generic = None
    for stream in streams:
        if stream.site != site or stream.instrument != instrument:
            continue
        if stream.datatype is not None and stream.datatype == datatype:
            return stream
        if stream.datatype is None:
            generic = stream
    if generic is None:
        raise NoStream(f"no stream matches site={site!r} instrument={instrument!r} datatype={datatype!r}")
    return generic


def place(streams: Sequence[Stream], event: FileClosed) -> Placement:
    """Stream, DID name, PFN and dataset of an event; Permanent errors say what is wrong."""
    eid = str(event.event_id)
    stream = match(streams, event.site, event.instrument, event.datatype)
    name = did_name(stream, event.path, eid)
    check_canonical(stream, event.path, eid)
    dataset = dataset_name(stream, event)
    check_did_name(dataset, f"dataset name (template {stream.dataset!r})", eid)
    return Placement(stream, stream.scope, name, stream.pfn_prefix + event.path, dataset)


def did_name(stream: Stream, path: str, event_id: str | None = None) -> str:
    """The DID name of a file of the stream (by its did_name and did_prefix); Permanent errors say why it has
    none: a path outside the root, or a name Rucio refuses (`invalid-name`)."""
    relative = relative_path(stream, path, event_id)
    name = stream.did_prefix + {"path": path, "relative": relative, "basename": posixpath.basename(relative)}[
        stream.did_name
    ]
    check_did_name(name, "DID name", event_id)
    return name


def path_of(stream: Stream, name: str) -> str | None:
    """The file's path from its DID name (`did_name` "path" or "relative"); None for "basename" (the directories are
    not in the name: ingest records the path on such a file, `injector_path`)."""
    if stream.did_name == "basename" or not name.startswith(stream.did_prefix):
        return None
    rest = name[len(stream.did_prefix):]
    return rest if stream.did_name == "path" else f"{stream.storage_root.rstrip('/')}/{rest}"


def name_pattern(stream: Stream) -> str:
    """A Rucio name wildcard covering the stream's file names (`prefix*`)."""
    if stream.did_name == "path":
        return f"{stream.did_prefix}{stream.storage_root.rstrip('/')}/*"
    return f"{stream.did_prefix}*"


def shares_names(stream: Stream, streams: Sequence[Stream]) -> bool:
    """Another stream of the config can have files of the same scope and name pattern: the stream cannot be told
    from the name, so ingest records it on each file (`injector_stream`)."""
    mine = name_pattern(stream)[:-1]
    return any(o is not stream and o.scope == stream.scope
               and (name_pattern(o)[:-1].startswith(mine) or mine.startswith(name_pattern(o)[:-1]))
               for o in streams)


def could_name(stream: Stream, scope: str, name: str) -> bool:
    """Whether `did_name` could have made this DID for a file of the stream."""
    if scope != stream.scope or not name.startswith(stream.did_prefix):
        return False
    rest = name[len(stream.did_prefix):]
    if stream.did_name == "path":
        return rest.startswith(stream.storage_root.rstrip("/") + "/")
    return bool(rest) and not rest.startswith("/") and (stream.did_name == "relative" or "/" not in rest)


def owner(streams: Sequence[Stream], scope: str, name: str) -> Stream | None:
    """The one stream that could have named this DID; None when none or several could."""
    found = [s for s in streams if could_name(s, scope, name)]
    return found[0] if len(found) == 1 else None


def relative_path(stream: Stream, path: str, event_id: str | None = None) -> str:
    """The path below the stream's storage root; refuses `..`, `.`, `//` and anything outside it."""
    root = stream.storage_root.rstrip("/")
    if posixpath.normpath(path) != path:  # `//`, `.`, `..`, a trailing `/`
        raise PathOutsideRoot(f"path {path!r} is not a normalised absolute path", event_id=event_id)
    if not path.startswith(root + "/"):
        raise PathOutsideRoot(
            f"path {path!r} is outside stream {stream.name!r} storage_root {stream.storage_root!r}",
            event_id=event_id,
        )
    return path[len(root) + 1 :]


def canonical_path(stream: Stream, path: str, event_id: str | None = None) -> str:
    """The one name of a file: the stream's storage_root as configured + the file's real path (symlinks
    resolved) relative to the root's real path. PathOutsideRoot when the real path leaves the root."""
    root = stream.storage_root.rstrip("/")
    real_root, real = os.path.realpath(root or "/"), os.path.realpath(path)
    if real == real_root or os.path.commonpath([real, real_root]) != real_root:
        via = "" if real == path else f" (its real path is {real!r})"
        raise PathOutsideRoot(
            f"path {path!r}{via} is outside stream {stream.name!r} storage_root {stream.storage_root!r}"
            + ("" if real_root == root else f" (real path {real_root!r})"), event_id=event_id)
    return f"{root}/{os.path.relpath(real, real_root)}"


def canonical(streams: Sequence[Stream], event: FileClosed) -> FileClosed:
    """The event announcing its file under the canonical path (producers, before publishing); as it is when
    no stream of this config takes it (ingest then decides)."""
    try:
        stream = match(streams, event.site, event.instrument, event.datatype)
    except NoStream:
        return event
    path = canonical_path(stream, event.path, str(event.event_id))
    return event if path == event.path else event.model_copy(update={"path": path})


def check_canonical(stream: Stream, path: str, event_id: str | None) -> None:
    """Ingest: a path this host can see must be the canonical one; a path it cannot see keeps the lexical checks."""
    if not os.path.lexists(path):
        return
    found = canonical_path(stream, path, event_id)
    if found != path:
        raise PathNotCanonical(
            f"event {event_id}: field path {path!r} is not the canonical path of its file: a symlink on it resolves "
            f"to {found!r} (stream {stream.name!r}); one file must have one DID, so announce {found!r}",
            event_id=event_id)


def dataset_name(stream: Stream, event: FileClosed) -> str:
    values = {
        "site": event.site,
        "instrument": event.instrument,
        "night": event.night,
        "run": event.run,
        "datatype": event.datatype,
        "date": event.occurred_at.strftime("%Y%m%d"),
        "stream": stream.name,
    }
    missing = sorted(n for n in template_fields(stream.dataset) if values.get(n) is None)
    if missing:
        raise TemplateFieldMissing(
            f"stream {stream.name!r} dataset template {stream.dataset!r} needs {missing}, absent from the event",
            event_id=str(event.event_id),
        )
    return stream.dataset.format(**values)


def check_did_name(name: str, what: str, event_id: str | None) -> None:
    if not DID_NAME.fullmatch(name):  # not match: `$` also matches before a trailing newline
        raise RucioRefused(
            f"{what} {name!r} is not a valid Rucio name (^[/A-Za-z0-9][/A-Za-z0-9.-_]*$, ≤ 250)",
            event_id=event_id,
            reason="invalid-name",
        )
