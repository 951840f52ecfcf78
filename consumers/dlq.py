"""Dead-letter operations on RabbitMQ: list, show, export, purge and replay — safely.

Browsing takes messages with basic.get WITHOUT acking and closes the channel at the end, so the
broker puts every message back: listing changes nothing. Replay republishes with publisher
confirms and acks a dead letter only after its copy is confirmed, so a replay killed at any
moment leaves each message in the work queue, in the dead-letter queue, or (harmlessly,
consumers are idempotent) in both.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from injector import topology
from injector.config import Broker, Settings
from injector.deadletter import Filter, Record, record, replay_headers
from injector.errors import ConfigError, PublishFailed
from injector.messages import Outgoing
from injector.transport import Publisher, connection

log = logging.getLogger(__name__)

FLUSH = 200  # dead letters republished per confirm round
EVERYTHING = Filter()


def dead_letter_queues(settings: Settings, queue: str | None = None) -> list[str]:
    """The DLQs to act on: all of the topology's, or the one named (work queue or DLQ name)."""
    known = [q.name for q in topology.declare(settings).queues if q.name.endswith(topology.DLQ_SUFFIX)]
    if queue is None:
        return known
    name = queue if queue.endswith(topology.DLQ_SUFFIX) else topology.dead_letter_queue(queue)
    if name not in known:
        raise ConfigError(f"{queue!r} is not a dead-letter queue of this config (known: {', '.join(known)})")
    return [name]


@dataclass
class ReplaySummary:
    seen: int = 0
    selected: int = 0
    replayed: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


class RabbitDlq:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    @contextmanager
    def _browse(self, queue: str) -> Iterator[tuple[Any, Any, Iterator[Record]]]:
        """(connection, channel, records): whatever is not acked returns to the queue at exit."""
        conn = connection(self._broker)
        try:
            channel = conn.channel()

            def records() -> Iterator[Record]:
                while (m := channel.basic_get(queue, no_ack=False)) is not None:
                    props = m.properties
                    headers = {k: v for k, v in (props.get("application_headers") or {}).items()
                               if k != "x-delivery-count"}
                    yield record(queue, bytes(m.body), headers, props.get("message_id"),
                                 tag=(m.delivery_tag, props.get("content_type") or "application/json"))

            yield conn, channel, records()
        finally:
            conn.release()

    def peek(self, queue: str, where: Filter = EVERYTHING) -> list[Record]:
        with self._browse(queue) as (_, _, records):
            return [r for r in records if where(r)]

    def depth(self, queue: str) -> int:
        conn = connection(self._broker)
        try:
            return int(conn.channel().queue_declare(queue, passive=True).message_count)
        finally:
            conn.release()

    def purge(self, queue: str, where: Filter = EVERYTHING) -> int:
        with self._browse(queue) as (_, channel, records):
            gone = 0
            for r in records:
                if where(r):
                    channel.basic_ack(r.tag[0])
                    log.info("purged %s from %s (reason %s)", r.id, queue, r.reason, extra={"event_id": r.id})
                    gone += 1
            return gone

    def replay(self, queue: str, where: Filter = EVERYTHING, *, limit: int | None = None, rate: float | None = None,
               routing_key: str | None = None, dry_run: bool = False,
               progress: Callable[[Record], None] | None = None) -> ReplaySummary:
        """Republish selected dead letters to their original exchange / routing key (or `routing_key`)."""
        summary = ReplaySummary()
        with self._browse(queue) as (conn, channel, records):
            publisher = None if dry_run else Publisher(conn)
            pending: list[Record] = []
            started = time.monotonic()
            for r in records:
                summary.seen += 1
                if not where(r):
                    continue
                summary.selected += 1
                summary.reasons[r.reason] += 1
                if dry_run:
                    log.info("would replay %s from %s to %s/%s", r.id, queue, r.exchange, routing_key or r.routing_key)
                elif not r.exchange:
                    summary.failed += 1
                    summary.errors.append(f"{r.id}: no original exchange recorded; left in {queue}")
                else:
                    pending.append(r)
                    if len(pending) >= _flush_size(rate):
                        self._flush(channel, publisher, pending, routing_key, summary, progress)
                        _throttle(rate, summary.replayed, started)
                if limit is not None and summary.selected >= limit:
                    break
            if pending:
                self._flush(channel, publisher, pending, routing_key, summary, progress)
        return summary

    def _flush(self, channel: Any, publisher: Publisher | None, pending: list[Record], routing_key: str | None,
               summary: ReplaySummary, progress: Callable[[Record], None] | None) -> None:
        assert publisher is not None
        batch = list(pending)
        pending.clear()
        messages = [Outgoing(r.exchange, routing_key or r.routing_key, r.body, replay_headers(r), r.id, r.tag[1])
                    for r in batch]
        try:
            publisher.publish(messages)
        except PublishFailed as exc:  # left unacked: they return to the DLQ when the channel closes
            summary.failed += len(batch)
            summary.errors.append(str(exc))
            log.error("replay of %d message(s) from %s failed, they stay dead-lettered: %s", len(batch),
                      batch[0].queue, exc)
            return
        for r, m in zip(batch, messages, strict=True):
            channel.basic_ack(r.tag[0])
            summary.replayed += 1
            log.info("replayed %s from %s to %s/%s (replay-count %d, reason was %s)", r.id, r.queue, m.exchange,
                     m.routing_key, r.replay_count + 1, r.reason, extra={"event_id": r.id})
            if progress:
                progress(r)


def _flush_size(rate: float | None) -> int:
    return FLUSH if rate is None else max(1, min(FLUSH, int(rate)))


def _throttle(rate: float | None, done: int, started: float) -> None:
    if rate:
        ahead = done / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)


def export_line(r: Record) -> str:
    """One JSON line: the record's summary, its headers and its body (text, or base64 if binary)."""
    import base64

    data: dict[str, Any] = r.summary()
    data["headers"] = {k: v for k, v in r.headers.items() if not k.startswith("x-")}
    try:
        data["body"] = r.body.decode()
    except UnicodeDecodeError:
        data["body_base64"] = base64.b64encode(r.body).decode()
    return json.dumps(data, default=str)
