"""ActiveMQ's DLQ.<queue> over STOMP (the cleanup consumer's; an ActiveMQ-only site's ingest queue's): list, purge
and replay, exactly.

Listing uses a queue BROWSER: nothing is consumed or counted. Purge and replay first browse (the dead
letters present at the start, by the broker's message id), then consume client-individual with a selector
that excludes anything newer than the newest of them, and act only on the browsed ids: a replayed event that
fails again and comes back meanwhile is never taken again by the same replay. A copy is SENT with a receipt
before its dead letter is ACKed, and the ACKs carry a receipt too, so a dead letter counts as removed only
once the broker said so; a check afterwards browses again and removes what is still there. Whatever is not
acked returns to the DLQ at disconnect.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterable, Iterator
from queue import Empty, Queue
from typing import Any

import stomp
import stomp.exception

from injector.config import StompServer
from injector.deadletter import EXCHANGE, REASON, SOURCE_QUEUE, Filter, Record, record
from injector.errors import BrokerUnavailable, PublishFailed
from injector.messages import Outgoing
from operations.dlq.replay import Progress, Replay, ReplaySummary, Target, replay_headers, stomp_target

log = logging.getLogger(__name__)

EVERYTHING = Filter()
RECEIPT_TIMEOUT = 30.0
LOST = (BrokerUnavailable, PublishFailed, stomp.exception.StompException, OSError)


class ActiveMqDlq:
    IDLE = 1.0  # seconds without a frame: the queue has nothing more for us
    PREFETCH = 1000

    def __init__(self, server: StompServer) -> None:
        self.server = server

    def peek(self, queue: str, where: Filter = EVERYTHING) -> list[Record]:
        with _Link(self.server) as link:
            return [r for r in link.records(queue, browse=True, idle=self.IDLE) if where(r)]

    def depth(self, queue: str) -> int:
        return len(self.peek(queue))

    def purge(self, queue: str, where: Filter = EVERYTHING) -> int:
        chosen = [r for r in self.peek(queue) if where(r)]
        removed = self.remove(queue, {r.message_id for r in chosen if r.message_id}, _newest(chosen))
        for r in chosen:
            if r.message_id in removed:
                log.info("purged %s from %s (reason %s)", r.id, queue, r.reason, extra={"event_id": r.id})
        return len(removed)

    def replay(self, queue: str, where: Filter = EVERYTHING, *, limit: int | None = None, rate: float | None = None,
               routing_key: str | None = None, dry_run: bool = False,
               progress: Progress | None = None) -> ReplaySummary:
        """Send the selected dead letters of the start back to the consumer queue they came from (or to the
        destination `routing_key`); remove each once the broker receipted its copy; then check."""
        present = self.peek(queue)
        run = Replay(queue, where, limit=limit, rate=rate, dry_run=dry_run, progress=progress)
        return run.run(_Adapter(self, queue, present, routing_key))

    def remove(self, queue: str, ids: set[str], newest: int | None) -> set[str]:
        """Consume and ack the messages with these broker ids; returns the ids whose ack was receipted."""
        done: set[str] = set()
        if not ids:
            return done
        with _Link(self.server) as link:
            for r in link.records(queue, browse=False, idle=self.IDLE, prefetch=self.PREFETCH, newest=newest):
                if r.message_id in ids:
                    link.ack([r.tag[0]])
                    done.add(str(r.message_id))
                    if done == ids:
                        break
        return done


class _Adapter:
    """A replay on ActiveMQ: the dead letters browsed at the start (by the broker's message id), consumed
    client-individual with a selector excluding anything newer, copies SENT with a receipt, ACKs receipted."""

    lost: tuple[type[BaseException], ...] = LOST

    def __init__(self, dlq: ActiveMqDlq, queue: str, present: list[Record], to: str | None) -> None:
        self.dlq, self.queue, self.browsed, self.to = dlq, queue, present, to
        self.waiting: dict[str, Record] = {}  # selected, not received yet
        self.link: _Link | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        try:
            yield
        finally:
            if self.link is not None:
                self.link.__exit__()  # whatever is not acked returns to the DLQ

    def present(self) -> tuple[int, list[Record]]:
        return len(self.browsed), self.browsed

    def deliver(self, selected: Iterable[Record]) -> Iterator[Record]:
        """Only the selected of the start: a replayed event that fails again meanwhile is newer, or not one of
        them, and is never acked (it returns to the DLQ at disconnect)."""
        chosen = list(selected)
        self.waiting = {str(r.message_id): r for r in chosen}
        if not chosen:
            return
        self.link = _Link(self.dlq.server)
        for r in self.link.records(self.queue, browse=False, idle=self.dlq.IDLE, prefetch=self.dlq.PREFETCH,
                                   newest=_newest(chosen)):
            if self.waiting.pop(str(r.message_id), None) is None:
                continue
            yield r
            if not self.waiting:
                return

    def unreached(self) -> list[Record]:
        return list(self.waiting.values())

    def target(self, r: Record) -> Target:
        return stomp_target(r, self.to)

    def publish(self, records: list[Record], target: Target) -> list[str | None]:
        assert self.link is not None
        destination = target.routing_key
        self.link.send(destination, [Outgoing(destination, "", r.body, replay_headers(r), None, r.tag[1])
                                     for r in records])
        return [None] * len(records)  # receipted, every one (else `send` raised)

    def remove(self, records: list[Record]) -> None:
        assert self.link is not None
        self.link.ack([r.tag[0] for r in records])

    def remove_again(self, records: list[Record]) -> tuple[list[Record], int]:
        ids = {str(r.message_id) for r in records}
        still = [r for r in self.dlq.peek(self.queue) if r.message_id in ids]
        if not still:
            return [], 0
        return still, len(self.dlq.remove(self.queue, {str(r.message_id) for r in still}, _newest(still)))


class _Link:
    """A short-lived STOMP connection for operator commands: one subscription, receipted sends and acks."""

    def __init__(self, server: StompServer) -> None:
        from injector.transport.stomp import open_connection

        self.inbox: Queue[Any] = Queue()
        inbox = self.inbox

        class Inbox(stomp.ConnectionListener):  # type: ignore[misc]
            def on_message(self, frame: Any) -> None:
                inbox.put(frame)

        self.conn, _, self.receipts = open_connection(server, {"records": Inbox()}, heartbeats=False)

    def records(self, queue: str, *, browse: bool, idle: float, prefetch: int = 0,
                newest: int | None = None) -> Iterator[Record]:
        """Frames of one subscription as records, until the browse ends or `idle` seconds pass without one.
        `newest`: only messages not newer than this broker timestamp (ms)."""
        # A browser consumes nothing; with client acks ActiveMQ would stop after its prefetch (500) unacked.
        headers = {"browser": "true"} if browse else {"activemq.prefetchSize": str(prefetch)}
        if newest is not None:
            headers["selector"] = f"JMSTimestamp <= {newest}"
        self.conn.subscribe(f"/queue/{queue}", id=uuid.uuid4().hex[:8], ack="auto" if browse else "client-individual",
                            headers=headers)
        while True:
            try:
                frame = self.inbox.get(timeout=idle)
            except Empty:
                if not self.conn.is_connected():
                    raise BrokerUnavailable(f"STOMP connection lost while reading {queue}") from None
                return
            if frame.headers.get("browser") == "end":
                return
            yield _record(queue, frame)

    def send(self, destination: str, messages: list[Outgoing]) -> None:
        self.receipts.send(self.conn, destination, messages)

    def ack(self, ack_ids: list[str]) -> None:
        """ACK each; the last carries a receipt: the broker handles a connection's frames in order."""
        receipt = uuid.uuid4().hex
        done = self.receipts.pending[receipt] = threading.Event()
        try:
            for i, ack_id in enumerate(ack_ids):
                self.conn.ack(ack_id, receipt=receipt if i == len(ack_ids) - 1 else None)
            if not done.wait(RECEIPT_TIMEOUT) or self.receipts.lost.is_set():
                raise BrokerUnavailable("no receipt from the broker for the acks")
        finally:
            self.receipts.pending.pop(receipt, None)

    def __enter__(self) -> _Link:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.conn.disconnect()  # with a receipt: what we acked is settled before the socket closes


def _record(queue: str, frame: Any) -> Record:
    from injector.transport.stomp import event_headers

    h = dict(frame.headers)
    body = frame.body if isinstance(frame.body, bytes) else str(frame.body or "").encode()
    headers = event_headers(h)
    if EXCHANGE not in headers and h.get("original-destination"):
        # The broker itself dead-lettered it (its redelivery limit): no reason headers of ours.
        headers[EXCHANGE] = h["original-destination"]
        headers.setdefault(SOURCE_QUEUE, str(h["original-destination"]).removeprefix("/queue/"))
        headers.setdefault(REASON, "broker-redelivery-limit")
    return record(queue, body, headers, h.get("message-id"),
                  tag=(h.get("ack") or h.get("message-id"), h.get("content-type") or "application/json",
                       _int(h.get("timestamp"))), own_id=h.get("correlation-id"))


def _newest(records: list[Record]) -> int | None:
    stamps = [r.tag[2] for r in records if r.tag and r.tag[2]]
    return max(stamps) if len(stamps) == len(records) and stamps else None


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
