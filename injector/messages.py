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
        return int(self.headers.get("x-delivery-count", 0) or 0) + 1
