"""The batching consumer loop shared by AMQP consumers.

The connection thread only receives, heartbeats and settles; each batch is processed on a
worker thread so that slow Rucio calls never starve heartbeats. While a batch is in flight
the next one fills up (bounded by the prefetch). On SIGTERM (stop event) the consumer is
cancelled, the batches already received are finished and settled, then the loop returns.
A lost connection drops unsettled deliveries (the broker redelivers them) and reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import amqp
import kombu

from injector.config import Broker
from injector.errors import BrokerUnavailable
from injector.messages import Delivery
from injector.metrics import Metrics
from injector.settle import Outcome, Route, settle
from injector.transport import AmqpSession, Publisher, connection, drain, to_delivery

log = logging.getLogger(__name__)

Process = Callable[[list[Delivery]], Sequence[Outcome]]


@dataclass
class Batching:
    size: int = 1000
    window: float = 0.2
    prefetch: int = 2000
    retry_pause: float = 2.0  # after a batch with transient failures, wait before the next


@dataclass
class Stats:
    batches: int = 0
    messages: int = 0
    reconnects: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class BatchWorker:
    def __init__(self, broker: Broker, route: Route, process: Process, batching: Batching,
                 metrics: Metrics | None = None) -> None:
        self.broker = broker
        self.route = route
        self.process = process
        self.batching = batching
        self.metrics = metrics or Metrics(route.queue)
        self.stats = Stats()
        self._unsettled: list[list[Delivery]] = []
        self.metrics.track_oldest(self._oldest_age)
        self._generation = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch")

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; reconnect on broker loss."""
        try:
            while not stop.is_set():
                try:
                    self._session(stop)
                except (BrokerUnavailable, OSError, amqp.exceptions.ConnectionError,
                        amqp.exceptions.RecoverableChannelError) as exc:
                    if stop.is_set():
                        break
                    self.stats.reconnects += 1
                    self.metrics.reconnected()
                    self.metrics.heartbeat(connected=False)
                    log.warning("broker connection lost (%s); reconnecting", exc)
                    stop.wait(1.0)
        finally:
            self._executor.shutdown(wait=True)

    def _session(self, stop: threading.Event) -> None:
        self._generation += 1
        generation = self._generation
        buffer: list[Delivery] = []
        self._unsettled = [buffer]
        conn: kombu.Connection = connection(self.broker)
        try:
            channel = conn.channel()
            channel.basic_qos(0, self.batching.prefetch, False)
            tag = channel.basic_consume(
                self.route.queue, callback=lambda m: buffer.append(to_delivery(m, generation)))
            session = AmqpSession(channel, Publisher(conn), generation)
            log.info("consuming %s (prefetch %d, batch %d/%.2fs)", self.route.queue,
                     self.batching.prefetch, self.batching.size, self.batching.window)
            self._loop(conn, channel, tag, session, buffer, stop)
        finally:
            with contextlib.suppress(Exception):  # closing a dead connection may itself fail
                conn.release()

    def _loop(self, conn: kombu.Connection, channel: amqp.Channel, tag: str, session: AmqpSession,
              buffer: list[Delivery], stop: threading.Event) -> None:
        inflight: tuple[Future[Sequence[Outcome]], list[Delivery], float] | None = None
        resume_at = 0.0
        cancelled = False
        while True:
            self.metrics.heartbeat()
            if stop.is_set() and not cancelled:
                channel.basic_cancel(tag)
                cancelled = True
            if inflight is not None and inflight[0].done():
                retried = self._settle(session, *inflight)
                inflight = None
                if retried:
                    resume_at = time.monotonic() + self.batching.retry_pause
            if inflight is None and self._ready(buffer, cancelled, resume_at):
                batch = buffer[: self.batching.size]
                del buffer[: len(batch)]
                inflight = (self._executor.submit(self.process, batch), batch, time.monotonic())
                self._unsettled = [buffer, batch]
            if cancelled and inflight is None and not buffer:
                return
            drain(conn, 0.02 if inflight is not None or buffer else 1.0)

    def _oldest_age(self) -> float:
        oldest = [d.received_at for group in self._unsettled for d in group[:1]]
        return time.monotonic() - min(oldest) if oldest else 0.0

    def _ready(self, buffer: list[Delivery], cancelled: bool, resume_at: float) -> bool:
        if not buffer or (time.monotonic() < resume_at and not cancelled):
            return False
        full = len(buffer) >= self.batching.size
        aged = time.monotonic() - buffer[0].received_at >= self.batching.window
        return full or aged or cancelled

    def _settle(self, session: AmqpSession, future: Future[Sequence[Outcome]], batch: list[Delivery],
                started: float) -> bool:
        try:
            outcomes = list(future.result())
            if len(outcomes) != len(batch):
                raise RuntimeError(f"handler returned {len(outcomes)} outcomes for {len(batch)} messages")
        except Exception as exc:  # a bug must not lose messages: requeue; the delivery limit catches poison
            log.exception("batch of %d failed unexpectedly; requeueing", len(batch))
            outcomes = [Outcome("retry", "handler-crashed", None, "handler-crashed", repr(exc))] * len(batch)
        final = settle(session, list(zip(batch, outcomes, strict=True)), self.route)
        self.stats.batches += 1
        self.stats.messages += len(batch)
        for o in final:
            self.stats.outcomes[o.label] = self.stats.outcomes.get(o.label, 0) + 1
        self._unsettled = self._unsettled[:1]
        self.metrics.observe_batch(final, time.monotonic() - started)
        return any(o.kind == "retry" for o in final)
