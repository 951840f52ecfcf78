"""The batching consumer loop shared by every consumer, whatever the transport (the link is given).

A `Link` (injector.transport) is one live broker connection consuming one queue; this module imports no
transport plug-in and no broker library. The loop thread only pumps it (receive, heartbeats) and settles;
each batch is processed on a worker thread so that slow Rucio calls never starve heartbeats. While a batch is
in flight the next one fills up (bounded by the prefetch).

Rucio outage (the process's breaker is open, injector.breaker): the batch in progress is HELD, unacked,
and processed again once Rucio answers; no other batch starts, and the broker sends no more than the
prefetch, all held unacked, so no delivery budget is spent however long it lasts. (The consumer is not
cancelled for an outage: RabbitMQ 3.x returns, counted, a quorum-queue message it was sending to a
consumer at the instant that consumer is cancelled.) Past `outage_hold` seconds (RabbitMQ would return
unacked messages, counted, at its consumer_timeout) the consumer is cancelled, the held batch and the
buffer are handed back without spending their budget and the link is closed until Rucio answers.

Stop (SIGTERM): intake is paused at once, only the batch in progress is finished and settled, the
deliveries received but not started are handed back without spending their budget, then the link closes.
A lost connection drops unsettled deliveries (the broker redelivers them) and reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_random_exponential

from injector.breaker import Breaker
from injector.config import RUCIO_BULK
from injector.errors import PublishFailed
from injector.messages import Delivery
from injector.metrics import Metrics
from injector.settle import Outcome, Route, Session, settle
from injector.transport import CONNECTION_LOST, Connect, Link

log = logging.getLogger(__name__)

Process = Callable[[list[Delivery]], Sequence[Outcome]]


@dataclass
class Batching:
    size: int = RUCIO_BULK
    window: float = 0.2
    prefetch: int = 2000
    retry_pause: float = 2.0  # after a batch with transient failures, wait before the next
    outage_hold: float = 900.0  # seconds a batch is held unacked in a Rucio outage before it is handed back


@dataclass
class Stats:
    batches: int = 0
    messages: int = 0
    reconnects: int = 0
    handed_back: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class _HandedBack(Exception):
    """A long Rucio outage: everything was handed back; reconnect once Rucio answers."""


@dataclass
class _Inflight:
    future: Future[Sequence[Outcome] | None]  # None: held through an outage past the hold (or stopped): hand back
    batch: list[Delivery]
    started: float


class BatchWorker:
    def __init__(self, connect: Connect, route: Route, process: Process, batching: Batching,
                 metrics: Metrics | None = None, breaker: Breaker | None = None) -> None:
        self.connect = connect
        self.route = route
        self.process = process
        self.batching = batching
        self.breaker = breaker
        self.metrics = metrics or Metrics(route.queue)
        self.stats = Stats()
        self._unsettled: list[list[Delivery]] = []
        self.metrics.track_oldest(self._oldest_age)
        if breaker is not None:
            self.metrics.track_breaker(breaker)
        self._generation = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch")

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; reconnect on broker loss."""
        try:
            while not stop.is_set():
                try:
                    self._session(stop)
                except _HandedBack:
                    assert self.breaker is not None
                    self.breaker.wait(stop)
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
        inflight: _Inflight | None = None
        resume_at = 0.0
        paused = False
        while True:
            self.metrics.heartbeat()
            if stop.is_set() and not paused:  # take nothing new; finish only the batch in progress
                link.pause()
                paused = True
            if inflight is not None and inflight.future.done():
                retried = self._finish(link, inflight, buffer, stop)
                inflight = None
                if retried:
                    resume_at = time.monotonic() + self.batching.retry_pause
            if inflight is None and stop.is_set():
                if not paused:  # the stop landed after the check above (while a batch was settled): cancel now,
                    link.pause()  # so what the broker sent after that ack is in the buffer and goes back uncounted
                self._hand_back(link.session, buffer, "stopping")
                return
            if inflight is None and self._rucio_down() and not stop.is_set():  # nobody is probing: probe
                inflight = _Inflight(self._executor.submit(self._await_rucio, stop), [], time.monotonic())
            if inflight is None and self._ready(buffer, resume_at):
                batch = buffer[: self.batching.size]
                del buffer[: len(batch)]
                inflight = _Inflight(self._executor.submit(self._job, batch, stop), batch, time.monotonic())
                self._unsettled = [buffer, batch]
            link.pump(0.02 if inflight is not None or buffer else 1.0)

    def _rucio_down(self) -> bool:
        return self.breaker is not None and self.breaker.open

    def _job(self, batch: list[Delivery], stop: threading.Event) -> Sequence[Outcome] | None:
        """Runs on the batch thread: the batch's outcomes, processed again after an outage; None when it was held
        past `outage_hold` or the consumer is stopping while Rucio is down (then it is handed back)."""
        held_since: float | None = None
        while True:
            outcomes = self._outcomes(batch)
            if not self._rucio_down():
                return outcomes
            assert self.breaker is not None
            if held_since is None:
                held_since = time.monotonic()
                log.warning("Rucio is down: holding a batch of %d message(s) unacked until it answers (at most "
                            "%.0f s, then they are handed back)", len(batch), self.batching.outage_hold)
            if not self.breaker.wait(stop, deadline=held_since + self.batching.outage_hold):
                return None

    def _await_rucio(self, stop: threading.Event) -> Sequence[Outcome]:
        assert self.breaker is not None
        self.breaker.wait(stop)
        return []

    def _outcomes(self, batch: list[Delivery]) -> Sequence[Outcome]:
        try:
            outcomes = list(self.process(batch))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"handler returned {len(outcomes)} outcomes for {len(batch)} messages")
            return outcomes
        except Exception as exc:  # a bug must not lose messages: requeue; the delivery limit catches poison
            log.exception("batch of %d failed unexpectedly; requeueing", len(batch))
            return [Outcome("retry", "handler-crashed", None, "handler-crashed", repr(exc))] * len(batch)

    def _finish(self, link: Link, inflight: _Inflight, buffer: list[Delivery], stop: threading.Event) -> bool:
        """Settle a finished batch (True when some of it is retried), or hand back a held one."""
        outcomes = inflight.future.result()
        if outcomes is not None:
            return self._settle(link.session, outcomes, inflight.batch, inflight.started)
        if not stop.is_set():  # held past outage_hold: give everything back and wait for Rucio disconnected
            link.pause()
            self._hand_back(link.session, inflight.batch + buffer, "Rucio still down")
            buffer.clear()
            raise _HandedBack()
        self._hand_back(link.session, inflight.batch, "stopping")
        self._unsettled = self._unsettled[:1]
        return False

    def _hand_back(self, session: Session, deliveries: list[Delivery], why: str) -> None:
        if deliveries:
            log.info("%s: handing %d message(s) back to %s without spending their delivery budget", why,
                     len(deliveries), self.route.queue)
            try:
                session.hand_back(list(deliveries))
                self.stats.handed_back += len(deliveries)
            except PublishFailed as exc:  # left unacked: the broker returns them when the link closes, counted once
                log.warning("could not hand %d message(s) back (%s); the broker redelivers them", len(deliveries),
                            exc)
            deliveries.clear()

    def _oldest_age(self) -> float:
        oldest = [d.received_at for group in self._unsettled for d in group[:1]]
        return time.monotonic() - min(oldest) if oldest else 0.0

    def _ready(self, buffer: list[Delivery], resume_at: float) -> bool:
        if not buffer or time.monotonic() < resume_at:
            return False
        full = len(buffer) >= self.batching.size
        aged = time.monotonic() - buffer[0].received_at >= self.batching.window
        return full or aged

    def _settle(self, session: Session, outcomes: Sequence[Outcome], batch: list[Delivery], started: float) -> bool:
        final = settle(session, list(zip(batch, outcomes, strict=True)), self.route)
        self.stats.batches += 1
        self.stats.messages += len(batch)
        for o in final:
            self.stats.outcomes[o.label] = self.stats.outcomes.get(o.label, 0) + 1
        self._unsettled = self._unsettled[:1]
        self.metrics.observe_batch(final, time.monotonic() - started)
        return any(o.kind == "retry" for o in final)
