"""The STOMP transport plug-in: the cleanup consumer on ActiveMQ (hermes → ActiveMQ → competing cleanup consumers).

ActiveMQ Classic (Rucio's usual broker) delivers a virtual topic to competing consumers through
/queue/Consumer.<app>.VirtualTopic.<name>. (On RabbitMQ the cleanup consumer reads its quorum queue over
AMQP like ingest does: RabbitMQ's STOMP adapter refuses acks after UNSUBSCRIBE, so a STOMP consumer there
could neither stop intake while keeping its deliveries nor give them back without spending their budget.)
Acks are client-individual and sent only after the effect; stomp.py's receiver thread only enqueues
(a slow Rucio call never starves heartbeats); a lost connection is reconnected and RESUBSCRIBED by the
BatchWorker loop (stomp.py does not).

ActiveMQ sends no delivery count on STOMP (only `redelivered: true`; its redelivery plugin keeps the
counter inside the broker), so a retry SENDs a copy carrying the count in `injector-retries`
(receipted, delayed with AMQ_SCHEDULED_DELAY) to the same consumer queue, then ACKs the original: the
count is exact across competing processes and restarts. Should that send fail, the message is NACKed
and the broker's redelivery plugin redelivers it after a delay. What a consumer received but did not
settle goes back when it disconnects, its count untouched: that is how a stopping consumer hands
deliveries back. Dead letters go to DLQ.<queue> over STOMP with a receipt; file-archived goes to the
DAQ exchange over AMQP with publisher confirms, on a connection that is kept serviced while idle.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import stomp
import stomp.exception

from injector.config import Broker, Cleanup, Settings
from injector.errors import BrokerUnavailable, PublishFailed
from injector.messages import PRIOR, Delivery, Outgoing
from injector.settle import Session
from injector.transport import Connect
from injector.transport.amqp import Publisher, connection, drain

log = logging.getLogger(__name__)

RECEIPT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0
RETRIES = PRIOR  # ActiveMQ: deliveries of this event before this copy
RETRY_DELAY_MS = (1000, 120_000)  # ActiveMQ: first delay, cap; doubles per retry
# Frame headers that describe one delivery, not the event: never copied onto a retry or dead letter.
_DELIVERY_HEADERS = frozenset({
    "message-id", "destination", "subscription", "ack", "content-length", "content-type", "redelivered",
    "expires", "priority", "timestamp", "persistent", "original-destination", "receipt", "redeliveryDelay",
    "scheduledJobId", "correlation-id"})


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    """Runs on stomp.py's receiver thread: it only enqueues and records."""

    def __init__(self, cfg: Cleanup, generation: int) -> None:
        self.cfg = cfg
        self.generation = generation
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.lost = threading.Event()
        self.errors: list[str] = []

    def on_message(self, frame: Any) -> None:
        self.inbox.put(to_delivery(frame, self.generation, self.cfg.flavour))

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


def to_delivery(frame: Any, generation: int, flavour: str) -> Delivery:
    """A received MESSAGE frame; `headers` keeps the event's own headers (and RabbitMQ's count)."""
    from injector.topology import stomp_destination

    h = dict(frame.headers)
    body = frame.body if isinstance(frame.body, bytes) else str(frame.body or "").encode()
    # The count lives in `deliveries`, not in headers: a dead letter replayed later starts afresh.
    headers = event_headers(h)
    deliveries = None
    if flavour == "activemq":
        deliveries = _int(h.get(RETRIES)) + 1
    elif "x-delivery-count" in headers:
        headers["x-delivery-count"] = _int(headers["x-delivery-count"])
    # Where the event came from, as a dead letter must record it to be replayed. RabbitMQ: the AMQP exchange
    # and routing key behind the STOMP destination (/topic/<name> is amq.topic + <name>), never the destination
    # itself, which names no exchange. ActiveMQ: the consumer queue the frame came from (never the virtual topic).
    destination = h.get("destination", "")
    exchange, routing_key = stomp_destination(destination) if flavour == "rabbitmq" else (destination, "")
    return Delivery(body=body, headers=headers, exchange=exchange, routing_key=routing_key, delivery_tag=0,
                    redelivered=h.get("redelivered") == "true", message_id=h.get("message-id"),
                    content_type=h.get("content-type", "application/json"), generation=generation,
                    ack_id=h.get("ack") or h.get("message-id"), deliveries=deliveries)


def event_headers(frame_headers: dict[str, Any]) -> dict[str, Any]:
    """A frame's headers without those describing one delivery (or the consumer's retry count)."""
    return {k: v for k, v in frame_headers.items()
            if k not in _DELIVERY_HEADERS and k != RETRIES and not k.startswith("AMQ_")}


