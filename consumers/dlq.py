"""Dead-letter operations on RabbitMQ (AMQP) and ActiveMQ (STOMP): list, show, export, purge, replay — safely.

Browsing takes messages with basic.get WITHOUT acking and closes the channel at the end, so the
broker puts every message back: listing changes nothing. Replay republishes with publisher
confirms and acks a dead letter only after its copy is confirmed, so a replay killed at any
moment leaves each message in the work queue, in the dead-letter queue, or (harmlessly,
consumers are idempotent) in both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any

from injector import topology
from injector.config import Broker, Cleanup, Settings
from injector.deadletter import EXCHANGE, REASON, Filter, Record, record, replay_headers
from injector.errors import BrokerUnavailable, ConfigError, PublishFailed
from injector.messages import Outgoing
from injector.transport import Publisher, connection

log = logging.getLogger(__name__)

FLUSH = 200  # dead letters republished per confirm round
EVERYTHING = Filter()


def dead_letter_queues(settings: Settings, queue: str | None = None) -> list[str]:
    """The DLQs to act on: all of the topology's, or the one named (work queue or DLQ name).
    With ActiveMQ for Rucio's events, its DLQ.<consumer queue> is one of them."""
    known = [q.name for q in topology.declare(settings).queues if q.name.endswith(topology.DLQ_SUFFIX)]
    activemq = activemq_dlq_name(settings)
    if activemq:
        known.append(activemq)
    if queue is None:
        return known
    if activemq and queue in (activemq, activemq.removeprefix(ACTIVEMQ_DLQ_PREFIX)):
        return [activemq]
    name = queue if queue.endswith(topology.DLQ_SUFFIX) else topology.dead_letter_queue(queue)
    if name not in known:
        raise ConfigError(f"{queue!r} is not a dead-letter queue of this config (known: {', '.join(known)})")
    return [name]


ACTIVEMQ_DLQ_PREFIX = "DLQ."


def activemq_dlq_name(settings: Settings) -> str | None:
    c = settings.cleanup
    return c.dead_letter_destination.removeprefix("/queue/") if c.flavour == "activemq" else None


def dlq_for(settings: Settings, queue: str) -> RabbitDlq | ActiveMqDlq:
    """The tool for one dead-letter queue: ActiveMQ's DLQ.<queue> over STOMP, the rest over AMQP."""
    if queue == activemq_dlq_name(settings):
        return ActiveMqDlq(settings.cleanup)
    return RabbitDlq(settings.broker)


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


