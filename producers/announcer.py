"""Batched, confirmed publishing of file-closed events that never drops one.

Events are gathered for a short window (or until a batch is full) and published together with
DaqPublisher. While the broker is down they stay pending and the publish is retried with jittered
backoff (tenacity) until it succeeds or the caller stops; nothing is removed before the broker
confirmed it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from injector.config import Broker
from injector.errors import BrokerUnavailable, PublishFailed
from injector.events import FileClosed

log = logging.getLogger(__name__)

# Broker down, connection lost, confirms missing, unroutable: all worth another try later.
RETRYABLE = (PublishFailed, BrokerUnavailable, OSError)


class Sink(Protocol):
    def publish(self, events: Sequence[FileClosed]) -> object: ...

    def close(self) -> None: ...


def daq_publisher(broker: Broker) -> Sink:
    """A DaqPublisher making one connection attempt: the announcer's retry owns the backoff and stays
    stoppable, instead of waiting out the connection's own attempts."""
    from producers.publish import DaqPublisher

    return DaqPublisher(broker.model_copy(update={"connect_attempts": 1}))


class Announcer:
    """Pending file-closed events, published in batches with confirms; kept until confirmed."""

    def __init__(self, broker: Broker, *, batch_size: int = 500, window: float = 0.2, max_wait: float = 30.0,
                 idle_close: float = 10.0, connect: Callable[[Broker], Sink] = daq_publisher,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._broker = broker
        self._batch_size = batch_size
        self._window = window
        self._max_wait = max_wait
        self._idle_close = idle_close  # below the broker heartbeat: an idle connection is closed, not lost
        self._connect = connect
        self._clock = clock
        self._sink: Sink | None = None
        self._pending: list[FileClosed] = []
        self._oldest: float | None = None
        self._last_use = clock()

    @property
    def pending(self) -> list[FileClosed]:
        return list(self._pending)

    def add(self, event: FileClosed) -> None:
        if not self._pending:
            self._oldest = self._clock()
        self._pending.append(event)

    def due(self) -> bool:
        """A batch is full, or the oldest pending event has waited the window."""
        if not self._pending:
            return False
        return len(self._pending) >= self._batch_size or self._clock() - (self._oldest or 0.0) >= self._window

    def flush(self, stop: threading.Event) -> bool:
        """Publish every pending event, retrying with backoff until done or `stop` is set.
        False when events are still pending (they are kept)."""
        return self._retrying(stop_when_event_set(stop), stop.wait)

    def flush_final(self, timeout: float) -> bool:
        """Publish every pending event, retrying for at most about `timeout` seconds (at shutdown)."""
        return self._retrying(stop_after_delay(timeout), time.sleep)

    def idle(self) -> None:
        """Close the connection once unused for a while (nothing services its heartbeats meanwhile)."""
        if self._sink is not None and not self._pending and self._clock() - self._last_use > self._idle_close:
            self._drop_sink()

    def close(self) -> None:
        self._drop_sink()

    def _retrying(self, stop: stop_base, sleep: Callable[[float], Any]) -> bool:
        if not self._pending:
            return True
        retrying = Retrying(retry=retry_if_exception_type(RETRYABLE), stop=stop, sleep=sleep, reraise=True,
                            wait=wait_random_exponential(multiplier=0.5, max=self._max_wait),
                            before_sleep=self._log_retry)
        try:
            retrying(self._publish_pending)
        except RETRYABLE as exc:
            log.error("%d file-closed event(s) not published, kept pending: %s", len(self._pending), exc)
            return False
        return True

    def _publish_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self._batch_size]
            try:
                if self._sink is None:
                    self._sink = self._connect(self._broker)
                self._sink.publish(batch)
            except BaseException:
                self._drop_sink()  # a fresh connection for the next attempt
                raise
            del self._pending[: len(batch)]
            self._last_use = self._clock()
            for e in batch:
                # event_id rides as a context field: text logs end in [event_id=...], JSON logs carry it
                log.info("announced %s size=%d adler32=%s", e.path, e.size, e.adler32,
                         extra={"event_id": str(e.event_id)})
        self._oldest = None

    def _drop_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            with contextlib.suppress(Exception):
                sink.close()

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("broker unavailable (%s): %d event(s) kept, retry %d in %.1f s", exc, len(self._pending),
                    state.attempt_number, wait)
