"""Dead-letter queues on RabbitMQ (AMQP): list, purge and replay, exactly.

Reading: basic.get WITHOUT ack, at most as many messages as the queue held when the command started
(its depth), then the channel is closed and the broker puts back what was not acked. The DLQs are classic
queues (injector.topology): putting back keeps each message's place and counts nothing, so listing never
spends a delivery budget (a quorum queue counts every return, and RabbitMQ >= 4 drops a message past 20).

Why a replay reads only the depth it saw at start (issue 11): a replayed event that fails again is
dead-lettered back into this same DLQ while the replay is still reading it. Reading "until empty" took those
fresh returns too and replayed them again, round after round, never ending while a consumer kept returning
them; each reading also kept them unacked, so they were counted twice. Messages arriving after the start sit
behind the ones present at start, so reading `depth` messages reads exactly the dead letters of the start.

Why acks are only counted after the channel closed, and then checked (issue 11): on a QUORUM queue, acks of
basic.get deliveries sent in a burst just before the channel closes are lost (measured on this RabbitMQ
3.10: 1000 gets, 1000 acks, close → 45 to 185 messages back in the queue, even with a graceful channel.close
or a round trip in between; 0 on a classic queue). The dead letter then stays while its copy was replayed:
"replayed 300, failed 0" with dozens still there, replayed twice by the next run. Now a dead letter counts
as removed once the broker answered the channel's close (it processes a channel's frames in order), and a
check after every replay looks for any replayed dead letter still present and removes it (a DLQ still
declared quorum, or a connection lost mid-replay); what it cannot remove is reported as in both places.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import amqp
import kombu

from injector import topology
from injector.config import Broker
from injector.deadletter import Filter, Record, record
from injector.errors import BrokerUnavailable
from injector.messages import Outgoing
from injector.transport.amqp import connection
from operations.dlq.replay import Progress, Replay, ReplaySummary, Target, amqp_target, replay_headers

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT = 30.0
EVERYTHING = Filter()
# What ends a pass early: the connection (or, e.g. a queue deleted meanwhile, the channel) is gone.
LOST = (OSError, amqp.exceptions.ConnectionError, amqp.exceptions.ChannelError, BrokerUnavailable)


class RabbitDlq:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def _connection(self) -> kombu.Connection:
        return connection(self._broker)  # a context manager: kombu releases it at exit

    def depth(self, queue: str) -> int:
        with self._connection() as conn:
            return depth_of(conn, conn.channel(), queue)

    def peek(self, queue: str, where: Filter = EVERYTHING) -> list[Record]:
        """The dead letters present now that `where` selects; nothing is consumed or counted."""
        with self._connection() as conn:
            channel = conn.channel()
            found = [r for r in take(channel, queue, depth_of(conn, channel, queue)) if where(r)]
            close_gracefully(channel)
        return found

    def purge(self, queue: str, where: Filter = EVERYTHING) -> int:
        """Delete the selected dead letters for good; returns how many (counted once the broker has the acks)."""
        with self._connection() as conn:
            channel = conn.channel()
            gone = []
            for r in take(channel, queue, depth_of(conn, channel, queue)):
                if where(r):
                    channel.basic_ack(r.tag[0])
                    gone.append(r)
            close_gracefully(channel)
        for r in gone:
            log.info("purged %s from %s (reason %s)", r.id, queue, r.reason, extra={"event_id": r.id})
        return len(gone)

    def replay(self, queue: str, where: Filter = EVERYTHING, *, limit: int | None = None, rate: float | None = None,
               routing_key: str | None = None, dry_run: bool = False,
               progress: Progress | None = None) -> ReplaySummary:
        """Republish the selected dead letters of the start (see `operations.dlq.replay` for where each goes) and
        remove each once its copy is confirmed; then check that none of them is still in the DLQ."""
        run = Replay(queue, where, limit=limit, rate=rate, dry_run=dry_run, progress=progress)
        return run.run(_Adapter(self._broker, queue, routing_key))


class _Adapter:
    """A replay on RabbitMQ: basic.get without ack up to the depth of the start on one channel, copies published
    on a confirm channel, the dead letters acked on the reading channel (removed for sure once it closed)."""

    lost: tuple[type[BaseException], ...] = LOST

    def __init__(self, broker: Broker, queue: str, to: str | None) -> None:
        self.broker, self.queue, self.to = broker, queue, to
        self.depth = 0
        self.conn: Any = None
        self.browse: Any = None
        self.publisher: Confirms | None = None
        self.exchanges: dict[str, str | None] = {}  # exchange → why it cannot be used (None: it exists)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with connection(self.broker) as conn:  # a context manager: kombu releases it at exit
            self.conn, self.browse = conn, conn.channel()
            yield
            close_gracefully(self.browse)  # the broker answers only after it processed every ack sent before

    def present(self) -> tuple[int, Iterator[Record]]:
        self.depth = depth_of(self.conn, self.browse, self.queue)
        return self.depth, take(self.browse, self.queue, self.depth)

    def deliver(self, selected: Iterable[Record]) -> Iterator[Record]:
        return iter(selected)  # each is held unacked on the reading channel already

    def unreached(self) -> list[Record]:
        return []

    def target(self, r: Record) -> Target:
        return amqp_target(r, self.to)

    def publish(self, records: list[Record], target: Target) -> list[str | None]:
        why = self._unusable(target)
        if why:
            return [why] * len(records)
        if self.publisher is None:
            self.publisher = Confirms(self.conn)
        refused = self.publisher.publish([Outgoing(target.exchange, target.routing_key, r.body,
                                                   replay_headers(r, target), r.id, r.tag[1]) for r in records])
        return [refused.get(r.id) for r in records]

    def _unusable(self, target: Target) -> str | None:
        """Publishing to a missing exchange would close the channel: ask first, once per exchange."""
        if target.exchange and target.exchange not in self.exchanges:
            channel = self.conn.channel()
            try:
                channel.exchange_declare(target.exchange, "topic", passive=True)
                self.exchanges[target.exchange] = None
                close_gracefully(channel)
            except amqp.exceptions.NotFound:
                self.exchanges[target.exchange] = f"exchange {target.exchange!r} does not exist"
        return self.exchanges.get(target.exchange)

    def remove(self, records: list[Record]) -> None:
        for r in records:
            self.browse.basic_ack(r.tag[0])

    def remove_again(self, records: list[Record]) -> tuple[list[Record], int]:
        left = Counter(r.key for r in records)
        with connection(self.broker) as conn:
            channel = conn.channel()
            found = [r for r in take(channel, self.queue, self.depth) if left[r.key] > 0]
            for r in found:
                channel.basic_ack(r.tag[0])
                left[r.key] -= 1
            close_gracefully(channel)  # the acks are processed once the broker answered the close
        return found, len(found)


class Confirms:
    """A confirm-mode channel that tells, message by message, whether the broker took a message (confirmed
    and routed to a queue): a replay must know which dead letters it may remove."""

    def __init__(self, conn: kombu.Connection) -> None:
        self.conn = conn
        self.channel = conn.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(lambda tag, multiple: self._settle(tag, multiple, None))
        self.channel.events["basic_nack"].add(lambda tag, multiple: self._settle(tag, multiple, "nacked"))
        self.channel.events["basic_return"].add(self._returned)
        self.seq = 0
        self.pending: dict[int, str] = {}
        self.refused: dict[str, str] = {}

    def _settle(self, tag: int, multiple: bool, why: str | None) -> None:
        for t in [t for t in self.pending if t <= tag] if multiple else [tag]:
            mid = self.pending.pop(t, None)
            if mid is not None and why:
                self.refused[mid] = f"refused by the broker ({why})"

    def _returned(self, exc: Exception, exchange: str, routing_key: str, message: amqp.Message) -> None:
        where = f"queue {routing_key!r}" if exchange == "" else f"exchange {exchange!r} routing key {routing_key!r}"
        self.refused[message.properties.get("message_id", "?")] = f"unroutable: no {where} ({exc})"

    def publish(self, messages: list[Outgoing]) -> dict[str, str]:
        """Publish (mandatory, persistent) and wait for every confirm; returns message id → why refused."""
        self.refused = {}
        for m in messages:
            self.seq += 1
            self.pending[self.seq] = m.message_id or ""
            self.channel.basic_publish(
                amqp.Message(m.body, content_type=m.content_type, delivery_mode=2, message_id=m.message_id,
                             application_headers=m.headers, timestamp=int(time.time())),
                exchange=m.exchange, routing_key=m.routing_key, mandatory=True)
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while self.pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.pending)} publish confirm(s) not received in {CONFIRM_TIMEOUT:.0f}s")
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=1.0)
        return self.refused


def depth_of(conn: kombu.Connection, channel: Any, queue: str) -> int:
    try:
        return int(channel.queue_declare(queue, passive=True).message_count)
    except amqp.exceptions.NotFound:
        raise topology.TopologyMissing(
            f"queue {queue!r} does not exist on {topology.where(conn.as_uri())}: run `rucio-injector broker setup`"
        ) from None


def take(channel: Any, queue: str, most: int) -> Iterator[Record]:
    """Up to `most` messages, oldest first, unacked (they return to their place unless acked)."""
    for _ in range(most):
        m = channel.basic_get(queue, no_ack=False)
        if m is None:
            return
        props = m.properties
        headers = {k: v for k, v in (props.get("application_headers") or {}).items() if k != "x-delivery-count"}
        body = m.body if isinstance(m.body, bytes) else str(m.body).encode()
        yield record(queue, body, headers, props.get("message_id"),
                     tag=(m.delivery_tag, props.get("content_type") or "application/json"))


def close_gracefully(channel: Any) -> None:
    """Close gracefully: the broker's close-ok comes after it processed every frame sent before."""
    if channel.is_open:
        channel.close()
