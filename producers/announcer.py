"""Batched hand-over of file-closed events to the durable outbox, never dropping one.

Events are gathered for a short window (or until a batch is full) and written together to the outbox through
DaqPublisher (one transaction per batch), whose background drainer publishes them with confirms and retries while
the broker is down (`producers.drainer`). While the outbox cannot take them (full, unwritable) they stay pending in
memory and the hand-over is retried with jittered backoff (tenacity) until it succeeds or the caller stops.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
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

from injector.config import Broker, OutboxSettings
from injector.errors import BrokerUnavailable, OutboxFull, PublishFailed
from injector.events import FileClosed
from injector.signing import Keyring
from injector.topology import Routes
from producers.outbox import Drained

log = logging.getLogger(__name__)

# The outbox full or busy past its timeout (or, for another sink, the broker down): worth another try later.
RETRYABLE = (OutboxFull, sqlite3.OperationalError, PublishFailed, BrokerUnavailable, OSError)


class Sink(Protocol):
    """Where batches go (DaqPublisher): it keeps what it took until the broker confirmed it."""

    def publish(self, events: Sequence[FileClosed]) -> object: ...

    def flush(self, timeout: float) -> Drained: ...

    def waiting(self) -> list[FileClosed]: ...

    def close(self) -> None: ...


def daq_publisher(broker: Broker, outbox: OutboxSettings | None = None, max_wait: float = 30.0,
                  routes: Routes | None = None, keyring: Keyring | None = None) -> Sink:
    """A DaqPublisher draining in the background; its close leaves at once what waits in the outbox (the watcher
    flushes for the time it has first)."""
    from producers.publish import DaqPublisher

    return DaqPublisher(broker, outbox=outbox, routes=routes, keyring=keyring, max_wait=max_wait, close_timeout=0)


class Announcer:
    """Pending file-closed events, handed to the outbox in batches; kept in memory until it took them."""

    def __init__(self, broker: Broker, *, batch_size: int = 500, window: float = 0.2, max_wait: float = 30.0,
                 connect: Callable[[Broker], Sink] = daq_publisher,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._broker = broker
        self._batch_size = batch_size
        self._window = window
        self._max_wait = max_wait
        self._connect = connect
        self._clock = clock
        self._sink: Sink | None = None
        self._pending: list[FileClosed] = []
        self._oldest: float | None = None

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
        """Hand every pending event to the outbox, retrying with backoff until done or `stop` is set.
        False when events are still pending (they are kept)."""
        return self._retrying(stop_when_event_set(stop), stop.wait)

    def flush_final(self, timeout: float) -> bool:
        """Hand every pending event over, then have the broker confirm what waits, retrying for at most about
        `timeout` seconds (at shutdown). False when some are not confirmed: `pending` (not in the outbox) and
        `unconfirmed()` (in the outbox, sent by its next drain) name them."""
        deadline = time.monotonic() + timeout
        if not self._retrying(stop_after_delay(timeout), time.sleep):
            return False
        if self._sink is None:  # nothing was ever handed over
            return True
        try:
            return not self._sink.flush(max(deadline - time.monotonic(), 0.0)).left
        except RETRYABLE as exc:
            log.error("broker unavailable at shutdown: %s", exc)
            return False

    def unconfirmed(self) -> list[FileClosed]:
        """Events handed over that the broker has not confirmed yet (in the outbox)."""
        return self._sink.waiting() if self._sink is not None else []

    def open(self) -> None:
        """Make the sink now (its drainer then sends what an earlier process left in the outbox)."""
        if self._sink is None:
            self._sink = self._connect(self._broker)

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
            log.error("%d file-closed event(s) not in the outbox yet, kept pending: %s", len(self._pending), exc)
            return False
        return True

    def _publish_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self._batch_size]
            self.open()
            assert self._sink is not None
            self._sink.publish(batch)
            del self._pending[: len(batch)]
            for e in batch:
                # event_id rides as a context field: text logs end in [event_id=...], JSON logs carry it
                log.debug("in the outbox: %s", e.path, extra={"event_id": str(e.event_id)})
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
