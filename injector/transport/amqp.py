"""The AMQP transport plug-in (kombu over py-amqp): connections, confirmed publishing, batched consumption.

Transport code moves bytes and headers; it never knows what a replica is. Publishing is
pipelined: every message is published with `mandatory`, then all publisher confirms are
awaited together, so an unroutable or nacked message is an error, not silence, without one
round trip per message.

Acks are sent as few frames as possible (`multiple` for the run of a batch's delivery tags), and a
link lingers a moment before it closes. Both matter on quorum queues: each ack frame is one
settle command for the queue, and past a few dozen commands in flight RabbitMQ's channel keeps
the rest in its own memory and sends them later; a channel closed meanwhile drops them and the
broker redelivers messages whose ack was sent (measured on 3.10: up to 537 of 1000 individual
acks lost at close; none with one `multiple` ack per batch).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import amqp
import kombu
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from injector import topology
from injector.config import Broker, Settings, StompServer, Tls
from injector.errors import BrokerUnavailable, PublishFailed
from injector.messages import Delivery, Outgoing, copy_of, count_of, split_copy_headers
from injector.tls import refusal as tls_refusal
from injector.topology import Routes
from injector.transport import Connect, Sender

log = logging.getLogger(__name__)

CONFIRM_WINDOW = 2000  # unconfirmed messages in flight before the publisher waits
LINGER = 0.25  # seconds a closing link keeps reading, so the broker has applied the last acks
# What a dead connection or channel raises in py-amqp / kombu; links turn it into BrokerUnavailable.
LOST: tuple[type[BaseException], ...] = (OSError, amqp.exceptions.ConnectionError,
                                         amqp.exceptions.RecoverableChannelError)


@contextlib.contextmanager
def _lost(what: str) -> Iterator[None]:
    try:
        yield
    except LOST as exc:
        raise BrokerUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


def connection(broker: Broker, attempts: int | None = None) -> kombu.Connection:
    """An open kombu connection to the first of broker.urls that answers (failover order; TLS as the broker says),
    retried with jittered backoff (`attempts`, default broker.connect_attempts; a consumer passes 1: its own loop
    retries, and stops at once on SIGTERM)."""

    @retry(
        retry=retry_if_exception_type(BrokerUnavailable),
        stop=stop_after_attempt(attempts or broker.connect_attempts),
        wait=wait_random_exponential(multiplier=0.5, max=15),
        reraise=True,
    )
    def connect() -> kombu.Connection:
        try:
            return _first(broker.connect_urls, broker.tls_settings, 10.0, broker.heartbeat)
        except amqp.exceptions.AccessRefused as exc:  # a running consumer waits for its password to be put right
            raise _unavailable(f"broker refused our login ({_reply(exc)})") from exc
        except BrokerUnavailable as exc:
            raise _unavailable(str(exc)) from exc

    return connect()


def _unavailable(why: str) -> BrokerUnavailable:
    log.warning("%s", why)
    return BrokerUnavailable(why)


def _first(urls: Sequence[str], tls: Tls | None, timeout: float, heartbeat: int = 0) -> kombu.Connection:
    """One attempt at each url in turn: the first connection made, else BrokerUnavailable naming every failure. A
    refused login is raised as it is: another url of the broker would refuse it too. One kombu connection per url
    (not kombu's own failover list): TLS checks each broker's certificate against that broker's own host name."""
    errors = []
    login = {"login_method": "EXTERNAL"} if tls is not None and tls.certificate_login else {}
    for url in urls:
        conn = kombu.Connection(url, heartbeat=heartbeat, connect_timeout=timeout, ssl=ssl_options(tls, url), **login)
        try:
            conn.connect()
            return conn
        except amqp.exceptions.AccessRefused:
            conn.release()
            raise
        except (OSError, *conn.connection_errors) as exc:
            conn.release()
            errors.append(f"{topology.where(url)} ({tls_refusal(exc, tls) or f'{type(exc).__name__}: {exc}'})")
    raise BrokerUnavailable(f"broker unreachable: {'; '.join(errors)}")


def ssl_options(tls: Tls | None, url: str) -> dict[str, Any] | bool:
    """py-amqp's TLS options for one url (False: no TLS). The server's certificate must chain to ca_file (else the
    system's trust store) and name server_name, else the url's host; verify = false checks nothing (logged)."""
    if tls is None:
        return False
    options: dict[str, Any] = {"ca_certs": tls.file("ca_file"), "certfile": tls.file("cert_file"),
                               "keyfile": tls.file("key_file")}
    if tls.verify:
        options.update(cert_reqs=ssl.CERT_REQUIRED, server_hostname=tls.server_name or urlparse(url).hostname)
    else:
        log.warning("TLS to %s without checking its certificate ([tls] verify = false)", topology.where(url))
        options.update(cert_reqs=ssl.CERT_NONE)
    return options


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
            raise PublishFailed(f"{len(self._failed)} of {len(messages)} message(s) not accepted: {detail}",
                                failed=self._failed)

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

    def __init__(self, channel: amqp.Channel, publisher: Publisher, generation: int, queue: str) -> None:
        self.channel = channel
        self.publisher = publisher
        self.generation = generation
        self.queue = queue
        self.outstanding: set[int] = set()  # delivery tags received on this channel and not yet settled

    def _tags(self, deliveries: Sequence[Delivery]) -> list[int]:
        # A delivery tag is only valid on the channel that delivered it; after a reconnect the broker
        # redelivers, so acting on a stale tag would be wrong and is skipped.
        if not self.channel.is_open:
            return []
        return sorted(d.delivery_tag for d in deliveries
                      if d.generation == self.generation and d.delivery_tag in self.outstanding)

    def _frames(self, tags: list[int]) -> list[tuple[int, bool]]:
        """(tag, multiple) frames settling exactly `tags`: one `multiple` frame for the run of them that starts at
        the oldest outstanding tag (a batch, normally), single frames for the rest."""
        wanted, end = set(tags), None
        for tag in sorted(self.outstanding):
            if tag not in wanted:
                break
            end = tag
        rest = [t for t in tags if end is None or t > end]
        return ([(end, True)] if end is not None else []) + [(t, False) for t in rest]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        tags = self._tags(deliveries)
        with _lost("acking"):
            for tag, multiple in self._frames(tags):
                self.channel.basic_ack(tag, multiple=multiple)
        self.outstanding.difference_update(tags)

    def requeue(self, deliveries: Sequence[Delivery]) -> None:
        tags = self._tags(deliveries)  # retries are few: one reject each (py-amqp has no basic.nack)
        with _lost("requeueing"):
            for tag in tags:
                self.channel.basic_reject(tag, requeue=True)
        self.outstanding.difference_update(tags)

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Return deliveries to their queue without spending their delivery budget: a quorum queue counts every
        return (reject, nack, or a closed channel) in x-delivery-count, so a confirmed copy that carries the
        count so far takes each one's place, and then the original is acked."""
        live = [d for d in deliveries if d.generation == self.generation and d.delivery_tag in self.outstanding]
        if not live:
            return
        self.publisher.publish([copy_of(d, self.queue, d.attempts - 1) for d in live])
        self.ack(live)
        log.info("handed %d message(s) back to %s (delivery budget untouched)", len(live), self.queue)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.publisher.publish(messages)

    def dead_letter(self, messages: Sequence[Outgoing]) -> None:
        self.publisher.publish(messages)


class AmqpLink:
    """A kombu connection consuming one queue with a bounded prefetch (an injector.transport Link)."""

    def __init__(self, broker: Broker, queue: str, prefetch: int, generation: int, buffer: list[Delivery]) -> None:
        self.queue = queue
        self.generation = generation
        self.buffer = buffer
        self.tag: str | None = None
        self.conn: kombu.Connection = connection(broker, attempts=1)
        try:
            with _lost(f"cannot consume {queue}"):
                self.channel: amqp.Channel = self.conn.channel()
                self.channel.basic_qos(0, prefetch, False)
                self.session = AmqpSession(self.channel, Publisher(self.conn), generation, queue)
                self.resume()
        except BaseException:
            with contextlib.suppress(Exception):
                self.conn.release()
            raise

    def _received(self, message: amqp.Message) -> None:
        d = to_delivery(message, self.generation)
        self.session.outstanding.add(d.delivery_tag)
        self.buffer.append(d)

    def pump(self, timeout: float) -> None:
        with _lost("broker connection lost"):
            drain(self.conn, timeout)

    def pause(self) -> None:
        """Take no new deliveries; those received stay valid to settle (basic.cancel waits for the broker's
        cancel-ok, so every delivery sent before it has been received)."""
        if self.tag is not None:
            with _lost("cancelling the consumer"):
                self.channel.basic_cancel(self.tag)
            self.tag = None

    def resume(self) -> None:
        if self.tag is None:
            with _lost(f"cannot consume {self.queue}"):
                self.tag = self.channel.basic_consume(self.queue, callback=self._received)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection may itself fail
            if self.channel.is_open:
                deadline = time.monotonic() + LINGER
                while time.monotonic() < deadline:
                    drain(self.conn, max(deadline - time.monotonic(), 0.01))
                self.channel.close()
        with contextlib.suppress(Exception):
            self.conn.release()


class AmqpSender:
    """Confirmed, mandatory publishing on its own connection to the broker (an injector.transport Sender)."""

    def __init__(self, broker: Broker) -> None:
        self.conn = connection(broker)
        self._publisher = Publisher(self.conn)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self._publisher.publish(messages)

    def service(self) -> None:
        """Read the idle connection (the broker's heartbeats) and send ours: a connection that is only written to
        is declared dead by py-amqp after two missed heartbeats."""
        with _lost("publishing connection lost"):
            drain(self.conn, 0.001)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._publisher.close()
        with contextlib.suppress(Exception):
            self.conn.release()


def sender(broker: Broker, routes: Routes | None = None) -> Sender:
    """A confirmed publisher to the broker; the broker's own exchanges route (`routes` is not needed)."""
    return AmqpSender(broker)


def link(settings: Settings, queue: str, prefetch: int, at: StompServer | None = None) -> Connect:
    """A worker's `connect`: (generation, buffer) → a link consuming `queue` on settings.broker."""
    if at is not None:
        raise ValueError("the AMQP transport consumes from [broker] urls only")
    return lambda generation, buffer: AmqpLink(settings.broker, queue, prefetch, generation, buffer)


def to_delivery(message: amqp.Message, generation: int) -> Delivery:
    info = message.delivery_info
    props = message.properties
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    headers, prior, exchange, routing_key = split_copy_headers(dict(props.get("application_headers") or {}))
    count = count_of(headers.get("x-delivery-count"))  # the broker's, or junk a publisher set
    return Delivery(
        body=body,
        headers=headers,
        exchange=info.get("exchange", "") if exchange is None else exchange,
        routing_key=info.get("routing_key", "") if routing_key is None else routing_key,
        delivery_tag=info["delivery_tag"],
        redelivered=bool(info.get("redelivered")),
        message_id=props.get("message_id"),
        content_type=props.get("content_type", "application/json"),
        generation=generation,
        deliveries=prior + count + 1 if prior else None,
    )


HEARTBEAT_RATE = 4  # heartbeat checks (and, when idle, heartbeats sent) per negotiated interval


def drain(conn: kombu.Connection, timeout: float) -> None:
    """Wait up to `timeout` for frames; keep heartbeats flowing. The broker gives up after two silent intervals;
    checking and sending four times an interval leaves a stalled process (a loaded host) most of that margin."""
    interval = float(conn.heartbeat or 0)
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=min(timeout, interval / HEARTBEAT_RATE) if interval else timeout)
    conn.heartbeat_check(rate=HEARTBEAT_RATE)


