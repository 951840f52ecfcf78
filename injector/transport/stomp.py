"""The STOMP transport plug-in (ActiveMQ): competing consumers of a queue, receipted publishing, and the broker's
own routing replaced by the declared topology's (ActiveMQ has no exchanges).

Two kinds of site use it. Hermes → ActiveMQ → cleanup: the cleanup consumers share
/queue/Consumer.<app>.VirtualTopic.<name> on hermes' broker ([cleanup]). An ActiveMQ-only site ([broker] urls are
stomp://): the DAQ's file-closed events, ingest, dead letters and file-archived all live on ActiveMQ too. There a
message published to (exchange, routing key) is SENT, with a receipt, to each queue the topology binds to it
(`injector.topology.Routes`: file.closed.# → /queue/<ingest queue>, file.archived.# → /queue/<archived queue>);
a routing key no binding takes is refused as unroutable, like an AMQP mandatory publish. (On RabbitMQ every
consumer reads over AMQP: its STOMP adapter refuses acks after UNSUBSCRIBE, so a STOMP consumer there could
neither stop intake while keeping its deliveries nor give them back without spending their budget.)

Acks are client-individual and sent only after the effect; stomp.py's receiver thread only enqueues
(a slow Rucio call never starves heartbeats); a lost connection is reconnected and RESUBSCRIBED by the
BatchWorker loop (stomp.py does not).

ActiveMQ sends no delivery count on STOMP (only `redelivered: true`; its redelivery plugin keeps the
counter inside the broker), so a retry SENDs a copy carrying the count in `injector-retries`
(receipted, delayed with AMQ_SCHEDULED_DELAY) to the same queue, then ACKs the original: the
count is exact across competing processes and restarts. Should that send fail, the message is NACKed
and the broker's redelivery plugin redelivers it after a delay. What a consumer received but did not
settle goes back when it disconnects, its count untouched: that is how a stopping consumer hands
deliveries back. Dead letters go to DLQ.<queue> with a receipt; what a consumer publishes (file-archived) goes to
the DAQ broker ([broker] urls, AMQP or STOMP) confirmed, on a connection that is kept serviced while idle. The
event id a publisher gives a message travels in `correlation-id` (the broker's own `message-id` names one copy).
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

from injector.config import Broker, Settings, StompServer
from injector.errors import BrokerUnavailable, PublishFailed
from injector.messages import PRIOR, Delivery, Outgoing, count_of
from injector.settle import Session
from injector.tls import diagnosis as tls_diagnosis
from injector.topology import Routes, activemq_dead_letter_queue, stomp_destination
from injector.transport import Connect, Sender, sender_for

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


class Watch(stomp.ConnectionListener):  # type: ignore[misc]
    """A connection's health, recorded on stomp.py's receiver thread: the broker's ERROR frames, and its loss."""

    def __init__(self) -> None:
        self.lost = threading.Event()
        self.errors: list[str] = []

    def on_error(self, frame: Any) -> None:
        text = f"{frame.headers.get('message', '')} {_text(frame.body)}".strip()
        self.errors.append(text)
        log.error("STOMP broker error: %s", text)

    def on_disconnected(self) -> None:
        self.lost.set()

    def on_heartbeat_timeout(self) -> None:
        log.warning("STOMP heartbeat timeout")
        self.lost.set()

    def why(self, otherwise: str = "connection closed") -> str:
        """The broker's last words, else `otherwise`."""
        return "; ".join(self.errors[-3:]) or otherwise


def open_connection(server: StompServer, listeners: dict[str, Any], *, heartbeats: bool = True
                    ) -> tuple[Any, Watch, Receipts]:
    """A connected STOMP 1.2 connection to the first of `server`'s hosts that answers, with `listeners`, a Watch
    and a Receipts listener; BrokerUnavailable naming why not. stomp.py's own wait (connect(wait=True)) never gives
    up on a broker that accepts the socket but never answers CONNECT; this one does."""
    beat = (server.heartbeat_ms, server.heartbeat_ms) if heartbeats else (0, 0)
    conn = stomp.Connection12(list(server.addresses), heartbeats=beat, vhost=server.vhost, auto_decode=False,
                              reconnect_attempts_max=1, timeout=10)
    if server.tls is not None:
        tls = server.tls
        if not tls.verify:
            log.warning("STOMP over TLS to %s without checking its certificate ([tls] verify = false)", server.hosts)
        conn.set_ssl(for_hosts=list(server.addresses), key_file=tls.file("key_file"), cert_file=tls.file("cert_file"),
                     ca_certs=tls.file("ca_file"), verify=tls.verify)
    watch = Watch()
    receipts = Receipts(watch.lost)
    for name, listener in {**listeners, "watch": watch, "receipts": receipts}.items():
        conn.set_listener(name, listener)
    try:
        conn.connect(server.username, server.password, wait=False,
                     headers={"client-id": f"rucio-injector-{uuid.uuid4().hex[:8]}"})
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not conn.is_connected():
            if watch.errors or watch.lost.is_set() or time.monotonic() > deadline:
                why = _tls_why(server) or watch.why(f"no CONNECTED frame within {CONNECT_TIMEOUT:.0f}s")
                raise BrokerUnavailable(f"STOMP {server.hosts} refused the connection: {why}")
            time.sleep(0.01)
    except (stomp.exception.StompException, OSError) as exc:
        _disconnect(conn)
        why = _tls_why(server) or f"{type(exc).__name__}: {exc}"
        raise BrokerUnavailable(f"cannot connect to STOMP {server.hosts}: {why}") from None
    except BaseException:
        _disconnect(conn)
        raise
    return conn, watch, receipts


