"""The batching consumer loop shared by every consumer, whatever the transport (AMQP or STOMP).

A `Link` is one live broker connection with one subscription; the loop thread only pumps it
(receive, heartbeat) and settles; each batch is processed on a
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
from typing import Protocol

import amqp
import kombu
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_random_exponential

from injector.config import Broker
from injector.errors import BrokerUnavailable
from injector.messages import Delivery
from injector.metrics import Metrics
from injector.settle import Outcome, Route, Session, settle
from injector.transport import AmqpSession, Publisher, connection, drain, to_delivery

log = logging.getLogger(__name__)

Process = Callable[[list[Delivery]], Sequence[Outcome]]

# What a lost connection looks like, whatever the transport: the loop reconnects.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    BrokerUnavailable, OSError, amqp.exceptions.ConnectionError, amqp.exceptions.RecoverableChannelError)


class Link(Protocol):
    """One broker connection consuming one queue; `pump` moves received deliveries into the
    buffer given at connect time (waiting up to `timeout`) and raises when the connection is lost."""

    session: Session

    def pump(self, timeout: float) -> None: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...


Connect = Callable[[int, list[Delivery]], Link]  # (generation, buffer) → a consuming link


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
    def __init__(self, connect: Connect, route: Route, process: Process, batching: Batching,
                 metrics: Metrics | None = None) -> None:
        self.connect = connect
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
                except CONNECTION_LOST as exc:
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
        buffer: list[Delivery] = []
        self._unsettled = [buffer]
        link = self._connect(stop, buffer)
        try:
            log.info("consuming %s (batch %d/%.2fs)", self.route.queue, self.batching.size, self.batching.window)
            self._loop(link, buffer, stop)
        finally:
            with contextlib.suppress(Exception):  # closing a dead connection may itself fail
                link.close()

    def _connect(self, stop: threading.Event, buffer: list[Delivery]) -> Link:
        """Connect and subscribe, retried with jittered exponential backoff until it works or `stop`."""

        def pause(seconds: float) -> None:
            stop.wait(seconds)  # SIGTERM ends the wait at once

        def report(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("cannot connect (attempt %d): %s", state.attempt_number, error)

        retrying = Retrying(retry=retry_if_exception_type(CONNECTION_LOST), stop=stop_when_event_set(stop),
                            wait=wait_random_exponential(multiplier=0.5, max=30), sleep=pause, reraise=True,
                            before_sleep=report)
        return retrying(self.connect, self._generation, buffer)

    def _loop(self, link: Link, buffer: list[Delivery], stop: threading.Event) -> None:
        inflight: tuple[Future[Sequence[Outcome]], list[Delivery], float] | None = None
        resume_at = 0.0
        cancelled = False
        while True:
            self.metrics.heartbeat()
            if stop.is_set() and not cancelled:
                link.cancel()
                cancelled = True
            if inflight is not None and inflight[0].done():
                retried = self._settle(link.session, *inflight)
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
            link.pump(0.02 if inflight is not None or buffer else 1.0)

    def _oldest_age(self) -> float:
        oldest = [d.received_at for group in self._unsettled for d in group[:1]]
        return time.monotonic() - min(oldest) if oldest else 0.0

    def _ready(self, buffer: list[Delivery], cancelled: bool, resume_at: float) -> bool:
        if not buffer or (time.monotonic() < resume_at and not cancelled):
            return False
        full = len(buffer) >= self.batching.size
        aged = time.monotonic() - buffer[0].received_at >= self.batching.window
        return full or aged or cancelled

    def _settle(self, session: Session, future: Future[Sequence[Outcome]], batch: list[Delivery],
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


class AmqpLink:
    """A kombu connection consuming one queue with a bounded prefetch."""

    def __init__(self, broker: Broker, queue: str, prefetch: int, generation: int, buffer: list[Delivery]) -> None:
        self.conn: kombu.Connection = connection(broker)
        try:
            self.channel: amqp.Channel = self.conn.channel()
            self.channel.basic_qos(0, prefetch, False)
            self.tag = self.channel.basic_consume(
                queue, callback=lambda m: buffer.append(to_delivery(m, generation)))
            self.session: Session = AmqpSession(self.channel, Publisher(self.conn), generation)
        except BaseException:
            with contextlib.suppress(Exception):
                self.conn.release()
            raise

    def pump(self, timeout: float) -> None:
        drain(self.conn, timeout)

    def cancel(self) -> None:
        self.channel.basic_cancel(self.tag)

    def close(self) -> None:
        self.conn.release()


def amqp_worker(broker: Broker, route: Route, process: Process, batching: Batching,
                metrics: Metrics | None = None) -> BatchWorker:
    """A BatchWorker consuming `route.queue` over AMQP."""

    def connect(generation: int, buffer: list[Delivery]) -> Link:
        return AmqpLink(broker, route.queue, batching.prefetch, generation, buffer)

    return BatchWorker(connect, route, process, batching, metrics)
