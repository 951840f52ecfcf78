"""The demo's embedded broker, for a machine with no RabbitMQ: one Python process, no system service.

It speaks the parts of AMQP 0-9-1 (frames encoded by pamqp) and STOMP 1.2 that rucio-injector,
hermes and stomp.py use, with RabbitMQ's meaning for them, so the demo runs the very same code
paths as on RabbitMQ: topic and direct exchanges; STOMP /topic/<key> routed through amq.topic and
/amq/queue/<q> subscriptions; quorum-queue delivery counting (`x-delivery-count`) and
dead-lettering past `x-delivery-limit`; publisher confirms; mandatory returns; per-consumer
prefetch; basic.get; receipts; and redelivery (counted) of whatever a closed connection left
unacknowledged.

It keeps everything in memory: stopping it loses its messages. That is its whole reason to
exist (a demo with nothing installed) and why it is nothing else: production runs RabbitMQ or
ActiveMQ. Run alone: `python -m injector.testbed.broker --amqp-port 5673 --stomp-port 61614`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import selectors
import signal
import struct
import subprocess
import sys
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pamqp import commands, frame, heartbeat
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from injector.testbed.rucio import stop_group
from injector.topology import topic_matches

log = logging.getLogger(__name__)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_MAX = 131072
HEARTBEAT = 60  # seconds the server proposes; the client's TuneOk decides
NOT_FOUND, PRECONDITION_FAILED, NOT_IMPLEMENTED, NO_ROUTE = 404, 406, 540, 312


class BrokerError(Exception):
    """An AMQP channel error (the channel is closed) or, with `connection`, a connection error."""

    def __init__(self, code: int, text: str, connection: bool = False) -> None:
        super().__init__(text)
        self.code, self.text, self.connection = code, text, connection


# --- the model: exchanges, queues, messages ------------------------------------------------------


@dataclass
class Message:
    body: bytes
    properties: dict[str, Any]  # AMQP basic properties (content_type, headers, message_id, ...)
    exchange: str
    routing_key: str
    returned: int = 0  # times given back to the queue: the quorum queue's x-delivery-count
    redelivered: bool = False

    def headers(self) -> dict[str, Any]:
        headers = dict(self.properties.get("headers") or {})
        if self.returned:
            headers["x-delivery-count"] = self.returned
        return headers


class Consumer(Protocol):
    """An AMQP basic.consume or a STOMP subscription."""

    def has_room(self) -> bool: ...
    def deliver(self, queue: Queue, message: Message) -> None: ...


@dataclass
class Queue:
    name: str
    arguments: dict[str, Any]
    auto_delete: bool = False
    messages: deque[Message] = field(default_factory=deque)
    consumers: list[Consumer] = field(default_factory=list)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def dispatch(self) -> None:
        """Hand ready messages to consumers with room, round robin."""
        while self.messages and self.consumers:
            start = next(self._turn)
            for i in range(len(self.consumers)):
                consumer = self.consumers[(start + i) % len(self.consumers)]
                if consumer.has_room():
                    consumer.deliver(self, self.messages.popleft())
                    break
            else:
                return


@dataclass
class Exchange:
    name: str
    type: str
    bindings: set[tuple[str, str]] = field(default_factory=set)  # (queue, routing key)


class Broker:
    """Exchanges and queues, shared by every AMQP and STOMP connection (one asyncio thread)."""

    def __init__(self) -> None:
        self.exchanges = {name: Exchange(name, kind) for name, kind in
                          (("", "direct"), ("amq.direct", "direct"), ("amq.topic", "topic"),
                           ("amq.fanout", "fanout"))}
        self.queues: dict[str, Queue] = {}

    def exchange(self, name: str) -> Exchange:
        try:
            return self.exchanges[name]
        except KeyError:
            raise BrokerError(NOT_FOUND, f"NOT_FOUND - no exchange '{name}' in vhost '/'") from None

    def queue(self, name: str) -> Queue:
        try:
            return self.queues[name]
        except KeyError:
            raise BrokerError(NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost '/'") from None

    def declare_exchange(self, name: str, kind: str, passive: bool) -> None:
        if passive or name in self.exchanges:
            existing = self.exchange(name)
            if not passive and existing.type != kind:
                raise BrokerError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - inequivalent arg 'type' for "
                                  f"exchange '{name}': received '{kind}' but current is '{existing.type}'")
            return
        if kind not in ("direct", "topic", "fanout"):
            raise BrokerError(NOT_IMPLEMENTED, f"exchange type '{kind}' is not supported here", connection=True)
        self.exchanges[name] = Exchange(name, kind)

    def delete_exchange(self, name: str) -> None:
        if name and not name.startswith("amq."):
            self.exchanges.pop(name, None)

    def declare_queue(self, name: str, arguments: dict[str, Any], passive: bool, auto_delete: bool = False) -> Queue:
        if passive:
            return self.queue(name)
        name = name or f"amq.gen-{uuid.uuid4().hex}"
        existing = self.queues.get(name)
        if existing is None:
            existing = self.queues[name] = Queue(name, dict(arguments), auto_delete)
            self.exchanges[""].bindings.add((name, name))
        elif arguments and arguments != existing.arguments:
            raise BrokerError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - inequivalent arguments for queue "
                              f"'{name}': received {arguments} but current is {existing.arguments}")
        return existing

    def delete_queue(self, name: str) -> int:
        q = self.queues.pop(name, None)
        if q is None:
            return 0
        for e in self.exchanges.values():
            e.bindings = {b for b in e.bindings if b[0] != name}
        return len(q.messages)

    def bind(self, queue: str, exchange: str, key: str) -> None:
        self.queue(queue)
        self.exchange(exchange).bindings.add((queue, key))

    def unbind(self, queue: str, exchange: str, key: str) -> None:
        self.exchange(exchange).bindings.discard((queue, key))

    def route(self, exchange: str, key: str) -> list[Queue]:
        e = self.exchange(exchange)
        if e.type == "topic":
            names = {q for q, pattern in e.bindings if topic_matches(pattern, key)}
        elif e.type == "fanout":
            names = {q for q, _ in e.bindings}
        else:
            names = {q for q, bound in e.bindings if bound == key}
        return [self.queues[n] for n in sorted(names) if n in self.queues]

    def publish(self, exchange: str, key: str, body: bytes, properties: dict[str, Any]) -> int:
        """Put a copy in every queue the exchange routes `key` to; how many."""
        queues = self.route(exchange, key)
        for q in queues:
            q.messages.append(Message(body, properties, exchange, key))
        for q in queues:
            q.dispatch()
        return len(queues)

    def give_back(self, queue: Queue, messages: list[Message]) -> None:
        """Messages a consumer did not settle (nack, reject, closed channel): counted, requeued at the
        front in their order, or dead-lettered once past the queue's delivery limit."""
        limit = queue.arguments.get("x-delivery-limit")
        back = []
        for m in messages:
            m.returned += 1
            m.redelivered = True
            if limit is not None and m.returned > int(limit):
                self.dead_letter(queue, m, "delivery_limit")
            else:
                back.append(m)
        queue.messages.extendleft(reversed(back))
        if queue.name in self.queues:
            queue.dispatch()

    def dead_letter(self, queue: Queue, message: Message, reason: str) -> None:
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None or exchange not in self.exchanges:
            log.warning("dropped a message of %s (%s; no dead-letter exchange)", queue.name, reason)
            return
        key = queue.arguments.get("x-dead-letter-routing-key", message.routing_key)
        headers = dict(message.properties.get("headers") or {})
        headers.update({"x-first-death-reason": reason, "x-first-death-queue": queue.name})
        self.publish(exchange, key, message.body, {**message.properties, "headers": headers})

    def consumer_gone(self, queue: Queue, consumer: Consumer) -> None:
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        if queue.auto_delete and not queue.consumers:
            self.delete_queue(queue.name)


