"""transfer-failed: count a file's failed transfers where the count survives, dead-letter once per episode.

The count lives on the file in Rucio (DID mark `injector_transfer_failures`), not in the consumer: a restart, a
second consumer or a dead letter forget nothing. Per destination RSE it holds the failure episode: the failed
request ids (with the request each retried) and their reasons, and which request's event was dead-lettered.
Rucio's own request chain delimits episodes: the conveyor retries a failed request as a new request whose
`previous-request-id` is the failed one, while a new rule (or a judge-repairer pass over a STUCK lock) starts a
chain with none. So:
  * a request already counted (hermes duplicates, redeliveries) counts nothing;
  * the stream's `failure_limit`-th distinct failed request of an episode dead-letters it, once;
  * after that, failures of the same chain are acked (`transfer-failed-known`); a request that starts a new
    chain (no previous request, none counted retried it) starts a new episode, which can dead-letter again.
Competing consumers may race on one file's mark (read, then write); Rucio retries a request only after its
failure was processed by the finisher, so two failures of one chain rarely meet in two batches at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from injector import marks
from injector.config import RUCIO_BULK
from injector.errors import Permanent, Transient
from injector.events import RucioEvent
from injector.gateway import RucioGateway, chunks
from injector.settle import Outcome

log = logging.getLogger(__name__)

Did = tuple[str, str]


class Failed(Protocol):
    """One transfer-failed event as cleanup holds it."""

    index: int
    event: RucioEvent

    @property
    def did(self) -> Did: ...
    @property
    def label(self) -> str: ...


@dataclass
class Episode:
    """The failures of one file towards one destination since its current request chain began."""

    requests: dict[str, dict[str, str | None]] = field(default_factory=dict)  # id -> {previous, reason}
    dead_lettered: str | None = None  # the request whose event was dead-lettered

    def starts_anew(self, rid: str, previous: str | None) -> bool:
        retried = {r["previous"] for r in self.requests.values()}
        return bool(self.requests) and previous is None and rid not in self.requests and rid not in retried

    def add(self, rid: str, previous: str | None, reason: str) -> bool:
        """Count one failed request; False when it was counted already."""
        if rid in self.requests:
            return False
        if self.starts_anew(rid, previous):
            self.requests, self.dead_lettered = {}, None
        self.requests[rid] = {"previous": previous, "reason": reason}
        return True


def load(mark: Any) -> dict[str, Episode]:
    """The episodes per destination stored on a file (a mark written by an older version reads as none)."""
    try:
        data = json.loads(mark) if isinstance(mark, str) and mark else {}
        return {dst: Episode(dict(e["requests"]), e.get("dead_lettered")) for dst, e in data.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("unreadable %s mark %r: counting afresh", marks.TRANSFER_FAILURES, mark)
        return {}


def describe(mark: Any) -> str:
    """The failure episodes stored on a file, in words ('' when none): for the reconciler's reports."""
    parts = []
    for dst, e in sorted(load(mark).items()):
        if e.requests:
            last = list(e.requests.values())[-1]["reason"]
            parts.append(f"{len(e.requests)} failed transfer(s) to {dst} in this episode"
                         f"{' (dead-lettered)' if e.dead_lettered else ''}, last: {last}")
    return "; ".join(parts)


def dump(episodes: dict[str, Episode]) -> str:
    return json.dumps({dst: {"requests": e.requests, "dead_lettered": e.dead_lettered}
                       for dst, e in sorted(episodes.items())}, sort_keys=True)


def transfers_failed(managed: Sequence[tuple[Failed, int]], rucio: RucioGateway) -> dict[int, Outcome]:
    """Outcomes of a batch's transfer-failed events (each with its stream's failure_limit): counted on their
    files, dead-lettered once per episode."""
    if not managed:
        return {}
    dids = sorted({it.did for it, _ in managed})
    out: dict[int, Outcome] = {}
    try:
        stored = {did: m.get(marks.TRANSFER_FAILURES) for did, m in rucio.marks(dids).items()}
        known = {did: load(m) for did, m in stored.items()}
        for it, limit in managed:
            out[it.index] = _count(it, known.setdefault(it.did, {}), limit)
        changed = [d for d in dids if dump(known[d]) != stored.get(d)]  # duplicates alone write nothing
        for part in chunks(changed, RUCIO_BULK):
            rucio.mark([(d[0], d[1], {marks.TRANSFER_FAILURES: dump(known[d])}) for d in part])
    except (Permanent, Transient) as exc:
        return {it.index: Outcome.failed(exc, it.label) for it, _ in managed}
    return out


def _count(it: Failed, episodes: dict[str, Episode], limit: int) -> Outcome:
    ev = it.event
    dst, reason = str(ev.get("dst-rse")), str(ev.get("reason") or "no reason given")
    rid = str(ev.get("request-id") or f"no-request-id:{reason}")
    previous = ev.get("previous-request-id")
    episode = episodes.setdefault(dst, Episode())
    new = episode.add(rid, str(previous) if previous else None, reason)
    n = len(episode.requests)
    log.warning("%s: transfer to %s failed (request %s, %d/%d in this episode%s): %s", it.label, dst, rid, n, limit,
                "" if new else ", already counted", reason)
    if episode.dead_lettered is not None or n < limit:
        return Outcome.done("transfer-failed-known" if episode.dead_lettered else "transfer-failed", it.label)
    episode.dead_lettered = rid
    reasons = " | ".join(str(r["reason"]) for r in episode.requests.values())
    return Outcome.failed(Permanent(f"{it.label}: {n} failed transfers to {dst} (requests "
                                    f"{', '.join(episode.requests)}): {reasons}", reason="transfer-failed"), it.label)
