"""`dlq migrate`: turn a dead-letter queue declared by an older version (a quorum queue) into the classic
queue `injector.topology` declares now, keeping every dead letter once, body and headers untouched (a quorum
queue does not keep its order across returns, so neither can this).

RabbitMQ cannot change a queue's type, so the dead letters move out to `<dlq>.migrating` (classic), the old
queue is deleted once empty, `broker setup`'s declaration recreates it with its binding, and they move back.
Each move publishes a copy with a publisher confirm BEFORE acking the original, so a crash at any moment
leaves each dead letter in one of the two queues (or, harmlessly, in both: the move back drops byte-identical
duplicates, which is also how a quorum queue's lost acks are absorbed); running the command again resumes.
The old queue is first unbound from the dead-letter exchange: until it is recreated, a consumer's dead letter
is unroutable and the consumer requeues the message instead, so nothing is lost (run it when no other `dlq`
command is reading the queue: a message another command holds unacked would not be seen).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import amqp
import kombu

from injector import topology
from injector.config import Settings
from injector.deadletter import Record
from injector.messages import Outgoing
from injector.transport.amqp import connection
from operations.dlq.rabbitmq import Confirms, close_gracefully, depth_of, take

log = logging.getLogger(__name__)

HOLD_SUFFIX = ".migrating"
BATCH = 500
ROUNDS = 10  # passes emptying the old queue (a quorum queue may keep some whose ack it lost)
SETTLE = 1.0  # seconds an emptied queue must stay empty


@dataclass
class Migration:
    queue: str
    moved_out: int = 0
    moved_back: int = 0
    duplicates: int = 0
    done: bool = False
    note: str = ""


def migrate(settings: Settings, queue: str) -> Migration:
    """Recreate `queue` (a DLQ of the topology) as declared now, keeping its dead letters."""
    m = Migration(queue)
    hold = queue + HOLD_SUFFIX
    with connection(settings.broker) as conn:  # kombu releases it at exit
        if not _exists(conn, queue) and not _exists(conn, hold):
            m.note = "does not exist: run `rucio-injector broker setup`"
            return m
        if _exists(conn, queue) and _declared_as_now(conn, settings, queue) and not _exists(conn, hold):
            m.note, m.done = "already declared as now: nothing to do", True
            return m
        _declare(conn, hold, topology.DLQ_ARGUMENTS)
        if _exists(conn, queue) and not _declared_as_now(conn, settings, queue):
            _unbind(conn, settings, queue)  # nothing new arrives: a consumer's dead letter is refused, requeued
            m.moved_out = _empty(conn, queue, hold)
            _delete(conn, queue)
        topology.apply(conn, _only(topology.declare(settings), queue))  # recreates it, with its binding
        while _ready(conn, hold):
            moved, dropped = _move(conn, hold, queue, dedupe=True)
            m.moved_back, m.duplicates = m.moved_back + moved, m.duplicates + dropped
        _delete_if_empty(conn, hold)
        m.done = not _exists(conn, hold)
    return m


def missing(settings: Settings, queues: Sequence[str]) -> list[str]:
    """The DLQs that exist neither as themselves nor half-way through a migration."""
    with connection(settings.broker) as conn:  # kombu releases it at exit
        return [q for q in queues if not _exists(conn, q) and not _exists(conn, q + HOLD_SUFFIX)]


def _move(conn: kombu.Connection, source: str, target: str, *, dedupe: bool = False) -> tuple[int, int]:
    """Copy the messages present in `source` into `target` (confirmed), then remove each from `source`.
    With `dedupe`, a byte-identical copy of one already moved is dropped. Returns (moved, dropped)."""
    browse, publisher = conn.channel(), Confirms(conn)
    seen: set[tuple[str, int, str]] = set()
    batch: list[Record] = []
    moved = dropped = 0
    for r in take(browse, source, depth_of(conn, browse, source)):
        if dedupe and r.key in seen:
            browse.basic_ack(r.tag[0])
            dropped += 1
            continue
        seen.add(r.key)
        batch.append(r)
        if len(batch) >= BATCH:
            moved += _copy(browse, publisher, batch, target)
    moved += _copy(browse, publisher, batch, target)
    close_gracefully(browse)
    close_gracefully(publisher.channel)
    log.info("moved %d dead letter(s) from %s to %s (%d duplicate(s) dropped)", moved, source, target, dropped)
    return moved, dropped


def _copy(browse: amqp.Channel, publisher: Confirms, batch: list[Record], target: str) -> int:
    if not batch:
        return 0
    messages = [Outgoing("", target, r.body, r.headers, r.message_id, r.tag[1]) for r in batch]
    refused = publisher.publish(messages)
    if refused:
        raise topology.TopologyMissing(f"could not move dead letters into {target}: {next(iter(refused.values()))}")
    for r in batch:
        browse.basic_ack(r.tag[0])
    n = len(batch)
    batch.clear()
    return n


def _only(decl: topology.Topology, queue: str) -> topology.Topology:
    """The part of the declaration that makes `queue`: the queue and its bindings."""
    return topology.Topology(decl.vhost, [], [decl.queue(queue)], [b for b in decl.bindings if b.queue == queue])


def _declared_as_now(conn: kombu.Connection, settings: Settings, queue: str) -> bool:
    channel = conn.channel()
    try:
        channel.queue_declare(queue, durable=True, auto_delete=False,
                              arguments=topology.declare(settings).queue(queue).arguments)
    except amqp.exceptions.PreconditionFailed:
        return False
    close_gracefully(channel)
    return True


def _empty(conn: kombu.Connection, queue: str, hold: str) -> int:
    """Move everything out of `queue`; done once it stayed empty for a while (a quorum queue returns the
    messages whose ack it lost a moment after the channel closed)."""
    moved = 0
    for _ in range(ROUNDS):
        moved += _move(conn, queue, hold)[0]
        time.sleep(SETTLE)
        if _ready(conn, queue) == 0:
            return moved
    raise topology.TopologyMismatch(f"{queue} does not stay empty: stop whatever still reads it (another `dlq` "
                                    "command) and run `rucio-injector dlq migrate` again")


def _unbind(conn: kombu.Connection, settings: Settings, queue: str) -> None:
    channel = conn.channel()
    for b in topology.declare(settings).bindings:
        if b.queue == queue:
            channel.queue_unbind(queue, b.exchange, b.routing_key)
    close_gracefully(channel)


def _delete(conn: kombu.Connection, queue: str) -> None:
    """Delete an emptied queue (quorum queues refuse the if-empty flag: emptiness was checked, and nothing is
    routed to it any more)."""
    channel = conn.channel()
    channel.queue_delete(queue)
    close_gracefully(channel)


def _ready(conn: kombu.Connection, queue: str) -> int:
    channel = conn.channel()
    n = depth_of(conn, channel, queue)
    close_gracefully(channel)
    return n


def _exists(conn: kombu.Connection, queue: str) -> bool:
    channel = conn.channel()
    try:
        channel.queue_declare(queue, passive=True)
    except amqp.exceptions.NotFound:
        return False
    close_gracefully(channel)
    return True


def _declare(conn: kombu.Connection, queue: str, arguments: dict[str, str]) -> None:
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)
    close_gracefully(channel)


def _delete_if_empty(conn: kombu.Connection, queue: str) -> None:
    channel = conn.channel()
    try:
        channel.queue_delete(queue, if_empty=True)
    except amqp.exceptions.PreconditionFailed:
        return  # not empty (a dead letter arrived, or an ack was lost): the caller moves again
    close_gracefully(channel)
