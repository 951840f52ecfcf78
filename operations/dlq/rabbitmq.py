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
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import kombu

from injector import topology
from injector.config import Broker
from injector.deadletter import Filter, Record, record
from injector.errors import BrokerUnavailable
from injector.messages import Outgoing
from injector.transport import connection
from operations.dlq.replay import ReplaySummary, Target, amqp_target, replay_headers

log = logging.getLogger(__name__)

FLUSH = 200  # dead letters republished per confirm round
CONFIRM_TIMEOUT = 30.0
CHECKS = 3  # passes of the after-replay check (a quorum DLQ may lose the check's own acks too)
EVERYTHING = Filter()
# What ends a pass early: the connection (or, e.g. a queue deleted meanwhile, the channel) is gone.
LOST = (OSError, amqp.exceptions.ConnectionError, amqp.exceptions.ChannelError, BrokerUnavailable)
Progress = Callable[[Record], None]


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
        run = _Replay(queue, where, limit, rate, routing_key, progress, ReplaySummary(queue, dry_run))
        try:
            with self._connection() as conn:
                run.read(conn)
        except LOST as exc:
            run.lost(exc)
        if run.removed:
            self._check(queue, run)
        return run.summary

    def _check(self, queue: str, run: _Replay) -> None:
        """Remove any replayed dead letter still in the DLQ (its removal was lost); count what stays."""
        left = Counter(r.key for r in run.removed)
        try:
            for _ in range(CHECKS):
                with self._connection() as conn:
                    channel = conn.channel()
                    found = [r for r in take(channel, queue, run.summary.depth) if left[r.key] > 0]
                    for r in found:
                        channel.basic_ack(r.tag[0])
                        left[r.key] -= 1
                    close_gracefully(channel)
                if not found:
                    return
                run.summary.resettled += len(found)
                log.warning("%d replayed dead letter(s) were still in %s (their removal was lost); removed now",
                            len(found), queue)
                left = Counter(r.key for r in found)
        except LOST as exc:
            run.summary.unchecked = sum(left.values())
            run.summary.errors.append(f"could not check {queue} after the replay: {type(exc).__name__}: {exc}")
            return
        run.summary.in_both = sum(left.values())


class _Replay:
    """One replay pass over one DLQ: reading, selecting, republishing with confirms, removing."""

    def __init__(self, queue: str, where: Filter, limit: int | None, rate: float | None, to: str | None,
                 progress: Progress | None, summary: ReplaySummary) -> None:
        self.queue, self.where, self.limit, self.rate, self.to = queue, where, limit, rate, to
        self.progress = progress
        self.summary = summary
        self.pending: list[tuple[Record, Outgoing]] = []
        self.removed: list[Record] = []  # acked; removed for sure once the channel closed
        self.started = time.monotonic()
        self.publisher: Confirms | None = None
        self.exchanges: dict[str, str | None] = {}  # exchange → why it cannot be used (None: it exists)

    def read(self, conn: kombu.Connection) -> None:
        browse = conn.channel()
        self.summary.depth = depth_of(conn, browse, self.queue)
        if not self.summary.dry_run:
            self.publisher = Confirms(conn)
        for r in take(browse, self.queue, self.summary.depth):
            self.summary.seen += 1
            if self.where(r):
                self._select(conn, browse, r)
            if self.limit is not None and self.summary.selected >= self.limit:
                break
        self._flush(browse)
        close_gracefully(browse)  # the broker answers only after it processed every ack sent before

    def _select(self, conn: kombu.Connection, browse: Any, r: Record) -> None:
        self.summary.count(r, "selected")
        target = amqp_target(r, self.to)
        if self.summary.dry_run:
            log.info("would replay %s from %s to %s", r.id, self.queue, target)
            return
        why = self._unusable(conn, target)
        if why:
            self._fail(r, f"{r.id}: {why}; left in {self.queue}")
            return
        if any(p.id == r.id for p, _ in self.pending):  # one id per confirm round: outcomes are told by id
            self._flush(browse)
        self.pending.append((r, Outgoing(target.exchange, target.routing_key, r.body, replay_headers(r, target),
                                         r.id, r.tag[1])))
        if len(self.pending) >= _flush_size(self.rate):
            self._flush(browse)

    def _unusable(self, conn: kombu.Connection, target: Target) -> str | None:
        """Publishing to a missing exchange would close the channel: ask first, once per exchange."""
        if target.exchange and target.exchange not in self.exchanges:
            channel = conn.channel()
            try:
                channel.exchange_declare(target.exchange, "topic", passive=True)
                self.exchanges[target.exchange] = None
                close_gracefully(channel)
            except amqp.exceptions.NotFound:
                self.exchanges[target.exchange] = f"exchange {target.exchange!r} does not exist"
        return self.exchanges.get(target.exchange)

    def _flush(self, browse: Any) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        assert self.publisher is not None
        try:
            refused = self.publisher.publish([m for _, m in batch])
        except LOST:
            self.pending = batch  # unconfirmed: `lost` counts them as doubtful
            raise
        accepted = []
        for r, m in batch:
            if m.message_id in refused:
                self._fail(r, f"{r.id}: {refused[m.message_id]}; left in {self.queue}")
            else:
                accepted.append(r)
                self._done(r, Target(m.exchange, m.routing_key))
        for r in accepted:  # removed for sure once the channel closed; `RabbitDlq._check` looks again
            browse.basic_ack(r.tag[0])
        _throttle(self.rate, self.summary.replayed, self.started)

    def _done(self, r: Record, target: Target) -> None:
        """The broker confirmed the copy: replayed (the dead letter's removal follows)."""
        self.removed.append(r)
        self.summary.count(r, "replayed")
        log.info("replayed %s from %s to %s (replay-count %d, reason was %s)", r.id, self.queue, target,
                 r.replay_count + 1, r.reason, extra={"event_id": r.id})
        if self.progress:
            self.progress(r)

    def _fail(self, r: Record, why: str) -> None:
        self.summary.count(r, "failed")
        self.summary.errors.append(why)
        log.error("replay of %s failed, it stays dead-lettered: %s", r.id, why, extra={"event_id": r.id})

    def lost(self, exc: BaseException) -> None:
        """The connection died: what was sent without a confirm may or may not have arrived."""
        for r, _ in self.pending:
            self.summary.count(r, "doubtful")
        self.pending = []
        self.summary.interrupted = f"broker connection lost ({type(exc).__name__}: {exc})"
        log.error("replay of %s interrupted: %s", self.queue, self.summary.interrupted)


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


def _flush_size(rate: float | None) -> int:
    return FLUSH if rate is None else max(1, min(FLUSH, int(rate)))


def _throttle(rate: float | None, done: int, started: float) -> None:
    if rate:
        ahead = done / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