@contextlib.contextmanager
def first_answering(broker: Broker, timeout: float) -> Iterator[kombu.Connection]:
    """The first broker url that answers (one attempt each, no heartbeats), else BrokerUnavailable naming each
    failure; a refused login is raised as it is."""
    conn = _first(broker.connect_urls, broker.tls_settings, timeout)
    try:
        yield conn
    finally:
        conn.release()


def explain(exc: BaseException, where: str) -> str | None:
    """The one line for a broker's AMQP refusal (`where`: the broker, password-free), or None if `exc` is not
    one."""
    if isinstance(exc, amqp.exceptions.NotFound):
        return f"{_reply(exc)} on {where}: run `rucio-injector broker setup`"
    if isinstance(exc, amqp.exceptions.AccessRefused):
        if "EXTERNAL" in _reply(exc):
            return (f"{where} refused our certificate login ({_reply(exc)}): a RabbitMQ user must be named as the "
                    "certificate's subject (ssl_cert_login_from), and the plugin rabbitmq_auth_mechanism_ssl be on")
        return f"{where} refused our login ({_reply(exc)}): check the user and password in [broker] urls"
    if isinstance(exc, amqp.exceptions.PreconditionFailed):
        return f"{_reply(exc)} on {where}: the broker's declaration differs from ours (`broker setup` says)"
    if isinstance(exc, amqp.exceptions.AMQPError):
        return f"broker {where}: {_reply(exc)}"
    return None


def _reply(exc: BaseException) -> str:
    """The broker's own words (`NOT_FOUND - no queue 'x' in vhost '/'`), without py-amqp's method prefix."""
    text = getattr(exc, "reply_text", "") or str(exc)
    return str(text)