def _tls_why(server: StompServer) -> str | None:
    """Why a TLS connection to `server` fails, if it does: stomp.py only logs why a handshake failed (and, TLS 1.3,
    keeps a refused client certificate, said after the handshake, to itself), so the handshake is made again."""
    return tls_diagnosis(server.tls, server.addresses) if server.tls is not None else None


def _disconnect(conn: Any) -> None:
    with contextlib.suppress(Exception):
        if conn.is_connected():
            conn.disconnect()
    with contextlib.suppress(Exception):
        conn.transport.stop()


class _Inbox(stomp.ConnectionListener):  # type: ignore[misc]
    """Runs on stomp.py's receiver thread: it only enqueues."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.inbox: queue.Queue[Delivery] = queue.Queue()

    def on_message(self, frame: Any) -> None:
        self.inbox.put(to_delivery(frame, self.generation, "activemq"))


def _text(body: bytes | str | None) -> str:
    return body.decode(errors="replace") if isinstance(body, bytes) else (body or "")


def to_delivery(frame: Any, generation: int, flavour: str) -> Delivery:
    """A received MESSAGE frame; `headers` keeps the event's own headers (and RabbitMQ's count)."""
    h = dict(frame.headers)
    body = frame.body if isinstance(frame.body, bytes) else str(frame.body or "").encode()
    # The count lives in `deliveries`, not in headers: a dead letter replayed later starts afresh.
    headers = event_headers(h)
    deliveries = None
    if flavour == "activemq":
        deliveries = count_of(h.get(RETRIES)) + 1
    elif "x-delivery-count" in headers:
        headers["x-delivery-count"] = count_of(headers["x-delivery-count"])
    # Where the event came from, as a dead letter must record it to be replayed. RabbitMQ: the AMQP exchange
    # and routing key behind the STOMP destination (/topic/<name> is amq.topic + <name>), never the destination
    # itself, which names no exchange. ActiveMQ: the queue the frame came from (never the virtual topic).
    destination = h.get("destination", "")
    exchange, routing_key = stomp_destination(destination) if flavour == "rabbitmq" else (destination, "")
    return Delivery(body=body, headers=headers, exchange=exchange, routing_key=routing_key, delivery_tag=0,
                    redelivered=h.get("redelivered") == "true",
                    message_id=h.get("correlation-id") or h.get("message-id"),
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


def retry_delay_ms(attempts: int) -> int:
    first, cap = RETRY_DELAY_MS
    return min(first * 2 ** max(attempts - 1, 0), cap)


class StompSender:
    """Confirmed publishing to an ActiveMQ-only DAQ broker (an injector.transport Sender): each message is SENT
    with a receipt to every queue the topology binds its (exchange, routing key) to; a message no binding takes is
    refused as unroutable (PublishFailed names it, nothing of it sent)."""

    def __init__(self, server: StompServer, routes: Routes) -> None:
        self.routes = routes
        self.conn, self.watch, self.receipts = open_connection(server, {})

    def publish(self, messages: Sequence[Outgoing]) -> None:
        by_queue: dict[str, list[Outgoing]] = {}
        failed: dict[str, str] = {}
        for m in messages:
            queues = self.routes.queues(m.exchange, m.routing_key)
            if not queues:
                failed[m.message_id or "?"] = (f"unroutable: exchange {m.exchange!r} has no queue bound for "
                                               f"{m.routing_key!r}")
            for q in queues:
                by_queue.setdefault(q, []).append(m)
        for q, batch in by_queue.items():
            self.receipts.send(self.conn, f"/queue/{q}", batch)
        if failed:
            detail = "; ".join(f"{mid}: {why}" for mid, why in list(failed.items())[:20])
            raise PublishFailed(f"{len(failed)} of {len(messages)} message(s) not accepted: {detail}", failed=failed)

    def service(self) -> None:
        """stomp.py's own threads keep the heartbeats; a lost connection is raised (the next publish reopens)."""
        if self.watch.lost.is_set() or not self.conn.is_connected():
            raise BrokerUnavailable(f"STOMP connection lost: {self.watch.why()}")

    def close(self) -> None:
        _disconnect(self.conn)


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
    """settle's Session over one STOMP connection (+ a DAQ-broker sender for what the consumer publishes)."""

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
        self.link.sender().publish(messages)

    def dead_letter(self, messages: Sequence[Outgoing]) -> None:
        self.link.send_confirmed(self.link.dead_letters, messages)


