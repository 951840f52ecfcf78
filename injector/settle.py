"""Outcomes and how they are settled: the ONE place that decides ack / requeue / dead-letter.

Handlers return an `Outcome` per message; they never ack. `settle` turns a batch of
(delivery, outcome) pairs into broker actions. A dead-letter is published (with publisher
confirms) BEFORE the original is acked, so a crash in between duplicates, never loses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from injector import deadletter
from injector.errors import Permanent, PublishFailed, Transient
from injector.messages import Delivery, Outgoing

log = logging.getLogger(__name__)

Kind = Literal["done", "dead-letter", "retry"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one message: `label` for people and metrics, `reason` for dead letters."""

    kind: Kind
    label: str
    did: str | None = None
    reason: str | None = None
    error: str | None = None
    emit: tuple[Outgoing, ...] = ()  # published (confirmed) before the message is acked

    @classmethod
    def done(cls, label: str, did: str | None = None, emit: tuple[Outgoing, ...] = ()) -> Outcome:
        return cls("done", label, did, emit=emit)

    @classmethod
    def failed(cls, exc: Permanent | Transient, did: str | None = None) -> Outcome:
        kind: Kind = "dead-letter" if isinstance(exc, Permanent) else "retry"
        return cls(kind, exc.reason, did, exc.reason, str(exc))


class Session(Protocol):
    """The broker operations settle needs (AMQP, STOMP, or the in-memory one). `publish` and
    `dead_letter` return only when the broker confirmed, or raise PublishFailed. `hand_back` returns
    deliveries to their queue WITHOUT spending their delivery budget (at shutdown, in a long outage)."""

    def ack(self, deliveries: Sequence[Delivery]) -> None: ...
    def requeue(self, deliveries: Sequence[Delivery]) -> None: ...
    def hand_back(self, deliveries: Sequence[Delivery]) -> None: ...
    def publish(self, messages: Sequence[Outgoing]) -> None: ...
    def dead_letter(self, messages: Sequence[Outgoing]) -> None: ...


@dataclass(frozen=True)
class Route:
    """Where this consumer's messages come from and where its dead letters go."""

    queue: str
    dead_letter_exchange: str
    delivery_limit: int


def settle(session: Session, results: Sequence[tuple[Delivery, Outcome]], route: Route) -> Sequence[Outcome]:
    """Apply outcomes; returns the outcomes as finally applied (a last retry becomes a dead letter)."""
    final = [(d, _exhausted(d, o, route)) for d, o in results]
    emits = [m for _, o in final if o.kind == "done" for m in o.emit]
    if emits:
        try:
            session.publish(emits)
        except PublishFailed as exc:
            log.error("could not publish %d message(s), requeueing their triggers: %s", len(emits), exc)
            final = _demote(final, lambda o: bool(o.emit), "publish-failed")
    dead = [(d, o) for d, o in final if o.kind == "dead-letter"]
    if dead:
        try:
            session.dead_letter([_dead_letter_message(d, o, route) for d, o in dead])
        except PublishFailed as exc:
            log.error("could not dead-letter %d message(s), requeueing them: %s", len(dead), exc)
            final = _demote(final, lambda o: o.kind == "dead-letter", "dead-letter-failed")
    session.requeue([d for d, o in final if o.kind == "retry"])
    session.ack([d for d, o in final if o.kind != "retry"])
    for d, o in final:
        _log(d, o)
    return [o for _, o in final]


def _demote(pairs: list[tuple[Delivery, Outcome]], which: Callable[[Outcome], bool],
            label: str) -> list[tuple[Delivery, Outcome]]:
    """Nothing is lost: what could not be published is requeued instead of acked."""
    return [(d, Outcome("retry", label, o.did, o.reason, o.error)) if which(o) else (d, o) for d, o in pairs]


def _exhausted(d: Delivery, o: Outcome, route: Route) -> Outcome:
    """A retry on the last allowed delivery is dead-lettered by us, with our reason headers."""
    if o.kind == "retry" and d.attempts >= route.delivery_limit:
        return Outcome("dead-letter", o.label, o.did, o.reason,
                       f"gave up after {d.attempts} deliveries: {o.error}")
    return o


def _dead_letter_message(d: Delivery, o: Outcome, route: Route) -> Outgoing:
    hdrs = deadletter.headers(
        d.headers, reason=o.reason or o.label, error=o.error or "", exchange=d.exchange,
        routing_key=d.routing_key, queue=route.queue, attempts=d.attempts)
    return Outgoing(route.dead_letter_exchange, route.queue, d.body, hdrs, d.message_id, d.content_type)


def _log(d: Delivery, o: Outcome) -> None:
    level = logging.INFO if o.kind == "done" else logging.WARNING
    log.log(level, "%s %s %s%s", o.kind, o.label, o.did or "-", f": {o.error}" if o.error else "",
            extra={"event_id": d.message_id, "did": o.did, "outcome": o.label, "kind": o.kind})