# --- AMQP 0-9-1 ---------------------------------------------------------------------------------


class _AmqpConsumer:
    def __init__(self, channel: _Channel, tag: str, queue: Queue, prefetch: int, no_ack: bool) -> None:
        self.channel, self.tag, self.queue, self.prefetch, self.no_ack = channel, tag, queue, prefetch, no_ack
        self.unacked = 0

    def has_room(self) -> bool:
        return self.no_ack or not self.prefetch or self.unacked < self.prefetch

    def deliver(self, queue: Queue, message: Message) -> None:
        tag = self.channel.track(queue, message, self, settle_later=not self.no_ack)
        self.channel.conn.send_content(
            self.channel.id, commands.Basic.Deliver(self.tag, tag, message.redelivered, message.exchange,
                                                    message.routing_key), message)


@dataclass
class _Channel:
    conn: AmqpConnection
    id: int
    prefetch: int = 0
    confirms: bool = False
    published: int = 0
    closing: bool = False
    tags: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    unacked: OrderedDict[int, tuple[Queue, Message, _AmqpConsumer | None]] = field(default_factory=OrderedDict)
    consumers: dict[str, _AmqpConsumer] = field(default_factory=dict)
    content: tuple[commands.Basic.Publish, ContentHeader | None, list[bytes]] | None = None

    def track(self, queue: Queue, message: Message, consumer: _AmqpConsumer | None, settle_later: bool) -> int:
        """A delivery tag for a message sent on this channel (basic.deliver or basic.get-ok); one the
        client must settle is kept until it does, counting against its consumer's prefetch."""
        tag = next(self.tags)
        if settle_later:
            if consumer is not None:
                consumer.unacked += 1
            self.unacked[tag] = (queue, message, consumer)
        return tag

    def settle(self, tag: int, multiple: bool) -> list[tuple[Queue, Message]]:
        """Forget the given deliveries (all up to `tag` with `multiple`; tag 0 = all) and free room."""
        if multiple:
            tags = [t for t in self.unacked if tag == 0 or t <= tag]
        elif tag in self.unacked:
            tags = [tag]
        else:
            raise BrokerError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        out = []
        for t in tags:
            queue, message, consumer = self.unacked.pop(t)
            if consumer is not None:
                consumer.unacked -= 1
            out.append((queue, message))
        return out

    def release(self, broker: Broker) -> None:
        """The channel is gone: cancel its consumers and give back what it had not settled."""
        for consumer in self.consumers.values():
            broker.consumer_gone(consumer.queue, consumer)
        self.consumers.clear()
        _give_back_grouped(broker, self.settle(0, True))


