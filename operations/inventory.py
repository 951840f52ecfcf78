"""What Rucio holds for a stream, read for the reconciler and `status`: its files (found by the stream's name
pattern) with their replicas and the project's marks, and its datasets (the template with `*` for each field)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from injector import marks
from injector.config import RUCIO_BULK, Stream
from injector.gateway import FileReplicas, RucioInspector, chunks

Did = tuple[str, str]


@dataclass
class FileState:
    did: Did
    replicas: FileReplicas  # no replica anywhere: empty states
    marks: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.did[0]}:{self.did[1]}"


def stream_pattern(stream: Stream) -> str:
    """A Rucio name wildcard covering the stream's file names."""
    if stream.did_name == "path":
        return f"{stream.did_prefix}{stream.storage_root.rstrip('/')}/*"
    return f"{stream.did_prefix}*"


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


def files_of(stream: Stream, rucio: RucioInspector, unfinished: bool = False) -> Iterator[FileState]:
    """Every file of the stream known to Rucio, with its replicas and the project's marks. `unfinished`: skip,
    without reading their replicas, the files already announced archived (nothing is left to do for them)."""
    names = rucio.list_files(stream.scope, stream_pattern(stream))
    for part in chunks([(stream.scope, n) for n in names], RUCIO_BULK):
        meta = rucio.marks(part)
        ours = [did for did in part  # another stream may share the scope and root
                if meta.setdefault(did, {}).get(marks.STREAM, stream.name) == stream.name]
        wanted = [did for did in ours if not (unfinished and meta[did].get(marks.ANNOUNCED))]
        reps = rucio.replicas(wanted) if wanted else {}
        for did in wanted:
            yield FileState(did, reps.get(did) or FileReplicas(*did, None, None, {}, {}), meta[did])