class StompLink:
    """One STOMP connection with one client-individual subscription to /queue/<queue> (an injector.transport Link)
    on ActiveMQ; dead letters to /queue/DLQ.<queue>; what the consumer publishes to the DAQ broker `publishing`."""

    def __init__(self, server: StompServer, queue_name: str, prefetch: int, generation: int,
                 buffer: list[Delivery], publishing: Broker, routes: Routes) -> None:
        self.server = server
        self.destination = f"/queue/{queue_name}"
        self.dead_letters = f"/queue/{activemq_dead_letter_queue(queue_name)}"
        self.prefetch = prefetch
        self.generation = generation
        self.buffer = buffer
        self._publishing = publishing
        self._routes = routes
        self._sender: Sender | None = None
        self.paused = False
        self.listener = _Inbox(generation)
        self.subscription_id = f"consumer-{uuid.uuid4().hex[:8]}"
        self.conn, self.watch, self.receipts = open_connection(server, {"inbox": self.listener})
        self.session: Session = StompSession(self)
        try:
            self.conn.subscribe(self.destination, id=self.subscription_id, ack="client-individual",
                                headers={"activemq.prefetchSize": str(self.prefetch)})
        except (stomp.exception.StompException, OSError) as exc:
            self.close()
            raise BrokerUnavailable(f"cannot subscribe on STOMP {server.hosts}: {type(exc).__name__}: {exc}") \
                from None
        log.info("subscribed to %s on %s (prefetch %d)", self.destination, server.hosts, self.prefetch)

    def sender(self) -> Sender:
        if self._sender is None:
            self._sender = sender_for(self._publishing, self._routes)
        return self._sender

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
            self.watch.lost.wait(timeout)
        else:
            self._receive(timeout)
        if self.watch.lost.is_set() or not self.conn.is_connected():
            raise BrokerUnavailable(f"STOMP connection lost: {self.watch.why()}")
        self._service_sender()

    def _service_sender(self) -> None:
        """Keep the idle publishing connection alive (an AMQP one is declared dead by py-amqp after two missed
        heartbeats if it is only written to). Lost: reopened when next needed."""
        if self._sender is None:
            return
        try:
            self._sender.service()
        except Exception as exc:  # the next publish reconnects
            log.info("publishing connection lost (%s); reopened when next needed", exc)
            self._drop_sender()

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
        _disconnect(self.conn)
        self._drop_sender()

    def _drop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            with contextlib.suppress(Exception):
                sender.close()


def link(settings: Settings, queue: str, prefetch: int, at: StompServer | None = None) -> Connect:
    """A worker's `connect`: (generation, buffer) → a link consuming /queue/<queue> on `at` (default: the DAQ
    broker's stomp:// urls, an ActiveMQ-only site's ingest; the cleanup passes hermes' broker)."""
    on = at if at is not None else settings.broker.stomp
    routes = Routes(settings)
    return lambda generation, buffer: StompLink(on, queue, prefetch, generation, buffer, settings.broker, routes)


def sender(broker: Broker, routes: Routes | None) -> Sender:
    """A confirmed publisher to the DAQ broker's stomp:// urls, routing by `routes` (required: ActiveMQ has no
    exchanges)."""
    if routes is None:
        raise ValueError("publishing over STOMP needs the topology's routes (DaqPublisher.of(settings))")
    return StompSender(broker.stomp, routes)


def explain(exc: BaseException, where: str) -> str | None:
    """The one line for a STOMP failure, or None if `exc` is not one."""
    if isinstance(exc, stomp.exception.StompException):
        return f"STOMP broker: {type(exc).__name__}: {exc} (is it running; are the stomp hosts and urls right?)"
    return None