def _give_back_grouped(broker: Broker, settled: list[tuple[Queue, Message]]) -> None:
    by_queue: dict[str, tuple[Queue, list[Message]]] = {}
    for queue, message in settled:
        by_queue.setdefault(queue.name, (queue, []))[1].append(message)
    for queue, messages in by_queue.values():
        broker.give_back(queue, messages)


def _properties(header: ContentHeader) -> dict[str, Any]:
    p = header.properties
    return {k: getattr(p, k) for k in p.attributes() if getattr(p, k) is not None}


class AmqpConnection:
    def __init__(self, broker: Broker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.broker, self.reader, self.writer = broker, reader, writer
        self.channels: dict[int, _Channel] = {}
        self.frame_max = FRAME_MAX
        self.heartbeat = 0
        self.closed = False

    def send(self, channel: int, value: Any) -> None:
        if not self.closed:
            self.writer.write(frame.marshal(value, channel))

    def send_content(self, channel: int, method: Frame, message: Message) -> None:
        properties = {**message.properties, "headers": message.headers() or None}
        self.send(channel, method)
        self.send(channel, ContentHeader(0, len(message.body), commands.Basic.Properties(**properties)))
        step = self.frame_max - 8
        for i in range(0, len(message.body), step):
            self.send(channel, ContentBody(message.body[i:i + step]))

    async def run(self) -> None:
        try:
            if await self.reader.readexactly(8) != PROTOCOL_HEADER:
                self.writer.write(PROTOCOL_HEADER)
                return
            self.send(0, commands.Connection.Start(
                server_properties={"product": "rucio-injector embedded broker", "capabilities": {
                    "publisher_confirms": True, "basic.nack": True, "consumer_cancel_notify": True,
                    "per_consumer_qos": True, "authentication_failure_close": True}},
                mechanisms="PLAIN AMQPLAIN", locales="en_US"))
            while not self.closed:
                head = await self.reader.readexactly(7)
                _, _, size = struct.unpack(">BHI", head)
                _, channel, value = frame.unmarshal(head + await self.reader.readexactly(size + 1))
                self.handle(channel, value)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed = True
            for ch in self.channels.values():
                ch.release(self.broker)
            self.channels.clear()
            with contextlib.suppress(Exception):
                self.writer.close()

    async def beat(self) -> None:
        while not self.closed:
            await asyncio.sleep(max(self.heartbeat, 1) / 2)
            if self.heartbeat:
                self.send(0, heartbeat.Heartbeat())

    def handle(self, channel: int, value: Any) -> None:
        if isinstance(value, heartbeat.Heartbeat):
            return
        if channel == 0:
            self._connection_method(value)
            return
        ch = self.channels.get(channel)
        if ch is None:
            if isinstance(value, commands.Channel.Open):
                self.channels[channel] = _Channel(self, channel)
                self.send(channel, commands.Channel.OpenOk())
        elif ch.closing:  # after our Channel.Close everything but its CloseOk is ignored
            if isinstance(value, commands.Channel.Close):
                self.send(channel, commands.Channel.CloseOk())
            if isinstance(value, commands.Channel.CloseOk | commands.Channel.Close):
                del self.channels[channel]
        else:
            try:
                self._channel_method(ch, value)
            except BrokerError as exc:
                self._fail(ch, value, exc)

    def _channel_method(self, ch: _Channel, value: Any) -> None:
        if isinstance(value, ContentHeader | ContentBody):
            self._content(ch, value)
            return
        handler = getattr(self, "_" + value.name.replace(".", "_"), None)
        if handler is None:
            raise BrokerError(NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - {value.name}", connection=True)
        handler(ch, value)

    def _fail(self, ch: _Channel, value: Any, exc: BrokerError) -> None:
        """A channel error closes the channel (what it had unsettled goes back); a connection error all."""
        index = getattr(value, "index", 0)
        if exc.connection:
            self.send(0, commands.Connection.Close(exc.code, exc.text, index >> 16, index & 0xFFFF))
            self.closed = True
            return
        ch.closing = True
        ch.release(self.broker)
        self.send(ch.id, commands.Channel.Close(exc.code, exc.text, index >> 16, index & 0xFFFF))

    def _connection_method(self, value: Any) -> None:
        if isinstance(value, commands.Connection.StartOk):
            self.send(0, commands.Connection.Tune(2047, FRAME_MAX, HEARTBEAT))
        elif isinstance(value, commands.Connection.TuneOk):
            self.frame_max = value.frame_max or FRAME_MAX
            self.heartbeat = value.heartbeat
            asyncio.get_running_loop().create_task(self.beat())
        elif isinstance(value, commands.Connection.Open):
            self.send(0, commands.Connection.OpenOk())
        elif isinstance(value, commands.Connection.Close):
            self.send(0, commands.Connection.CloseOk())
            self.closed = True
        elif isinstance(value, commands.Connection.CloseOk):
            self.closed = True

    # Channel, exchange and queue methods.

    def _Channel_Close(self, ch: _Channel, value: commands.Channel.Close) -> None:
        ch.release(self.broker)
        del self.channels[ch.id]
        self.send(ch.id, commands.Channel.CloseOk())

    def _Channel_Flow(self, ch: _Channel, value: commands.Channel.Flow) -> None:
        self.send(ch.id, commands.Channel.FlowOk(value.active))

    def _Exchange_Declare(self, ch: _Channel, value: commands.Exchange.Declare) -> None:
        self.broker.declare_exchange(value.exchange, value.exchange_type, value.passive)
        if not value.nowait:
            self.send(ch.id, commands.Exchange.DeclareOk())

    def _Exchange_Delete(self, ch: _Channel, value: commands.Exchange.Delete) -> None:
        self.broker.delete_exchange(value.exchange)
        if not value.nowait:
            self.send(ch.id, commands.Exchange.DeleteOk())

    def _Queue_Declare(self, ch: _Channel, value: commands.Queue.Declare) -> None:
        q = self.broker.declare_queue(value.queue, dict(value.arguments or {}), value.passive, value.auto_delete)
        if not value.nowait:
            self.send(ch.id, commands.Queue.DeclareOk(q.name, len(q.messages), len(q.consumers)))

    def _Queue_Bind(self, ch: _Channel, value: commands.Queue.Bind) -> None:
        self.broker.bind(value.queue, value.exchange, value.routing_key)
        if not value.nowait:
            self.send(ch.id, commands.Queue.BindOk())

    def _Queue_Unbind(self, ch: _Channel, value: commands.Queue.Unbind) -> None:
        self.broker.unbind(value.queue, value.exchange, value.routing_key)
        self.send(ch.id, commands.Queue.UnbindOk())

    def _Queue_Purge(self, ch: _Channel, value: commands.Queue.Purge) -> None:
        q = self.broker.queue(value.queue)
        count = len(q.messages)
        q.messages.clear()
        if not value.nowait:
            self.send(ch.id, commands.Queue.PurgeOk(count))

    def _Queue_Delete(self, ch: _Channel, value: commands.Queue.Delete) -> None:
        count = self.broker.delete_queue(value.queue)
        if not value.nowait:
            self.send(ch.id, commands.Queue.DeleteOk(count))

    # Basic and confirm methods.

    def _Confirm_Select(self, ch: _Channel, value: commands.Confirm.Select) -> None:
        ch.confirms = True
        if not value.nowait:
            self.send(ch.id, commands.Confirm.SelectOk())

    def _Basic_Qos(self, ch: _Channel, value: commands.Basic.Qos) -> None:
        ch.prefetch = value.prefetch_count
        self.send(ch.id, commands.Basic.QosOk())

    def _Basic_Consume(self, ch: _Channel, value: commands.Basic.Consume) -> None:
        queue = self.broker.queue(value.queue)
        tag = value.consumer_tag or f"amq.ctag-{uuid.uuid4().hex}"
        consumer = ch.consumers[tag] = _AmqpConsumer(ch, tag, queue, ch.prefetch, value.no_ack)
        if not value.nowait:
            self.send(ch.id, commands.Basic.ConsumeOk(tag))
        queue.consumers.append(consumer)
        queue.dispatch()

    def _Basic_Cancel(self, ch: _Channel, value: commands.Basic.Cancel) -> None:
        consumer = ch.consumers.pop(value.consumer_tag or "", None)
        if consumer is not None:
            self.broker.consumer_gone(consumer.queue, consumer)
        if not value.nowait:
            self.send(ch.id, commands.Basic.CancelOk(value.consumer_tag))

    def _Basic_Get(self, ch: _Channel, value: commands.Basic.Get) -> None:
        queue = self.broker.queue(value.queue)
        if not queue.messages:
            self.send(ch.id, commands.Basic.GetEmpty())
            return
        message = queue.messages.popleft()
        tag = ch.track(queue, message, None, settle_later=not value.no_ack)
        self.send_content(ch.id, commands.Basic.GetOk(tag, message.redelivered, message.exchange,
                                                      message.routing_key, len(queue.messages)), message)

    def _Basic_Ack(self, ch: _Channel, value: commands.Basic.Ack) -> None:
        for queue, _ in ch.settle(value.delivery_tag, value.multiple):
            queue.dispatch()

    def _Basic_Nack(self, ch: _Channel, value: commands.Basic.Nack) -> None:
        self._unsettled(ch, ch.settle(value.delivery_tag, value.multiple), value.requeue)

    def _Basic_Reject(self, ch: _Channel, value: commands.Basic.Reject) -> None:
        self._unsettled(ch, ch.settle(value.delivery_tag or 0, False), value.requeue)

    def _unsettled(self, ch: _Channel, settled: list[tuple[Queue, Message]], requeue: bool) -> None:
        if requeue:
            _give_back_grouped(self.broker, settled)
            return
        for queue, message in settled:
            self.broker.dead_letter(queue, message, "rejected")
            queue.dispatch()

    def _Basic_Publish(self, ch: _Channel, value: commands.Basic.Publish) -> None:
        self.broker.exchange(value.exchange)  # an unknown exchange closes the channel, as RabbitMQ does
        ch.content = (value, None, [])

    def _content(self, ch: _Channel, value: ContentHeader | ContentBody) -> None:
        if ch.content is None:
            raise BrokerError(505, "UNEXPECTED_FRAME - content without basic.publish", connection=True)
        method, header, parts = ch.content
        if isinstance(value, ContentHeader):
            header = value
        else:
            parts.append(value.value)
        ch.content = (method, header, parts)
        if header is None or sum(map(len, parts)) < header.body_size:
            return
        ch.content = None
        body = b"".join(parts)
        properties = _properties(header)
        routed = self.broker.publish(method.exchange, method.routing_key, body, properties)
        if not routed and method.mandatory:
            self.send_content(ch.id, commands.Basic.Return(NO_ROUTE, "NO_ROUTE", method.exchange,
                                                           method.routing_key),
                              Message(body, properties, method.exchange, method.routing_key))
        if ch.confirms:
            ch.published += 1
            self.send(ch.id, commands.Basic.Ack(ch.published, False))


# --- STOMP 1.2 ----------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"}
_UNESCAPES = {"\\\\": "\\", "\\n": "\n", "\\c": ":", "\\r": "\r"}
# STOMP headers that are AMQP properties, not application headers (as RabbitMQ's STOMP plugin maps them).
_STOMP_PROPERTIES = {"content-type": "content_type", "content-encoding": "content_encoding",
                     "correlation-id": "correlation_id", "reply-to": "reply_to", "expiration": "expiration",
                     "amqp-message-id": "message_id", "type": "message_type", "app-id": "app_id"}
_STOMP_FRAME_ONLY = {"destination", "receipt", "content-length", "transaction", "persistent", "message-id",
                     "subscription", "ack", "id", "redelivered"}


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in text)


def _unescape(text: str) -> str:
    return re.sub(r"\\[\\ncr]", lambda m: _UNESCAPES[m.group(0)], text)


class _Subscription:
    def __init__(self, conn: StompConnection, sid: str, queue: Queue, ack: str, prefetch: int) -> None:
        self.conn, self.id, self.queue, self.ack, self.prefetch = conn, sid, queue, ack, prefetch
        self.unacked: OrderedDict[str, Message] = OrderedDict()

    def has_room(self) -> bool:
        return self.ack == "auto" or not self.prefetch or len(self.unacked) < self.prefetch

    def deliver(self, queue: Queue, message: Message) -> None:
        ack = f"T_{self.id}@@{self.conn.session}@@{next(self.conn.counter)}"
        if self.ack != "auto":
            self.unacked[ack] = message
            self.conn.pending[ack] = self
        headers = {"subscription": self.id, "destination": self._destination_of(message), "message-id": ack,
                   "redelivered": str(message.redelivered).lower()}
        if self.ack != "auto":
            headers["ack"] = ack
        props = message.properties
        for stomp_name, amqp_name in _STOMP_PROPERTIES.items():
            if props.get(amqp_name) is not None:
                headers[stomp_name] = str(props[amqp_name])
        if props.get("delivery_mode") == 2:
            headers["persistent"] = "true"
        for key, value in message.headers().items():
            headers.setdefault(key, value.decode() if isinstance(value, bytes) else str(value))
        self.conn.send_frame("MESSAGE", headers, message.body)

    @staticmethod
    def _destination_of(message: Message) -> str:
        if message.exchange == "amq.topic":
            return f"/topic/{message.routing_key}"
        if message.exchange == "":
            return f"/queue/{message.routing_key}"
        return f"/exchange/{message.exchange}/{message.routing_key}"


class StompConnection:
    def __init__(self, broker: Broker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.broker, self.reader, self.writer = broker, reader, writer
        self.session = uuid.uuid4().hex[:12]
        self.counter = itertools.count(1)
        self.subscriptions: dict[str, _Subscription] = {}
        self.pending: dict[str, _Subscription] = {}  # ack id → subscription
        self.send_heartbeat_ms = 0
        self.closed = False

    def send_frame(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        if self.closed:
            return
        escape = command != "CONNECTED"
        lines = [command] + [f"{_escape(k) if escape else k}:{_escape(v) if escape else v}"
                             for k, v in headers.items()]
        if body:
            lines.append(f"content-length:{len(body)}")
        self.writer.write(("\n".join(lines) + "\n\n").encode() + body + b"\0")

    async def read_frame(self) -> tuple[str, dict[str, str], bytes]:
        command = ""
        while not command:  # EOLs between frames are heartbeats
            line = await self.reader.readuntil(b"\n")
            command = line.decode().strip("\r\n")
        headers: dict[str, str] = {}
        while (text := (await self.reader.readuntil(b"\n")).decode().rstrip("\n").rstrip("\r")):
            key, _, value = text.partition(":")
            if command not in ("CONNECT", "STOMP"):
                key, value = _unescape(key), _unescape(value)
            headers.setdefault(key, value)  # 1.2: the first of repeated headers wins
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
            await self.reader.readexactly(1)
        else:
            body = (await self.reader.readuntil(b"\0"))[:-1]
        return command, headers, body

    async def run(self) -> None:
        try:
            while not self.closed:
                command, headers, body = await self.read_frame()
                try:
                    self.handle(command, headers, body)
                except BrokerError as exc:
                    self.send_frame("ERROR", {"message": exc.text}, exc.text.encode())
                    self.closed = True
                await self.writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            self.closed = True
            self.release()
            with contextlib.suppress(Exception):
                self.writer.close()

    def release(self) -> None:
        for sub in self.subscriptions.values():
            self.broker.consumer_gone(sub.queue, sub)
            if sub.unacked:
                self.broker.give_back(sub.queue, list(sub.unacked.values()))
                sub.unacked.clear()
        self.subscriptions.clear()

    async def beat(self) -> None:
        while not self.closed and self.send_heartbeat_ms:
            await asyncio.sleep(self.send_heartbeat_ms / 1000)
            if not self.closed:
                self.writer.write(b"\n")

    def handle(self, command: str, headers: dict[str, str], body: bytes) -> None:
        if command in ("CONNECT", "STOMP"):
            _, _, wants = headers.get("heart-beat", "0,0").partition(",")
            self.send_heartbeat_ms = int(wants or 0)
            self.send_frame("CONNECTED", {"version": "1.2", "heart-beat": f"{self.send_heartbeat_ms},0",
                                          "server": "rucio-injector-embedded/1", "session": self.session})
            if self.send_heartbeat_ms:
                asyncio.get_running_loop().create_task(self.beat())
        elif command == "SEND":
            self._send(headers, body)
        elif command == "SUBSCRIBE":
            self._subscribe(headers)
        elif command == "UNSUBSCRIBE":
            sub = self.subscriptions.pop(headers.get("id", ""), None)
            if sub is not None:
                self.broker.consumer_gone(sub.queue, sub)
        elif command in ("ACK", "NACK"):
            self._settle(headers.get("id", ""), requeue=command == "NACK")
        elif command == "DISCONNECT":
            self.closed = True
        else:
            raise BrokerError(NOT_IMPLEMENTED, f"{command} is not supported by the embedded broker")
        if "receipt" in headers:  # written even after a DISCONNECT
            self.writer.write(f"RECEIPT\nreceipt-id:{_escape(headers['receipt'])}\n\n\0".encode())

    def _target(self, destination: str) -> tuple[str, str]:
        """(exchange, routing key) of a destination, RabbitMQ STOMP style; declares /queue/ queues."""
        kind, _, rest = destination.lstrip("/").partition("/")
        if kind == "topic" and rest:
            return "amq.topic", rest
        if kind == "queue" and rest:
            self.broker.declare_queue(rest, {}, passive=False)
            return "", rest
        if kind == "amq" and rest.startswith("queue/"):
            name = rest.removeprefix("queue/")
            self.broker.queue(name)
            return "", name
        if kind == "exchange" and rest:
            exchange, _, key = rest.partition("/")
            self.broker.exchange(exchange)
            return exchange, key
        raise BrokerError(NOT_FOUND, f"unknown destination '{destination}'")

    def _send(self, headers: dict[str, str], body: bytes) -> None:
        exchange, key = self._target(headers.get("destination", ""))
        properties: dict[str, Any] = {}
        app: dict[str, Any] = {}
        for name, value in headers.items():
            if name in _STOMP_PROPERTIES:
                properties[_STOMP_PROPERTIES[name]] = value
            elif name not in _STOMP_FRAME_ONLY:
                app[name] = value
        if headers.get("persistent") == "true":
            properties["delivery_mode"] = 2
        if app:
            properties["headers"] = app
        self.broker.publish(exchange, key, body, properties)

    def _subscribe(self, headers: dict[str, str]) -> None:
        destination = headers.get("destination", "")
        exchange, key = self._target(destination)
        if exchange == "":
            queue = self.broker.queue(key)
        else:  # a subscription of its own to a topic or exchange, gone with the subscription
            queue = self.broker.declare_queue(f"stomp-subscription-{uuid.uuid4().hex}", {}, False, auto_delete=True)
            self.broker.bind(queue.name, exchange, key)
        sid = headers.get("id", destination)
        ack = headers.get("ack", "auto")
        sub = self.subscriptions[sid] = _Subscription(self, sid, queue, ack, int(headers.get("prefetch-count", 0)))
        queue.consumers.append(sub)
        queue.dispatch()

    def _settle(self, ack_id: str, requeue: bool) -> None:
        sub = self.pending.pop(ack_id, None)
        if sub is None or ack_id not in sub.unacked:
            return
        ids = [ack_id]
        if sub.ack == "client":  # cumulative: everything delivered before it on this subscription
            ids = list(itertools.takewhile(lambda i: i != ack_id, sub.unacked)) + [ack_id]
        messages = []
        for i in ids:
            messages.append(sub.unacked.pop(i))
            self.pending.pop(i, None)
        if requeue:
            self.broker.give_back(sub.queue, messages)
        else:
            sub.queue.dispatch()


# --- running it ---------------------------------------------------------------------------------


async def serve(host: str, amqp_port: int, stomp_port: int, ready: Any = None, with_parent: bool = False) -> None:
    broker = Broker()

    def accept(kind: type[AmqpConnection] | type[StompConnection]) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await kind(broker, reader, writer).run()
        return handle

    amqp = await asyncio.start_server(accept(AmqpConnection), host, amqp_port, limit=1 << 24)
    stomp = await asyncio.start_server(accept(StompConnection), host, stomp_port, limit=1 << 24)
    ports = {"amqp": amqp.sockets[0].getsockname()[1], "stomp": stomp.sockets[0].getsockname()[1]}
    if ready is not None:
        ready(ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if with_parent:  # our stdin is the parent's pipe: EOF means the parent is gone, even after a SIGKILL
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)),
                         daemon=True).start()
    async with amqp, stomp:
        await stop.wait()


@dataclass(frozen=True)
class Embedded:
    """A running embedded broker (a child process)."""

    host: str
    amqp_port: int
    stomp_port: int

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.amqp_port}//"


