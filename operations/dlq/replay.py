"""Replaying dead letters: where each one goes back (`amqp_target`, `stomp_target`), the headers of the
republished copy (`replay_headers`), what a replay did (`ReplaySummary`), and the one replay loop both brokers
run (`Replay`), with a small `Adapter` per broker (`operations.dlq.rabbitmq`, `operations.dlq.activemq`).

The rule: a replay goes straight back into the queue the dead letter came from (RabbitMQ: the default
exchange with the queue's name as routing key; ActiveMQ: /queue/<consumer queue>), so nothing else bound to
the original exchange or topic sees the event a second time. `--to` re-routes explicitly.

The loop's guarantees, whatever the broker: it takes only the dead letters present at its start (the adapter
reads no further than the depth it saw), selects by filter and limit, and removes a dead letter only after the
broker confirmed its copy; a lost connection leaves every selected dead letter counted once (replayed, failed,
or doubtful when its copy was sent but not confirmed), and a check afterwards removes any replayed dead letter
the broker kept (`in_both` what it could not).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from injector.deadletter import REPLAY_COUNT, REPLAYED_EXCHANGE, REPLAYED_ROUTING_KEY, Filter, Record
from injector.topology import stomp_destination

log = logging.getLogger(__name__)

FLUSH = 200  # dead letters republished per confirm round
CHECKS = 3  # passes of the after-replay check (a broker may lose the check's own removals too)
Progress = Callable[[Record], None]


@dataclass(frozen=True)
class Target:
    """Where a replay sends a dead letter. AMQP: `exchange` and `routing_key` (exchange "" is the default
    exchange: straight into the queue named `routing_key`). STOMP: the destination in `routing_key`."""

    exchange: str
    routing_key: str

    def __str__(self) -> str:
        if self.exchange == "":
            return f"queue {self.routing_key} (default exchange)" if not self.routing_key.startswith("/") \
                else self.routing_key
        return f"exchange {self.exchange}, routing key {self.routing_key}"


def source_queue(r: Record, dlq_suffix: str = ".dlq", dlq_prefix: str = "DLQ.") -> str:
    """The queue a dead letter was dead-lettered from: recorded, else read off the DLQ's own name
    (RabbitMQ `<queue>.dlq`, ActiveMQ `DLQ.<queue>`: each holds one queue's dead letters)."""
    if r.source_queue:
        return r.source_queue
    return r.queue.removesuffix(dlq_suffix).removeprefix(dlq_prefix)


def amqp_target(r: Record, to: str | None = None) -> Target:
    """A replay over AMQP goes straight back into the queue it was dead-lettered from, through the default
    exchange: no other binding of the DAQ exchange (or of amq.topic) sees it twice. With `to`, it goes through
    its original exchange with that routing key instead (re-routing, e.g. to another instrument's binding)."""
    if to is not None:
        exchange, _ = original_address(r)
        return Target(exchange, to)
    return Target("", source_queue(r))


def stomp_target(r: Record, to: str | None = None) -> Target:
    """A replay over STOMP (ActiveMQ) goes to the consumer queue it came from, never to the virtual topic
    (which would copy it to every consumer group); `to` is a destination."""
    return Target("", to or f"/queue/{source_queue(r)}")


def original_address(r: Record) -> tuple[str, str]:
    """The AMQP exchange and routing key the event first came by. Dead letters of the cleanup consumer written
    before this was fixed carry a STOMP destination (`/topic/<name>`) in both headers."""
    if r.exchange.startswith("/"):
        return stomp_destination(r.exchange)
    return r.exchange, r.routing_key


def replay_headers(r: Record, target: Target | None = None) -> dict[str, Any]:
    """Headers for the republished message: our record removed, replay-count incremented, and, when it goes
    straight into its queue, the address it first came by."""
    out = {k: v for k, v in r.headers.items() if not k.startswith(("dlq-", "x-"))}
    out[REPLAY_COUNT] = r.replay_count + 1
    if target is not None and target.exchange == "" and not target.routing_key.startswith("/"):
        exchange, routing_key = original_address(r)
        out.setdefault(REPLAYED_EXCHANGE, exchange)
        out.setdefault(REPLAYED_ROUTING_KEY, routing_key)
    return out


@dataclass
class ReplaySummary:
    """What one replay of one dead-letter queue did, every dead letter counted once.

    After a replay, each selected dead letter is in exactly one of: `replayed` (its copy confirmed by the
    broker, the dead letter removed), `failed` (not republished, still dead-lettered), `doubtful` (the
    connection died before the broker confirmed its copy: still dead-lettered, and maybe also republished),
    `in_both` (copy confirmed, but the dead letter could not be removed: counted in `replayed` as well)."""

    queue: str
    dry_run: bool = False
    depth: int = 0  # dead letters in the queue when the replay started: it reads no further
    seen: int = 0
    selected: int = 0
    replayed: int = 0
    failed: int = 0
    doubtful: int = 0
    in_both: int = 0
    resettled: int = 0  # removals the broker lost (e.g. a quorum DLQ), found and done again by the check
    unchecked: int = 0  # removed, but the check after the replay could not run: maybe in both places
    by_reason: dict[str, Counter[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    interrupted: str | None = None

    def count(self, r: Record, outcome: str, n: int = 1) -> None:
        """Count `n` dead letters of r's reason as `outcome` (selected, replayed, failed, doubtful)."""
        self.by_reason.setdefault(r.reason, Counter())[outcome] += n
        setattr(self, outcome, getattr(self, outcome) + n)

    @property
    def reasons(self) -> Counter[str]:
        return Counter({reason: c["selected"] for reason, c in self.by_reason.items()})

    @property
    def clean(self) -> bool:
        """Everything selected was replayed and removed from the DLQ; nothing was interrupted."""
        return not (self.failed or self.doubtful or self.in_both or self.unchecked or self.interrupted) and \
            (self.dry_run or self.replayed == self.selected)

    def __str__(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        done = self.selected if self.dry_run else self.replayed
        text = (f"{self.queue}: depth {self.depth}, looked at {self.seen}, selected {self.selected}, {verb} {done}, "
                f"failed {self.failed}")
        extra = [f"{n} {what}" for what, n in (("doubtful", self.doubtful), ("in both places", self.in_both),
                                               ("not checked", self.unchecked), ("removals re-done", self.resettled))
                 if n]
        if self.interrupted:
            extra.append(f"interrupted: {self.interrupted}")
        return text + (f" ({'; '.join(extra)})" if extra else "")


class Adapter(Protocol):
    """A replay's broker-specific part: how the dead letters of the start are read, how a copy is published with
    the broker's confirm, how a dead letter is removed. `Replay` decides what happens, in which order."""

    lost: tuple[type[BaseException], ...]  # what a lost connection raises

    def session(self) -> AbstractContextManager[Any]:
        """The connection the replay reads, publishes and removes on."""

    def present(self) -> tuple[int, Iterable[Record]]:
        """The depth at the start, and the dead letters present then, oldest first (nothing newer)."""

    def deliver(self, selected: Iterable[Record]) -> Iterator[Record]:
        """The selected dead letters, each held so that `remove` can remove it, as they come."""

    def unreached(self) -> list[Record]:
        """Selected dead letters `deliver` has not given."""

    def target(self, r: Record) -> Target:
        """Where r's copy goes."""

    def publish(self, records: list[Record], target: Target) -> list[str | None]:
        """Copies of `records` to `target`, each confirmed by the broker; per record None, or why it was refused.
        Raises one of `lost` when the connection died before every answer came."""

    def remove(self, records: list[Record]) -> None:
        """Remove these dead letters (their copies are confirmed)."""

    def remove_again(self, records: list[Record]) -> tuple[list[Record], int]:
        """Those of these replayed dead letters still in the DLQ (their removal was lost), removed again, and
        how many of those removals the broker confirmed."""


class Replay:
    """One replay of one DLQ: selection by filter and limit, copy confirmed BEFORE the dead letter is removed,
    `rate` per second at most, every selected dead letter counted once (`summary`), a lost connection noted."""

    def __init__(self, queue: str, where: Filter, *, limit: int | None = None, rate: float | None = None,
                 dry_run: bool = False, progress: Progress | None = None) -> None:
        self.queue, self.where, self.limit, self.rate, self.progress = queue, where, limit, rate, progress
        self.summary = ReplaySummary(queue, dry_run)
        self.pending: list[Record] = []  # delivered, copy not sent yet
        self.in_flight: list[Record] = []  # copy sent, the broker's answer not received yet
        self.removed: list[Record] = []  # copy confirmed, dead letter removed (`_check` looks again)
        self.started = time.monotonic()

    def run(self, adapter: Adapter) -> ReplaySummary:
        """The replay on this broker; a lost connection ends it early (`summary.interrupted`), then the check."""
        try:
            with adapter.session():
                self.summary.depth, present = adapter.present()
                self._move(adapter, adapter.deliver(self._select(adapter, present)))
        except adapter.lost as exc:
            self._lost(adapter, exc)
        if self.removed:
            self._check(adapter)
        return self.summary

    def _select(self, adapter: Adapter, present: Iterable[Record]) -> Iterator[Record]:
        if self.limit is not None and self.limit <= 0:
            return
        for r in present:
            self.summary.seen += 1
            if not self.where(r):
                continue
            self.summary.count(r, "selected")
            if self.summary.dry_run:
                log.info("would replay %s from %s to %s", r.id, self.queue, adapter.target(r))
            else:
                yield r
            if self.limit is not None and self.summary.selected >= self.limit:
                return

    def _move(self, adapter: Adapter, delivered: Iterable[Record]) -> None:
        for r in delivered:
            if any(p.id == r.id for p in self.pending):  # one copy of an event per round: RabbitMQ confirms by id
                self._flush(adapter)
            self.pending.append(r)
            if len(self.pending) >= _flush_size(self.rate):
                self._flush(adapter)
        self._flush(adapter)
        for r in adapter.unreached():  # consumed meanwhile by someone else (a purge), or not delivered
            self._fail(r, f"{r.id}: no longer delivered from {self.queue}")

    def _flush(self, adapter: Adapter) -> None:
        """Publish the pending copies, one target at a time; remove the dead letters whose copies are confirmed."""
        while self.pending:
            target = adapter.target(self.pending[0])
            batch = [r for r in self.pending if adapter.target(r) == target]
            self.pending = [r for r in self.pending if adapter.target(r) != target]
            self.in_flight = batch
            answers = adapter.publish(batch, target)
            self.in_flight = []
            confirmed = []
            for r, why in zip(batch, answers, strict=True):
                if why is None:
                    confirmed.append(r)
                    self._done(r, target)
                else:
                    self._fail(r, f"{r.id}: {why}; left in {self.queue}")
            adapter.remove(confirmed)  # removed for sure once the broker said so; `_check` looks again
            _throttle(self.rate, self.summary.replayed, self.started)

    def _done(self, r: Record, target: Target) -> None:
        """The broker confirmed the copy: replayed (the dead letter's removal follows)."""
        self.removed.append(r)
        self.summary.count(r, "replayed")
        log.info("replayed %s from %s to %s (replay-count %d, reason was %s)", r.id, self.queue, target,
                 r.replay_count + 1, r.reason, extra={"event_id": r.id})
        if self.progress:
            self.progress(r)

    def _fail(self, r: Record, why: str) -> None:
        self.summary.count(r, "failed")
        self.summary.errors.append(why)
        log.error("replay of %s failed, it stays dead-lettered: %s", r.id, why, extra={"event_id": r.id})

    def _lost(self, adapter: Adapter, exc: BaseException) -> None:
        """The connection died: a copy sent without an answer may or may not have arrived (doubtful); a selected
        dead letter whose copy was never sent is still dead-lettered (failed)."""
        for r in self.in_flight:
            self.summary.count(r, "doubtful")
        unsent = self.pending + adapter.unreached()
        for r in unsent:
            self.summary.count(r, "failed")
        if unsent:
            self.summary.errors.append(f"{len(unsent)} selected dead letter(s) not reached before the connection "
                                       f"was lost: still in {self.queue}")
        self.in_flight, self.pending = [], []
        self.summary.interrupted = f"broker connection lost ({type(exc).__name__}: {exc})"
        log.error("replay of %s interrupted: %s", self.queue, self.summary.interrupted)

    def _check(self, adapter: Adapter) -> None:
        """Remove any replayed dead letter still in the DLQ (its removal was lost); count what stays."""
        left = self.removed
        try:
            for _ in range(CHECKS):
                found, removed = adapter.remove_again(left)
                if not found:
                    return
                self.summary.resettled += removed
                log.warning("%d replayed dead letter(s) were still in %s (their removal was lost); removed now",
                            len(found), self.queue)
                left = found
        except adapter.lost as exc:
            self.summary.unchecked = len(left)
            self.summary.errors.append(f"could not check {self.queue} after the replay: {type(exc).__name__}: {exc}")
            return
        self.summary.in_both = len(left)


def _flush_size(rate: float | None) -> int:
    """Copies per confirm round: FLUSH, fewer under a low rate (so the throttle spreads them)."""
    return FLUSH if rate is None else max(1, min(FLUSH, int(rate)))


def _throttle(rate: float | None, done: int, started: float) -> None:
    """Sleep until `done` copies since `started` are within `rate` per second."""
    if rate:
        ahead = done / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
