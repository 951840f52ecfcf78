"""Dead-letter records: the headers this project puts on a message it dead-letters.

The body is never touched. Header names have no `x-` prefix: RabbitMQ owns those (x-death).
`broker` dead-lettering after the queue's delivery limit carries x-death instead; `record`
reads both so operators see one picture. Ids: `stable_id` (what operators see), `resolve` (short prefixes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from injector import clock
from injector.errors import InjectorError
from injector.logs import masked
from injector.messages import COPY_HEADERS, ORIGIN_EXCHANGE, ORIGIN_ROUTING_KEY, count_of

log = logging.getLogger(__name__)

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
# A replay that goes straight back into its queue (the default exchange) carries the address the event first
# came by, as every copy put back in a queue does (injector.messages), so that a dead letter of the replayed
# copy still names it (and `--to` can route through it). Consumers read it into Delivery.exchange/routing_key.
REPLAYED_EXCHANGE = ORIGIN_EXCHANGE
REPLAYED_ROUTING_KEY = ORIGIN_ROUTING_KEY
SHORT_ID = 8  # characters of an id shown in tables; `show` and `--id` accept any unambiguous prefix

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
    """The original headers plus this project's dead-letter record (never the count a copy carried: a replay
    starts afresh). The error text is masked like a log line: no credentials, no kept secret."""
    error = masked(error)
    exchange = str(original.get(REPLAYED_EXCHANGE, exchange))
    routing_key = str(original.get(REPLAYED_ROUTING_KEY, routing_key))
    out = {k: v for k, v in original.items() if not k.startswith("x-") and k not in COPY_HEADERS}
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
    message_id: str | None = None  # as the broker gave it (ActiveMQ: its JMS id, the browse's unit)

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID]

    @property
    def key(self) -> tuple[str, int, str]:
        """This dead letter, told apart from a later dead letter of its own replay (one replay-count more)."""
        return self.id, self.replay_count, str(self.headers.get(FAILED_AT) or self.failed_at or "")

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


def record(queue: str, body: bytes, headers: dict[str, Any], message_id: str | None, tag: Any = None,
           own_id: str | None = None) -> Record:
    """Read our dlq-* headers, or RabbitMQ's x-death when the broker dead-lettered it. `own_id`: the id the
    publisher gave the message where the broker's `message_id` is its own (ActiveMQ's correlation-id)."""
    death = (headers.get("x-death") or [{}])[0]
    routing_keys = death.get("routing-keys") or [""]
    reason = headers.get(REASON) or (f"broker-{death['reason']}" if death.get("reason") else "unknown")
    failed_at = headers.get(FAILED_AT) or death.get("time")
    return Record(
        id=stable_id(own_id or message_id, body),
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
        attempts=count_of(headers.get(ATTEMPTS) or death.get("count")),
        replay_count=count_of(headers.get(REPLAY_COUNT)),
        tag=tag,
        message_id=message_id,
    )


# Ids a broker makes up: ActiveMQ's `ID:<host>-<port>-…`, RabbitMQ STOMP's `T_<subscription>@@session-…@@<n>`.
# They share long prefixes, so a short id of theirs would name nothing: such a dead letter goes by a digest.
_BROKER_MADE = re.compile(r"^ID:|@@")


def stable_id(message_id: str | None, body: bytes) -> str:
    """The id operators see: the message id the event was published with (the DAQ's event_id), or a digest
    of a broker-made id, or of the body when there is none. The same dead letter has the same id every time."""
    if not message_id:
        return hashlib.sha1(body).hexdigest()[:16]
    if _BROKER_MADE.search(message_id):
        return hashlib.sha1(message_id.encode()).hexdigest()[:16]
    return message_id


class UnknownId(InjectorError):
    """An id (or prefix) that names no dead letter, or more than one."""


def resolve(prefixes: tuple[str, ...], ids: list[str]) -> tuple[str, ...]:
    """The full ids the given ids or unambiguous prefixes name (the table shows the first SHORT_ID characters)."""
    known = sorted(set(ids))
    out = []
    for p in prefixes:
        if p in known:
            out.append(p)
            continue
        matches = [i for i in known if i.startswith(p)]
        if not matches:
            raise UnknownId(f"no dead letter has an id starting with {p!r}")
        if len(matches) > 1:
            raise UnknownId(f"id prefix {p!r} is ambiguous: {', '.join(matches[:10])}"
                            f"{' …' if len(matches) > 10 else ''}; give more characters")
        out.append(matches[0])
    return tuple(out)


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
    """A dead letter's time header, read by `injector.clock`; a listing never fails on one: unreadable → None."""
    if not isinstance(value, datetime | str) or value == "":
        return None
    try:
        return clock.parse(value, "dead-letter time header")
    except clock.BadTime as exc:
        log.warning("%s", exc)
        return None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
