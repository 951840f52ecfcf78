"""STOMP consumption for the cleanup consumer: hermes → broker → competing cleanup consumers.

Works with RabbitMQ's STOMP plugin (a durable quorum queue bound to amq.topic, subscribed as
/amq/queue/<q>) and with ActiveMQ Classic (a virtual topic consumed as
/queue/Consumer.<app>.VirtualTopic.<name>). Acks are client-individual and sent only after the
effect; stomp.py's receiver thread only enqueues (a slow Rucio call never starves heartbeats);
a lost connection is reconnected and RESUBSCRIBED by the BatchWorker loop (stomp.py does not).

Redelivery counting: RabbitMQ quorum queues put `x-delivery-count` on redeliveries; ActiveMQ
sends no count, so deliveries of a message id are counted in this process (`DeliveryCounts`) and
the broker's own redeliveryPlugin limit (broker-config/activemq) catches a message bouncing
between processes. Dead letters on ActiveMQ go to its DLQ.<queue> over STOMP with a receipt;
file-archived always goes to the DAQ exchange over AMQP with publisher confirms.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import stomp
import stomp.exception

from injector.config import Broker, Cleanup
from injector.errors import BrokerUnavailable, PublishFailed
from injector.messages import Delivery, Outgoing
from injector.metrics import Metrics
from injector.settle import Route, Session
from injector.transport import Publisher, connection
from injector.worker import Batching, BatchWorker, Link, Process

log = logging.getLogger(__name__)

RECEIPT_TIMEOUT = 30.0


class DeliveryCounts:
    """Deliveries per message id seen by this process (ActiveMQ sends no delivery count)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def seen(self, message_id: str) -> int:
        with self._lock:
            n = self._seen.pop(message_id, 0) + 1
            self._seen[message_id] = n
            while len(self._seen) > self._limit:
                self._seen.popitem(last=False)
            return n

    def forget(self, message_id: str | None) -> None:
        with self._lock:
            if message_id is not None:
                self._seen.pop(message_id, None)


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    """Runs on stomp.py's receiver thread: it only enqueues and records."""

    def __init__(self, cfg: Cleanup, generation: int, counts: DeliveryCounts) -> None:
        self.cfg = cfg
        self.generation = generation
        self.counts = counts
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.lost = threading.Event()
        self.errors: list[str] = []
        self.receipts: dict[str, threading.Event] = {}

    def on_message(self, frame: Any) -> None:
        self.inbox.put(to_delivery(frame, self.generation, self.cfg.flavour, self.counts))

    def on_receipt(self, frame: Any) -> None:
        event = self.receipts.get(frame.headers.get("receipt-id", ""))
        if event is not None:
            event.set()

    def on_error(self, frame: Any) -> None:
        text = f"{frame.headers.get('message', '')} {_text(frame.body)}".strip()
        self.errors.append(text)
        log.error("STOMP broker error: %s", text)

    def on_disconnected(self) -> None:
        self.lost.set()

    def on_heartbeat_timeout(self) -> None:
        log.warning("STOMP heartbeat timeout")
        self.lost.set()


def _text(body: bytes | str | None) -> str:
    return body.decode(errors="replace") if isinstance(body, bytes) else (body or "")


def to_delivery(frame: Any, generation: int, flavour: str, counts: DeliveryCounts) -> Delivery:
    h = dict(frame.headers)
    body = frame.body if isinstance(frame.body, bytes) else str(frame.body or "").encode()
    message_id = h.get("message-id")
    deliveries = None
    if flavour == "activemq" and message_id:
        deliveries = counts.seen(message_id)
    elif "x-delivery-count" in h:
        h["x-delivery-count"] = int(h["x-delivery-count"])
    destination = h.get("destination", "")
    return Delivery(body=body, headers=h, exchange=destination, routing_key=destination, delivery_tag=0,
                    redelivered=h.get("redelivered") == "true", message_id=message_id,
                    content_type=h.get("content-type", "application/json"), generation=generation,
                    ack_id=h.get("ack") or message_id, deliveries=deliveries)


class StompSession:
    """settle's Session over one STOMP connection (+ an AMQP publisher for file-archived)."""

    def __init__(self, link: StompLink) -> None:
        self.link = link

    def _current(self, d: Delivery) -> bool:
        # An ack id is only valid on the connection that delivered it; after a reconnect the
        # broker redelivers, so a stale one is skipped.
        return d.generation == self.link.generation and self.link.conn.is_connected()

    def ack(self, delivery: Delivery) -> None:
        if self._current(delivery):
            self.link.conn.ack(delivery.ack_id)
            self.link.counts.forget(delivery.message_id)

    def requeue(self, delivery: Delivery) -> None:
        if self._current(delivery):
            self.link.conn.nack(delivery.ack_id)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.link.publisher().publish(messages)

    def dead_letter(self, messages: Sequence[Outgoing]) -> None:
        if self.link.cfg.flavour == "rabbitmq":
            self.link.publisher().publish(messages)  # to the DLX → <queue>.dlq
        else:
            self.link.send_confirmed(self.link.cfg.dead_letter_destination, messages)


