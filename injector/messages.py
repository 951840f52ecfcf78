"""Broker-neutral message records: what a consumer received and what it wants published.

No broker library is imported here, so handlers and `injector.settle` stay transport-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str = "application/json"


@dataclass(slots=True)
class Delivery:
    """One received message, with what settling it needs."""

    body: bytes
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    delivery_tag: int
    redelivered: bool
    message_id: str | None
    content_type: str
    generation: int = 0
    received_at: float = field(default_factory=time.monotonic)
    ack_id: str | None = None  # STOMP: the frame's ack header
    deliveries: int | None = None  # where the broker sends no count (ActiveMQ): from our retry copy's header

    @property
    def attempts(self) -> int:
        """Deliveries so far, this one included (quorum queues count in x-delivery-count)."""
        if self.deliveries is not None:
            return self.deliveries
        return count_of(self.headers.get("x-delivery-count")) + 1


# A copy this project puts back on a queue in place of a delivery (ActiveMQ retries, hand-backs at shutdown or
# in a long Rucio outage) carries how many deliveries the event had before it, and where it was first routed,
# so the copy continues the count (the delivery budget) and dead-letters name the original route.
PRIOR = "injector-retries"
ORIGIN_EXCHANGE = "injector-exchange"
ORIGIN_ROUTING_KEY = "injector-routing-key"
COPY_HEADERS = (PRIOR, ORIGIN_EXCHANGE, ORIGIN_ROUTING_KEY)


def copy_of(d: Delivery, queue: str, deliveries: int) -> Outgoing:
    """A copy of `d` for its queue (the default exchange routes it there) that counts `deliveries` so far."""
    headers = {k: v for k, v in d.headers.items() if k != "x-delivery-count"}
    headers.update({PRIOR: deliveries, ORIGIN_EXCHANGE: d.exchange, ORIGIN_ROUTING_KEY: d.routing_key})
    return Outgoing("", queue, d.body, headers, d.message_id, d.content_type)


def split_copy_headers(headers: dict[str, Any]) -> tuple[dict[str, Any], int, str | None, str | None]:
    """(the event's own headers, deliveries before this copy, original exchange, original routing key)."""
    own = {k: v for k, v in headers.items() if k not in COPY_HEADERS}
    exchange, routing_key = headers.get(ORIGIN_EXCHANGE), headers.get(ORIGIN_ROUTING_KEY)
    return own, count_of(headers.get(PRIOR)), None if exchange is None else str(exchange), \
        None if routing_key is None else str(routing_key)


def count_of(value: Any) -> int:
    """A count from a header, which any publisher may have set to anything: not a whole number → 0."""
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0
