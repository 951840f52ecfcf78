"""Dead-letter records: the headers this project puts on a message it dead-letters.

The body is never touched. Header names have no `x-` prefix: RabbitMQ owns those (x-death).
`broker` dead-lettering after the queue's delivery limit carries x-death instead; `describe`
reads both so operators see one picture.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


@dataclass(frozen=True)
class Record:
    """A dead-lettered message as operators see it (ours, or dead-lettered by the broker itself)."""

    id: str
    queue: str
    body: bytes
    headers: dict[str, Any]
    reason: str
    error: str
    exchange: str
    routing_key: str
    source_queue: str
    failed_at: datetime | None
    attempts: int
    replay_count: int
    tag: Any = None  # the broker's handle for ack / requeue

    def field(self, path: str) -> Any:
        """A body field (dotted path into the JSON), else a header of that name."""
        node: Any = _json(self.body)
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node if node is not None else self.headers.get(path)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "queue": self.queue, "reason": self.reason, "error": self.error,
            "failed_at": self.failed_at.isoformat().replace("+00:00", "Z") if self.failed_at else None,
            "exchange": self.exchange, "routing_key": self.routing_key, "source_queue": self.source_queue,
            "attempts": self.attempts, "replay_count": self.replay_count,
            "event_id": self.headers.get(EVENT_ID) or self.field("event_id"),
        }


def record(queue: str, body: bytes, headers: dict[str, Any], message_id: str | None, tag: Any = None) -> Record:
    """Read our dlq-* headers, or RabbitMQ's x-death when the broker dead-lettered it."""
    death = (headers.get("x-death") or [{}])[0]
    routing_keys = death.get("routing-keys") or [""]
    reason = headers.get(REASON) or (f"broker-{death['reason']}" if death.get("reason") else "unknown")
    failed_at = headers.get(FAILED_AT) or death.get("time")
    return Record(
        id=message_id or hashlib.sha1(body).hexdigest()[:16],
        queue=queue,
        body=body,
        headers=headers,
        reason=str(reason),
        error=str(headers.get(ERROR) or (f"dead-lettered by the broker after {death.get('count')} deliveries"
                                         if death else "")),
        exchange=str(headers.get(EXCHANGE) or death.get("exchange") or ""),
        routing_key=str(headers.get(ROUTING_KEY) or routing_keys[0]),
        source_queue=str(headers.get(SOURCE_QUEUE) or death.get("queue") or ""),
        failed_at=_time(failed_at),
        attempts=int(headers.get(ATTEMPTS) or death.get("count") or 0),
        replay_count=int(headers.get(REPLAY_COUNT) or 0),
        tag=tag,
    )


def replay_headers(r: Record) -> dict[str, Any]:
    """Headers for the republished message: our record removed, replay-count incremented."""
    out = {k: v for k, v in r.headers.items() if not k.startswith(("dlq-", "x-"))}
    out[REPLAY_COUNT] = r.replay_count + 1
    return out


@dataclass(frozen=True)
class Filter:
    reason: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    match: tuple[tuple[str, str], ...] = ()
    ids: tuple[str, ...] = ()

    def __call__(self, r: Record, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        if self.ids and r.id not in self.ids:
            return False
        if self.reason and r.reason != self.reason:
            return False
        if self.older_than and not (r.failed_at and now - r.failed_at > self.older_than):
            return False
        if self.newer_than and not (r.failed_at and now - r.failed_at < self.newer_than):
            return False
        return all(str(r.field(k)) == v for k, v in self.match)

    @property
    def empty(self) -> bool:
        return self == Filter()


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `2h`, `7d` (or plain seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 2h, 7d)")
    return timedelta(seconds=float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