class Receipts(stomp.ConnectionListener):  # type: ignore[misc]
    """Receipted SENDs on one connection: `send` returns once the broker has receipted every frame."""

    def __init__(self, lost: threading.Event | None = None) -> None:
        self.pending: dict[str, threading.Event] = {}
        self.lost = lost or threading.Event()

    def on_receipt(self, frame: Any) -> None:
        event = self.pending.get(frame.headers.get("receipt-id", ""))
        if event is not None:
            event.set()

    def on_disconnected(self) -> None:
        self.lost.set()

    def send(self, conn: Any, destination: str, messages: Sequence[Outgoing]) -> None:
        waits = []
        try:
            for m in messages:
                receipt = uuid.uuid4().hex
                event = self.pending[receipt] = threading.Event()
                headers = {k: str(v) for k, v in m.headers.items() if k not in _DELIVERY_HEADERS}
                headers["persistent"] = "true"
                if m.message_id:
                    headers["correlation-id"] = m.message_id
                conn.send(destination, m.body, content_type=m.content_type, headers=headers, receipt=receipt)
                waits.append((receipt, event))
            for _, event in waits:
                if not event.wait(RECEIPT_TIMEOUT) or self.lost.is_set():
                    raise PublishFailed(f"no receipt from the broker for a message sent to {destination}")
        except (stomp.exception.StompException, OSError) as exc:
            raise PublishFailed(f"cannot send to {destination}: {type(exc).__name__}: {exc}") from None
        finally:
            for receipt, _ in waits:
                self.pending.pop(receipt, None)