@contextlib.contextmanager
def embedded(host: str = "127.0.0.1", log_file: Path | None = None, timeout: float = 20.0) -> Iterator[Embedded]:
    """Start the embedded broker on free ports in a child process; stop it (and lose its messages) at exit."""
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(open(log_file, "ab")) if log_file else subprocess.DEVNULL
        proc = subprocess.Popen([sys.executable, "-m", "injector.testbed.broker", "--host", host, "--amqp-port", "0",
                                 "--stomp-port", "0", "--with-parent"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        try:
            ports = json.loads(_readline(proc, timeout))
            yield Embedded(host, ports["amqp"], ports["stomp"])
        finally:
            if proc.stdin is not None:
                proc.stdin.close()  # the broker also stops on this alone (--with-parent)
            stop_group(proc, grace=5)


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        assert proc.stdout is not None
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"the embedded broker did not start within {timeout:.0f} s")
        line = proc.stdout.readline().decode()
    if not line:
        raise RuntimeError(f"the embedded broker exited at start (code {proc.wait()})")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--amqp-port", type=int, default=5673)
    parser.add_argument("--stomp-port", type=int, default=61614)
    parser.add_argument("--with-parent", action="store_true", help="stop when stdin closes (the parent exited)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s broker %(levelname)s %(message)s")

    def ready(ports: dict[str, int]) -> None:
        print(json.dumps(ports), flush=True)
        log.info("embedded broker: AMQP %s:%d, STOMP %s:%d (pid %d)", args.host, ports["amqp"], args.host,
                 ports["stomp"], os.getpid())

    asyncio.run(serve(args.host, args.amqp_port, args.stomp_port, ready, args.with_parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