class ActiveMqDlq:
    """ActiveMQ's DLQ.<queue> over STOMP. Listing uses a queue BROWSER (nothing is consumed); purge and
    replay consume client-individual and ack a message only after its effect (for replay: after the
    broker's RECEIPT for the republished copy); whatever is not acked returns to the DLQ at disconnect."""

    IDLE = 1.0  # seconds without a frame: the queue has nothing more for us
    PREFETCH = 20000

    def __init__(self, cfg: Cleanup) -> None:
        self.cfg = cfg

    @contextmanager
    def _consume(self, queue: str, browse: bool) -> Iterator[tuple[Any, Iterator[Record]]]:
        import stomp

        frames: Queue[Any] = Queue()

        class Inbox(stomp.ConnectionListener):  # type: ignore[misc]
            def on_message(self, frame: Any) -> None:
                frames.put(frame)

        link = _StompClient(self.cfg, Inbox())
        try:
            headers = {"browser": "true"} if browse else {"activemq.prefetchSize": str(self.PREFETCH)}
            link.conn.subscribe(f"/queue/{queue}", id="dlq", ack="client-individual", headers=headers)

            def records() -> Iterator[Record]:
                while True:
                    try:
                        frame = frames.get(timeout=self.IDLE)
                    except Empty:
                        return
                    if frame.headers.get("browser") == "end":
                        return
                    yield _activemq_record(queue, frame)

            yield link, records()
        finally:
            link.close()

    def peek(self, queue: str, where: Filter = EVERYTHING) -> list[Record]:
        with self._consume(queue, browse=True) as (_, records):
            return [r for r in records if where(r)]

    def depth(self, queue: str) -> int:
        return len(self.peek(queue))

    def purge(self, queue: str, where: Filter = EVERYTHING) -> int:
        gone = 0
        with self._consume(queue, browse=False) as (link, records):
            for r in records:
                if where(r):
                    link.conn.ack(r.tag[0])
                    log.info("purged %s from %s (reason %s)", r.id, queue, r.reason, extra={"event_id": r.id})
                    gone += 1
        return gone

    def replay(self, queue: str, where: Filter = EVERYTHING, *, limit: int | None = None, rate: float | None = None,
               routing_key: str | None = None, dry_run: bool = False,
               progress: Callable[[Record], None] | None = None) -> ReplaySummary:
        """Send selected dead letters back to the queue they failed on (or `routing_key`, a destination)."""
        summary = ReplaySummary()
        started = time.monotonic()
        with self._consume(queue, browse=dry_run) as (link, records):
            for r in records:
                summary.seen += 1
                if not where(r):
                    continue
                summary.selected += 1
                summary.reasons[r.reason] += 1
                destination = routing_key or r.exchange
                if dry_run:
                    log.info("would replay %s from %s to %s", r.id, queue, destination)
                elif not destination:
                    summary.failed += 1
                    summary.errors.append(f"{r.id}: no original destination recorded; left in {queue}")
                else:
                    headers = replay_headers(r)
                    try:
                        link.send_confirmed(destination, r.body, headers, r.tag[1])
                    except PublishFailed as exc:
                        summary.failed += 1
                        summary.errors.append(str(exc))
                        log.error("replay of %s from %s failed, it stays dead-lettered: %s", r.id, queue, exc)
                    else:
                        link.conn.ack(r.tag[0])
                        summary.replayed += 1
                        log.info("replayed %s from %s to %s (replay-count %d, reason was %s)", r.id, queue,
                                 destination, r.replay_count + 1, r.reason, extra={"event_id": r.id})
                        if progress:
                            progress(r)
                        _throttle(rate, summary.replayed, started)
                if limit is not None and summary.selected >= limit:
                    break
        return summary


def _activemq_record(queue: str, frame: Any) -> Record:
    from injector.stomp import event_headers

    h = dict(frame.headers)
    body = frame.body if isinstance(frame.body, bytes) else str(frame.body or "").encode()
    headers = event_headers(h)
    if EXCHANGE not in headers and h.get("original-destination"):
        # The broker itself dead-lettered it (its redelivery limit): no reason headers of ours.
        headers[EXCHANGE] = h["original-destination"]
        headers.setdefault(REASON, "broker-redelivery-limit")
    return record(queue, body, headers, h.get("message-id"),
                  tag=(h.get("ack") or h.get("message-id"), h.get("content-type") or "application/json"))


class _StompClient:
    """A short-lived STOMP connection for operator commands, with receipted sends."""

    def __init__(self, cfg: Cleanup, listener: Any) -> None:
        import stomp

        from injector.stomp import Receipts

        self.receipts = Receipts()
        hosts = [(h, int(p)) for h, _, p in (hp.rpartition(":") for hp in cfg.stomp_hosts)]
        self.conn = stomp.Connection12(hosts, vhost=cfg.vhost, auto_decode=False, reconnect_attempts_max=1)
        self.conn.set_listener("records", listener)
        self.conn.set_listener("receipts", self.receipts)
        try:
            self.conn.connect(cfg.username, cfg.password, wait=True)
        except (stomp.exception.StompException, OSError) as exc:
            raise BrokerUnavailable(f"cannot connect to STOMP {cfg.stomp_hosts}: {type(exc).__name__}: {exc}") \
                from None

    def send_confirmed(self, destination: str, body: bytes, headers: dict[str, Any], content_type: str) -> None:
        self.receipts.send(self.conn, destination, [Outgoing(destination, "", body, headers, None, content_type)])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.disconnect()