def _int(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def retry_delay_ms(attempts: int) -> int:
    first, cap = RETRY_DELAY_MS
    return min(first * 2 ** max(attempts - 1, 0), cap)


@contextlib.contextmanager
def _connection_gone_is_fine(d: Delivery) -> Iterator[None]:
    # The connection died between the check and the frame: the broker redelivers what was not acked,
    # and the next pump() notices the loss and reconnects.
    try:
        yield
    except (stomp.exception.StompException, OSError) as exc:
        log.warning("could not settle, connection gone (%s): the broker redelivers it", type(exc).__name__,
                    extra={"event_id": d.message_id})


class StompSession:
    """settle's Session over one STOMP connection (+ an AMQP publisher for file-archived)."""

    def __init__(self, link: StompLink) -> None:
        self.link = link

    def _current(self, d: Delivery) -> bool:
        # An ack id is only valid on the connection that delivered it; after a reconnect the
        # broker redelivers, so a stale one is skipped.
        return d.generation == self.link.generation and self.link.conn.is_connected()

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            if self._current(d):
                with _connection_gone_is_fine(d):
                    self.link.conn.ack(d.ack_id)

    def requeue(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            if self._current(d):
                with _connection_gone_is_fine(d):
                    self.link.retry(d)

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to send: ActiveMQ gives unsettled deliveries back when the link disconnects, and their count
        (our injector-retries header) is untouched by that."""

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.link.publisher().publish(messages)

    def dead_letter(self, messages: Sequence[Outgoing]) -> None:
        self.link.send_confirmed(self.link.cfg.dead_letter_destination, messages)


class StompLink:
    """One STOMP connection with one client-individual subscription to `destination` (an injector.transport Link),
    ActiveMQ."""

    def __init__(self, cfg: Cleanup, broker: Broker, destination: str, prefetch: int, generation: int,
                 buffer: list[Delivery]) -> None:
        self.cfg = cfg
        self.broker = broker
        self.destination = destination
        self.prefetch = prefetch
        self.generation = generation
        self.buffer = buffer
        self.listener = _Listener(cfg, generation)
        self.subscription_id = f"cleanup-{uuid.uuid4().hex[:8]}"
        self._amqp: Any = None
        self._publisher: Publisher | None = None
        self.paused = False
        self.conn = stomp.Connection12(cfg.stomp_addresses, heartbeats=(cfg.heartbeat_ms, cfg.heartbeat_ms),
                                       vhost=cfg.vhost, auto_decode=False, reconnect_attempts_max=1, timeout=10)
        self.conn.set_listener("injector", self.listener)
        self.receipts = Receipts(self.listener.lost)
        self.conn.set_listener("receipts", self.receipts)
        try:
            self._subscribe()
        except BaseException:
            self.close()
            raise
        self.session: Session = StompSession(self)

    def _subscribe(self) -> None:
        cfg = self.cfg
        try:
            self.conn.connect(cfg.username, cfg.password, wait=False,
                              headers={"client-id": f"rucio-injector-{uuid.uuid4().hex[:8]}"})
            self._await_connected()
            self.conn.subscribe(self.destination, id=self.subscription_id, ack="client-individual",
                                headers={"activemq.prefetchSize": str(self.prefetch)})
        except (stomp.exception.StompException, OSError) as exc:
            raise BrokerUnavailable(f"cannot subscribe on STOMP {cfg.stomp_hosts}: {type(exc).__name__}: {exc}") \
                from None
        log.info("subscribed to %s on %s (prefetch %d)", self.destination, cfg.stomp_hosts, self.prefetch)

    def _await_connected(self) -> None:
        # stomp.py's own wait (connect(wait=True)) never gives up on a broker that accepts the
        # socket but never answers CONNECT; this one does, so the reconnect loop goes on.
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self.conn.is_connected():
            if self.listener.errors or self.listener.lost.is_set() or time.monotonic() > deadline:
                why = "; ".join(self.listener.errors[-3:]) or f"no CONNECTED frame within {CONNECT_TIMEOUT:.0f}s"
                raise BrokerUnavailable(f"STOMP {self.cfg.stomp_hosts} refused the connection: {why}")
            time.sleep(0.01)

    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._amqp = connection(self.broker)
            self._publisher = Publisher(self._amqp)
        return self._publisher

    def retry(self, d: Delivery) -> None:
        """A delayed copy carrying the delivery count, then ACK; NACK if it cannot be sent."""
        headers = {**d.headers, RETRIES: d.attempts, "AMQ_SCHEDULED_DELAY": retry_delay_ms(d.attempts)}
        copy = Outgoing(self.destination, "", d.body, headers, d.message_id, d.content_type)
        try:
            self.send_confirmed(self.destination, [copy])
        except PublishFailed as exc:
            log.warning("could not queue the retry (%s); NACK: the broker redelivers it", exc,
                        extra={"event_id": d.message_id})
            self.conn.nack(d.ack_id)
            return
        self.conn.ack(d.ack_id)

    def send_confirmed(self, destination: str, messages: Sequence[Outgoing]) -> None:
        """SEND each message with a receipt; returns when the broker has receipted all."""
        self.receipts.send(self.conn, destination, messages)

    def pump(self, timeout: float) -> None:
        if self.paused:  # what arrives now stays unacked: the broker gives it back when we disconnect
            self.listener.lost.wait(timeout)
        else:
            self._receive(timeout)
        if self.listener.lost.is_set() or not self.conn.is_connected():
            why = "; ".join(self.listener.errors[-3:]) or "connection closed"
            raise BrokerUnavailable(f"STOMP connection lost: {why}")
        self._service_publisher()

    def _service_publisher(self) -> None:
        """Read the idle AMQP publishing connection (the broker's heartbeats) and send ours; a connection that
        is only written to is declared dead by py-amqp after two missed heartbeats. Lost: reopened when needed."""
        if self._amqp is None:
            return
        try:
            drain(self._amqp, 0.001)
        except Exception as exc:  # the next publish reconnects
            log.info("AMQP publishing connection lost (%s); reopened when next needed", exc)
            self._drop_publisher()

    def _receive(self, timeout: float) -> None:
        try:
            self.buffer.append(self.listener.inbox.get(timeout=timeout))
            while True:
                self.buffer.append(self.listener.inbox.get_nowait())
        except queue.Empty:
            pass

    def pause(self) -> None:
        # No UNSUBSCRIBE: acks for the batch in flight must stay valid on this subscription.
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn.is_connected():
                self.conn.disconnect()
        self._drop_publisher()

    def _drop_publisher(self) -> None:
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.close()
        if self._amqp is not None:
            with contextlib.suppress(Exception):
                self._amqp.release()
        self._amqp = self._publisher = None


def link(settings: Settings, queue: str, prefetch: int) -> Connect:
    """A worker's `connect`: (generation, buffer) → a link subscribed to the STOMP destination `queue` on the
    [cleanup] STOMP hosts (ActiveMQ: the cleanup consumer queue)."""
    return lambda generation, buffer: StompLink(settings.cleanup, settings.broker, queue, prefetch, generation,
                                                buffer)


def explain(exc: BaseException, where: str) -> str | None:
    """The one line for a STOMP failure, or None if `exc` is not one (`where`, the AMQP broker, is not its host)."""
    if isinstance(exc, stomp.exception.StompException):
        return f"STOMP broker: {type(exc).__name__}: {exc} (is it running; are [cleanup] stomp_hosts right?)"
    return None
