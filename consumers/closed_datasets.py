"""Closed datasets: where the files of a dataset that ops closed go.

Rucio refuses to attach anything to a closed dataset (UnsupportedOperation). Ingest registers and attaches in one
transaction, so nothing is registered for a closed dataset, and checks before registering (`consumers.ingest`)
to route such files; this module holds the suffix rule used when a stream says `on_closed_dataset = "next"`.
Orphans (a replica in no dataset, under no rule, never archived) come only from earlier versions of ingest, which
registered, then attached: naming and repairing them is the operator tools' part, `operations.orphans`.

Suffix rule: the successors of dataset `<name>` are `<name>.2`, `<name>.3`, ...; files go to the first successor
that is open or does not exist yet (which is then created with the stream's rules, as any dataset).
"""

from __future__ import annotations

from injector.errors import DatasetClosed
from injector.gateway import RucioGateway
from injector.streams import check_did_name

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