class StompLink:
    """One STOMP connection with one client-individual subscription (a BatchWorker Link)."""

    def __init__(self, cfg: Cleanup, broker: Broker, generation: int, buffer: list[Delivery],
                 counts: DeliveryCounts) -> None:
        self.cfg = cfg
        self.broker = broker
        self.generation = generation
        self.buffer = buffer
        self.counts = counts
        self.listener = _Listener(cfg, generation, counts)
        self.subscription_id = f"cleanup-{uuid.uuid4().hex[:8]}"
        self._amqp: Any = None
        self._publisher: Publisher | None = None
        self.cancelled = False
        hosts = [(h, int(p)) for h, _, p in (hp.rpartition(":") for hp in cfg.stomp_hosts)]
        self.conn = stomp.Connection12(hosts, heartbeats=(cfg.heartbeat_ms, cfg.heartbeat_ms), vhost=cfg.vhost,
                                       auto_decode=False, reconnect_attempts_max=1, timeout=10)
        self.conn.set_listener("injector", self.listener)
        try:
            self.conn.connect(cfg.username, cfg.password, wait=True,
                              headers={"client-id": f"rucio-injector-{uuid.uuid4().hex[:8]}"}
                              if cfg.flavour == "activemq" else None)
        except (stomp.exception.StompException, OSError) as exc:
            raise BrokerUnavailable(f"cannot connect to STOMP {cfg.stomp_hosts}: {type(exc).__name__}: {exc}") \
                from None
        prefetch = ({"prefetch-count": str(cfg.prefetch)} if cfg.flavour == "rabbitmq"
                    else {"activemq.prefetchSize": str(cfg.prefetch)})
        self.conn.subscribe(cfg.subscription, id=self.subscription_id, ack="client-individual", headers=prefetch)
        self.session: Session = StompSession(self)
        log.info("subscribed to %s on %s (%s, prefetch %d)", cfg.subscription, cfg.stomp_hosts, cfg.flavour,
                 cfg.prefetch)

    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._amqp = connection(self.broker)
            self._publisher = Publisher(self._amqp)
        return self._publisher

    def send_confirmed(self, destination: str, messages: Sequence[Outgoing]) -> None:
        """SEND each message with a receipt; returns when the broker has receipted all."""
        waits = []
        try:
            for m in messages:
                receipt = uuid.uuid4().hex
                event = self.listener.receipts[receipt] = threading.Event()
                headers = {k: str(v) for k, v in m.headers.items()}
                headers["persistent"] = "true"
                if m.message_id:
                    headers["correlation-id"] = m.message_id
                self.conn.send(destination, m.body, content_type=m.content_type, headers=headers, receipt=receipt)
                waits.append((receipt, event))
            for _, event in waits:
                if not event.wait(RECEIPT_TIMEOUT):
                    raise PublishFailed(f"no receipt from the broker for a message sent to {destination}")
        except (stomp.exception.StompException, OSError) as exc:
            raise PublishFailed(f"cannot send to {destination}: {type(exc).__name__}: {exc}") from None
        finally:
            for receipt, _ in waits:
                self.listener.receipts.pop(receipt, None)

    def pump(self, timeout: float) -> None:
        if self.cancelled:  # what arrives now stays unacked: the broker redelivers it after we disconnect
            self.listener.lost.wait(timeout)
        else:
            self._receive(timeout)
        if self.listener.lost.is_set() or not self.conn.is_connected():
            why = "; ".join(self.listener.errors[-3:]) or "connection closed"
            raise BrokerUnavailable(f"STOMP connection lost: {why}")
        if self._amqp is not None:
            self._amqp.heartbeat_check()

    def _receive(self, timeout: float) -> None:
        try:
            self.buffer.append(self.listener.inbox.get(timeout=timeout))
            while True:
                self.buffer.append(self.listener.inbox.get_nowait())
        except queue.Empty:
            pass

    def cancel(self) -> None:
        # No UNSUBSCRIBE: acks for the batch in flight must stay valid on this subscription.
        self.cancelled = True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn.is_connected():
                self.conn.disconnect()
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.close()
        if self._amqp is not None:
            with contextlib.suppress(Exception):
                self._amqp.release()


def stomp_worker(cfg: Cleanup, broker: Broker, route: Route, process: Process, batching: Batching,
                 metrics: Metrics | None = None) -> BatchWorker:
    """A BatchWorker consuming the cleanup subscription over STOMP."""
    counts = DeliveryCounts()

    def connect(generation: int, buffer: list[Delivery]) -> Link:
        return StompLink(cfg, broker, generation, buffer, counts)

    return BatchWorker(connect, route, process, batching, metrics)
