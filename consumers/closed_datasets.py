"""Closed datasets: where the files of a dataset that ops closed go, and the orphans a closed dataset left.

Rucio refuses to attach anything to a closed dataset (UnsupportedOperation), yet registers replicas before it,
so a file registered while its dataset was being closed is an orphan: a replica in no dataset, under no rule,
never archived. Ingest checks before registering (`consumers.ingest`); this module holds the suffix rule used
when a stream says `on_closed_dataset = "next"`, and finds (status) and names or repairs (reconcile) orphans.

Suffix rule: the successors of dataset `<name>` are `<name>.2`, `<name>.3`, ...; files go to the first successor
that is open or does not exist yet (which is then created with the stream's rules, as any dataset).
"""

from __future__ import annotations

from collections.abc import Sequence

from consumers.findings import Finding
from consumers.inventory import FileState
from injector import marks
from injector.config import RUCIO_BULK, Stream
from injector.errors import DatasetClosed, Permanent
from injector.gateway import Attachment, RucioGateway, RucioInspector, chunks
from injector.streams import check_did_name

Did = tuple[str, str]
ROLL_LIMIT = 1000  # successors tried before giving up
PROBE = 10  # successors whose state one call reads


def next_open(rucio: RucioGateway, scope: str, name: str) -> tuple[list[str], str]:
    """The closed datasets from `name` on (`name` first) and the first successor that is open or absent."""
    closed = [name]
    for start in range(2, ROLL_LIMIT, PROBE):
        names = [f"{name}.{n}" for n in range(start, start + PROBE)]
        is_open = rucio.datasets_open([(scope, n) for n in names])
        for n in names:
            if is_open.get((scope, n), True):
                check_did_name(n, "dataset name (after a closed dataset)", None)
                return closed, n
            closed.append(n)
    raise DatasetClosed(f"{scope}:{name} and its successors up to {scope}:{name}.{ROLL_LIMIT} are all closed")


def recorded_dataset(f: FileState) -> Did | None:
    """The dataset ingest recorded on the file (`injector_dataset`), if any."""
    scope, sep, name = str(f.marks.get(marks.DATASET) or "").partition(":")
    return (scope, name) if sep else None


class Orphans:
    """Tells orphans: files not attached to their recorded dataset, which is closed. Reads each dataset's state
    once, and the content of each closed one once."""

    def __init__(self, rucio: RucioInspector) -> None:
        self._rucio = rucio
        self._open: dict[Did, bool] = {}
        self._content: dict[Did, set[Did]] = {}

    def is_orphan(self, f: FileState) -> bool:
        ds = recorded_dataset(f)
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
