"""Dead-letter records: the headers this project puts on a message it dead-letters.

The body is never touched. Header names have no `x-` prefix: RabbitMQ owns those (x-death).
`broker` dead-lettering after the queue's delivery limit carries x-death instead; `describe`
reads both so operators see one picture.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Any

REASON = "dlq-reason"
ERROR = "dlq-error"
EXCHANGE = "dlq-original-exchange"
ROUTING_KEY = "dlq-original-routing-key"
SOURCE_QUEUE = "dlq-source-queue"
FAILED_AT = "dlq-failed-at"
HOST = "dlq-consumer-host"
ATTEMPTS = "dlq-attempts"
REPLAY_COUNT = "dlq-replay-count"
EVENT_ID = "event-id"

MAX_ERROR_TEXT = 4000  # AMQP header tables share the frame; keep them small


def headers(
    original: dict[str, Any],
    *,
    reason: str,
    error: str,
    exchange: str,
    routing_key: str,
    queue: str,
    attempts: int,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The original headers plus this project's dead-letter record."""
    out = {k: v for k, v in original.items() if not k.startswith("x-")}
    out.update({
        REASON: reason,
        ERROR: error if len(error) <= MAX_ERROR_TEXT else error[: MAX_ERROR_TEXT - 3] + "...",
        EXCHANGE: exchange,
        ROUTING_KEY: routing_key,
        SOURCE_QUEUE: queue,
        FAILED_AT: (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        HOST: socket.gethostname(),
        ATTEMPTS: attempts,
        REPLAY_COUNT: int(original.get(REPLAY_COUNT, 0) or 0),
    })
    return out
