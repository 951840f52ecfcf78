"""Orphans: files registered but never attached because their dataset is closed (`consumers.closed_datasets`
says why they happen and where the files of a closed dataset go). `status` counts them; `reconcile` names them
with their cause and, with --fix and on_closed_dataset = "next", attaches them to the next open dataset."""

from __future__ import annotations

from collections.abc import Sequence

from consumers.closed_datasets import next_open
from injector import marks
from injector.config import RUCIO_BULK, Stream
from injector.errors import Permanent
from injector.gateway import Attachment, RucioInspector, chunks
from operations.findings import Finding
from operations.inventory import FileState

Did = tuple[str, str]


class Orphans:
    """Tells orphans: files not attached to their recorded dataset, which is closed. Reads each dataset's state
    once, and the content of each closed one once."""

    def __init__(self, rucio: RucioInspector) -> None:
        self._rucio = rucio
        self._open: dict[Did, bool] = {}
        self._content: dict[Did, set[Did]] = {}

    def is_orphan(self, f: FileState) -> bool:
        ds = f.recorded
        if ds is None:
            return False
        if ds not in self._open:
            self._open[ds] = self._rucio.datasets_open([ds]).get(ds, True)
        if self._open[ds]:
            return False
        if ds not in self._content:
            self._content[ds] = self._rucio.content(*ds)
        return f.did not in self._content[ds]


def orphan_findings(stream: Stream, dataset: Did, files: Sequence[FileState], rucio: RucioInspector, fix: bool,
                    dry_run: bool) -> list[Finding]:
    """Name orphans with their cause; with --fix and on_closed_dataset = "next", attach them to the next open
    dataset and record it on them."""
    label, roll = f"{dataset[0]}:{dataset[1]}", stream.on_closed_dataset == "next"
    if not (fix and roll) or dry_run:
        action = "would" if fix and roll else "report"
        return [Finding(stream.name, "orphaned", f.label, _cause(stream, label), action,
                        "attach it to the next open dataset" if roll else "") for f in files]
    scope = dataset[0]
    target = ""
    try:
        _, target = next_open(rucio, scope, dataset[1])
        rucio.add_dataset(scope, target, stream.rules)  # as ingest would: with the stream's rules
        for part in chunks(files, RUCIO_BULK):
            rucio.attach([Attachment(scope, target, tuple(f.did for f in part))])
            rucio.mark([(*f.did, {marks.DATASET: f"{scope}:{target}"}) for f in part])
    except Permanent as exc:
        return [Finding(stream.name, "orphaned", f.label, f"{_cause(stream, label)}. Attaching it to "
                        f"{scope}:{target or '(none)'} was refused: {exc}") for f in files]
    return [Finding(stream.name, "orphaned", f.label, f"attached to {scope}:{target} (its dataset {label} is "
                    f"closed)", "done") for f in files]


def _cause(stream: Stream, label: str) -> str:
    what = (f"registered at {stream.source_rse} but not attached: its dataset {label} is closed, so no rule "
            f"archives it")
    if stream.on_closed_dataset == "next":
        return f"{what}; `reconcile --fix` attaches it to the next open dataset ({label}.2, {label}.3, ...)"
    return (f"{what}. Either reopen the dataset (set_status open=True, an admin account) and run `reconcile --fix`, "
            f"or set on_closed_dataset = \"next\" on stream {stream.name!r} and run `reconcile --fix` to attach it "
            f"to the next open dataset")
