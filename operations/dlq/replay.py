"""Replaying dead letters: where each one goes back (`amqp_target`, `stomp_target`), the headers of the
republished copy (`replay_headers`), and what a replay did (`ReplaySummary`).

The rule: a replay goes straight back into the queue the dead letter came from (RabbitMQ: the default
exchange with the queue's name as routing key; ActiveMQ: /queue/<consumer queue>), so nothing else bound to
the original exchange or topic sees the event a second time. `--to` re-routes explicitly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from injector.deadletter import REPLAY_COUNT, REPLAYED_EXCHANGE, REPLAYED_ROUTING_KEY, Record
from injector.topology import stomp_destination


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
