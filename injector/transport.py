"""AMQP transport (kombu over py-amqp): connections, confirmed publishing, batched consumption.

Transport code moves bytes and headers; it never knows what a replica is. Publishing is
pipelined: every message is published with `mandatory`, then all publisher confirms are
awaited together, so an unroutable or nacked message is an error, not silence, without one
round trip per message.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Sequence

import amqp
import kombu
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from injector.config import Broker
from injector.errors import BrokerUnavailable, PublishFailed
from injector.messages import Delivery, Outgoing

log = logging.getLogger(__name__)

CONFIRM_WINDOW = 2000  # unconfirmed messages in flight before the publisher waits


def connection(broker: Broker) -> kombu.Connection:
    """An open kombu connection (failover over broker.urls), retried with jittered backoff."""
    conn = kombu.Connection(broker.urls, heartbeat=broker.heartbeat, connect_timeout=10,
                            failover_strategy="round-robin")

    @retry(
        retry=retry_if_exception_type(BrokerUnavailable),
        stop=stop_after_attempt(broker.connect_attempts),
        wait=wait_random_exponential(multiplier=0.5, max=15),
        reraise=True,
    )
    def connect() -> None:
        try:
            conn.connect()
        except conn.connection_errors as exc:
            log.warning("broker %s unreachable: %s", conn.as_uri(), exc)
            raise BrokerUnavailable(f"broker {conn.as_uri()} unreachable: {exc}") from exc

    connect()
    return conn


class Publisher:
    """Confirmed, mandatory publishing on its own channel of a kombu connection."""

    def __init__(self, conn: kombu.Connection, timeout: float = 30.0) -> None:
        self._conn = conn
        self._timeout = timeout
        self._channel: amqp.Channel | None = None
        self._seq = 0
        self._pending: dict[int, str] = {}
        self._failed: dict[str, str] = {}

    def _open(self) -> amqp.Channel:
        if self._channel is None or not self._channel.is_open:
            ch = self._conn.channel()
            ch.confirm_select()
            ch.events["basic_ack"].add(self._on_ack)
            ch.events["basic_nack"].add(self._on_nack)
            ch.events["basic_return"].add(self._on_return)
            self._channel, self._seq, self._pending = ch, 0, {}
        return self._channel

    def _settled(self, tag: int, multiple: bool) -> list[str]:
        tags = [t for t in self._pending if t <= tag] if multiple else [tag]
        return [self._pending.pop(t) for t in tags if t in self._pending]

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settled(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        for mid in self._settled(tag, multiple):
            self._failed[mid] = "nacked by the broker"

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: amqp.Message) -> None:
        mid = message.properties.get("message_id", "?")
        self._failed[mid] = f"unroutable: exchange {exchange!r} has no queue bound for {routing_key!r} ({exc})"

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish all; return once the broker confirmed every one. PublishFailed names the failures."""
        self._failed = {}
        try:
            ch = self._open()
            for m in messages:
                mid = m.message_id or str(uuid.uuid4())
                self._seq += 1
                self._pending[self._seq] = mid
                msg = amqp.Message(m.body, content_type=m.content_type, delivery_mode=2, message_id=mid,
                                   application_headers=m.headers, timestamp=int(time.time()))
                ch.basic_publish(msg, exchange=m.exchange, routing_key=m.routing_key, mandatory=True)
                if len(self._pending) >= CONFIRM_WINDOW:
                    self._await(CONFIRM_WINDOW // 2)
            self._await(0)
        except self._conn.channel_errors as exc:
            self._channel = None
            raise PublishFailed(f"broker refused the publish: {exc}") from exc
        except self._conn.connection_errors as exc:
            self._channel = None
            raise PublishFailed(f"broker connection lost while publishing: {exc}") from exc
        if self._failed:
            detail = "; ".join(f"{mid}: {why}" for mid, why in list(self._failed.items())[:20])
            raise PublishFailed(f"{len(self._failed)} of {len(messages)} message(s) not accepted: {detail}")

    def _await(self, allowed: int) -> None:
        deadline = time.monotonic() + self._timeout
        while len(self._pending) > allowed:
            left = deadline - time.monotonic()
            if left <= 0:
                self._channel = None  # confirms are lost with this channel; never reuse it
                raise PublishFailed(f"{len(self._pending)} publish confirm(s) not received in {self._timeout}s")
            with contextlib.suppress(TimeoutError):
                self._conn.drain_events(timeout=min(left, 1.0))

    def close(self) -> None:
        if self._channel is not None and self._channel.is_open:
            self._channel.close()
        self._channel = None


class AmqpSession:
    """Settling operations for deliveries of one consumer channel (see injector.settle.Session)."""

    def __init__(self, channel: amqp.Channel, publisher: Publisher, generation: int) -> None:
        self.channel = channel
        self.publisher = publisher
        self.generation = generation

    def _current(self, d: Delivery) -> bool:
        # A delivery tag is only valid on the channel that delivered it; after a reconnect
        # the broker redelivers, so acting on a stale tag would be wrong and is skipped.
        return d.generation == self.generation and self.channel.is_open

    def ack(self, delivery: Delivery) -> None:
        if self._current(delivery):
            self.channel.basic_ack(delivery.delivery_tag)

    def requeue(self, delivery: Delivery) -> None:
        if self._current(delivery):
            self.channel.basic_reject(delivery.delivery_tag, requeue=True)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.publisher.publish(messages)

    def dead_letter(self, messages: Sequence[Outgoing]) -> None:
        self.publisher.publish(messages)


def to_delivery(message: amqp.Message, generation: int) -> Delivery:
    info = message.delivery_info
    props = message.properties
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    return Delivery(
        body=body,
        headers=dict(props.get("application_headers") or {}),
        exchange=info.get("exchange", ""),
        routing_key=info.get("routing_key", ""),
        delivery_tag=info["delivery_tag"],
        redelivered=bool(info.get("redelivered")),
        message_id=props.get("message_id"),
        content_type=props.get("content_type", "application/json"),
        generation=generation,
    )


def drain(conn: kombu.Connection, timeout: float) -> None:
    """Wait up to `timeout` for frames; keep heartbeats flowing."""
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=timeout)
    conn.heartbeat_check()
